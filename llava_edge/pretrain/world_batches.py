"""Scenes of the synthetic world as model inputs: pixels as LLaVA preprocesses them, and targets.

The targets are the scene's symbolic annotation, the same facts its captions state, laid on the
3x3 grid the world places shapes on: per cell the colour, kind and size of its shape (or "none"),
per image the number of shapes, the background and which colour+kind pairs are present.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llava_edge.data.render import render
from llava_edge.data.synth import scene_at
from llava_edge.data.world import BACKGROUNDS, COLORS, NUMBERS, SHAPES, SIZES, Scene
from llava_edge.model.image import CLIP_MEAN, CLIP_STD, PreprocessConfig, preprocess_batch

GRID = 3  # the world's 3x3 grid of cells
NONE = "none"
# name -> class names; index 0 of the per-cell tasks is "no shape in this cell".
CELL_CLASSES = {
    "color": (NONE, *COLORS),
    "shape": (NONE, *SHAPES),
    "size": (NONE, *SIZES),
}
IMAGE_CLASSES = {
    "count": NUMBERS,
    "background": tuple(sorted(BACKGROUNDS)),
}
KINDS = tuple((color, shape) for color in COLORS for shape in SHAPES)  # presence labels


def preprocess_config(image_size: int) -> PreprocessConfig:
    """LLaVA-1.5 preprocessing as every demo checkpoint declares it (see model.build)."""
    return PreprocessConfig(size=image_size, mean=CLIP_MEAN, std=CLIP_STD, pad=True, resample="bicubic")


def scene_targets(scene: Scene) -> dict[str, np.ndarray]:
    """Class indices of every task for one scene (cells in reading order: row * 3 + column)."""
    cells = {task: np.zeros(GRID * GRID, dtype=np.int64) for task in CELL_CLASSES}
    present = np.zeros(len(KINDS), dtype=np.float32)
    for s in scene.shapes:
        cell = s.cell[0] * GRID + s.cell[1]
        for task, value in (("color", s.color), ("shape", s.shape), ("size", s.size)):
            cells[task][cell] = CELL_CLASSES[task].index(value)
        present[KINDS.index((s.color, s.shape))] = 1.0
    return {
        **cells,
        "count": np.int64(len(scene.shapes)),
        "background": np.int64(IMAGE_CLASSES["background"].index(scene.background)),
        "present": present,
    }


def scene_batch(seed: int, split: str, indices: Sequence[int], image_size: int):
    """(pixel_values float32 [N, 3, S, S], targets: name -> tensor [N, ...]) of scenes ``indices``."""
    import torch

    scenes = [scene_at(seed, split, i, image_size) for i in indices]
    pixels = preprocess_batch([render(s) for s in scenes], preprocess_config(image_size))
    per_scene = [scene_targets(s) for s in scenes]
    targets = {k: torch.from_numpy(np.stack([t[k] for t in per_scene])) for k in per_scene[0]}
    return torch.from_numpy(pixels), targets


def _overlap_1d(image_size: int, patch_size: int) -> np.ndarray:
    """[GRID, patches per side]: length of each patch's overlap with each grid band, in pixels."""
    cell = image_size / GRID
    n = image_size // patch_size
    out = np.zeros((GRID, n))
    for k in range(GRID):
        for p in range(n):
            out[k, p] = max(0.0, min((k + 1) * cell, (p + 1) * patch_size) - max(k * cell, p * patch_size))
    return out


def patch_cells(image_size: int, patch_size: int) -> np.ndarray:
    """[n_patches] the grid cell holding each patch's centre (patches in LLaVA's row-major order)."""
    n = image_size // patch_size
    band = np.minimum(((np.arange(n) + 0.5) * patch_size * GRID / image_size).astype(np.int64), GRID - 1)
    return (band[:, None] * GRID + band[None, :]).reshape(-1)


def cell_pooling(image_size: int, patch_size: int) -> np.ndarray:
    """[9, n_patches] weights averaging the patches over each cell by overlapping area (rows sum to 1)."""
    o = _overlap_1d(image_size, patch_size)
    weights = np.einsum("ip,jq->ijpq", o, o).reshape(GRID * GRID, -1)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
