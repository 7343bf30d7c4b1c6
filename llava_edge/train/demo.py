"""The demo recipe end to end: base model -> stage 1 -> stage 2 -> accuracy, plus stage 2 alone.

    python -m llava_edge.train.demo --work runs/demo-recipe            # what the issue measures
    python -m llava_edge.train.demo --work runs/demo-recipe --n 300    # a quicker look

Steps, each timed:

1. the base: ``llava_edge.pretrain.build_demo_base`` (pretrained CLIP tower + LM from the committed
   assets, random projector); where that package is not there yet, ``init_checkpoint("demo")``
   (everything random), and the report says so;
2. the synthetic world: ``synth(n)`` training scenes and 1000 held-out eval scenes (one short and one
   multiple-choice question each: at 80-90% accuracy one standard error is about 1.2 points; on
   100 questions it was 4, enough to read 75% as 83%);
3. stage 1 (configs/demo-stage1.toml) then stage 2 (configs/demo-stage2.toml);
4. exact match on the eval split's short answers and multiple-choice accuracy, by greedy generation
   through the torch runtime (:func:`llava_edge.train.evaluate.evaluate`);
5. for comparison, stage 2 from the base (random projector, no stage 1), scored the same way.

``report.json`` in the work folder holds every number, the load average of the (shared) machine
before and after each step, and the recipes used.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EVAL_SCENES = 1000
log = logging.getLogger("llava_edge.train")


def _timed(report: dict, name: str, fn):
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    value = fn()
    report["steps"][name] = {"seconds": round(time.perf_counter() - started, 1),
                             "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
    log.info("%s: %.0f s", name, report["steps"][name]["seconds"])
    return value


def build_base(folder: Path, assets: Path | None = None) -> tuple[Path, str]:
    """The pretrained demo base when the pretrain package and its assets are there, else a random
    demo model. ``assets``: another asset folder than the committed one."""
    if (folder / "config.json").is_file():
        return folder, json.loads((folder / "llava_edge.json").read_text()).get("base_kind", "existing")
    try:
        from llava_edge.pretrain.assets import DEMO_ASSETS
        from llava_edge.pretrain.base import build_demo_base
    except ImportError:
        DEMO_ASSETS = build_demo_base = None
    assets = Path(assets) if assets is not None else DEMO_ASSETS
    if build_demo_base is None or not (assets / "pretrain.json").is_file():
        from llava_edge.model.build import init_checkpoint

        log.warning("no pretrained demo components (llava_edge.pretrain + assets): starting from random weights")
        return init_checkpoint("demo", folder, seed=0), "random (init_checkpoint demo)"
    return Path(build_demo_base(folder, seed=0, assets=assets)), f"pretrained (build_demo_base, assets {assets})"


def run_demo_recipe(work: str | Path, *, n: int = 1000, n_eval: int = EVAL_SCENES, compare: bool = True,
                    recipes: Path = CONFIGS, assets: str | Path | None = None, **overrides) -> dict:
    from llava_edge.data.synth import synth
    from llava_edge.train.evaluate import evaluate
    from llava_edge.train.run import train

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    stage1_recipe, stage2_recipe = recipes / "demo-stage1.toml", recipes / "demo-stage2.toml"
    report: dict = {"n_train_scenes": n, "n_eval_scenes": n_eval, "cpu_count": os.cpu_count(),
                    "overrides": overrides, "steps": {}}
    base, kind = _timed(report, "base", lambda: build_base(work / "base", assets))
    report["base"] = kind
    world = work / "world"
    if not world.exists():
        _timed(report, "synth", lambda: synth(world, n=n, seed=0, image_size=64, n_eval=n_eval))
    common = dict(progress=True, **overrides)
    s1 = _timed(report, "stage1", lambda: train(1, base, world / "stage1.json", work / "stage1", stage1_recipe, **common))
    s2 = _timed(report, "stage2", lambda: train(2, s1.out, world / "stage2.json", work / "stage2", stage2_recipe, **common))
    report["train_seconds"] = report["steps"]["stage1"]["seconds"] + report["steps"]["stage2"]["seconds"]
    for name, result in (("stage1", s1), ("stage2", s2)):
        report[name] = {"steps": result.history[-1]["step"], "final_loss": result.history[-1]["loss"],
                        "train_runtime": result.metrics.get("train_runtime"),
                        "samples_per_s": result.metrics.get("train_samples_per_second"),
                        "tokens_seen": result.metrics.get("num_input_tokens_seen"),
                        "recipe": result.recipe.to_dict()}
    scores = _timed(report, "eval", lambda: evaluate(s2.out, world / "eval.json"))
    report["eval"] = scores.to_dict()
    log.info("two-stage: %s", scores.summary())
    if compare:
        only = _timed(report, "stage2_only", lambda: train(2, base, world / "stage2.json", work / "stage2-only",
                                                             stage2_recipe, **common))
        report["stage2_only"] = {"final_loss": only.history[-1]["loss"]}
        alone = _timed(report, "eval_stage2_only", lambda: evaluate(only.out, world / "eval.json"))
        report["eval_stage2_only"] = alone.to_dict()
        log.info("stage 2 only: %s", alone.summary())
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/demo-recipe")
    parser.add_argument("--n", type=int, default=1000, help="training scenes")
    parser.add_argument("--n-eval", type=int, default=EVAL_SCENES, help="held-out scenes scored")
    parser.add_argument("--assets", default=None, help="demo asset folder (default: the committed one)")
    parser.add_argument("--no-compare", action="store_true", help="skip the stage-2-only comparison")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of both demo recipes (JSON values)")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run_demo_recipe(args.work, n=args.n, n_eval=args.n_eval, compare=not args.no_compare,
                             assets=args.assets, **overrides)
    summary = {k: report[k] for k in ("base", "train_seconds") if k in report}
    summary["exact_match"] = report["eval"]["exact_match"]
    summary["mc_accuracy"] = report["eval"]["mc_accuracy"]
    if "eval_stage2_only" in report:
        summary["stage2_only_exact_match"] = report["eval_stage2_only"]["exact_match"]
        summary["stage2_only_mc_accuracy"] = report["eval_stage2_only"]["mc_accuracy"]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
