"""The synthetic world: scenes of 1-3 coloured shapes on a 3x3 grid, as symbolic annotations.

Every word the world can say about a scene comes from the tables below, so its language stays
small and regular (a tiny model has to learn it on a laptop in minutes). Each shape has a cell of
its own and fits inside it, so shapes never overlap and every question has one right answer.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

# name -> RGB. Chosen to stay distinct from each other and from every background.
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 210, 30),
    "purple": (150, 60, 200),
}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (140, 140, 140), "black": (0, 0, 0)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Shape diameter as a fraction of its cell: small shapes stay visible at 64 px (about 10 px).
SIZE_FRACTION = {"small": 0.48, "large": 0.82}
# (row, column) -> the name used in captions and answers.
POSITIONS = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
NUMBERS = ("zero", "one", "two", "three")
MAX_SHAPES = 3
# Scenes whose symbolic signature hashes into this bucket are held out for evaluation: no eval
# scene (same background, shapes, colours, sizes and cells) ever appears in training.
EVAL_BUCKETS = 10


@dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    size: str
    cell: tuple[int, int]  # (row, column) on the 3x3 grid
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels (x1, y1 inclusive)

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def name(self) -> str:
        """The phrase that names this shape uniquely in its scene: colour + shape."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]  # in reading order (row, then column)
    image_size: int

    def signature(self) -> str:
        parts = [self.background] + [f"{s.color}-{s.shape}-{s.size}-{s.cell[0]}{s.cell[1]}" for s in self.shapes]
        return "|".join(parts)

    def is_eval(self) -> bool:
        return zlib.crc32(self.signature().encode()) % EVAL_BUCKETS == 0

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return sum(
            1
            for s in self.shapes
            if (shape is None or s.shape == shape) and (color is None or s.color == color)
        )

    def annotation(self) -> dict:
        return {
            "background": self.background,
            "objects": [
                {
                    "color": s.color,
                    "shape": s.shape,
                    "size": s.size,
                    "position": s.position,
                    "bbox": list(s.bbox),
                }
                for s in self.shapes
            ],
        }


def sample_scene(rng: random.Random, image_size: int, split: str) -> Scene:
    """A random scene of the given split ("train" or "eval"); the two never share a signature."""
    want_eval = split == "eval"
    while True:
        scene = _sample_any(rng, image_size)
        if scene.is_eval() == want_eval:
            return scene


def _sample_any(rng: random.Random, image_size: int) -> Scene:
    n = rng.randint(1, MAX_SHAPES)
    cells = sorted(rng.sample(sorted(POSITIONS), n))
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)  # unique colour+shape
    shapes = tuple(
        _place(rng, color, shape, rng.choice(SIZES), cell, image_size)
        for (color, shape), cell in zip(kinds, cells)
    )
    return Scene(rng.choice(sorted(BACKGROUNDS)), shapes, image_size)


def _place(rng: random.Random, color: str, shape: str, size: str, cell: tuple[int, int], image_size: int) -> Shape:
    cell_px = image_size / 3
    diameter = SIZE_FRACTION[size] * cell_px
    # Jitter the centre inside the cell, keeping a 1 px margin to the cell border.
    slack = max(0.0, (cell_px - diameter) / 2 - 1)
    cx = (cell[1] + 0.5) * cell_px + rng.uniform(-slack, slack)
    cy = (cell[0] + 0.5) * cell_px + rng.uniform(-slack, slack)
    half = diameter / 2
    bbox = (round(cx - half), round(cy - half), round(cx + half) - 1, round(cy + half) - 1)
    return Shape(color, shape, size, cell, bbox)
