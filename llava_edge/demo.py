"""``llava-edge demo``: the README's main command: train, export ``--int4``, answer, measure.

1. **the demo model**: LLaVA's two-stage recipe (``configs/demo-stage1.toml`` then
   ``demo-stage2.toml``) from the committed pretrained vision tower and language model, on the
   synthetic world, scored on its held-out questions (:mod:`llava_edge.train.demo`); the model is
   ``WORK/stage2``, the world ``WORK/world``;
2. **its int4 bundle**: ``llava-edge export --int4`` (ONNX and GGUF, whichever can be written here),
   which records each runtime's drift from the FP16 reference in the manifest; cached in
   ``WORK/bundle-int4``;
3. **held-out questions answered side by side**: torch on the fp32 model, then every runtime that
   reads the int4 bundle, with the gold answer and each reply marked right or wrong;
4. **the drift and bench tables**: the drift summary from the manifest, and speed and memory of
   each runtime on the bundle (:func:`llava_edge.bench.bench`).

A second run reuses the model and the bundle: only steps 3 and 4 run again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from llava_edge.errors import UserError
from llava_edge.train.demo import EVAL_SCENES

DRIFT_RECORDS = 200  # the export's drift summary: the first 100 eval scenes' questions (short + mc)


def demo(workdir: str | Path = "runs/demo", *, questions: int = 6, bench: bool = True, n: int = 1000,
         n_eval: int = EVAL_SCENES, console=None, **recipe_overrides) -> dict:
    """Run the demo, printing to ``console`` (a rich Console; default stdout); returns the training
    scores, each runtime's answers, and the bench results.

    ``n``: training scenes; ``n_eval``: held-out scenes; ``recipe_overrides``: fields of both demo
    recipes (e.g. ``max_steps`` for a quick look). A non-default run is cached in its own folder."""
    from rich.console import Console

    from llava_edge.drift.evalset import load_eval_set

    if questions < 1:
        raise UserError(f"questions must be >= 1, got {questions}")
    console = console or Console()

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False)

    workdir = Path(workdir)
    model, world, scores = train_demo_model(workdir, n=n, n_eval=n_eval, say=say, **recipe_overrides)
    bundle = export_demo_bundle(model, workdir / ("bundle-int4" + _suffix(n, n_eval, recipe_overrides)),
                                world / "eval.json", say=say)
    items = [i for i in load_eval_set(world / "eval.json") if i.kind is not None][:questions]
    answers = answer_side_by_side(model, bundle, items, say=say)
    result = {"model": str(model), "bundle": str(bundle), "scores": scores, "answers": answers}
    console.print(_answers_table(items, answers))
    _print_drift(bundle, say)
    if bench:
        from llava_edge.bench import bench as run_bench

        say("bench: each runtime in its own process (image encode, prefill, decode, peak memory)")
        report = run_bench(bundle, model_dir=model, n_tokens=16, repeats=2, progress=lambda line: None)
        console.print(report.table())
        result["bench"] = report.results
    return result


def train_demo_model(workdir: Path, *, n: int = 1000, n_eval: int = EVAL_SCENES,
                     say: Callable[[str], None] = print, **overrides) -> tuple[Path, Path, dict]:
    """(model folder, world folder, scores): the trained demo model, trained here the first time."""
    from llava_edge.train.demo import run_demo_recipe

    suffix = _suffix(n, n_eval, overrides)
    work = workdir / f"train{suffix}" if suffix else workdir  # the default run: WORK/stage2, WORK/world
    report_file = work / "report.json"
    if report_file.is_file() and (work / "stage2" / "config.json").is_file():
        report = json.loads(report_file.read_text())
        say(f"demo model: {work / 'stage2'} (cached; delete it and {work / 'report.json'} to train again)")
        if _trained_from_other_assets(work):
            say(f"note: {work / 'stage2'} was trained from other demo assets than llava_edge/assets/demo has "
                f"now (they changed since); delete {work} to train from the current ones")
    else:
        say(f"training the demo model in {work}: stage 1 then stage 2 on {n} synthetic scenes "
            "(about 7 minutes on 2 cores)")
        report = run_demo_recipe(work, n=n, n_eval=n_eval, compare=False, **overrides)
    scores = {"exact_match": report["eval"]["exact_match"], "mc_accuracy": report["eval"]["mc_accuracy"],
              "train_seconds": report.get("train_seconds")}
    say(f"demo model, torch fp32, on {report['n_eval_scenes']} held-out scenes: "
        f"exact match {scores['exact_match']:.0%}, multiple choice {scores['mc_accuracy']:.0%}")
    return work / "stage2", work / "world", scores


def _trained_from_other_assets(work: Path) -> bool:
    """Whether the cached run's base recorded other asset files (sha256) than the committed assets
    have; False where either side cannot be read (a random base, no pretrain package)."""
    from llava_edge.model.build import SIDECAR

    try:
        from llava_edge.pretrain.assets import DEMO_ASSETS, read_record

        used = json.loads((work / "base" / SIDECAR).read_text())["pretrained"]["files"]
        return used != read_record(DEMO_ASSETS).get("files")
    except (ImportError, OSError, ValueError, KeyError, TypeError):
        return False


def export_demo_bundle(model: Path, bundle: Path, eval_json: Path, *,
                       say: Callable[[str], None] = print) -> Path:
    """``llava-edge export MODEL --int4`` with the drift summary measured on the world's eval set."""
    from llava_edge.export.pipeline import export, parse_formats

    if (bundle / "manifest.json").is_file():
        say(f"int4 bundle: {bundle} (cached)")
        return bundle
    formats = parse_formats(None)  # those available here, or an error saying what to install
    say(f"exporting it with --int4 to {bundle} ({', '.join(formats)}), drift against FP16 on the eval questions")
    return export(model, bundle, formats=formats, level="int4", drift_eval=eval_json, drift_limit=DRIFT_RECORDS,
                  progress=False, say=say)


def answer_side_by_side(model: Path, bundle: Path, items, *,
                        say: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Each runtime's greedy reply to each item: ``{"torch fp32": [...], "onnx int4": [...], ...}``."""
    from llava_edge.runtimes import Conversation, GenerationConfig, open_runtime
    from llava_edge.runtimes.registry import runtime_names

    answers: dict[str, list[str]] = {}
    config = GenerationConfig(max_new_tokens=16)
    for name in sorted(runtime_names(), key=lambda n: n != "torch"):  # the fp32 reference first
        label = "torch fp32" if name == "torch" else f"{name} int4"
        try:
            runtime = open_runtime(model if name == "torch" else bundle, runtime=name)
        except UserError as exc:
            say(f"[{label}] skipped: {exc}")
            continue
        answers[label] = [Conversation(runtime).ask(item.turns[0][1], image=item.image, config=config)
                          for item in items]
    return answers


def _suffix(n: int, n_eval: int, overrides: dict) -> str:
    """Cache folders of non-default runs get their own names."""
    parts = ([f"n{n}"] if n != 1000 else []) + ([f"eval{n_eval}"] if n_eval != EVAL_SCENES else [])
    parts += [f"{k}{v}" for k, v in sorted(overrides.items())]
    return ("-" + "-".join(parts)) if parts else ""


def _answers_table(items, answers: dict[str, list[str]]):
    from rich.table import Table

    from llava_edge.data.language import MC_INSTRUCTION
    from llava_edge.drift.evalset import score_reply

    table = Table(title="held-out questions, answered by each runtime (greedy)", show_lines=True)
    table.add_column("image")
    table.add_column("question")
    table.add_column("gold")
    for label in answers:
        table.add_column(label)
    for k, item in enumerate(items):
        question = " ".join(item.turns[0][1].replace("<image>", "").replace(MC_INSTRUCTION, "").split())
        cells = []
        for label, replies in answers.items():
            ok = score_reply(item, replies[k])
            cells.append(f"{'[green]✓' if ok else '[red]✗'}[/] {replies[k]}")
        table.add_row(Path(item.image).name if item.image else "-", question, item.answer or "", *cells)
    totals = {label: sum(bool(score_reply(item, r)) for item, r in zip(items, replies))
              for label, replies in answers.items()}
    table.caption = "right: " + ", ".join(f"{label} {t}/{len(items)}" for label, t in totals.items())
    return table


def _print_drift(bundle: Path, say: Callable[[str], None]) -> None:
    from llava_edge.export.bundle import read_manifest
    from llava_edge.export.verify import drift_summary

    suite = {label: entry for label, entry in read_manifest(bundle).drift.items() if "metrics" in entry}
    lines = drift_summary(suite)  # the drift suite's summaries, not the exporters' per-part checks
    say("drift of the int4 bundle from the FP16 reference (recorded in its manifest.json):")
    for line in lines or ["none recorded"]:
        say(f"  {line}")
