"""``llava-edge demo``: the README's main job on the embedded default.

Today: create the tiny preset model (cached under the work folder), export it to an fp32 bundle
(ONNX + GGUF, whichever can be written here), draw an image from the synthetic world, and ask the
same question through every runtime side by side: with equal weights their greedy answers agree. The trained
demo model and the quantized bundle take its place as they land (issues 4 and 8).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from llava_edge.errors import UserError


def demo(workdir: str | Path = "runs/demo", say: Callable[[str], None] = print) -> dict:
    """Run the demo; returns what each runtime answered."""
    from llava_edge.data.synth import synth
    from llava_edge.model.build import init_checkpoint
    from llava_edge.runtimes import Conversation, GenerationConfig, open_runtime
    from llava_edge.runtimes.registry import runtime_names

    workdir = Path(workdir)
    model_dir = workdir / "tiny-model"
    if not model_dir.exists():
        say(f"creating the tiny model in {model_dir}")
        init_checkpoint("tiny", model_dir, seed=0)
    bundle = workdir / "tiny-bundle"
    if not bundle.exists():
        from llava_edge.export.pipeline import available_formats, export

        formats = available_formats()
        if formats:
            say(f"exporting it to {bundle} ({', '.join(formats)}, fp32)")
            export(model_dir, bundle, formats=formats, level="fp32", progress=False)
    world = workdir / "world"
    if not world.exists():
        say(f"drawing a small synthetic world in {world}")
        synth(world, n=8, seed=0, image_size=32, n_eval=4)
    image = sorted((world / "images").glob("*.png"))[0]
    question = "What shapes are in the image?"
    say(f"image: {image}\nquestion: {question}")
    answers = {}
    for name in runtime_names():
        try:
            runtime = open_runtime(model_dir if name == "torch" else bundle, runtime=name)
        except UserError as exc:
            say(f"[{name}] skipped: {exc}")
            continue
        reply = Conversation(runtime).ask(question, image=image, config=GenerationConfig(max_new_tokens=24))
        answers[name] = reply
        say(f"[{name}] {reply!r}")
    say("(the tiny model has random weights: its words are noise until the demo model is trained)")
    return answers
