"""Stage-1 conversion: caption pairs become single-turn "describe briefly" LLaVA records.

This is how LLaVA built ``blip_laion_cc_sbu_558k.json``: the human turn is ``<image>`` and one of a
fixed list of brief-description prompts (the image before or after the prompt), the gpt turn is the
caption. The prompt and the order are drawn from an RNG seeded by (seed, record id), so a record's
text does not depend on which other pairs are converted with it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

from .jsonio import write_json_records
from .records import GPT, HUMAN, IMAGE_TOKEN, to_json_record

# LLaVA's list of brief-description instructions (LLaVA paper, Table 8 / llava/instruct prompts).
BRIEF_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)


@dataclass(frozen=True)
class CaptionPair:
    """An image path (relative to the image root) and its caption. ``id`` defaults to the file stem."""

    image: str
    caption: str
    id: str | None = None


def stage1_prompt(seed: int, record_id: str) -> str:
    """The human turn for one record: ``<image>`` and a brief prompt, in a seeded random order."""
    rng = random.Random(f"stage1:{seed}:{record_id}")
    prompt = rng.choice(BRIEF_PROMPTS)
    # LLaVA put the image before or after the instruction (about half each).
    return f"{IMAGE_TOKEN}\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n{IMAGE_TOKEN}"


def caption_record(pair: CaptionPair | tuple[str, str], seed: int = 0) -> dict:
    """One caption pair as a LLaVA JSON record."""
    if not isinstance(pair, CaptionPair):
        pair = CaptionPair(*pair)
    rid = pair.id if pair.id is not None else PurePosixPath(pair.image).stem
    human = stage1_prompt(seed, rid)
    return to_json_record(rid, pair.image, [(HUMAN, human), (GPT, pair.caption.strip())])


def stage1_records(
    pairs: Iterable[CaptionPair | tuple[str, str]], seed: int = 0
) -> Iterator[dict]:
    """Convert caption pairs (``CaptionPair`` or ``(image, caption)`` tuples) lazily."""
    for pair in pairs:
        yield caption_record(pair, seed)


def write_stage1(pairs: Iterable[CaptionPair | tuple[str, str]], out: str | Path, seed: int = 0) -> int:
    """Write the converted pairs as a LLaVA JSON file (atomically); returns the record count."""
    return write_json_records(out, stage1_records(pairs, seed))
