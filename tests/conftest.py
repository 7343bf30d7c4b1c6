"""Shared fixtures: a tiny random LLaVA model folder, built once per test session."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``llava-edge init --preset tiny`` output (random weights, our BPE, processor)."""
    from llava_edge.model.build import init_checkpoint

    return init_checkpoint("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The tiny model loaded in transformers (fp32, eval)."""
    from llava_edge.model.loading import load_model

    return load_model(tiny_model_dir)


@pytest.fixture
def test_image() -> Image.Image:
    """A non-square image with structure (so resize and padding matter)."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(30, 45, 3), dtype=np.uint8)
    array[5:15, 10:30] = (220, 30, 30)
    return Image.fromarray(array)


@pytest.fixture
def other_image() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, size=(50, 20, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def onnx_bundle(tiny_model_dir, tmp_path_factory):
    """``onnx_bundle(precision)``: the tiny model's ONNX bundle, exported once per session and
    precision and shared by every test_onnx_* module (an export costs tens of seconds here)."""
    def get(precision: str = "fp32", **options):
        from llava_edge.export.onnx import export_onnx

        out = tmp_path_factory.getbasetemp() / "onnx-bundles" / precision
        if not (out / "manifest.json").is_file():
            export_onnx(tiny_model_dir, out, precision, progress=False, **options)
        return out

    return get
