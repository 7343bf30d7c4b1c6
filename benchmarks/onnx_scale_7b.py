"""Can a LLaVA-1.5-7B export to ONNX int4 on a 24 GiB, 2-core laptop-class machine? Measure it.

    python benchmarks/onnx_scale_7b.py --workdir /tmp/llava7b [--preset llava-1.5-7b]

1. Writes the preset as a random-weight fp16 checkpoint, one safetensors shard at a time (building
   the model in memory first would itself need 28 GB in fp32).
2. Exports it with ``export_onnx(..., "int4")`` in a child process (the decoder streamed: traced on
   the meta device, each weight read and quantized alone) and records wall time and peak RSS.
3. Opens the bundle in the onnx runtime and times image encode, prefill and decode.

Prints one JSON object; benchmarks/onnx_results.md records the figures measured here.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_random_checkpoint(preset_name: str, out: Path, seed: int = 0, shard_bytes: int = 2 << 30) -> Path:
    """A random-weight fp16 checkpoint folder, written tensor by tensor (the memory of one shard)."""
    import torch
    from safetensors.numpy import save_file
    from transformers import LlavaForConditionalGeneration

    from llava_edge.export.onnx.streamed import CHECKPOINT_PREFIXES
    from llava_edge.model.build import SIDECAR, llava_config, make_tokenizer, preprocess_config_for
    from llava_edge.model.presets import get_preset
    from llava_edge.model.templates import get_template

    preset = get_preset(preset_name)
    tokenizer = make_tokenizer(preset)
    config = llava_config(preset, tokenizer)
    config.dtype = "float16"
    with torch.device("meta"):
        meta = LlavaForConditionalGeneration(config)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def checkpoint_key(name: str) -> str:  # the layout save_pretrained writes
        for old, new in CHECKPOINT_PREFIXES:
            if name.startswith(new):
                return old + name[len(new):]
        return name

    weight_map, shard, shard_size, n_shards, total = {}, {}, 0, 0, 0
    shapes = [(n, tuple(p.shape)) for n, p in meta.named_parameters()]

    def flush():
        nonlocal shard, shard_size, n_shards
        if shard:
            n_shards += 1
            file = f"model-{n_shards:05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
            shard, shard_size = {}, 0

    for name, shape in shapes:
        if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm" in name:
            array = np.ones(shape, np.float16) if name.endswith("weight") else np.zeros(shape, np.float16)
        else:
            array = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
        shard[checkpoint_key(name)] = array
        shard_size += array.nbytes
        total += array.nbytes
        if shard_size >= shard_bytes:
            flush()
    flush()
    # n_shards were named before their count was known: rename to the -of- form transformers expects
    final = {}
    for i in range(1, n_shards + 1):
        old = f"model-{i:05d}.safetensors"
        new = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
        (out / old).rename(out / new)
        final[old] = new
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    chat = get_template("vicuna_v1")
    tokenizer.save(out, chat_template=chat.jinja)
    sidecar = {"template": chat.name, "preprocess": preprocess_config_for(config).to_dict(),
               "preset": preset.name, "seed": seed}
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    return out


def export_in_child(model_dir: Path, bundle: Path, precision: str) -> dict:
    code = ("import sys; from llava_edge.export.onnx import export_onnx; "
            "export_onnx(sys.argv[1], sys.argv[2], sys.argv[3], overwrite=True)")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(model_dir), str(bundle), precision])
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if done.returncode != 0:
        raise SystemExit(f"export failed with exit code {done.returncode}")
    return {"export_s": round(seconds, 1), "export_peak_rss_gib": round(peak_kib / 2**20, 2)}


def run_bundle(bundle: Path, new_tokens: int = 16) -> dict:
    from PIL import Image

    from llava_edge.runtimes.base import Prompt
    from llava_edge.runtimes.onnx_runtime import OnnxRuntime

    t = time.perf_counter()
    rt = OnnxRuntime.open(bundle, verify=False)
    opened = time.perf_counter() - t
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 500, 3), dtype=np.uint8))
    t = time.perf_counter()
    embeds = rt.encode_image(image)
    encode = time.perf_counter() - t
    ids = [rt.tokenizer.bos_id] + [rt.image_token_id] * rt.n_image_tokens + rt.tokenizer.encode(
        "USER: describe the image. ASSISTANT:")
    prompt = Prompt(np.array(ids), [embeds])
    t = time.perf_counter()
    rt._prefill(prompt, 0)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for token in range(new_tokens):
        rt._step(100 + token)
    decode = time.perf_counter() - t
    return {"open_s": round(opened, 1), "image_encode_s": round(encode, 2), "prefill_tokens": len(ids),
            "prefill_s": round(prefill, 2), "decode_tokens_per_s": round(new_tokens / decode, 2),
            "runtime_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llava-edge-scale"))
    parser.add_argument("--preset", default="llava-1.5-7b")
    parser.add_argument("--precision", default="int4")
    args = parser.parse_args()
    model_dir, bundle = args.workdir / f"{args.preset}-random-fp16", args.workdir / f"{args.preset}-onnx-{args.precision}"
    result: dict = {"preset": args.preset, "precision": args.precision}
    if not (model_dir / "model.safetensors.index.json").is_file():
        t = time.perf_counter()
        write_random_checkpoint(args.preset, model_dir)
        result["write_checkpoint_s"] = round(time.perf_counter() - t, 1)
    result["checkpoint_gib"] = round(sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**30, 2)
    result.update(export_in_child(model_dir, bundle, args.precision))
    manifest = json.loads((bundle / "manifest.json").read_text())
    result["components"] = {
        k: {"precision": c["precision"],
            "gib": round((c["bytes"] + sum(c["details"].get("extra_bytes", {}).values())) / 2**30, 3)}
        for k, c in manifest["components"].items()}
    result.update(run_bundle(bundle))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
