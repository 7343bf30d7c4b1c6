"""ONNX bundles of one model at every precision: size, speed, and drift from fp32.

    python benchmarks/onnx_bench.py MODEL_DIR [--workdir /tmp/onnx-bench] [--samples 16]

Exports MODEL_DIR once in fp32 (traced, checked against torch), converts that bundle to fp16, int8
and int4 (``convert_bundle``), then for each bundle measures: bytes on disk, image encode, prefill and
decode times in the onnx runtime, and over ``--samples`` synthetic image + question prompts the
teacher-forced top-1 agreement and mean KL(fp32 || precision) of the next-token distributions.
Drift is meaningful on a trained model only (random weights give flat logits; DESIGN.md).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def bundles(model_dir: Path, workdir: Path) -> dict[str, Path]:
    from llava_edge.export.onnx import convert_bundle, export_onnx

    out = {"fp32": workdir / "fp32"}
    if not (out["fp32"] / "manifest.json").is_file():
        export_onnx(model_dir, out["fp32"], "fp32", overwrite=True)
    for precision in ("fp16", "int8", "int4"):
        out[precision] = workdir / precision
        if not (out[precision] / "manifest.json").is_file():
            convert_bundle(out["fp32"], out[precision], precision, overwrite=True)
    return out


def prompts(runtime, n: int):
    """Synthetic-world eval questions with their images, as (prompt, image) pairs."""
    from llava_edge.data.render import render
    from llava_edge.data.synth import eval_records, scene_at
    from llava_edge.model.templates import encode_conversation
    from llava_edge.runtimes.base import Prompt

    out = []
    for i in range(n):
        scene = scene_at(0, "eval", i)
        record = eval_records(scene, f"eval_{i}.png", 0, i)[i % 2]
        image = render(scene)
        ids = encode_conversation(runtime.tokenizer, runtime.template, record["conversations"],
                                  runtime.n_image_tokens).input_ids
        out.append((ids, image))
    return [(Prompt(np.array(ids), [runtime.encode_image(image)]), image) for ids, image in out]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def measure(bundle: Path, reference_logits: list[np.ndarray] | None, n: int) -> tuple[dict, list]:
    from llava_edge.runtimes.onnx_runtime import OnnxRuntime

    manifest = json.loads((bundle / "manifest.json").read_text())
    size = sum(c["bytes"] + sum(c["details"].get("extra_bytes", {}).values())
               for c in manifest["components"].values())
    rt = OnnxRuntime.open(bundle, verify=False)
    samples = prompts(rt, n)
    image = samples[0][1]
    rt._image_cache.clear()
    t = time.perf_counter()
    rt.encode_image(image)
    encode = time.perf_counter() - t
    prompt = samples[0][0]
    t = time.perf_counter()
    rt._prefill(prompt, 0)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for k in range(32):
        rt._step(10 + k)
    decode = time.perf_counter() - t
    logits = [rt.logits(p) for p, _ in samples]
    result = {"mib": round(size / 2**20, 3), "image_encode_ms": round(encode * 1e3, 1),
              "prefill_ms": round(prefill * 1e3, 1), "prefill_tokens": len(prompt.input_ids),
              "decode_tokens_per_s": round(32 / decode, 1),
              "components": {k: c["precision"] for k, c in manifest["components"].items()}}
    if reference_logits is not None:
        agree, kl = [], []
        for ref, got in zip(reference_logits, logits):
            agree.append(np.mean(ref.argmax(-1) == got.argmax(-1)))
            lp, lq = log_softmax(ref), log_softmax(got)
            kl.append(np.mean((np.exp(lp) * (lp - lq)).sum(-1)))
        result["top1_agreement"] = round(float(np.mean(agree)), 4)
        result["mean_kl"] = float(f"{np.mean(kl):.3g}")
    return result, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnx-bench"))
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    paths = bundles(args.model_dir, args.workdir / args.model_dir.name)
    results, reference = {}, None
    for precision, path in paths.items():
        results[precision], logits = measure(path, reference, args.samples)
        reference = reference if reference is not None else logits
    print(json.dumps({"model": str(args.model_dir), "results": results}, indent=2))


if __name__ == "__main__":
    main()
