"""What the synthetic world says about a scene: captions, questions and answers, rule-based.

All text is lower case and built from the word tables of :mod:`llava_edge.data.world` and the
templates here. Short answers are a single word or short phrase with no full stop, for exact-match
scoring; descriptions and reasoning answers are sentences.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import permutations

from .world import BACKGROUNDS, COLORS, NUMBERS, POSITIONS, SHAPES, SIZES, Scene, Shape

DETAIL_PROMPTS = (
    "describe the image in detail.",
    "give a detailed description of the image.",
    "what do you see in the image? describe it in detail.",
)
# LLaVA-1.5's instruction for multiple-choice questions (its ScienceQA / A-OKVQA format).
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCD"
MAX_OPTIONS = 4


@dataclass(frozen=True)
class QA:
    """A question about a scene, its short answer, the answers of its kind (for MC distractors),
    and, for reasoning questions, the full sentence answer."""

    category: str
    question: str
    answer: str
    choices: tuple[str, ...]
    explanation: str | None = None

    @property
    def long_answer(self) -> str:
        return self.explanation if self.explanation is not None else self.answer


def caption(scene: Scene) -> str:
    """One sentence naming every shape (size, colour, kind, place) and the background."""
    parts = [f"a {s.size} {s.color} {s.shape} at the {s.position}" for s in scene.shapes]
    return f"{_join(parts)} on a {scene.background} background."


def description(scene: Scene) -> str:
    """A detailed description: how many shapes, each shape, and one spatial relation."""
    n = len(scene.shapes)
    sentences = [f"the image shows {_count_phrase(n, 'shape')} on a {scene.background} background."]
    sentences += [f"a {s.size} {s.color} {s.shape} is at the {s.position}." for s in scene.shapes]
    if n >= 2:
        a, b = scene.shapes[0], scene.shapes[1]
        sentences.append(f"the {a.name} is {_relation(a, b)} the {b.name}.")
    return " ".join(sentences)


def short_questions(scene: Scene, rng: random.Random) -> list[QA]:
    """One question per category that the scene can answer unambiguously, with short answers."""
    shapes = scene.shapes
    qas = [
        QA("count", "how many shapes are there?", NUMBERS[len(shapes)], NUMBERS[1:]),
        QA("background", "what color is the background?", scene.background, tuple(sorted(BACKGROUNDS))),
    ]
    qas.append(_count_shape(scene, rng.choice(SHAPES)))
    unique_kind = [s for s in shapes if scene.count(shape=s.shape) == 1]
    if unique_kind:
        qas.append(_color(rng.choice(unique_kind)))
    unique_color = [s for s in shapes if scene.count(color=s.color) == 1]
    if unique_color:
        qas.append(_shape(rng.choice(unique_color)))
    qas.append(_position(rng.choice(shapes)))
    qas.append(_size(rng.choice(shapes)))
    present = {(s.color, s.shape) for s in shapes}
    if rng.random() < 0.5:
        color, kind = rng.choice(sorted(present))
    else:
        color, kind = rng.choice([(c, k) for c in COLORS for k in SHAPES if (c, k) not in present])
    qas.append(_presence(scene, color, kind))
    return qas


def lookup_questions(scene: Scene, rng: random.Random) -> list[QA]:
    """Every look-up the scene answers, shuffled: each shape's place and size, the colour of each
    kind that occurs once, the kind of each colour that occurs once, every kind's count, and every
    present colour+kind pair with as many absent ones (yes and no equally often)."""
    qas = []
    for s in scene.shapes:
        qas += [_position(s), _size(s)]
        if scene.count(shape=s.shape) == 1:
            qas.append(_color(s))
        if scene.count(color=s.color) == 1:
            qas.append(_shape(s))
    qas += [_count_shape(scene, kind) for kind in SHAPES]
    present = sorted({(s.color, s.shape) for s in scene.shapes})
    absent = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in present]
    qas += [_presence(scene, c, k) for c, k in present + rng.sample(absent, len(present))]
    rng.shuffle(qas)
    return qas


# The short questions, one phrasing each (short_questions and lookup_questions ask the same way).
def _count_shape(scene: Scene, kind: str) -> QA:
    return QA("count_shape", f"how many {kind}s are there?", NUMBERS[scene.count(kind)], NUMBERS)


def _color(s: Shape) -> QA:
    return QA("color", f"what color is the {s.shape}?", s.color, tuple(COLORS))


def _shape(s: Shape) -> QA:
    return QA("shape", f"what shape is the {s.color} object?", s.shape, SHAPES)


def _position(s: Shape) -> QA:
    return QA("position", f"where is the {s.name}?", s.position, tuple(POSITIONS.values()))


def _size(s: Shape) -> QA:
    return QA("size", f"is the {s.name} small or large?", s.size, SIZES)


def _presence(scene: Scene, color: str, kind: str) -> QA:
    answer = "yes" if scene.count(shape=kind, color=color) else "no"
    return QA("presence", f"is there a {color} {kind}?", answer, ("yes", "no"))


def reasoning_questions(scene: Scene, rng: random.Random) -> list[QA]:
    """Questions that need relations between shapes, answered with their reason."""
    qas = []
    pairs = list(permutations(scene.shapes, 2))
    side = [(a, b) for a, b in pairs if a.cell[1] != b.cell[1]]
    if side:
        a, b = rng.choice(side)
        yes = a.cell[1] < b.cell[1]
        rel = "left of" if yes else "right of"
        qas.append(_yes_no("left_of", f"is the {a.name} left of the {b.name}?", yes,
                           f"{_places(a, b)}, so the {a.name} is {rel} the {b.name}."))
    levels = [(a, b) for a, b in pairs if a.cell[0] != b.cell[0]]
    if levels:
        a, b = rng.choice(levels)
        yes = a.cell[0] < b.cell[0]
        rel = "above" if yes else "below"
        qas.append(_yes_no("above", f"is the {a.name} above the {b.name}?", yes,
                           f"{_places(a, b)}, so the {a.name} is {rel} the {b.name}."))
    sized = [(a, b) for a, b in pairs if a.size != b.size]
    if sized:
        a, b = rng.choice(sized)
        big, small = (a, b) if a.size == "large" else (b, a)
        qas.append(QA("larger", f"which is larger, the {a.name} or the {b.name}?", big.name,
                      (a.name, b.name),
                      f"the {big.name}. the {big.name} is large and the {small.name} is small."))
    k1, k2 = rng.sample(SHAPES, 2)
    c1, c2 = scene.count(k1), scene.count(k2)
    qas.append(_yes_no("more", f"are there more {k1}s than {k2}s?", c1 > c2,
                       f"the image has {_count_phrase(c1, k1)} and {_count_phrase(c2, k2)}."))
    return qas


def multiple_choice(qa: QA, rng: random.Random) -> tuple[str, list[str], str]:
    """(question with lettered options and LLaVA's MC instruction, options, answer letter)."""
    distractors = [c for c in qa.choices if c != qa.answer]
    options = rng.sample(distractors, min(MAX_OPTIONS - 1, len(distractors))) + [qa.answer]
    rng.shuffle(options)
    lines = [qa.question] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)] + [MC_INSTRUCTION]
    return "\n".join(lines), options, LETTERS[options.index(qa.answer)]


def _yes_no(category: str, question: str, yes: bool, reason: str) -> QA:
    answer = "yes" if yes else "no"
    return QA(category, question, answer, ("yes", "no"), f"{answer}. {reason}")


def _places(a: Shape, b: Shape) -> str:
    return f"the {a.name} is at the {a.position} and the {b.name} is at the {b.position}"


def _relation(a: Shape, b: Shape) -> str:
    if a.cell[0] != b.cell[0]:
        return "above" if a.cell[0] < b.cell[0] else "below"
    return "left of" if a.cell[1] < b.cell[1] else "right of"


def _count_phrase(n: int, noun: str) -> str:
    return f"{NUMBERS[n]} {noun}" + ("" if n == 1 else "s")


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]
