#!/usr/bin/env bash
# The drift report on the trained demo model (issue 7): torch fp32 reference; torch fp16, ONNX
# fp16/int8/int4 and GGUF F16/Q8_0/Q4_0/Q4_K_M candidates; llama.cpp's own mmproj encoder as a
# finding (the CLS-order defect); noise floor = the reference run again; attribution on.
#
#   llava-edge demo --no-bench                       # trains runs/demo/stage2 (cached)
#   bash benchmarks/drift_demo.sh                    # -> benchmarks/drift-demo/{report.json,report.md,plots/}
#
# Arguments: MODEL (runs/demo/stage2), EVAL (runs/demo/world/eval.json), BUNDLES (runs/drift-bundles),
# OUT (benchmarks/drift-demo).
set -euo pipefail
M=${1:-runs/demo/stage2}
EVAL=${2:-runs/demo/world/eval.json}
B=${3:-runs/drift-bundles}
OUT=${4:-benchmarks/drift-demo}

# fp16 bundle: ONNX fp16 + every GGUF decoder quant + mmproj F16 (llama.cpp reads the ONNX vision side).
[ -f "$B/fp16/manifest.json" ] || llava-edge export "$M" --out "$B/fp16" --formats onnx,gguf --fp16 \
  --quant F16 --quant Q8_0 --quant Q4_0 --quant Q4_K_M --no-drift
[ -f "$B/int8/manifest.json" ] || llava-edge export "$M" --out "$B/int8" --formats onnx --int8 --no-drift
[ -f "$B/int4/manifest.json" ] || llava-edge export "$M" --out "$B/int4" --formats onnx --int4 --no-drift

llava-edge drift --reference "fp32=torch:$M" \
  --candidate "torch-fp16=torch:$M?dtype=float16" \
  --candidate "onnx-fp16=onnx:$B/fp16" \
  --candidate "onnx-int8=onnx:$B/int8" \
  --candidate "onnx-int4=onnx:$B/int4" \
  --candidate "gguf-F16=llamacpp:$B/fp16?quant=F16" \
  --candidate "gguf-Q8_0=llamacpp:$B/fp16?quant=Q8_0" \
  --candidate "gguf-Q4_0=llamacpp:$B/fp16?quant=Q4_0" \
  --candidate "gguf-Q4_K_M=llamacpp:$B/fp16?quant=Q4_K_M" \
  --candidate "gguf-F16-mmproj=llamacpp:$B/fp16?quant=F16&vision=mmproj" \
  --eval "$EVAL" --out "$OUT"
