"""Every runtime on one bundle of the tiny preset, against llama.cpp alone: the runtimes' overhead.

    python benchmarks/bench_runtimes.py [--workdir /tmp/bench-runtimes] [--rounds 5] [--repeats 4]

Builds the ``tiny`` preset (random weights, seed 0), exports one bundle holding the ONNX parts (fp32)
and the GGUF files (Q8_0 decoder, F16 mmproj), then runs ``llava_edge.bench.bench`` on it with its
default targets plus torch. Writes ``benchmarks/bench_runtimes_tiny.{json,png}`` and prints the
Markdown of ``benchmarks/bench_runtimes_tiny.md`` (best-of and median tables from the same runs).

The tiny model (2 layers, 64 wide, 16 image tokens) does almost no arithmetic, so what is measured is
each runtime's fixed cost per call — the overhead a bigger model pays on top of its arithmetic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_bundle(workdir: Path) -> tuple[Path, Path]:
    from llava_edge.export.gguf import export_gguf
    from llava_edge.export.onnx import export_onnx
    from llava_edge.model.build import init_checkpoint

    model, bundle = workdir / "tiny", workdir / "bundle"
    if not (model / "config.json").is_file():
        init_checkpoint("tiny", model, seed=0)
    if not (bundle / "manifest.json").is_file():
        export_onnx(model, bundle, "fp32", progress=False, overwrite=True)
        export_gguf(model, bundle, quant="Q8_0", mmproj_quant="F16", extend=True)
    return model, bundle


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-runtimes"))
    parser.add_argument("--repeats", type=int, default=4, help="runs per target and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over all targets")
    parser.add_argument("--n-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per target")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()

    from llava_edge.bench import bench, default_targets

    model, bundle = build_bundle(args.workdir)
    targets = default_targets(bundle, model)
    command = "python benchmarks/bench_runtimes.py " + " ".join(sys.argv[1:])
    report = bench(bundle, targets, n_tokens=args.n_tokens, repeats=args.repeats, rounds=args.rounds,
                   threads=args.threads, model_dir=model, statistic="min", timeout=args.timeout,
                   command=command, progress=lambda line: print(line, file=sys.stderr, flush=True))
    median = report.with_statistic("median")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_runtimes_tiny.json").write_text(report.to_json())
    from llava_edge.bench.report import plot

    plot(report, args.out / "bench_runtimes_tiny.png")
    print("## best of the runs\n\n" + report.markdown())
    print("## median of the runs\n\n" + median.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
