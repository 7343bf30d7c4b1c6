"""Training throughput per stage on this machine: samples/s and tokens/s of optimizer steps.

    python benchmarks/bench_train.py                       # demo preset, synthetic world, both stages
    python benchmarks/bench_train.py --preset tiny --steps 6 --threads 1 2
    python benchmarks/bench_train.py --out benchmarks/train_results.json

Each configuration runs ``llava_edge.train.train`` for ``--steps`` optimizer steps of global batch 32
(8 per micro-batch, the demo recipes' micro-batch, x 4 accumulated), fp32, one process. The first step is
warm-up; throughput is measured from the end of step 1 to the end of the last step, so loading,
checkpoint writing and the final save are not counted. tokens/s counts non-padding input tokens
(64 image tokens per sample included). The machine is shared: the load average before and after
each run is recorded with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback


class StepClock(TrainerCallback):
    """Wall time and tokens seen at the end of every optimizer step."""

    def __init__(self):
        self.marks: list[tuple[float, int, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), state.global_step, state.num_input_tokens_seen))


STAGES = {
    "stage1": dict(stage=1, data="stage1.json", tune="projector", learning_rate=1e-3),
    "stage2-full": dict(stage=2, data="stage2.json", tune="full", learning_rate=2e-5),
    "stage2-lora": dict(stage=2, data="stage2.json", tune="lora", learning_rate=2e-4, lora_r=64, lora_alpha=128),
}


def bench_one(model: Path, world: Path, work: Path, name: str, threads: int, steps: int,
              per_device: int, global_batch: int, checkpointing: bool) -> dict:
    from llava_edge.train import train

    cfg = dict(STAGES[name])
    stage, data = cfg.pop("stage"), cfg.pop("data")
    out = work / f"{name}-t{threads}"
    clock = StepClock()
    load_before = os.getloadavg()
    result = train(stage, model, world / data, out, global_batch_size=global_batch,
                   per_device_batch_size=per_device, max_steps=steps, save_steps=10_000, precision="fp32",
                   gradient_checkpointing=checkpointing, threads=threads, progress=False,
                   callbacks=(clock,), **cfg)
    load_after = os.getloadavg()
    (t0, s0, tok0), (t1, s1, tok1) = clock.marks[0], clock.marks[-1]
    seconds = t1 - t0
    samples = (s1 - s0) * global_batch
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".run"), ignore_errors=True)
    return {
        "stage": name, "threads": threads, "steps_timed": s1 - s0, "global_batch": global_batch,
        "per_device_batch": per_device, "gradient_checkpointing": checkpointing,
        "seconds": round(seconds, 3), "samples_per_s": round(samples / seconds, 2),
        "tokens_per_s": round((tok1 - tok0) / seconds, 1),
        "tokens_per_sample": round((tok1 - tok0) / samples, 1),
        "s_per_step": round(seconds / (s1 - s0), 3),
        "final_loss": round(result.losses[-1], 4),
        "trainable_parameters": result.trainable["trainable"],
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--model", default=None, help="model folder (default: init the preset, random weights)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--per-device", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from llava_edge.data.synth import synth
    from llava_edge.model.build import init_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        preset_size = {"tiny": 32, "demo": 64}.get(args.preset, 64)
        world = synth(work / "world", n=max(64, args.steps * args.global_batch // 4 + 8), seed=0,
                      image_size=preset_size, n_eval=0).out_dir
        model = Path(args.model) if args.model else init_checkpoint(args.preset, work / "model", seed=0)
        rows = []
        for name in args.stages:
            for threads in args.threads:
                row = bench_one(model, world, work, name, threads, args.steps, args.per_device,
                                args.global_batch, args.gradient_checkpointing)
                rows.append(row)
                print(f"{name:12} threads {threads}: {row['samples_per_s']:7.2f} samples/s "
                      f"{row['tokens_per_s']:9.1f} tokens/s ({row['s_per_step']:.2f} s/step, "
                      f"{row['tokens_per_sample']:.0f} tokens/sample, load {row['load_average_before'][0]:.1f}"
                      f"->{row['load_average_after'][0]:.1f})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "note": "shared development machine: other engineers' jobs run at the same time"},
        "preset": args.preset, "model": str(args.model or f"init_checkpoint({args.preset!r}) random weights"),
        "precision": "fp32", "date": time.strftime("%Y-%m-%d %H:%M"),
        "results": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
