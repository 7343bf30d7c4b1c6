"""``python -m llava_edge.train``: the training entry for launchers that need a module or script.

    torchrun --nproc-per-node 8 -m llava_edge.train --stage 1 --model M --data D --out O --recipe R
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m llava_edge.train --stage 2 ...

Extra ``--set FIELD=VALUE`` options override recipe fields (VALUE is parsed as JSON when it can be).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from llava_edge.errors import UserError


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_edge.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True)
    parser.add_argument("--model", required=True, help="LLaVA model folder to start from")
    parser.add_argument("--data", required=True, help="LLaVA JSON/JSONL training file")
    parser.add_argument("--out", required=True, help="folder the trained model is written to")
    parser.add_argument("--recipe", default=None, help="recipe file (configs/*.toml); default LLaVA-1.5")
    parser.add_argument("--run-dir", default=None, help="checkpoints and logs (default OUT.run)")
    parser.add_argument("--no-resume", action="store_true", help="refuse to continue an earlier run")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a recipe field (repeatable)")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = _value(value)

    import logging

    from llava_edge.train.run import train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = train(args.stage, args.model, args.data, args.out, args.recipe, run_dir=args.run_dir,
                       resume=not args.no_resume and "auto", progress=not args.no_progress, **overrides)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.history and os.environ.get("RANK", "0") == "0":
        print(json.dumps({"out": str(result.out), "steps": result.history[-1]["step"],
                          "final_loss": result.history[-1]["loss"],
                          "train_runtime": result.metrics.get("train_runtime")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
