"""The eval set a drift run feeds every runtime, and how a reply is scored against its gold answer.

An eval set is a LLaVA JSON/JSONL file (``llava-edge data synth`` writes ``eval.json``). Each record
gives the question turns; the last ``gpt`` turn is dropped from the prompt (it is the gold reply).
Task accuracy uses the record's ``answer`` field:

- ``kind: "mc"`` or an ``options`` list: multiple choice; the reply's option letter must equal
  ``answer`` (LLaVA's ScienceQA rule: a leading letter "B", "B.", "(B)"; a reply that spells out an
  option's text counts as that option).
- otherwise, with ``answer``: short answer; normalised exact match (case, surrounding whitespace and
  punctuation, repeated spaces ignored).
- no ``answer``: the record still measures drift (logits, generation) but not accuracy.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

from llava_edge.data.dataset import LlavaDataset
from llava_edge.data.records import GPT
from llava_edge.errors import DataError

MC, SHORT = "mc", "short"
# "B", "B.", "(B)", "B) two", "B. two" — not "A red circle" (LLaVA's ScienceQA rule wants "X. ").
_LETTER = re.compile(r"^\(?([A-Z])(?:\)?[.:]?$|(?:\)[.:]?|[.:])\s)")


@dataclass
class EvalItem:
    id: str
    image: Path | None
    turns: list[tuple[str, str]]  # the conversation up to and including the last question
    answer: str | None = None
    kind: str | None = None  # MC, SHORT or None (no gold answer)
    options: list[str] | None = None


def load_eval_set(path: str | Path, *, limit: int | None = None,
                  image_root: str | Path | None = None) -> list[EvalItem]:
    """The first ``limit`` records of a LLaVA eval file (or of ``PATH/eval.json`` for a folder).

    Image paths are relative to ``image_root``; by default the ``image_root`` named in a
    ``meta.json`` beside the file (synth's ``images``), else the file's folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "eval.json").is_file():
            raise DataError(f"{path}: a folder without eval.json; pass the eval file itself")
        path = path / "eval.json"
    if not path.is_file():
        raise DataError(f"{path}: no such eval file (create one with `llava-edge data synth OUT`, "
                        "which writes OUT/eval.json)")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    dataset = LlavaDataset(path, image_root or _default_image_root(path), on_error="raise",
                           check_images="exists")
    try:
        n = len(dataset) if limit is None else min(limit, len(dataset))
        items = [_item(dataset[i]) for i in range(n)]
    finally:
        dataset.close()
    if not items:
        raise DataError(f"{path}: the eval set has no records")
    return items


def _default_image_root(path: Path) -> Path:
    meta = path.parent / "meta.json"
    if meta.is_file():
        try:
            root = json.loads(meta.read_text()).get("image_root")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            root = None
        if isinstance(root, str) and (path.parent / root).is_dir():
            return path.parent / root
    return path.parent


def _item(record) -> EvalItem:
    turns = list(record.turns)
    if turns and turns[-1][0] == GPT:
        turns = turns[:-1]
    extra = record.extra
    answer = extra.get("answer")
    answer = None if answer is None else str(answer)
    options = extra.get("options") if isinstance(extra.get("options"), list) else None
    if answer is None:
        kind = None
    elif extra.get("kind") == MC or options is not None:
        kind = MC
    else:
        kind = SHORT
    return EvalItem(record.id, record.image, turns, answer, kind, options)


def normalise_answer(text: str) -> str:
    """Lower case, no surrounding whitespace or punctuation, single spaces."""
    text = " ".join(text.lower().split())
    return text.strip(string.punctuation + " ")


def choice_letter(reply: str, options: list[str] | None = None) -> str | None:
    """The option letter a reply picks: a leading letter (A, A., (A), "A) ..."), or the letter of
    the option whose text the reply spells out; None if neither."""
    reply = reply.strip()
    n_options = len(options) if options else 26
    match = _LETTER.match(reply)
    if match:
        letter = match[1].upper()
        if ord(letter) - ord("A") < n_options:
            return letter
    if options:
        wanted = normalise_answer(reply)
        for i, option in enumerate(options):
            if normalise_answer(str(option)) == wanted:
                return chr(ord("A") + i)
    return None


def score_reply(item: EvalItem, reply: str) -> bool | None:
    """Whether ``reply`` answers the item correctly; None when it has no gold answer."""
    if item.answer is None:
        return None
    if item.kind == MC:
        return choice_letter(reply, item.options) == item.answer.strip().upper()
    return normalise_answer(reply) == normalise_answer(item.answer)
