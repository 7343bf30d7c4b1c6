"""GGUF file sizes per quant type and how far each quantized decoder strays from F16.

    python benchmarks/gguf_quant_drift.py --preset tiny            # random weights: plumbing only
    python benchmarks/gguf_quant_drift.py --model runs/demo/stage2   # the trained demo model (issue 4)

For each quant: file size, llama.cpp's tensor types (K-quants fall back on rows not % 256), and on
teacher-forced synthetic-world conversations with images (scenes the model was not trained on): top-1
agreement and mean KL(F16 || quant) of the next-token distributions at the assistant's positions. The
image rows come from the torch model for every file, so only the decoder's quantization is measured.
On random weights the logits are flat and these figures say little (DESIGN.md); judge a trained model.

Writes ``benchmarks/gguf_quant_drift_<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
QUANTS = ["F16", "Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0"]


def conversations(n: int, seed: int = 7):
    """(turns, image) pairs from the synthetic world's held-out scenes."""
    from llava_edge.data.render import render
    from llava_edge.data.synth import eval_records, scene_at

    for i in range(n):
        scene = scene_at(seed, "eval", i)
        for record in eval_records(scene, f"eval_{i:06d}.png", seed, i):
            turns = [(t["from"], t["value"]) for t in record["conversations"]]
            yield turns, render(scene)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, help="checkpoint folder (default: init --preset)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--samples", type=int, default=16)
    args = ap.parse_args()

    from llava_edge.export.gguf import export_gguf
    from llava_edge.model.build import init_checkpoint
    from llava_edge.model.templates import encode_conversation
    from llava_edge.runtimes.base import Prompt
    from llava_edge.runtimes.llamacpp_runtime import LlamaCppRuntime
    from llava_edge.runtimes.torch_runtime import TorchRuntime

    work = Path(tempfile.mkdtemp(prefix="gguf-drift-"))
    model_dir = args.model or init_checkpoint(args.preset, work / "model", seed=0)
    bundle = export_gguf(model_dir, work / "bundle", quant=QUANTS, mmproj_quant="F16")
    manifest = json.loads((bundle / "manifest.json").read_text())
    torch_rt = TorchRuntime.open(model_dir)

    prompts = []
    for turns, image in conversations(args.samples // 2):
        enc = encode_conversation(torch_rt.tokenizer, torch_rt.template, turns, torch_rt.n_image_tokens)
        embeds, key = torch_rt._encode_with_key(image)
        answer = np.array(enc.labels[1:]) != -100  # logits at t predict token t + 1
        prompts.append((Prompt(enc.input_ids, [embeds], [key]), np.append(answer, False)))

    logprobs = {}
    for q in QUANTS:
        rt = LlamaCppRuntime.open(bundle, quant=q, vision="mmproj")
        logprobs[q] = [log_softmax(rt.logits(p))[mask] for p, mask in prompts]
        rt.close()
    ref = np.concatenate(logprobs["F16"])
    result = {"model": str(args.model or f"init --preset {args.preset} (random weights)"),
              "positions": int(ref.shape[0]), "quants": {}}
    for q in QUANTS:
        comp = next(c for c in manifest["components"].values()
                    if c["format"] == "gguf" and c["file"].startswith("gguf/model-") and c["precision"] == q)
        lp = np.concatenate(logprobs[q])
        kl = (np.exp(ref) * (ref - lp)).sum(-1)
        result["quants"][q] = {
            "bytes": comp["bytes"],
            "tensor_types": comp["details"].get("tensor_types"),
            "fallback_tensors": len(comp["details"].get("fallback_tensors", [])),
            "top1_agreement_vs_F16": float(np.mean(lp.argmax(-1) == ref.argmax(-1))),
            "mean_kl_vs_F16": float(kl.mean()),
        }
    name = args.model.name if args.model else args.preset
    print(json.dumps(result, indent=2))
    (HERE / f"gguf_quant_drift_{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
