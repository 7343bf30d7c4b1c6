"""Which int4 settings of the ONNX decoder stray least from FP16 on the trained demo model (issue 5).

    python benchmarks/onnx_int4_variants.py runs/demo/stage2 runs/demo/world/eval.json \
        --work runs/onnx-int4-variants --out benchmarks/onnx_int4_variants.json

Exports the decoder at int4 with each variant below (everything else as ``--int4`` does it: vision,
projector and embeddings fp16), and runs the drift suite end to end against the torch fp32 model
on the whole eval set, no attribution passes. Prints and writes KL, top-1, accuracy, size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS = {
    "default (sym, block 32)": {},
    "asymmetric, block 32": {"symmetric": False},
    "sym, block 16": {"block_size": 16},
    "hqq (asym, block 32)": {"algorithm": "hqq", "symmetric": False},
    "kquant": {"algorithm": "kquant"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("eval", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from llava_edge.drift import compare
    from llava_edge.export.onnx.export import export_onnx
    from llava_edge.quant.onnx_quant import Int4Options

    bundles, seconds = {}, {}
    for k, (name, options) in enumerate(VARIANTS.items()):
        out = args.work / f"v{k}"
        started = time.perf_counter()
        if not (out / "manifest.json").is_file():
            export_onnx(args.model, out, "int4", int4=Int4Options(**options), progress=False)
        seconds[name] = round(time.perf_counter() - started, 1)
        bundles[name] = out
    report = compare(f"fp32=torch:{args.model}", [f"v{k}=onnx:{b}" for k, b in enumerate(bundles.values())],
                     args.eval, floor=None, attribution=False)
    rows = []
    for k, name in enumerate(VARIANTS):
        m = report.result(f"v{k}").metrics
        rows.append({"variant": name, "options": VARIANTS[name], "kl_mean": m["e2e.kl_mean"],
                     "kl_p99": m["e2e.kl_p99"], "top1": m["e2e.top1"], "accuracy": m["task.accuracy"],
                     "accuracy_drop": m["task.accuracy_drop"],
                     "decoder_mib": round(sum(p.stat().st_size for p in (bundles[name] / "onnx").rglob("decoder*"))
                                          / 2**20, 2),
                     "export_s": seconds[name]})
        print(json.dumps(rows[-1]))
    args.out.write_text(json.dumps({"command": "python benchmarks/onnx_int4_variants.py " + " ".join(
        [str(args.model), str(args.eval), "--work", str(args.work), "--out", str(args.out)]),
        "n_items": report.n_items, "reference_accuracy": report.reference.metrics.get("task.accuracy"),
        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
