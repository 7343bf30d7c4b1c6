"""Accuracy on an eval file: exact match on short answers, accuracy on multiple-choice letters.

Answers come from greedy generation through a runtime (the torch runtime by default), i.e. the
prompt and decoding a user gets, not teacher forcing. An eval file is a LLaVA file whose records
carry ``answer`` and ``kind`` ("short" or "mc"), as ``synth()`` writes ``eval.json``; records
without them are ignored. The drift suite passes other runtimes (ONNX, llama.cpp) to compare.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from llava_edge.errors import DataError

_MC_LETTER = re.compile(r"^\W*([A-Z])\b")


def normalise_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding punctuation: "Blue." == "blue"."""
    return " ".join(text.lower().strip().strip(".!?,;:'\"").split())


def mc_letter(text: str) -> str | None:
    """The option letter a reply starts with ("B", "B.", "(B) blue"), or None."""
    match = _MC_LETTER.match(text.strip())
    return match.group(1) if match else None


@dataclass
class EvalReport:
    exact_match: float | None  # short-answer questions answered exactly (normalised)
    mc_accuracy: float | None  # multiple-choice questions answered with the right letter
    n_short: int
    n_mc: int
    by_category: dict[str, dict] = field(default_factory=dict)  # kind/category -> correct, total, accuracy
    mistakes: list[dict] = field(default_factory=list)  # the first wrong answers, for a look
    seconds: float = 0.0

    def summary(self) -> str:
        parts = []
        if self.exact_match is not None:
            parts.append(f"exact match {self.exact_match:.1%} of {self.n_short}")
        if self.mc_accuracy is not None:
            parts.append(f"multiple choice {self.mc_accuracy:.1%} of {self.n_mc}")
        return ", ".join(parts) + f" ({self.seconds:.0f} s)"

    def to_dict(self) -> dict:
        return {"exact_match": self.exact_match, "mc_accuracy": self.mc_accuracy, "n_short": self.n_short,
                "n_mc": self.n_mc, "by_category": self.by_category, "mistakes": self.mistakes,
                "seconds": self.seconds}


def evaluate(model, eval_json: str | Path, *, image_root: str | Path | None = None,
             limit: int | None = None, max_new_tokens: int = 16, keep_mistakes: int = 20) -> EvalReport:
    """Score ``model`` (a model folder, or an opened :class:`~llava_edge.runtimes.Runtime`) on
    ``eval_json``; ``limit`` scores only the first N questions."""
    from llava_edge.runtimes import Conversation, GenerationConfig, Runtime, open_runtime
    from llava_edge.train.data import default_image_root, open_records

    runtime = model if isinstance(model, Runtime) else open_runtime(model, runtime="torch")
    eval_json = Path(eval_json)
    records = open_records(eval_json, image_root or default_image_root(eval_json), skip_bad=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    tally: dict[str, list[int]] = {}
    mistakes: list[dict] = []
    started = time.perf_counter()
    scored = 0
    for record in records:
        kind, gold = record.extra.get("kind"), record.extra.get("answer")
        if kind not in ("short", "mc") or not isinstance(gold, str):
            continue
        if limit is not None and scored >= limit:
            break
        if not record.turns:
            raise DataError(f"{eval_json}: record {record.id!r} has no question")
        question = record.turns[0][1]
        reply = Conversation(runtime).ask(question, image=record.image, config=config)
        if kind == "short":
            correct = normalise_answer(reply) == normalise_answer(gold)
        else:
            correct = mc_letter(reply) == gold.strip().upper()
        scored += 1
        for key in (kind, f"{kind}/{record.extra.get('category', '-')}"):
            tally.setdefault(key, [0, 0])
            tally[key][0] += int(correct)
            tally[key][1] += 1
        if not correct and len(mistakes) < keep_mistakes:
            mistakes.append({"id": record.id, "question": question, "answer": gold, "reply": reply})

    def accuracy(key: str) -> float | None:
        right, total = tally.get(key, (0, 0))
        return right / total if total else None

    return EvalReport(
        exact_match=accuracy("short"), mc_accuracy=accuracy("mc"),
        n_short=tally.get("short", (0, 0))[1], n_mc=tally.get("mc", (0, 0))[1],
        by_category={k: {"correct": v[0], "total": v[1], "accuracy": v[0] / v[1]} for k, v in sorted(tally.items())},
        mistakes=mistakes, seconds=time.perf_counter() - started,
    )
