"""One LLaVA conversation record: its in-memory form and the checks on its structure.

LLaVA's training files (``llava_v1_5_mix665k.json``, ``blip_laion_cc_sbu_558k.json``) hold records
``{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}``. A record without
``image`` is text-only. The checks here need nothing but the record itself; image files are checked
in :mod:`llava_edge.data.image_paths`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"
HUMAN = "human"
GPT = "gpt"
ROLES = (HUMAN, GPT)

# Why a record was refused. Each problem names one of these kinds; the table is the one place
# that lists them, so reports, tests and the CLI agree on the words.
MALFORMED = "malformed"
BAD_ROLES = "bad_roles"
EMPTY_TURN = "empty_turn"
PLACEHOLDER = "placeholder"
IMAGE_OUTSIDE_ROOT = "image_outside_root"
IMAGE_MISSING = "image_missing"
IMAGE_UNREADABLE = "image_unreadable"
PROBLEM_KINDS = (
    MALFORMED,
    BAD_ROLES,
    EMPTY_TURN,
    PLACEHOLDER,
    IMAGE_OUTSIDE_ROOT,
    IMAGE_MISSING,
    IMAGE_UNREADABLE,
)


@dataclass
class Record:
    """A parsed record. ``image`` is the resolved file (inside the image root) or None (text-only).

    ``extra`` keeps any other keys of the source record (for example the ``answer``/``options``/
    ``kind`` fields of an eval file), untouched.
    """

    id: str
    image: Path | None
    turns: list[tuple[str, str]]
    extra: dict[str, Any] = field(default_factory=dict)


class RecordProblem(Exception):
    """A record fails one check. ``kind`` is one of :data:`PROBLEM_KINDS`; the text is the reason."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def record_id(obj: Any) -> str | None:
    """The record's id as text, or None when it has no usable one (used to name it in errors)."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, (str, int)) and not isinstance(rid, bool):
            return str(rid)
    return None


def parse_structure(obj: Any) -> tuple[str, Any, list[tuple[str, str]], dict[str, Any]]:
    """Check keys and types; returns (id, raw image value or None, turns, extra keys).

    Raises :class:`RecordProblem` (``malformed``) on the first missing key or wrong type.
    """
    if not isinstance(obj, dict):
        raise RecordProblem(MALFORMED, f"record is a JSON {_json_type(obj)}, expected an object")
    rid = record_id(obj)
    if rid is None:
        if "id" not in obj:
            raise RecordProblem(MALFORMED, "missing key 'id'")
        raise RecordProblem(MALFORMED, f"'id' is a JSON {_json_type(obj['id'])}, expected a string")
    image = obj.get("image")
    if image is not None and not isinstance(image, str):
        raise RecordProblem(MALFORMED, f"'image' is a JSON {_json_type(image)}, expected a string")
    if image is not None and not image.strip():
        raise RecordProblem(MALFORMED, "'image' is an empty string")
    if "conversations" not in obj:
        raise RecordProblem(MALFORMED, "missing key 'conversations'")
    convs = obj["conversations"]
    if not isinstance(convs, list):
        raise RecordProblem(
            MALFORMED, f"'conversations' is a JSON {_json_type(convs)}, expected a list"
        )
    try:  # the common case, fast; the loop below finds what is wrong and says where
        turns = [(turn["from"], turn["value"]) for turn in convs]
        if all(type(role) is str and type(text) is str for role, text in turns):
            extra = {k: v for k, v in obj.items() if k not in ("id", "image", "conversations")}
            return rid, image, turns, extra
    except (TypeError, KeyError):
        pass
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise RecordProblem(
                MALFORMED, f"conversations[{i}] is a JSON {_json_type(turn)}, expected an object"
            )
        for key in ("from", "value"):
            if key not in turn:
                raise RecordProblem(MALFORMED, f"conversations[{i}] has no key '{key}'")
            if not isinstance(turn[key], str):
                raise RecordProblem(
                    MALFORMED,
                    f"conversations[{i}].{key} is a JSON {_json_type(turn[key])}, expected a string",
                )
    raise AssertionError("unreachable: the fast path accepts every well-formed list of turns")


def conversation_problems(turns: list[tuple[str, str]], has_image: bool) -> list[RecordProblem]:
    """Every problem of the turns: roles, empty turns, ``<image>`` placeholder count."""
    if not turns:
        return [RecordProblem(EMPTY_TURN, "'conversations' is empty")]
    problems = []
    roles = [role for role, _ in turns]
    if roles != _alternating(len(roles)):
        i = next((i for i, role in enumerate(roles) if role != ROLES[i % 2]), None)
        if i is None:
            reason = f"conversation ends with a human turn ({len(turns)} turns)"
        else:
            reason = (
                f"roles must alternate human/gpt starting with human: "
                f"conversations[{i}].from is {roles[i]!r}, expected {ROLES[i % 2]!r}"
            )
        problems.append(RecordProblem(BAD_ROLES, reason))
    if any(not text or text.isspace() for _, text in turns):
        i = next(i for i, (_, text) in enumerate(turns) if not text.strip())
        problems.append(RecordProblem(EMPTY_TURN, f"conversations[{i}].value is empty"))
    first = turns[0][1].count(IMAGE_TOKEN)
    later = next((i for i, (_, text) in enumerate(turns) if i and IMAGE_TOKEN in text), None)
    if has_image and (first != 1 or later is not None):
        where = f"; conversations[{later}] has {turns[later][1].count(IMAGE_TOKEN)}" if later else ""
        problems.append(
            RecordProblem(
                PLACEHOLDER,
                f"a record with an image needs exactly one {IMAGE_TOKEN} in the first human "
                f"turn; it has {first}{where}",
            )
        )
    elif not has_image and (first or later is not None):
        i = 0 if first else later
        problems.append(
            RecordProblem(
                PLACEHOLDER,
                f"a text-only record (no 'image') must have no {IMAGE_TOKEN}; "
                f"conversations[{i}] has {turns[i][1].count(IMAGE_TOKEN)}",
            )
        )
    return problems


_ALTERNATING = [ROLES[i % 2] for i in range(64)]


def _alternating(n: int) -> list[str]:
    """human, gpt, human, ... ending with gpt: the roles a conversation of ``n`` turns must have."""
    expected = _ALTERNATING[:n] if n <= len(_ALTERNATING) else [ROLES[i % 2] for i in range(n)]
    return expected if n % 2 == 0 else expected + [GPT]


def to_json_record(rid: str, image: str | None, turns: list[tuple[str, str]], **extra: Any) -> dict:
    """The LLaVA JSON form of a record (``image`` left out when None), keys in LLaVA's order."""
    obj: dict[str, Any] = {"id": rid}
    if image is not None:
        obj["image"] = image
    obj["conversations"] = [{"from": role, "value": text} for role, text in turns]
    obj.update(extra)
    return obj


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )
