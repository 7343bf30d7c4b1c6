#!/usr/bin/env bash
# Speed and size of the trained demo model's --int4 bundle on every runtime, torch included, against
# raw llama.cpp on the same GGUF (`llava-edge bench`). Run `make demo` (or `llava-edge demo`) first:
# it leaves the model in runs/demo/stage2 and the bundle in runs/demo/bundle-int4.
#
#   . .venv/bin/activate && bash benchmarks/bench_demo.sh [MODEL] [BUNDLE]   # writes benchmarks/bench_demo/{bench.json,md,png}
set -euo pipefail
MODEL=${1:-runs/demo/stage2}
BUNDLE=${2:-runs/demo/bundle-int4}
HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_WAIT_POLICY=PASSIVE
llava-edge bench "$BUNDLE" --model "$MODEL" -r torch -r onnx -r llamacpp -r "llamacpp?vision=mmproj" -r raw-llamacpp \
  --n-tokens 32 --repeats 5 --rounds 2 --out "$HERE/bench_demo"
