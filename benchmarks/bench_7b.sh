#!/usr/bin/env bash
# Speed and size of the llava-1.5-7b architecture exported --int4 (random fp16 weights: the figures
# are speed and size only, never accuracy), every runtime through `llava-edge bench`.
#
#   . .venv/bin/activate && bash benchmarks/bench_7b.sh [WORKDIR]   # default /tmp/llava7b; needs ~35 GB of disk
#
# 1. a random-weight fp16 checkpoint of the preset, written shard by shard (13.2 GiB);
# 2. `llava-edge export --int4` to ONNX (streamed decoder, int4 symmetric block 16) + GGUF (Q4_K_M,
#    mmproj F16), drift skipped (random weights have nothing to drift from);
# 3. `llava-edge bench` on onnx, llamacpp (ONNX vision) and raw llama.cpp (its own mmproj path),
#    16 decoded tokens, one run after a warm-up. Writes benchmarks/bench_7b/{bench.json,md,png}.
set -euo pipefail
WORK=${1:-/tmp/llava7b}
HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_WAIT_POLICY=PASSIVE
mkdir -p "$WORK"
if [ ! -f "$WORK/model/config.json" ]; then
  python - "$WORK/model" <<'PY'
import sys, time
sys.path.insert(0, "benchmarks")
from onnx_scale_7b import write_random_checkpoint
start = time.perf_counter()
write_random_checkpoint("llava-1.5-7b", __import__("pathlib").Path(sys.argv[1]))
print(f"checkpoint written in {time.perf_counter() - start:.0f} s")
PY
fi
/usr/bin/time -v llava-edge export "$WORK/model" --int4 --out "$WORK/bundle-int4" --no-drift --force \
  2> >(tee "$WORK/export.log" >&2)
llava-edge bench "$WORK/bundle-int4" -r onnx -r llamacpp -r raw-llamacpp --n-tokens 16 --repeats 1 \
  --out "$HERE/bench_7b"
