"""Streaming GGUF conversion of the LLaVA-1.5-7B architecture: peak RSS and time.

    python benchmarks/gguf_streaming_7b.py --work /tmp/gguf7b            # make + convert + report
    python benchmarks/gguf_streaming_7b.py --work /tmp/gguf7b --keep     # keep the 28 GB of files

1. ``make``: a checkpoint folder of the ``llava-1.5-7b`` preset with random fp16 weights, written
   tensor by tensor (names and shapes from a meta-device model: nothing is materialised, so making
   it needs about one tensor of memory too) plus config, tokenizer and sidecar.
2. ``convert``: ``export_gguf(quant="F16", mmproj_quant="F16")`` in a fresh child process; its peak
   RSS (``ru_maxrss``) and wall time are the figures. The bundle's source checksum (sha256 of the
   14 GB of weights) is timed separately, since it is I/O, not conversion.

Writes ``benchmarks/gguf_streaming_7b.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_checkpoint(folder: Path, preset_name: str = "llava-1.5-7b", seed: int = 0) -> dict:
    import torch
    from transformers import LlavaForConditionalGeneration

    from llava_edge.model.build import SIDECAR, llava_config, make_tokenizer, preprocess_config_for
    from llava_edge.model.presets import get_preset
    from llava_edge.model.templates import get_template

    preset = get_preset(preset_name)
    tokenizer = make_tokenizer(preset)
    config = llava_config(preset, tokenizer)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json_file(folder / "config.json")
    tokenizer.save(folder, chat_template=get_template("vicuna_v1").jinja)
    (folder / SIDECAR).write_text(json.dumps({
        "template": "vicuna_v1", "preprocess": preprocess_config_for(config).to_dict(),
        "preset": preset.name, "seed": seed}, indent=2))
    largest = _write_random_safetensors(folder / "model.safetensors", params, seed)
    return {"tensors": len(params), "parameters": int(sum(np.prod(s) for _, s in params)),
            "largest_tensor": largest}


def _write_random_safetensors(path: Path, params, seed: int) -> dict:
    """A valid safetensors file of fp16 values ~N(0, 0.02) written one tensor at a time."""
    header, offset, largest = {}, 0, ("", 0)
    for name, shape in params:
        nbytes = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        largest = max(largest, (name, nbytes), key=lambda x: x[1])
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in params:
            n = int(np.prod(shape))
            for start in range(0, n, 1 << 26):  # 64 M values per chunk: bounded memory
                count = min(1 << 26, n - start)
                chunk = rng.integers(-100, 101, count, dtype=np.int8).astype(np.float16)
                chunk *= np.float16(0.0002)
                chunk.tofile(f)
    return {"name": largest[0], "bytes": largest[1]}


def _hwm_mib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: after fork + exec that keeps the
    parent's peak, which here is the parent that imported torch."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def convert_child(model_dir: str, out_dir: str) -> None:
    """Runs in a fresh process: the conversion alone, then its own peak RSS."""
    from llava_edge.export.bundle import manifest_for_model
    from llava_edge.export.gguf import export_gguf

    t0 = time.perf_counter()
    manifest_for_model(model_dir)  # the source checksum: measured apart from the conversion
    t1 = time.perf_counter()
    rss_before = _hwm_mib()
    export_gguf(model_dir, out_dir, quant="F16", mmproj_quant="F16")
    t2 = time.perf_counter()
    print(json.dumps({"checksum_s": t1 - t0, "export_s": t2 - t1,
                      "peak_rss_mib": _hwm_mib(), "rss_before_export_mib": rss_before}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf7b"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--preset", default="llava-1.5-7b", help="demo: a quick check of the script")
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        convert_child(*args.child)
        return
    model_dir, out_dir = args.work / args.preset, args.work / "bundle"
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    if not (model_dir / "model.safetensors").is_file():
        made = make_checkpoint(model_dir, args.preset)
    else:
        made = {}
    make_s = time.perf_counter() - t0
    done = subprocess.run([sys.executable, __file__, "--child", str(model_dir), str(out_dir)],
                          capture_output=True, text=True, check=True)
    child = json.loads(done.stdout.strip().splitlines()[-1])
    files = {p.name: p.stat().st_size for p in sorted((out_dir / "gguf").iterdir())}
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    result = {
        "preset": f"{args.preset} (random fp16 weights)",
        "machine": f"{os.cpu_count()} CPUs, {ram_gib:.0f} GiB RAM",
        "load_average_at_start": os.getloadavg()[0],
        "checkpoint_bytes": (model_dir / "model.safetensors").stat().st_size,
        "make_checkpoint_s": round(make_s, 1) if made else None,
        **{k: v for k, v in made.items()},
        "checksum_s": round(child["checksum_s"], 1),
        "convert_s": round(child["export_s"], 1),
        "peak_rss_mib": round(child["peak_rss_mib"]),
        "rss_before_convert_mib": round(child["rss_before_export_mib"]),
        "gguf_files": files,
        "notes": [
            "peak_rss_mib: VmHWM of the converting process (imports included); the largest tensor "
            "alone is largest_tensor.bytes",
            "convert_s includes export_gguf's own source checksum (write_bundle hashes the weights "
            "again, about checksum_s) besides reading, converting and writing 14 GB",
            "timings on a shared machine: see load_average_at_start",
        ],
    }
    print(json.dumps(result, indent=2))
    name = args.preset.replace("llava-1.5-", "")
    (HERE / f"gguf_streaming_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
