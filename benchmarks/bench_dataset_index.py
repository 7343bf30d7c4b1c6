"""Benchmark: index a LLaVA-1.5-mix-sized JSON file (665k records) by streaming; time and peak RSS.

    python benchmarks/bench_dataset_index.py                       # 665k records, writes dataset_index.md
    python benchmarks/bench_dataset_index.py --records 50000 --no-write

The file is generated in a temporary folder (about 1 GB, like ``llava_v1_5_mix665k.json``) and
removed afterwards. Its records mimic the mix: multi-turn short-answer VQA records, LLaVA-Instruct
conversations / detailed descriptions / reasoning with long answers, and text-only ShareGPT
records, with escapes and non-ASCII text. Each measurement runs in a fresh child process, so its
peak RSS (``resource.getrusage(...).ru_maxrss``) is its own: indexing, a full validation pass
(every record parsed and checked, image files not opened), random access, and ``json.load`` of
the whole file for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "dataset_index.md"
PROTOTYPES = 20000

WORDS = (
    "the a of in on with is are what where how many which person people man woman dog cat table "
    "street car building sign red blue green white black yellow left right top bottom front behind "
    "holding sitting standing wearing shirt hat picture image photo scene there this that these "
    "color shape number two three several large small near next to background foreground window "
    "café naïve 東京 \"quoted\" back\\slash it's room kitchen food plate pizza bus train sky tree"
).split()
SHORT_SUFFIX = "\nAnswer the question using a single word or phrase."


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def _prototype(rng: random.Random) -> tuple[bool, str]:
    """(has image, JSON of the conversations list) for one record of a LLaVA-1.5-like mix."""
    kind = rng.choices(["vqa", "conv", "detail", "reason", "sharegpt"], [62, 9, 4, 12, 6])[0]
    if kind == "vqa":  # VQAv2 / GQA / OCR-VQA / VG: many short question-answer pairs per image
        pairs = [(_text(rng, rng.randint(5, 14)) + "?" + SHORT_SUFFIX, _text(rng, rng.randint(1, 3)))
                 for _ in range(rng.randint(1, 14))]
    elif kind == "conv":
        pairs = [(_text(rng, rng.randint(6, 16)) + "?", _text(rng, rng.randint(20, 110)) + ".")
                 for _ in range(rng.randint(2, 6))]
    elif kind == "detail":
        pairs = [("Describe the following image in detail.", _text(rng, rng.randint(80, 160)) + ".")]
    elif kind == "reason":
        pairs = [(_text(rng, rng.randint(8, 20)) + "?", _text(rng, rng.randint(60, 180)) + ".")]
    else:  # ShareGPT, text only, long
        pairs = [(_text(rng, rng.randint(10, 120)), _text(rng, rng.randint(80, 400)) + "\n\n1. " + _text(rng, 30))
                 for _ in range(rng.randint(1, 5))]
    has_image = kind != "sharegpt"
    turns = []
    for i, (q, a) in enumerate(pairs):
        if i == 0 and has_image:
            q = f"<image>\n{q}" if rng.random() < 0.5 else f"{q}\n<image>"
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return has_image, json.dumps(turns, ensure_ascii=False)


def generate(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    protos = [_prototype(rng) for _ in range(PROTOTYPES)]
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i in range(n):
            has_image, convs = protos[rng.randrange(PROTOTYPES)]
            image = f'"image": "coco/train2017/{i:012d}.jpg", ' if has_image else ""
            sep = ",\n" if i else ""
            f.write(f'{sep}{{"id": "{i:012d}", {image}"conversations": {convs}}}')
        f.write("\n]\n")


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(task: str, path: str) -> dict:
    """One measurement, run in a fresh interpreter (``--child TASK PATH``)."""
    if task == "json_load":
        base, cpu = _maxrss_mib(), _cpu_s()
        t = time.perf_counter()
        with open(path, "rb") as f:
            n = len(json.load(f))
        return {"records": n, "seconds": time.perf_counter() - t, "cpu_seconds": _cpu_s() - cpu,
                "base_mib": base, "peak_mib": _maxrss_mib()}
    from llava_edge.data.dataset import LlavaDataset
    from llava_edge.data.index import build_index

    base, cpu = _maxrss_mib(), _cpu_s()
    t = time.perf_counter()
    if task == "index":
        n = len(build_index(path))
        result = {"records": n}
    elif task == "validate":
        with tempfile.TemporaryDirectory() as root:  # images are not opened: check_images="none"
            report = LlavaDataset(path, root, on_error="skip", check_images="none").report
        result = {"records": report.total, "problems": len(report.problems)}
    elif task == "random_access":
        with tempfile.TemporaryDirectory() as root:
            ds = LlavaDataset(path, root, check_images="none")
            t_index = time.perf_counter() - t
            rng = random.Random(0)
            picks = [rng.randrange(len(ds)) for _ in range(20000)]
            t, cpu = time.perf_counter(), _cpu_s()
            turns = sum(len(ds[i].turns) for i in picks)
        result = {"records": len(picks), "turns": turns, "index_seconds": t_index}
    else:
        raise SystemExit(f"unknown task {task}")
    result.update(seconds=time.perf_counter() - t, cpu_seconds=_cpu_s() - cpu, base_mib=base,
                  peak_mib=_maxrss_mib())
    return result


def run_child(task: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", task, str(path)],
        check=True, capture_output=True, text=True, cwd=HERE.parent,
        env={**os.environ, "PYTHONPATH": str(HERE.parent)},
    )
    return json.loads(out.stdout)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), no GPU, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=665_000)
    ap.add_argument("--no-json-load", action="store_true", help="skip the json.load comparison")
    ap.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS.name}")
    ap.add_argument("--child", nargs=2, metavar=("TASK", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        path = Path(tmp) / "llava_mix_like.json"
        t = time.perf_counter()
        generate(path, args.records)
        gen_s = time.perf_counter() - t
        size_mib = path.stat().st_size / 2**20
        print(f"generated {args.records} records, {size_mib:.0f} MiB in {gen_s:.1f} s", flush=True)
        load_before = os.getloadavg()[0]
        results = {}
        for task in ["index", "validate", "random_access"] + ([] if args.no_json_load else ["json_load"]):
            results[task] = r = run_child(task, path)
            print(task, json.dumps(r), flush=True)
        load_after = os.getloadavg()[0]

    ix, va, ra = results["index"], results["validate"], results["random_access"]
    rows = [("index (byte offsets, streaming)", ix),
            ("validate: index + parse and check every record (skip mode, images not opened)", va)]
    if "json_load" in results:
        rows.append(("`json.load` of the whole file (for comparison)", results["json_load"]))
    command = "python benchmarks/bench_dataset_index.py" + (
        f" --records {args.records}" if args.records != 665_000 else "") + (
        " --no-json-load" if args.no_json_load else "")
    lines = [
        "# Dataset index benchmark",
        "",
        f"Command: `{command}` (from the repository root, with the project's virtualenv active)",
        "",
        f"Machine: {machine()}",
        "",
        f"File: {args.records} records in a LLaVA-1.5-mix-like JSON array, {size_mib:.0f} MiB "
        f"({size_mib * 2**20 / args.records:.0f} bytes a record; the real `llava_v1_5_mix665k.json` "
        f"is about 1 GB), generated in {gen_s:.1f} s.",
        "",
        "Each line is a fresh process; peak RSS is its `ru_maxrss`, interpreter and imports included "
        f"(a bare interpreter with llava_edge.data imported: {ix['base_mib']:.0f} MiB).",
        "",
        f"Load average (1 min) before / after the measurements: {load_before:.1f} / {load_after:.1f} "
        f"on {os.cpu_count()} cores" + (
            " - other processes were running, so wall times are inflated; CPU seconds (user + system "
            "of the measuring process) are the steadier figure." if max(load_before, load_after) > 1.5 else "."),
        "",
        "| what | records/s (wall) | records/s (CPU) | wall s | CPU s | peak RSS (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {name} | {r['records'] / r['seconds']:,.0f} | {r['records'] / r['cpu_seconds']:,.0f} | "
              f"{r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_mib']:.0f} |" for name, r in rows]
    lines += [
        "",
        f"Random access after indexing: {ra['records']} random `dataset[i]` reads in {ra['seconds']:.2f} s "
        f"wall, {ra['cpu_seconds']:.2f} s CPU ({ra['cpu_seconds'] / ra['records'] * 1e6:.0f} µs CPU a record: "
        f"seek, read, `json.loads`, checks).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
