"""Image loading and LLaVA-1.5 preprocessing (llava_edge.model.image).

Every test image is generated here with Pillow; nothing is downloaded. The parity tests compare with
transformers' PIL image processors (skipped when transformers is not installed).
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from llava_edge.errors import ImageError, ModelError
from llava_edge.model.image import (
    CLIP_MEAN,
    CLIP_STD,
    PreprocessConfig,
    expand_to_square,
    image_digest,
    load_image,
    preprocess,
    preprocess_batch,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CFG = PreprocessConfig(size=336, mean=CLIP_MEAN, std=CLIP_STD)


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Noise with hard edges: exercises bicubic overshoot and clipping, where implementations differ."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds no pixel data: a decompression bomb's shape
    without spending memory to make one (Pillow reads only the header on open)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------------
# Parity with transformers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers_pil():
    """transformers' PIL ("slow") processors: the ones LLaVA-1.5 was trained with (transformers 4's
    CLIPImageProcessor was PIL-based). transformers 5 names them *Pil."""
    transformers = pytest.importorskip("transformers", reason="parity reference needs transformers")
    clip = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    llava = getattr(transformers, "LlavaImageProcessorPil", getattr(transformers, "LlavaImageProcessor", None))
    return clip, llava


@pytest.mark.parametrize("shape", [(196, 301), (301, 196), (77, 500), (40, 50), (64, 64)])
def test_preprocess_matches_transformers_clip_processor_after_padding(transformers_pil, shape):
    clip_cls, _ = transformers_pil
    array = random_rgb(*shape)
    reference_processor = clip_cls(
        size={"shortest_edge": CFG.size},
        crop_size={"height": CFG.size, "width": CFG.size},
        do_center_crop=True,
        resample=Image.Resampling.BICUBIC,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    # LLaVA-1.5: expand2square with the mean colour, then the stock CLIP processor.
    padded = expand_to_square(Image.fromarray(array), CFG.background)
    reference = reference_processor(padded, return_tensors="np")["pixel_values"][0]

    ours = preprocess(array, CFG)

    assert ours.shape == reference.shape == (3, CFG.size, CFG.size)
    assert ours.dtype == np.float32
    # Exact (0.0): the same Pillow resize on the same uint8 pixels, then the same float64 rescale and
    # float32 normalisation; any difference would mean a different kernel or operation order.
    assert np.abs(ours - reference).max() == 0.0


@pytest.mark.parametrize("shape", [(196, 301), (301, 196)])
def test_preprocess_matches_transformers_llava_processor_with_do_pad(transformers_pil, shape):
    _, llava_cls = transformers_pil
    if llava_cls is None:
        pytest.skip("this transformers has no LlavaImageProcessor")
    array = random_rgb(*shape, seed=1)
    processor = llava_cls(
        size={"shortest_edge": CFG.size}, crop_size={"height": CFG.size, "width": CFG.size}, do_pad=True
    )
    reference = processor(Image.fromarray(array), return_tensors="np")["pixel_values"][0]
    # Exact, as above: transformers' pad_to_square places the image where expand2square does.
    assert np.abs(preprocess(array, CFG) - reference).max() == 0.0


@pytest.mark.parametrize("shape", [(196, 301), (301, 196), (50, 40)])
def test_unpadded_preprocess_matches_clip_resize_and_centre_crop(transformers_pil, shape):
    clip_cls, _ = transformers_pil
    config = PreprocessConfig(size=CFG.size, mean=CLIP_MEAN, std=CLIP_STD, pad=False)
    array = random_rgb(*shape, seed=2)
    processor = clip_cls(size={"shortest_edge": CFG.size}, crop_size={"height": CFG.size, "width": CFG.size})
    reference = processor(Image.fromarray(array), return_tensors="np")["pixel_values"][0]
    # Exact: same shortest-edge rounding (int()) and the same floor for the crop offset.
    assert np.abs(preprocess(array, config) - reference).max() == 0.0


def test_transformers_without_torchvision_falls_back_to_the_pil_clip_processor():
    transformers = pytest.importorskip("transformers")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchvision installed: transformers picks its torchvision processor")
    # transformers 5 makes CLIPImageProcessor the torchvision backend; without torchvision it logs a
    # warning and returns the PIL one, which is the one our preprocessing is bit-identical to.
    assert type(transformers.CLIPImageProcessor()).__name__ == "CLIPImageProcessorPil"


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------


def test_expand_to_square_centres_the_image_like_llava():
    red = Image.new("RGB", (5, 2), (255, 0, 0))
    square = np.asarray(expand_to_square(red, (1, 2, 3)))
    assert square.shape == (5, 5, 3)
    # 3 rows of padding: (5 - 2) // 2 = 1 above, 2 below.
    assert (square[[0, 3, 4]] == (1, 2, 3)).all()
    assert (square[1:3] == (255, 0, 0)).all()


def test_background_is_the_truncated_mean_colour():
    assert CFG.background == (122, 116, 104)  # int(m * 255), as LLaVA's expand2square call


def test_preprocess_batch_stacks_single_results_and_accepts_an_empty_list():
    small = PreprocessConfig(size=28, mean=CLIP_MEAN, std=CLIP_STD)
    images = [random_rgb(20, 30, seed=3), random_rgb(31, 17, seed=4)]
    batch = preprocess_batch(images, small)
    assert batch.shape == (2, 3, 28, 28) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], preprocess(images[1], small))
    assert preprocess_batch([], small).shape == (0, 3, 28, 28)


def test_pad_and_crop_differ_for_a_non_square_image():
    array = random_rgb(20, 40, seed=5)
    cropped = preprocess(array, PreprocessConfig(size=28, mean=CLIP_MEAN, std=CLIP_STD, pad=False))
    padded = preprocess(array, PreprocessConfig(size=28, mean=CLIP_MEAN, std=CLIP_STD, pad=True))
    assert not np.array_equal(cropped, padded)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def test_config_round_trips_through_json():
    config = PreprocessConfig(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pad=False, resample="bilinear")
    assert PreprocessConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    "change, words",
    [
        ({"crop": "centre"}, ["unknown", "crop"]),
        ({"size": 0}, ["size", "positive"]),
        ({"std": [0.2, 0.0, 0.2]}, ["std"]),
        ({"mean": [0.5, 0.5]}, ["mean", "3 numbers"]),
        ({"resample": "cubic"}, ["resample", "bicubic"]),
    ],
)
def test_invalid_config_dict_says_what_is_wrong(change, words):
    d = {**CFG.to_dict(), **change}
    with pytest.raises(ModelError) as err:
        PreprocessConfig.from_dict(d, source="manifest.json")
    for word in ["manifest.json", *words]:
        assert word in str(err.value)


HUB_LLAVA_15_PREPROCESSOR = {  # llava-hf/llava-1.5-7b-hf style: CLIPImageProcessor, no do_pad
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": list(CLIP_MEAN),
    "image_processor_type": "CLIPImageProcessor",
    "image_std": list(CLIP_STD),
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}


def test_from_pretrained_folder_reads_a_clip_preprocessor_config_and_pads_by_default(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(HUB_LLAVA_15_PREPROCESSOR))
    assert PreprocessConfig.from_pretrained_folder(tmp_path) == CFG


def test_from_pretrained_folder_reads_transformers_5_joint_processor_config(tmp_path):
    # transformers 5 LlavaProcessor.save_pretrained writes no preprocessor_config.json, only this.
    nested = {**HUB_LLAVA_15_PREPROCESSOR, "image_processor_type": "LlavaImageProcessor", "do_pad": False}
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": nested, "patch_size": 14}))
    config = PreprocessConfig.from_pretrained_folder(tmp_path)
    assert config.pad is False and config.size == 336


def test_from_pretrained_folder_reads_what_transformers_saves(tmp_path, transformers_pil):
    _, llava_cls = transformers_pil
    if llava_cls is None:
        pytest.skip("this transformers has no LlavaImageProcessor")
    llava_cls(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_pad=True).save_pretrained(
        tmp_path
    )
    assert PreprocessConfig.from_pretrained_folder(tmp_path) == PreprocessConfig(224, CLIP_MEAN, CLIP_STD, pad=True)


def test_from_pretrained_folder_without_processor_config_names_the_files(tmp_path):
    with pytest.raises(ModelError) as err:
        PreprocessConfig.from_pretrained_folder(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "preprocessor_config.json" in message and "save_pretrained" in message


def test_from_pretrained_folder_with_malformed_json_names_the_file(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ModelError, match="preprocessor_config.json"):
        PreprocessConfig.from_pretrained_folder(tmp_path)


def test_from_pretrained_folder_refuses_crop_smaller_than_resize(tmp_path):
    d = {**HUB_LLAVA_15_PREPROCESSOR, "size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
    with pytest.raises(ModelError, match="resize size 256 differs from crop size 224"):
        PreprocessConfig.from_pretrained_folder(tmp_path)


# --------------------------------------------------------------------------------------------------
# Bad inputs: each error says what and where
# --------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert str(path) in str(err.value) and "not found" in str(err.value)


def test_directory(tmp_path):
    with pytest.raises(ImageError) as err:
        load_image(str(tmp_path))
    assert str(tmp_path) in str(err.value) and "is a directory" in str(err.value)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are my notes, not a picture")
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert str(path) in str(err.value) and "not an image" in str(err.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert str(path) in str(err.value) and "empty (0 bytes)" in str(err.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP"])
def test_truncated_file_is_caught_at_load(tmp_path, fmt):
    data = encode(Image.fromarray(random_rgb(120, 160)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert str(path) in str(err.value) and "truncated" in str(err.value)


def test_corrupt_pixel_data(tmp_path):
    data = bytearray(encode(Image.fromarray(random_rgb(120, 160)), "PNG"))
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # zeroes in the middle of the deflate stream
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert str(path) in str(err.value) and "corrupt" in str(err.value)


def test_zero_size_image_and_array():
    with pytest.raises(ImageError, match=r"zero size \(0x5 pixels\)"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="zero size"):
        load_image(np.zeros((0, 5, 3), np.uint8))


def test_over_our_pixel_limit(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(encode(Image.new("RGB", (100, 80)), "PNG"))
    with pytest.raises(ImageError) as err:
        load_image(path, max_pixels=5_000)
    message = str(err.value)
    assert str(path) in message and "100x80" in message and "max_pixels" in message
    assert load_image(path, max_pixels=8_000).size == (100, 80)


def test_header_over_pillow_warning_threshold_gives_our_error_and_no_warning(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(10_000, 9_000))  # 90 MP: Pillow warns (> 89.5 MP), we refuse (> 64 MP)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a leaked DecompressionBombWarning would fail the test
        with pytest.raises(ImageError) as err:
            load_image(path)
    assert str(path) in str(err.value) and "decompression bombs" in str(err.value)


def test_header_over_pillow_hard_limit_is_a_clear_error_and_pil_state_is_untouched(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(20_000, 20_000))  # 400 MP: over Pillow's 2 x MAX_IMAGE_PIXELS
    with pytest.raises(ImageError) as err:
        load_image(path, max_pixels=None)  # even with our limit off, Pillow's guard holds
    assert str(path) in str(err.value) and "MAX_IMAGE_PIXELS" in str(err.value)
    assert Image.MAX_IMAGE_PIXELS == before


def test_wrong_array_dtype_or_shape_says_what_is_expected():
    with pytest.raises(ImageError, match=r"H x W x 3 uint8.*float32"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageError, match=r"\(4, 4, 4\)"):
        load_image(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(TypeError, match="path, bytes"):
        load_image(12345)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Colour modes and orientation
# --------------------------------------------------------------------------------------------------


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # transparent, black underneath (what convert('RGB') would show)
    rgba[0, 1] = (255, 0, 0, 255)  # opaque red
    rgba[0, 2] = (0, 0, 255, 128)  # half-transparent blue
    path = tmp_path / "sticker.png"
    Image.fromarray(rgba).save(path)
    out = np.asarray(load_image(path)).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [255, 0, 0]
    assert np.abs(out[0, 2] - [127, 127, 255]).max() <= 1  # 255 * (1 - 128/255), rounding either way


def test_la_is_composited_over_white():
    # Black everywhere; alpha 0 then 255.
    la = Image.merge("LA", [Image.new("L", (2, 1), 0), Image.frombytes("L", (2, 1), bytes([0, 255]))])
    assert np.asarray(load_image(la)).tolist() == [[[255, 255, 255], [0, 0, 0]]]


def test_palette_with_transparency_is_composited_over_white(tmp_path):
    palette_image = Image.new("P", (2, 1), 0)
    palette_image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette_image.putpixel((1, 0), 1)
    path = tmp_path / "icon.gif"
    palette_image.save(path, transparency=0)
    assert np.asarray(load_image(path)).tolist() == [[[255, 255, 255], [0, 200, 0]]]


def test_palette_without_transparency_uses_the_palette(tmp_path):
    palette_image = Image.new("P", (1, 1), 0)
    palette_image.putpalette([10, 20, 30] + [0] * 765)
    path = tmp_path / "p.png"
    palette_image.save(path)
    assert np.asarray(load_image(path)).tolist() == [[[10, 20, 30]]]


def test_cmyk_is_converted(tmp_path):
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))  # pure cyan
    path = tmp_path / "print.tif"
    cmyk.save(path)
    assert np.asarray(load_image(path)).tolist() == [[[255, 255, 255], [0, 255, 255]]]


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 32896, 65535]], np.uint16)
    path = tmp_path / "depth16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as stored:
        assert stored.mode == "I;16"
    out = np.asarray(load_image(path))
    # v / 257 rounded; Pillow's convert('RGB') would give 0, 255, 255, 255 (clipped).
    assert out[0, :, 0].tolist() == [0, 4, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_32_bit_int_image_is_16_bit_range_unless_it_fits_8_bits():
    wide = Image.fromarray(np.array([[0, 32896, 65535]], np.int32))
    narrow = Image.fromarray(np.array([[0, 100, 255]], np.int32))
    assert wide.mode == narrow.mode == "I"
    assert np.asarray(load_image(wide))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(load_image(narrow))[0, :, 0].tolist() == [0, 100, 255]


def test_float_image_is_0_to_1_unless_it_exceeds_1():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    byte_range = Image.fromarray(np.array([[0.0, 100.0, 300.0]], np.float32))
    assert unit.mode == "F"
    assert np.asarray(load_image(unit))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(load_image(byte_range))[0, :, 0].tolist() == [0, 100, 255]


@pytest.mark.parametrize("mode, value, expected", [("L", 77, 77), ("1", 1, 255), ("1", 0, 0)])
def test_greyscale_and_bilevel(tmp_path, mode, value, expected):
    path = tmp_path / f"grey_{mode}.png"
    Image.new(mode, (2, 2), value).save(path)
    assert (np.asarray(load_image(path)) == expected).all()


def test_exif_orientation_is_applied_once(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, "JPEG", exif=exif, quality=95)

    upright = load_image(path)
    assert upright.size == (20, 40)  # width and height swapped
    pixels = np.asarray(upright).astype(int)
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60  # the left side is now on top: red
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60  # bottom: blue
    np.testing.assert_array_equal(np.asarray(load_image(upright)), pixels)  # no second rotation


def test_given_pil_image_is_not_modified():
    rgba = Image.new("RGBA", (3, 2), (0, 0, 0, 0))
    load_image(rgba)
    assert rgba.mode == "RGBA" and rgba.getpixel((0, 0)) == (0, 0, 0, 0)


# --------------------------------------------------------------------------------------------------
# Digest
# --------------------------------------------------------------------------------------------------


def test_digest_depends_on_pixels_and_size_only(tmp_path):
    array = random_rgb(6, 8, seed=6)
    path = tmp_path / "a.png"
    Image.fromarray(array).save(path)
    digest = image_digest(array)
    assert len(digest) == 64
    assert image_digest(path) == digest == image_digest(path.read_bytes())
    opaque_rgba = Image.fromarray(np.dstack([array, np.full((6, 8), 255, np.uint8)]))
    assert image_digest(opaque_rgba) == digest  # same pixels the model sees

    changed = array.copy()
    changed[0, 0, 0] ^= 1
    assert image_digest(changed) != digest
    assert image_digest(array.reshape(8, 6, 3)) != digest  # same bytes, other shape


# --------------------------------------------------------------------------------------------------
# Runs without torch and transformers
# --------------------------------------------------------------------------------------------------


def test_module_imports_and_runs_without_torch_or_transformers():
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            BLOCKED = {"torch", "torchvision", "transformers"}
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in self.BLOCKED:
                    raise ImportError(f"{name} is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the import blocker does not work")

        import numpy as np
        from llava_edge.model.image import CLIP_MEAN, CLIP_STD, PreprocessConfig, image_digest, preprocess

        config = PreprocessConfig(size=28, mean=CLIP_MEAN, std=CLIP_STD)
        pixels = preprocess(np.zeros((20, 30, 3), np.uint8), config)
        assert pixels.shape == (3, 28, 28) and pixels.dtype == np.float32, pixels.shape
        image_digest(np.zeros((2, 2, 3), np.uint8))
        assert not {"torch", "transformers"} & {m.split(".")[0] for m in sys.modules}
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok"
