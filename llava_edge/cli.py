"""The ``llava-edge`` command line. Each command parses its options and delegates to a function
of the same name in the package; nothing here computes anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from llava_edge.errors import UserError

app = typer.Typer(
    name="llava-edge", no_args_is_help=True, add_completion=False,
    help="Train a LLaVA model, export it to ONNX / GGUF / TensorRT, run it locally, measure drift.",
)
data_app = typer.Typer(no_args_is_help=True, help="LLaVA datasets: the synthetic world, validation.")
app.add_typer(data_app, name="data")

out = Console()
err = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors.")) -> None:
    _state["debug"] = debug


def parse_options(items: Optional[list[str]]) -> dict:
    """``KEY=VALUE`` strings -> keyword arguments; ints, floats and true/false are converted."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--option {item!r}: expected KEY=VALUE")
        lowered = value.lower()
        if lowered in ("true", "false"):
            options[key] = lowered == "true"
            continue
        for cast in (int, float):
            try:
                options[key] = cast(value)
                break
            except ValueError:
                pass
        else:
            options[key] = value
    return options


@app.command()
def init(
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Folder to create."),
    preset: str = typer.Option("tiny", help="Architecture preset (see `llava-edge presets`)."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
) -> None:
    """Create a randomly initialised model folder (weights, tokenizer, processor)."""
    from llava_edge.model.build import init_checkpoint

    path = init_checkpoint(preset, out_dir, seed=seed)
    out.print(f"[green]wrote[/green] {path}")


@app.command()
def presets() -> None:
    """List the model presets."""
    from llava_edge.model.presets import PRESETS

    for p in PRESETS.values():
        out.print(f"[bold]{p.name:14}[/bold] {p.description} "
                  f"({p.n_image_tokens} image tokens, {p.vision.image_size} px)")


@app.command()
def chat(
    model: Path = typer.Argument(..., help="Model folder (or bundle, for bundle runtimes)."),
    image: Optional[Path] = typer.Option(None, help="Image to talk about."),
    prompt: Optional[str] = typer.Option(None, help="One message; without it, chat interactively."),
    runtime: str = typer.Option("torch", help="Runtime backend (see `llava-edge runtimes`)."),
    max_new_tokens: int = typer.Option(128, help="Most tokens per reply."),
    temperature: float = typer.Option(0.0, help="0 is greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed."),
    dtype: str = typer.Option("float32", help="torch runtime: float32, float16 or bfloat16."),
    device: str = typer.Option("cpu", help="torch runtime: cpu or cuda."),
    option: Optional[list[str]] = typer.Option(
        None, "--option", "-o", help="Runtime option KEY=VALUE, e.g. vision=mmproj (llamacpp), "
        "quant=Q8_0 (llamacpp), provider=cuda (onnx)."),
) -> None:
    """Chat with a model about an image; replies stream as they are generated.

    Interactive mode: type a message; `/image PATH` attaches an image to your next message;
    an empty line or Ctrl-D ends."""
    from llava_edge.model.image import load_image
    from llava_edge.runtimes import Conversation, GenerationConfig, open_runtime

    if image is not None:
        load_image(image)  # a bad image fails before the model is loaded
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              seed=seed)
    options = {"dtype": dtype, "device": device} if runtime == "torch" else {}
    options.update(parse_options(option))
    conversation = Conversation(open_runtime(model, runtime=runtime, **options))
    pending_image = image
    messages = [prompt] if prompt is not None else None
    while True:
        if messages is not None:
            if not messages:
                return
            text = messages.pop(0)
        else:
            try:
                text = input("you> ").strip()
            except EOFError:
                return
            if not text:
                return
            if text.startswith("/image "):
                pending_image = Path(text[len("/image "):].strip())
                conversation.runtime.encode_image(pending_image)
                continue
            out.print("llava> ", end="")
        for piece in conversation.send(text, image=pending_image, config=config):
            out.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
        out.print()
        pending_image = None


@app.command()
def train(
    stage: int = typer.Option(..., help="1: projector only (plain template); 2: projector + LLM (vicuna_v1)."),
    model: Path = typer.Option(..., help="Starting LLaVA model folder."),
    data: Path = typer.Option(..., help="LLaVA JSON/JSONL conversations (images relative to its images/ folder)."),
    out_dir: Path = typer.Option(..., "--out", help="Model folder to write (save_pretrained layout)."),
    recipe: Optional[Path] = typer.Option(None, help="Recipe file, e.g. configs/demo-stage1.toml "
                                          "(default: LLaVA-1.5's values for the stage)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
    resume: str = typer.Option("auto", help="auto (newest valid checkpoint), no, or a checkpoint path."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """Train one stage of the LLaVA recipe (also under torchrun / accelerate launch)."""
    from llava_edge.train.run import train as run_train

    overrides = {"max_steps": max_steps} if max_steps is not None else {}
    resume_arg = {"auto": "auto", "no": False}.get(resume, resume)
    result = run_train(stage, model, data, out_dir, recipe, resume=resume_arg, overwrite=force, **overrides)
    out.print(f"[green]wrote[/green] {result.out} (run folder with checkpoints and loss curve: {result.run_dir})")


@app.command()
def export(
    model: Path = typer.Argument(..., help="Model folder (ours, llava-hf, or converted original LLaVA)."),
    out_dir: Path = typer.Option(..., "--out", help="Bundle folder to write."),
    formats: Optional[str] = typer.Option(None, "--formats", "--format",
                                          help="Comma list: onnx, gguf, tensorrt (default: onnx and gguf, "
                                               "those available here)."),
    fp32: bool = typer.Option(False, "--fp32", help="Full precision."),
    fp16: bool = typer.Option(False, "--fp16", help="Half precision everywhere."),
    int8: bool = typer.Option(False, "--int8", help="8-bit decoder (ONNX int8, GGUF Q8_0)."),
    int4: bool = typer.Option(False, "--int4", help="4-bit decoder (ONNX MatMulNBits, GGUF Q4_K_M); the default."),
    quant: Optional[list[str]] = typer.Option(None, "--quant", help="GGUF decoder quant(s), e.g. Q4_0, Q8_0."),
    mmproj_quant: Optional[list[str]] = typer.Option(None, "--mmproj-quant", help="GGUF mmproj quant(s)."),
    part: Optional[list[str]] = typer.Option(None, "--part", help="ONNX per-part precision, e.g. vision=fp32."),
    imatrix: Optional[Path] = typer.Option(None, help="Importance matrix weighting the GGUF decoder quants "
                                           "(from `llava-edge imatrix`)."),
    drift_check: bool = typer.Option(True, "--drift/--no-drift",
                                     help="Measure each format against the FP16 torch reference and record "
                                          "the summary in manifest.json."),
    drift_eval: Optional[Path] = typer.Option(None, "--drift-eval", help="Eval file for that measurement "
                                              "(default: synthetic held-out scenes)."),
    drift_limit: Optional[int] = typer.Option(None, "--drift-limit", help="Only its first N records."),
    base: Optional[Path] = typer.Option(None, help="Original-LLaVA MODEL without LLM weights: the base LLM folder."),
    vision_tower: Optional[Path] = typer.Option(None, help="Original-LLaVA MODEL without a tower: a local CLIP folder."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle folder."),
) -> None:
    """Export a model to a bundle of ONNX, GGUF and/or TensorRT files, quantized, with its drift recorded.

    MODEL is a model folder of ours, a llava-hf folder, or an original-LLaVA checkpoint (converted
    on the fly)."""
    from llava_edge.export.pipeline import export as run_export
    from llava_edge.export.pipeline import parse_formats

    levels = [name for name, flag in (("fp32", fp32), ("fp16", fp16), ("int8", int8), ("int4", int4)) if flag]
    if len(levels) > 1:
        raise UserError(f"choose one precision flag, not {' and '.join('--' + l for l in levels)}")
    part_precision = {}
    for item in part or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--part {item!r}: expected PART=PRECISION, e.g. vision=fp32")
        part_precision[name] = value
    path = run_export(model, out_dir, formats=parse_formats(formats), level=(levels or ["int4"])[0],
                      gguf_quants=quant, mmproj_quants=mmproj_quant,
                      part_precision=part_precision or None, imatrix=imatrix, overwrite=force,
                      drift=drift_check, drift_eval=drift_eval, drift_limit=drift_limit, base=base,
                      vision_tower=vision_tower, say=lambda text: out.print(f"[dim]{text}[/dim]", highlight=False))
    out.print(f"[green]wrote[/green] {path}")
    from llava_edge.export.bundle import read_manifest
    from llava_edge.export.verify import drift_summary

    for line in drift_summary(read_manifest(path).drift):
        out.print(f"  drift {line}", highlight=False)


def _axis(text: str, option: str) -> tuple[int, int, int]:
    parts = text.split(",")
    try:
        values = tuple(int(v) for v in parts)
    except ValueError:
        values = ()
    if len(values) != 3:
        raise UserError(f"{option} {text!r}: expected MIN,OPT,MAX, e.g. 1,128,2048")
    return values


@app.command("build-engines")
def build_engines_command(
    bundle: Path = typer.Argument(..., help="Bundle with TensorRT ONNX parts (`export --format tensorrt`)."),
    seq: str = typer.Option("1,128,2048", help="Tokens per decoder call: MIN,OPT,MAX."),
    past: str = typer.Option("0,512,2048", help="Cached positions: MIN,OPT,MAX."),
    batch: str = typer.Option("1,1,1", help="Sequences per call: MIN,OPT,MAX."),
    images: str = typer.Option("1,1,1", help="Images per vision call: MIN,OPT,MAX."),
    timing_cache: Optional[Path] = typer.Option(None, help="Timing cache file: read if present, written back."),
    weakly_typed: bool = typer.Option(False, "--weakly-typed", help="Let TensorRT choose precisions (FP16 flag) "
                                      "instead of the ONNX file's types."),
    workspace_gb: Optional[float] = typer.Option(None, help="Builder workspace limit in GiB."),
) -> None:
    """Build TensorRT engines for this machine's GPU from a bundle's TensorRT ONNX parts.

    Engines are tied to the TensorRT version and GPU model: build them where they will run."""
    from llava_edge.export.tensorrt.builder import Profile, build_engines

    profile = Profile(batch=_axis(batch, "--batch"), seq=_axis(seq, "--seq"), past=_axis(past, "--past"),
                      images=_axis(images, "--images"))
    build_engines(bundle, profile, timing_cache=timing_cache, strongly_typed=not weakly_typed,
                  workspace_bytes=int(workspace_gb * (1 << 30)) if workspace_gb else None,
                  say=lambda text: out.print(f"[dim]{text}[/dim]", highlight=False))
    out.print(f"[green]built[/green] the TensorRT engines in {bundle}")


@app.command("imatrix")
def imatrix_command(
    model: Path = typer.Argument(..., help="Model folder."),
    data: Path = typer.Argument(..., help="LLaVA JSON/JSONL calibration conversations (with images)."),
    out_file: Path = typer.Option(..., "--out", help="imatrix file to write (.gguf, or .dat for the legacy format)."),
    samples: int = typer.Option(64, help="Conversations drawn from DATA."),
    seed: int = typer.Option(0, help="Seed of the draw."),
    images: Optional[Path] = typer.Option(None, help="Image root (default: DATA's folder/images)."),
    image_weight: float = typer.Option(1.0, help="Weight of image-token rows (1 = llama.cpp's statistic)."),
) -> None:
    """Compute an importance matrix from image + prompt conversations, for GGUF quantization."""
    from llava_edge.quant.imatrix import compute_imatrix, save_imatrix

    matrix = compute_imatrix(model, data, samples, seed=seed, image_root=images, image_weight=image_weight)
    out.print(f"[green]wrote[/green] {save_imatrix(matrix, out_file)}")


@app.command()
def convert(
    src: Path = typer.Argument(..., help="Original LLaVA checkpoint (merged, stage-1 projector, or LoRA)."),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Model folder to create."),
    base: Optional[Path] = typer.Option(None, help="Base LLM folder (for projector-only or LoRA checkpoints)."),
    vision_tower: Optional[Path] = typer.Option(None, help="Local CLIP folder, when the checkpoint has no tower."),
) -> None:
    """Convert an original-LLaVA-repo checkpoint to a transformers LLaVA folder."""
    from llava_edge.model.convert_original import convert_original

    path = convert_original(src, out_dir, base=base, vision_tower=vision_tower)
    out.print(f"[green]wrote[/green] {path}")


@app.command()
def drift(
    reference: str = typer.Option(..., help="Spec [LABEL=]RUNTIME:PATH[?KEY=VALUE,...], e.g. torch:runs/model."),
    candidate: list[str] = typer.Option(..., help="Candidate spec (repeatable), e.g. 'q4=llamacpp:B?quant=Q4_K_M'."),
    eval_set: Path = typer.Option(..., "--eval", help="LLaVA eval JSON with gold answers (e.g. data synth's eval.json)."),
    thresholds: Optional[Path] = typer.Option(None, help="TOML/JSON limits (default: the documented defaults)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Write report.json, report.md and plots/ here."),
    floor: str = typer.Option("rerun", help="Noise floor: rerun, none, a spec, or a candidate's label."),
    limit: Optional[int] = typer.Option(None, help="Use the first N eval records."),
    max_new_tokens: int = typer.Option(32, help="Greedy reply length."),
    attribution: bool = typer.Option(True, "--attribution/--no-attribution",
                                     help="Also split drift into vision and decoder parts."),
) -> None:
    """Measure how far candidates stray from a reference; exit 1 if a threshold is exceeded."""
    from llava_edge.drift import drift as run_drift

    code = run_drift(reference, candidate, eval_set, thresholds, out_dir, floor=floor, limit=limit,
                     max_new_tokens=max_new_tokens, attribution=attribution, console=out,
                     command="llava-edge " + " ".join(sys.argv[1:]))
    raise typer.Exit(code)


@app.command()
def inspect(path: Path = typer.Argument(..., help="Model folder or bundle.")) -> None:
    """Parameters, dtypes and sizes of a model folder; components, precisions and drift of a bundle."""
    from llava_edge.export.bundle import is_bundle

    if is_bundle(path):
        from llava_edge.export.verify import format_inspect, inspect_bundle

        out.print(format_inspect(inspect_bundle(path)), markup=False, highlight=False)
        return
    from llava_edge.model.inspect import inspect_model

    info = inspect_model(path)
    out.print(f"[bold]{info['path']}[/bold]  {info['kind']}, {info['architecture']}")
    out.print(f"image {info['image_size']} px; decoder {info['text_layers']} layers x "
              f"{info['text_hidden_size']}; vocab {info['vocab_size']}")
    for name, part in info["components"].items():
        out.print(f"  {name:14} {part['parameters']:>14,} params  {part['tensors']:>4} tensors  "
                  f"{','.join(part['dtypes'])}")
    out.print(f"  {'total':14} {info['parameters']:>14,} params  {info['bytes'] / 2**20:,.1f} MiB on disk")


@data_app.command("synth")
def data_synth(
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Folder to create."),
    n: int = typer.Option(1000, "--n", help="Training scenes (images)."),
    seed: int = typer.Option(0, help="Seed; the same seed writes the same files."),
    n_eval: int = typer.Option(100, "--n-eval", help="Held-out scenes with gold answers."),
    image_size: int = typer.Option(64, help="Image side in pixels."),
) -> None:
    """Draw the synthetic world: OUT/images, stage1.json, stage2.json, eval.json."""
    from llava_edge.data.synth import synth

    summary = synth(out_dir, n=n, seed=seed, image_size=image_size, n_eval=n_eval)
    out.print(f"[green]wrote[/green] {out_dir}: {summary.stage1_records} stage-1, "
              f"{summary.stage2_records} stage-2 and {summary.eval_records} eval records")


@data_app.command("validate")
def data_validate(
    path: Path = typer.Argument(..., help="LLaVA JSON or JSONL file."),
    images: Optional[Path] = typer.Option(None, help="Image root (default: the file's folder)."),
    skip: bool = typer.Option(False, "--skip", help="Report every bad record instead of stopping at the first."),
) -> None:
    """Check every record of a dataset; exit 1 if any is invalid."""
    from llava_edge.data.dataset import validate_dataset

    report = validate_dataset(path, images, skip=skip)
    out.print(report.summary(), markup=False, highlight=False)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def verify(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    image: Optional[Path] = typer.Option(None, help="Image of the smoke generations (default: a synthetic one)."),
    n_tokens: int = typer.Option(4, help="Tokens of each smoke generation."),
    threads: Optional[int] = typer.Option(None, help="CPU threads of the runtimes."),
    generate: bool = typer.Option(True, "--generate/--no-generate", help="Run a smoke generation per runtime."),
    strict: bool = typer.Option(False, "--strict", help="Also exit 1 when a component could not be loaded here."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON."),
) -> None:
    """Check a bundle: checksums, every component loads, a smoke generation per runtime; exit 1 if broken."""
    from llava_edge.export.verify import verify_bundle_full

    report = verify_bundle_full(bundle, image=image, n_tokens=n_tokens, threads=threads, generate=generate)
    out.print(report.summary(), markup=False, highlight=False)
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if not report.ok or (strict and not report.complete):
        raise typer.Exit(1)


@app.command()
def bench(
    path: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle (or model folder, for torch)."),
    runtime: Optional[list[str]] = typer.Option(
        None, "--runtime", "-r", help="Target [LABEL=]NAME[?KEY=VALUE&...] (repeatable): a runtime, "
        "raw-llamacpp or llama-cpp-python; e.g. llamacpp?vision=mmproj. Default: all that can run it."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder: also bench the torch runtime."),
    image: Optional[Path] = typer.Option(None, help="Image (default: a synthetic 640x480 picture)."),
    prompt: Optional[str] = typer.Option(None, help="Question about the image."),
    n_tokens: int = typer.Option(32, help="Tokens decoded per run."),
    repeats: int = typer.Option(3, help="Runs per target and round, after a warm-up."),
    rounds: int = typer.Option(1, help="Rounds over all targets (spreads the runs on a busy machine)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads of every target (default: all cores)."),
    statistic: str = typer.Option("median", help="median, or min (the best run)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Write bench.json, bench.md and bench.png here."),
) -> None:
    """Speed and memory per runtime: image encode, prefill, time to first token, decode tokens/s, peak RSS."""
    from llava_edge.bench import bench as run_bench

    report = run_bench(path, runtime or None, image=image, n_tokens=n_tokens, repeats=repeats, rounds=rounds,
                       threads=threads, model_dir=model, statistic=statistic, out=out_dir,
                       command="llava-edge " + " ".join(sys.argv[1:]),
                       progress=lambda line: err.print(line, markup=False, highlight=False),
                       **({"prompt": prompt} if prompt else {}))
    out.print(report.table())
    if any(r.get("error") for r in report.results):
        raise typer.Exit(1)


@app.command()
def runtimes() -> None:
    """List runtime backends and whether they can be used here."""
    from llava_edge.runtimes.registry import get_runtime_class, runtime_names

    for name in runtime_names():
        try:
            get_runtime_class(name)
            status = "[green]available[/green]"
        except UserError as exc:
            status = f"[yellow]unavailable[/yellow]: {exc}"
        out.print(f"{name:10} {status}")


@app.command()
def demo(
    workdir: Path = typer.Option(Path("runs/demo"), help="Where the model, data and bundle are cached."),
    questions: int = typer.Option(6, help="Held-out questions asked through every runtime."),
    bench: bool = typer.Option(True, "--bench/--no-bench", help="Measure speed and memory per runtime."),
) -> None:
    """The main job: train the demo model (cached), export it --int4, answer held-out questions with
    every runtime side by side, and print the drift and bench tables."""
    from llava_edge.demo import demo as run_demo

    run_demo(workdir, questions=questions, bench=bench, console=out)


def main() -> None:
    """Console entry point: user errors are one readable line and a non-zero exit."""
    try:
        # Outside standalone mode click returns a command's `typer.Exit(code)` instead of raising it.
        code = app(standalone_mode=False)
    except UserError as exc:
        if _state["debug"]:
            raise
        err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
