"""Importance-matrix quantization from multimodal calibration: drift vs F16 with and without it.

    python benchmarks/gguf_imatrix.py                            # demo preset (see "model" below)
    python benchmarks/gguf_imatrix.py --model runs/demo-recipe/stage2 --name demo-trained

1. model: ``--model``; else the pretrained demo base (``llava_edge.pretrain.base.build_demo_base``)
   when that module and its committed assets exist; else ``init_checkpoint("demo")``: random weights,
   whose flat logits make the comparison weak (the result says which one ran).
2. world: ``synth`` training scenes (calibration) and held-out eval scenes (measurement).
3. imatrix: :func:`compute_imatrix` on ``--calib`` conversations of ``stage2.json`` (train scenes,
   images through the vision tower + projector); saved as ``imatrix.gguf``.
4. files: F16, Q4_0 and Q4_K_M from llama.cpp's quantizer: without an imatrix, with it, and — the
   control — with a *uniform* importance (all ones), which runs llama.cpp's weighted rounding code
   without any information from the calibration: what the imatrix adds is "+imatrix" vs "+uniform".
5. drift: ``eval.json`` conversations (held-out scenes: image, question, gold answer) teacher-forced
   through llama.cpp; the image rows come from the torch model for every file, so only the decoder's
   quantization is measured. Mean KL(F16 || quant) and top-1 agreement with F16, at the answer
   positions and at every position that predicts a text token.
6. weight error: per quantized decoder weight, the importance-weighted relative error
   ``sum_ij w_j (W_ij - Q_ij)^2 / sum_ij w_j W_ij^2`` with ``w`` from an imatrix of the *eval*
   conversations (held out from the calibration), the quantity the imatrix is meant to lower.

Writes ``benchmarks/gguf_imatrix_<name>.json``; the note is ``benchmarks/gguf_imatrix.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
QUANTS = ["Q4_0", "Q4_K_M"]


def base_model(folder: Path, preset: str) -> tuple[Path, str]:
    """The pretrained demo base when its module and committed assets are there, else random weights."""
    from llava_edge.errors import ModelError
    from llava_edge.model.build import init_checkpoint

    try:
        from llava_edge.pretrain.base import build_demo_base

        return (Path(build_demo_base(folder, seed=0)),
                "build_demo_base: pretrained tower + LM, random projector")
    except (ImportError, ModelError) as exc:  # no module yet, or no committed assets yet
        why = str(exc).split(";")[0]
        return (init_checkpoint(preset, folder, seed=0),
                f"init_checkpoint({preset!r}): random weights (demo base unavailable: {why})")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def eval_prompts(torch_rt, eval_json: Path, n: int):
    """(Prompt, answer mask, text mask) of the first ``n`` eval records; masks over positions t
    whose logits predict token t + 1."""
    from llava_edge.model.templates import encode_conversation
    from llava_edge.runtimes.base import Prompt
    from llava_edge.train.data import open_records

    records = open_records(eval_json, None, skip_bad=False)
    out = []
    for i in range(min(n, len(records))):
        r = records[i]
        enc = encode_conversation(torch_rt.tokenizer, torch_rt.template, r.turns, torch_rt.n_image_tokens)
        embeds, key = torch_rt._encode_with_key(r.image)
        ids = np.array(enc.input_ids)
        answer = np.append(np.array(enc.labels[1:]) != -100, False)
        text = np.append(ids[1:] != torch_rt.image_token_id, False)
        out.append((Prompt(ids, [embeds], [key]), answer, text))
    records.close()
    return out


def weight_error(f16: Path, quantized: Path, importance) -> dict[str, float]:
    import gguf
    from gguf.quants import dequantize

    src = {t.name: t for t in gguf.GGUFReader(str(f16)).tensors}
    out = {}
    for t in gguf.GGUFReader(str(quantized)).tensors:
        if t.name not in importance.sums:
            continue
        shape = tuple(reversed([int(x) for x in t.shape]))
        w = np.array(src[t.name].data).astype(np.float64).reshape(shape)
        q = dequantize(np.array(t.data), t.tensor_type).astype(np.float64).reshape(shape)
        imp = importance.values(t.name).astype(np.float64)
        out[t.name] = float((imp * (w - q) ** 2).sum() / (imp * w ** 2).sum())
    return out


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "loadavg_1min": round(os.getloadavg()[0], 2),
            "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, help="checkpoint folder (default: the demo base, see above)")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--name", help="result name (default: the model folder's or the preset's)")
    ap.add_argument("--train-scenes", type=int, default=64)
    ap.add_argument("--eval-scenes", type=int, default=50)
    ap.add_argument("--calib", type=int, default=64, help="calibration conversations from stage2.json")
    ap.add_argument("--eval", type=int, default=100, help="eval conversations from eval.json")
    ap.add_argument("--work", type=Path, help="work folder (default: a new temporary one)")
    args = ap.parse_args()

    from llava_edge.data.synth import synth
    from llava_edge.export.gguf import export_gguf
    from llava_edge.quant.imatrix import ImportanceMatrix, compute_imatrix, save_imatrix, summary
    from llava_edge.runtimes.llamacpp_runtime import LlamaCppRuntime
    from llava_edge.runtimes.torch_runtime import TorchRuntime

    work = args.work or Path(tempfile.mkdtemp(prefix="gguf-imatrix-"))
    work.mkdir(parents=True, exist_ok=True)
    timings = {}
    started = time.perf_counter()
    if args.model:
        model_dir, kind = args.model, "given checkpoint"
    elif (work / "model" / "config.json").is_file():
        model_dir, kind = work / "model", json.loads((work / "kind.json").read_text())
    else:
        model_dir, kind = base_model(work / "model", args.preset)
        (work / "kind.json").write_text(json.dumps(kind))
    world = work / "world"
    if not world.exists():
        synth(world, n=args.train_scenes, seed=0, image_size=64, n_eval=args.eval_scenes)
    timings["model_and_world_s"] = round(time.perf_counter() - started, 1)

    t = time.perf_counter()
    imatrix = compute_imatrix(model_dir, world / "stage2.json", n_samples=args.calib)
    timings["imatrix_s"] = round(time.perf_counter() - t, 1)
    imatrix_file = save_imatrix(imatrix, work / "imatrix.gguf")
    heldout = compute_imatrix(model_dir, world / "eval.json", n_samples=args.eval)

    t = time.perf_counter()
    plain = export_gguf(model_dir, work / "plain", quant=["F16", *QUANTS], mmproj_quant="F16", overwrite=True)
    weighted = export_gguf(model_dir, work / "weighted", quant=QUANTS, mmproj_quant="F16", overwrite=True,
                           imatrix=imatrix_file)
    ones = ImportanceMatrix({n: np.ones_like(v) for n, v in imatrix.sums.items()},
                            {n: np.ones(1) for n in imatrix.names}, ["uniform"], 1, 1)
    uniform = export_gguf(model_dir, work / "uniform", quant=QUANTS, mmproj_quant="F16", overwrite=True,
                          imatrix=ones)
    timings["export_s"] = round(time.perf_counter() - t, 1)

    torch_rt = TorchRuntime.open(model_dir)
    prompts = eval_prompts(torch_rt, world / "eval.json", args.eval)
    files = {"F16": (plain, "F16")}
    for q in QUANTS:
        files[q] = (plain, q)
        files[f"{q}+imatrix"] = (weighted, q)
        files[f"{q}+uniform"] = (uniform, q)
    logprobs = {}
    t = time.perf_counter()
    for label, (bundle, q) in files.items():
        with LlamaCppRuntime.open(bundle, quant=q, n_threads=1) as rt:  # spinning threads: shared box
            logprobs[label] = [log_softmax(rt.logits(p)) for p, _, _ in prompts]
    timings["drift_s"] = round(time.perf_counter() - t, 1)

    def drift(label: str, which: int) -> dict:
        ref = np.concatenate([lp[m[which]] for lp, m in zip(logprobs["F16"], _masks(prompts))])
        got = np.concatenate([lp[m[which]] for lp, m in zip(logprobs[label], _masks(prompts))])
        kl = (np.exp(ref) * (ref - got)).sum(-1)
        return {"positions": int(ref.shape[0]), "mean_kl_vs_F16": float(kl.mean()),
                "top1_agreement_vs_F16": float(np.mean(got.argmax(-1) == ref.argmax(-1)))}

    manifest = {b: json.loads((b / "manifest.json").read_text()) for b in (plain, weighted, uniform)}
    results = {}
    for label, (bundle, q) in files.items():
        comp = next(c for c in manifest[bundle]["components"].values()
                    if c["format"] == "gguf" and c["file"].startswith("gguf/model-") and c["precision"] == q)
        entry = {"bytes": comp["bytes"], "tensor_types": comp["details"].get("tensor_types"),
                 "answer_positions": drift(label, 0), "text_positions": drift(label, 1)}
        if q != "F16":
            errors = weight_error(plain / "gguf" / "model-F16.gguf", bundle / comp["file"], heldout)
            entry["heldout_weighted_rel_error"] = {"mean": float(np.mean(list(errors.values()))),
                                                   "per_tensor": errors}
        results[label] = entry
    ref = np.concatenate([lp[text] for lp, (_, text) in zip(logprobs["F16"], _masks(prompts))])
    top2 = np.sort(ref, -1)[:, -2:]
    entropy = -(np.exp(ref) * ref).sum(-1)
    flatness = {"text_positions": int(ref.shape[0]),
                "median_top1_minus_top2_logprob": float(np.median(top2[:, 1] - top2[:, 0])),
                "mean_entropy_over_log_vocab": float(entropy.mean() / np.log(ref.shape[1]))}
    name = args.name or (args.model.name if args.model else args.preset)
    result = {
        "command": "python benchmarks/gguf_imatrix.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "work"),
        "model": str(args.model) if args.model else f"{args.preset}: {kind}",
        "machine": machine(), "timings": timings,
        "calibration": {**summary(imatrix), "datasets": ["stage2.json (train scenes)"]},
        "eval": {"records": len(prompts), "heldout_imatrix": "eval.json conversations (held-out scenes)",
                 "f16_flatness": flatness},
        "results": results,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "results"}, indent=2))
    for label, entry in results.items():
        a, x = entry["answer_positions"], entry["text_positions"]
        err = entry.get("heldout_weighted_rel_error", {}).get("mean", 0.0)
        print(f"{label:15s} answer KL {a['mean_kl_vs_F16']:.5f} top1 {a['top1_agreement_vs_F16']:.3f} | "
              f"text KL {x['mean_kl_vs_F16']:.5f} top1 {x['top1_agreement_vs_F16']:.3f} | "
              f"weight err {err:.5f}")
    (HERE / f"gguf_imatrix_{name}.json").write_text(json.dumps(result, indent=2) + "\n")


def _masks(prompts):
    return [(answer, text) for _, answer, text in prompts]


if __name__ == "__main__":
    main()
