"""The synthetic dataset: images of coloured shapes and the LLaVA files a demo model trains on.

``synth(OUT)`` writes::

    OUT/images/train_000000.png ...     scenes for training (stage 1 and stage 2)
    OUT/images/eval_000000.png ...      held-out scenes (their signatures never occur in training)
    OUT/stage1.json                     caption pairs as LLaVA "describe briefly" records
    OUT/stage2.json                     instruction records: conversation, detail, reasoning, mc
    OUT/eval.json                       gold short-answer and multiple-choice questions
    OUT/annotations.json                each image's caption and shapes with bounding boxes
    OUT/meta.json                       the arguments and counts

Every image path is relative to ``OUT/images``. Each scene draws its randomness from an RNG seeded
by (seed, split, index): the same seed gives byte-identical files, and scene ``i`` is the same
whatever ``n``. The folder is built beside OUT and renamed into place at the end.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from llava_edge.utils.atomic import atomic_dir
from .jsonio import JsonArrayWriter
from .language import (
    DETAIL_PROMPTS,
    QA,
    caption,
    description,
    lookup_questions,
    multiple_choice,
    reasoning_questions,
    short_questions,
)
from .records import GPT, HUMAN, IMAGE_TOKEN, to_json_record
from .render import render
from .stage1 import CaptionPair, caption_record
from .world import Scene, sample_scene

FORMAT_VERSION = 1
STAGE2_KINDS = ("conversation", "detail", "reasoning", "mc")
MC_TURNS = 3  # multiple-choice questions per training scene, asked one after another


@dataclass(frozen=True)
class SynthSummary:
    out_dir: Path
    train_images: int
    eval_images: int
    stage1_records: int
    stage2_records: int
    eval_records: int


def synth(
    out_dir: str | Path,
    n: int = 1000,
    seed: int = 0,
    image_size: int = 64,
    n_eval: int = 100,
    overwrite: bool = False,
) -> SynthSummary:
    """Write ``n`` training scenes and ``n_eval`` held-out scenes to ``out_dir`` (see module doc)."""
    if n < 0 or n_eval < 0:
        raise ValueError(f"n and n_eval must be >= 0 (got n={n}, n_eval={n_eval})")
    if image_size < 24:
        raise ValueError(f"image_size {image_size} is too small to draw shapes; use 24 or more")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        images = tmp / "images"
        images.mkdir()
        files = {name: open(tmp / f"{name}.json", "w", encoding="utf-8", newline="\n")
                 for name in ("stage1", "stage2", "eval", "annotations")}
        try:
            out = {name: JsonArrayWriter(f) for name, f in files.items()}
            for split, count in (("train", n), ("eval", n_eval)):
                for i in range(count):
                    scene = scene_at(seed, split, i, image_size)
                    image = f"{split}_{i:06d}.png"
                    render(scene).save(images / image, format="PNG")
                    out["annotations"].write({"image": image, "split": split,
                                              "caption": caption(scene), **scene.annotation()})
                    if split == "train":
                        out["stage1"].write(stage1_record(scene, image, seed))
                        for record in stage2_records(scene, image, seed, i):
                            out["stage2"].write(record)
                    else:
                        for record in eval_records(scene, image, seed, i):
                            out["eval"].write(record)
            for writer in out.values():
                writer.close()
        finally:
            for f in files.values():
                f.close()
        summary = SynthSummary(out_dir, n, n_eval, out["stage1"].count, out["stage2"].count, out["eval"].count)
        meta = {
            "generator": "llava_edge.data.synth",
            "format_version": FORMAT_VERSION,
            "seed": seed,
            "image_size": image_size,
            "train_images": n,
            "eval_images": n_eval,
            "records": {"stage1": summary.stage1_records, "stage2": summary.stage2_records,
                        "eval": summary.eval_records},
            "image_root": "images",
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return summary


def scene_at(seed: int, split: str, i: int, image_size: int = 64) -> Scene:
    """Scene ``i`` of a split, the same whatever else is generated."""
    return sample_scene(random.Random(f"synth-scene:{seed}:{split}:{i}"), image_size, split)


def stage1_record(scene: Scene, image: str, seed: int) -> dict:
    return caption_record(CaptionPair(image, caption(scene), image.removesuffix(".png")), seed)


def stage2_records(scene: Scene, image: str, seed: int, i: int) -> list[dict]:
    """The four instruction kinds for one training scene, in :data:`STAGE2_KINDS` order."""
    rng = random.Random(f"synth-text:{seed}:train:{i}")
    rid = image.removesuffix(".png")
    short = short_questions(scene, rng)
    reasoning = reasoning_questions(scene, rng)
    # Every short question the scene answers, in random order: a few answer tokens each, so one
    # pass over the image's 64 tokens teaches several facts (LLaVA's conversations are multi-turn too).
    conv = rng.sample(short, len(short))
    chosen = rng.sample(reasoning, min(len(reasoning), rng.randint(1, 2)))
    mc_turns: list[tuple[str, str]] = []
    for k, qa in enumerate(rng.sample(short + reasoning, MC_TURNS)):
        question, _, letter = multiple_choice(qa, rng)
        mc_turns += [(HUMAN, f"{IMAGE_TOKEN}\n{question}" if k == 0 else question), (GPT, letter)]
    turns = {
        "conversation": _qa_turns(conv, rng),
        "detail": _first_turn(rng.choice(DETAIL_PROMPTS), rng) + [(GPT, description(scene))],
        "reasoning": _qa_turns(chosen, rng, long=True),
        "mc": mc_turns,
    }
    return [to_json_record(f"{rid}_{kind}", image, turns[kind]) for kind in STAGE2_KINDS]


def drill_record(scene: Scene, image: str, i: int) -> dict:
    """Every look-up the scene answers (:func:`~.language.lookup_questions`) as one conversation.

    Not part of the LLaVA files ``synth()`` writes: the demo LM's pretraining adds it to each
    scene's records (:mod:`llava_edge.pretrain.language` says why). Its order and which absent
    pairs are asked depend on the scene's index only."""
    rng = random.Random(f"drill:{i}")
    return to_json_record(f"{image.removesuffix('.png')}_drill", image, _qa_turns(lookup_questions(scene, rng), rng))


def eval_records(scene: Scene, image: str, seed: int, i: int) -> list[dict]:
    """One short-answer and one multiple-choice question with gold answers for a held-out scene."""
    rng = random.Random(f"synth-text:{seed}:eval:{i}")
    rid = image.removesuffix(".png")
    short = short_questions(scene, rng)
    reasoning = reasoning_questions(scene, rng)
    qa = rng.choice(short)
    short_rec = to_json_record(
        f"{rid}_short", image, [(HUMAN, f"{IMAGE_TOKEN}\n{qa.question}"), (GPT, qa.answer)],
        answer=qa.answer, kind="short", category=qa.category,
    )
    mc_qa = rng.choice(short + reasoning)
    question, options, letter = multiple_choice(mc_qa, rng)
    mc_rec = to_json_record(
        f"{rid}_mc", image, [(HUMAN, f"{IMAGE_TOKEN}\n{question}"), (GPT, letter)],
        answer=letter, options=options, kind="mc", category=mc_qa.category,
    )
    return [short_rec, mc_rec]


def corpus_texts(seed: int = 0, n: int = 1000) -> Iterator[str]:
    """Every text of the first ``n`` training scenes (captions, prompts, questions, answers).

    The texts ``synth(seed=seed, n=n)`` trains on, without the ``<image>`` placeholder: what a
    tokenizer and a small language model of this world are trained on. No image is drawn.
    """
    for i in range(n):
        scene = scene_at(seed, "train", i)
        image = f"train_{i:06d}.png"
        for record in [stage1_record(scene, image, seed)] + stage2_records(scene, image, seed, i):
            for turn in record["conversations"]:
                yield turn["value"].replace(IMAGE_TOKEN, "").strip()


def _first_turn(question: str, rng: random.Random) -> list[tuple[str, str]]:
    # As LLaVA did, the image goes before or after the first question at random.
    text = f"{IMAGE_TOKEN}\n{question}" if rng.random() < 0.5 else f"{question}\n{IMAGE_TOKEN}"
    return [(HUMAN, text)]


def _qa_turns(qas: list[QA], rng: random.Random, long: bool = False) -> list[tuple[str, str]]:
    turns: list[tuple[str, str]] = []
    for k, qa in enumerate(qas):
        turns += _first_turn(qa.question, rng) if k == 0 else [(HUMAN, qa.question)]
        turns.append((GPT, qa.long_answer if long else qa.answer))
    return turns
