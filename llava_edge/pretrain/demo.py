"""Pretrain the demo's vision tower and language model on the synthetic world, and write the assets.

    python -m llava_edge.pretrain.demo --out llava_edge/assets/demo --seed 0

The recipe, top to bottom (:func:`pretrain_demo`):

1. the demo tokenizer, ``make_tokenizer(get_preset("demo"))`` (BPE on ``default_corpus()``);
2. the vision tower (``CLIPVisionModel`` as ``llava_config`` builds the demo's), trained so that its
   layer -2 patch features predict each scene's annotation (:mod:`.vision`); linear probes on held-out
   scenes score it against the same tower at initialisation (:mod:`.probe`);
3. the language model (``LlamaForCausalLM`` as ``llava_config(...).text_config``), trained on the
   world's conversations and a look-up drill in the chat templates with *scene tokens* where the
   image goes: fixed random vectors naming what each patch's grid cell holds, never pixels nor the
   tower's features (:mod:`.language` says why); held-out loss before and after;
4. ``vision.safetensors`` and ``language.safetensors`` (fp16), ``tokenizer.json`` and ``pretrain.json``
   (seed, command, configuration, metrics, sha256 of the files), written to a temporary folder and
   renamed into place.

Deterministic for a seed, a thread count and a software stack: only ``pretrain.json``'s ``run``
entry (wall time, versions) changes between runs. Thread count matters because it changes the
order of floating-point sums; it is recorded in ``pretrain.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from llava_edge.errors import UserError
from llava_edge.pretrain.assets import (
    LANGUAGE_FILE,
    PRESET,
    RECORD_FILE,
    TOKENIZER_FILE,
    VISION_FILE,
    file_sha256,
)

FORMAT_VERSION = 1
COMMAND = "python -m llava_edge.pretrain.demo"


@dataclass(frozen=True)
class DemoPretrainConfig:
    """Everything that decides the assets. The defaults are the committed assets' settings."""

    seed: int = 0  # model initialisation, data order and the world's scenes
    threads: int = 2
    vision_steps: int = 1200
    vision_batch_size: int = 32  # half the batch, twice the steps: shape was learned sooner per image seen
    vision_lr: float = 3e-3
    vision_weight_decay: float = 0.05
    language_steps: int = 2000  # reading scene tokens takes long: held-out reply loss 0.36 at 400 steps, 0.25 at 800
    language_epochs: int = 2  # passes over those batches, each with its own warm-up and decay (pretrain.language)
    language_batch_size: int = 16
    language_lr: float = 2e-3
    language_weight_decay: float = 0.0
    language_reply_weight: float = 5.0  # a reply token's weight in the LM's loss against a prompt token's (issue 4: 15 loses)
    language_context: str = "scene"  # what stands where the image goes: see pretrain.language
    warmup: float = 0.05
    probe_train_scenes: int = 1000
    probe_eval_scenes: int = 300
    lm_eval_scenes: int = 100


def pretrain_demo(out: str | Path, config: DemoPretrainConfig = DemoPretrainConfig(), *,
                  overwrite: bool = False, progress: bool = True, command: str | None = None) -> dict:
    """Run the recipe above and write the asset folder ``out``; returns ``pretrain.json``'s content."""
    out = Path(out)
    _check_out(out, overwrite)
    if config.language_epochs < 1:
        raise UserError(f"language epochs {config.language_epochs}: must be at least 1")
    if not config.language_reply_weight > 0:
        raise UserError(f"language reply weight {config.language_reply_weight}: must be above 0 "
                        "(1 weighs reply and prompt tokens alike)")
    started = time.perf_counter()
    import torch
    import transformers
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from llava_edge.model.build import make_tokenizer
    from llava_edge.model.presets import get_preset
    from llava_edge.pretrain.assets import demo_config, save_weights
    from llava_edge.pretrain.language import heldout_loss, scene_tokens_for, train_language
    from llava_edge.pretrain.probe import probe_accuracy
    from llava_edge.pretrain.vision import train_vision
    from llava_edge.utils.atomic import atomic_dir

    c = config
    threads_before = torch.get_num_threads()
    torch.set_num_threads(c.threads)
    with _Progress(progress) as bar, _restore(torch.set_num_threads, threads_before):
        bar.phase("tokenizer", 1)
        tokenizer = make_tokenizer(get_preset(PRESET))
        model_config = demo_config(tokenizer)
        bar.advance()

        torch.manual_seed(c.seed)
        tower = CLIPVisionModel(model_config.vision_config)
        probe_args = dict(seed=c.seed, n_train=c.probe_train_scenes, n_test=c.probe_eval_scenes)
        bar.phase("probe (random tower)", 1)
        probe_random = probe_accuracy(tower, **probe_args)
        bar.advance()
        bar.phase("vision tower", c.vision_steps)
        vision_history = train_vision(
            tower, steps=c.vision_steps, batch_size=c.vision_batch_size, lr=c.vision_lr,
            weight_decay=c.vision_weight_decay, warmup=c.warmup, world_seed=c.seed, on_step=bar.step)
        bar.phase("probe (pretrained)", 1)
        probe_trained = probe_accuracy(tower, **probe_args)
        bar.advance()

        torch.manual_seed(c.seed)
        lm = LlamaForCausalLM(model_config.text_config)
        tokens = scene_tokens_for(model_config, c.seed) if c.language_context == "scene" else None
        eval_args = dict(world_seed=c.seed, n_scenes=c.lm_eval_scenes, context=c.language_context)
        bar.phase("language model", c.language_steps * c.language_epochs)
        lm_start = heldout_loss(lm, tokenizer, tokens, **eval_args)
        language_history = train_language(
            lm, tokenizer, tokens, steps=c.language_steps, batch_size=c.language_batch_size, lr=c.language_lr,
            weight_decay=c.language_weight_decay, warmup=c.warmup, world_seed=c.seed, order_seed=c.seed,
            reply_weight=c.language_reply_weight, epochs=c.language_epochs, context=c.language_context,
            on_step=bar.step)
        lm_end = heldout_loss(lm, tokenizer, tokens, **eval_args)

    record = {
        "format_version": FORMAT_VERSION,
        "preset": PRESET,
        "seed": c.seed,
        "command": command or f"{COMMAND} --out {out} --seed {c.seed}",
        "config": asdict(c),
        "tokenizer": {"recipe": "make_tokenizer(get_preset('demo')) on default_corpus()",
                      "vocab_size": tokenizer.vocab_size,
                      "model_vocab_size": model_config.text_config.vocab_size},
        "vision": {
            "objective": "linear heads on layer -2 patch features (CLS dropped) predict each patch's "
                         "grid-cell colour/shape/size/row/column, each cell's colour/shape/size from the "
                         "patches pooled over it and, from all patches pooled, the image's count, "
                         "background and colour+shape pairs; fresh train-split scenes every step",
            "train_scenes": c.vision_steps * c.vision_batch_size,
            "loss_first_last": [round(vision_history[0], 4), round(vision_history[-1], 4)],
            "probe": {"held_out": f"eval split scenes 0..{c.probe_eval_scenes - 1}",
                      "fitted_on": f"train split scenes 0..{c.probe_train_scenes - 1}",
                      "pretrained": probe_trained, "random_init": probe_random},
        },
        "language": {
            "objective": "next-token loss on every token of text-only world conversations "
                         "(stage-1 caption pairs in 'plain', stage-2 records and the look-up drill in "
                         f"'vicuna_v1'), a reply token weighing {c.language_reply_weight:g} times a prompt "
                         f"token (pretrain.language.weighted_loss); {c.language_epochs} pass(es) over the same "
                         f"{c.language_steps} batches, each with its own warm-up and cosine decay; in place of "
                         "the image: " + ("scene tokens (fixed random vectors per patch naming the colour, kind "
                                          "and size in its grid cell, the background and the position; "
                                          "pretrain.language.SceneTokens)" if c.language_context == "scene"
                                          else "nothing"),
            "loss_first_last": [round(language_history[0], 4), round(language_history[-1], 4)],
            "held_out": f"eval split scenes 0..{c.lm_eval_scenes - 1}, all their records",
            "heldout_start": lm_start,
            "heldout_end": lm_end,
        },
    }
    with atomic_dir(out, overwrite=True) as tmp:
        save_weights(tower.state_dict(), tmp / VISION_FILE)  # which module each file is: assets.py
        save_weights(lm.state_dict(), tmp / LANGUAGE_FILE)
        tokenizer.backend.save(str(tmp / TOKENIZER_FILE))
        names = (VISION_FILE, LANGUAGE_FILE, TOKENIZER_FILE)
        record["files"] = {n: file_sha256(tmp / n) for n in names}
        record["sizes"] = {n: (tmp / n).stat().st_size for n in names}
        record["run"] = {"seconds": round(time.perf_counter() - started, 1), "threads": c.threads,
                         "torch": torch.__version__, "transformers": transformers.__version__}
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _check_out(out: Path, overwrite: bool) -> None:
    """Replace only an empty folder, an earlier output of this command, or with ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; pass a folder for the assets")
    if out.is_dir() and any(out.iterdir()) and not (out / RECORD_FILE).is_file() and not overwrite:
        raise UserError(f"{out}: not empty and not an earlier demo-asset folder (no {RECORD_FILE}); "
                        "choose another folder or pass --overwrite")


@contextlib.contextmanager
def _restore(setter, value):
    try:
        yield
    finally:
        setter(value)


class _Progress:
    """A rich progress bar per phase on stderr, or nothing."""

    def __init__(self, enabled: bool):
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("[bold]{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[loss]}"), TimeElapsedColumn(),
                                 console=Console(stderr=True))
        self._task = None

    def __enter__(self):
        if self._bar:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar:
            self._bar.__exit__(*exc)

    def phase(self, name: str, total: int) -> None:
        if self._bar:
            self._task = self._bar.add_task(name, total=total, loss="")

    def advance(self) -> None:
        if self._bar:
            self._bar.advance(self._task)

    def step(self, step: int, loss: float) -> None:
        if self._bar:
            self._bar.update(self._task, advance=1, loss=f"loss {loss:.3f}")


def main(argv: list[str] | None = None) -> int:
    defaults = DemoPretrainConfig()
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="asset folder to write (replaced whole)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="torch CPU threads; part of what makes a run reproducible")
    parser.add_argument("--vision-steps", type=int, default=defaults.vision_steps)
    parser.add_argument("--language-steps", type=int, default=defaults.language_steps)
    parser.add_argument("--language-epochs", type=int, default=defaults.language_epochs,
                        help="passes over the language steps' batches, the learning rate restarting each time")
    parser.add_argument("--language-reply-weight", type=float, default=defaults.language_reply_weight,
                        help="a reply token's weight in the LM's loss against a prompt token's (1: plain mean)")
    parser.add_argument("--overwrite", action="store_true", help="replace a folder this command did not write")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    # OpenMP threads that spin while waiting starve each other on a busy machine (5x slower on 2
    # shared cores); passive waiting changes speed only, never results. Set before torch starts.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    names = {f.name for f in fields(DemoPretrainConfig)}
    config = DemoPretrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    try:
        record = pretrain_demo(args.out, config, overwrite=args.overwrite, progress=not args.quiet,
                               command=" ".join([COMMAND, *argv]))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: record[k] for k in ("vision", "language", "sizes", "run")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
