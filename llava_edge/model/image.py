"""LLaVA-1.5 image preprocessing in numpy + Pillow: one implementation, used by every runtime.

Runtimes for desktop apps have neither torch nor transformers, so this module imports only numpy and
Pillow. Preprocessing mismatches are the most common silent accuracy bug in deployed VLMs, so the
arithmetic here reproduces transformers' PIL image processor bit for bit (see tests/test_image.py):

1. ``load_image``: any source -> upright RGB ``PIL.Image`` (alpha composited over white, 16-bit and
   float data rescaled, EXIF orientation applied), with a clear :class:`ImageError` for bad files.
2. ``preprocess``: LLaVA's ``expand2square`` (pad to square with the mean colour, image centred),
   resize to ``size`` x ``size`` (bicubic by default), x 1/255, (x - mean) / std -> float32 [3, S, S].
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps

from llava_edge.errors import ImageError, ModelError

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Default pixel limit of :func:`load_image` (64 megapixels; an 8000 x 8000 image is 64 MP). It is
#: below Pillow's own bomb warning (``Image.MAX_IMAGE_PIXELS``, 89.5 MP) so that our message, not a
#: Pillow warning, is what the user sees. A LLaVA model sees 336 x 336 pixels anyway.
DEFAULT_MAX_PIXELS = 64_000_000

#: Resampling kernels by the name stored in bundle manifests. Numbers are Pillow's (and the ``resample``
#: integers in Hugging Face ``preprocessor_config.json`` files, which use Pillow's numbering).
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_RESAMPLE_BY_NUMBER = {int(v): k for k, v in RESAMPLE.items()}

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

_PROCESSOR_FILE = "preprocessor_config.json"  # a standalone HF image processor (and older hub repos)
_JOINT_PROCESSOR_FILE = "processor_config.json"  # transformers 5 ProcessorMixin: {"image_processor": {...}}


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes pixel values; stored in bundle manifests as :meth:`to_dict`.

    ``pad=True`` is LLaVA-1.5's ``image_aspect_ratio=pad``: pad to square with the mean colour, then
    resize. ``pad=False`` is plain CLIP preprocessing: resize the shortest edge to ``size``, then
    centre-crop ``size`` x ``size`` (what LLaVA does for any other aspect-ratio setting).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad: bool = True
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"size must be a positive integer, got {self.size!r}")
        # Frozen dataclass: normalise lists from JSON to tuples so that equality and hashing work.
        object.__setattr__(self, "mean", _three_floats("mean", self.mean, low=0.0, high=1.0))
        object.__setattr__(self, "std", _three_floats("std", self.std, low=0.0, high=math.inf))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std}")
        if not isinstance(self.pad, bool):
            raise ValueError(f"pad must be true or false, got {self.pad!r}")
        if self.resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {self.resample!r}")

    @property
    def background(self) -> tuple[int, int, int]:
        """Padding colour: the mean in 0..255, truncated exactly as LLaVA's ``expand2square`` call does."""
        return tuple(int(m * 255) for m in self.mean)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for bundle manifests."""
        return {
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "pad": self.pad,
            "resample": self.resample,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "preprocessing config") -> PreprocessConfig:
        """Inverse of :meth:`to_dict`. Unknown keys are an error, not ignored: a key written by a newer
        version (say a crop mode) would otherwise be dropped and silently change the pixels."""
        if not isinstance(d, dict):
            raise ModelError(f"{source}: expected a JSON object, got {type(d).__name__}")
        fields = {"size", "mean", "std", "pad", "resample"}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ModelError(
                f"{source}: unknown preprocessing keys {unknown} (known: {sorted(fields)}). "
                "The bundle may come from a newer llava-edge; upgrade llava-edge to read it."
            )
        missing = sorted({"size", "mean", "std"} - set(d))
        if missing:
            raise ModelError(f"{source}: preprocessing keys {missing} are missing")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ModelError(f"{source}: invalid preprocessing config: {e}") from None

    @classmethod
    def from_pretrained_folder(cls, path: str | os.PathLike) -> PreprocessConfig:
        """Read a Hugging Face model folder's image-processor config (CLIPImageProcessor or
        LlavaImageProcessor style).

        Looks for ``preprocessor_config.json`` and then for ``processor_config.json``'s
        ``image_processor`` entry: transformers 5 ``LlavaProcessor.save_pretrained`` writes only the
        latter. ``do_pad`` defaults to True when absent because LLaVA-1.5 was trained with padding
        (transformers' own LLaVA processor defaults to no padding; an explicit ``do_pad`` wins).
        """
        folder = Path(path)
        if not folder.is_dir():
            raise ModelError(f"Model folder not found: {folder}. Pass the folder written by save_pretrained.")
        config_file = folder / _PROCESSOR_FILE
        joint_file = folder / _JOINT_PROCESSOR_FILE
        if config_file.is_file():
            return cls._from_hf_dict(_read_json(config_file), source=str(config_file))
        if joint_file.is_file():
            joint = _read_json(joint_file)
            hf = joint.get("image_processor") if isinstance(joint, dict) else None
            if not isinstance(hf, dict):
                raise ModelError(
                    f"{joint_file} has no 'image_processor' entry and {folder} has no {_PROCESSOR_FILE}: "
                    "the folder does not say how to preprocess images. Save the processor with "
                    "processor.save_pretrained(folder)."
                )
            return cls._from_hf_dict(hf, source=f"{joint_file} (image_processor)")
        raise ModelError(
            f"{folder} has neither {_PROCESSOR_FILE} nor {_JOINT_PROCESSOR_FILE}, so it does not say how "
            "to preprocess images. Save the processor next to the model with processor.save_pretrained(folder)."
        )

    @classmethod
    def _from_hf_dict(cls, hf: dict[str, Any], *, source: str) -> PreprocessConfig:
        if not isinstance(hf, dict):
            raise ModelError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        _reject_unsupported_hf_steps(hf, source)
        try:
            return cls(
                size=_hf_square_side(hf, source),
                # transformers' CLIP and LLaVA processors fall back to the OpenAI CLIP statistics.
                mean=hf.get("image_mean", CLIP_MEAN),
                std=hf.get("image_std", CLIP_STD),
                # null (some processors write it) means "not set", like an absent key.
                pad=True if hf.get("do_pad") is None else hf["do_pad"],
                resample=_hf_resample_name(hf.get("resample", int(Image.Resampling.BICUBIC)), source),
            )
        except (TypeError, ValueError) as e:
            raise ModelError(f"{source}: invalid image processor config: {e}") from None


def _three_floats(name: str, values: Any, *, low: float, high: float) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {values!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) and low <= v <= high for v in out):
        raise ValueError(f"{name} must be 3 numbers in [{low}, {high}] (one per RGB channel), got {values!r}")
    return out  # type: ignore[return-value]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"Cannot read {path}: {e}. Re-save the processor with save_pretrained.") from None


def _hf_side(value: Any, key: str, source: str) -> int:
    """One square side from an HF ``size``/``crop_size`` value: an int, ``{"shortest_edge": n}`` or
    ``{"height": n, "width": n}``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value and "longest_edge" not in value:
            return value["shortest_edge"]
        if "height" in value and "width" in value and value["height"] == value["width"]:
            return value["height"]
    raise ModelError(
        f"{source}: {key}={value!r} is not supported; LLaVA needs a square input "
        '(an int, {"shortest_edge": n} or {"height": n, "width": n}).'
    )


def _hf_square_side(hf: dict[str, Any], source: str) -> int:
    """The model's input side. With a square (padded) image, resize-to-``size`` then crop-to-``crop_size``
    equals one resize only when the two sides agree, so differing sides are refused, not guessed."""
    resize = _hf_side(hf["size"], "size", source) if hf.get("size") is not None else None
    crop = None
    if hf.get("do_center_crop", True) and hf.get("crop_size") is not None:
        crop = _hf_side(hf["crop_size"], "crop_size", source)
    if resize is not None and crop is not None and resize != crop:
        raise ModelError(
            f"{source}: resize size {resize} differs from crop size {crop}; llava-edge supports only "
            "equal sizes (as in every LLaVA-1.5 checkpoint)."
        )
    side = crop if crop is not None else resize
    if side is None:
        raise ModelError(f"{source}: neither 'crop_size' nor 'size' is set; cannot tell the input size.")
    return side


def _hf_resample_name(value: Any, source: str) -> str:
    if isinstance(value, str) and value in RESAMPLE:
        return value
    if isinstance(value, int) and value in _RESAMPLE_BY_NUMBER:
        return _RESAMPLE_BY_NUMBER[value]
    raise ModelError(f"{source}: resample={value!r} is not a Pillow resampling filter (0-5 or a name).")


def _reject_unsupported_hf_steps(hf: dict[str, Any], source: str) -> None:
    """Refuse configs whose pixels we would not reproduce, rather than silently preprocess differently."""
    for flag in ("do_resize", "do_rescale", "do_normalize"):
        if hf.get(flag, True) is not True:
            raise ModelError(f"{source}: {flag}={hf[flag]!r} is not supported (LLaVA always does this step).")
    factor = hf.get("rescale_factor", 1 / 255)
    if not isinstance(factor, (int, float)) or abs(factor - 1 / 255) > 1e-12:
        raise ModelError(f"{source}: rescale_factor={factor!r} is not supported (only 1/255).")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Any image source -> upright, fully decoded RGB ``PIL.Image``.

    ``source``: a path (str or ``os.PathLike``), encoded file bytes, a ``PIL.Image`` or an H x W x 3
    uint8 RGB array. ``max_pixels`` (None: no limit of ours) guards against decompression bombs: the
    size is checked from the header, before decoding. Pillow's own guard (2 x
    ``PIL.Image.MAX_IMAGE_PIXELS``) still applies; raising it is the application's decision.

    Colour handling (a user expects the model to see what an image viewer shows):
    transparency is composited over white; palette, greyscale, 1-bit and CMYK images are converted;
    16-bit images are scaled to 8 bits (Pillow's own conversion clips them, turning photos white);
    EXIF orientation is applied. Multi-frame files (GIF, TIFF) give their first frame.

    A PIL image that is already RGB and upright is returned as is (never modified); anything else is a
    new image. Truncated files are an error unless the application set
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``, in which case Pillow fills the missing part silently.
    """
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "the given PIL image"
        img = source
        _check_size(img.size, name, max_pixels)
        _decode(img, name)  # a lazily opened PIL image decodes here
    elif isinstance(source, np.ndarray):
        img = _image_from_array(source)
        name = "the given image array"
        _check_size(img.size, name, max_pixels)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name = f"the given image data ({len(source)} bytes)"
        img = _open_and_decode(io.BytesIO(bytes(source)), name, max_pixels)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = str(path)
        with _open_file(path) as f:
            img = _open_and_decode(f, name, max_pixels)
    else:
        raise TypeError(
            f"load_image takes a path, bytes, a PIL image or an HxWx3 uint8 array, got {type(source).__name__}"
        )
    return _to_rgb(_apply_exif_orientation(img, name), name)


def _open_file(path: Path) -> io.BufferedReader:
    # Checked first: on Windows opening a directory raises PermissionError, which would mislead.
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image file. Pass the path of an image file.")
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise ImageError(f"Image file not found: {path}. Check the path.") from None
    except PermissionError:
        raise ImageError(f"Cannot read image file {path}: permission denied.") from None
    except OSError as e:
        raise ImageError(f"Cannot read image file {path}: {e.strerror or e}.") from None


def _open_and_decode(fp: io.IOBase, name: str, max_pixels: int | None) -> Image.Image:
    """Open from a file object we own (so no file handle or mmap outlives this call) and decode fully."""
    if fp.seek(0, io.SEEK_END) == 0:
        raise ImageError(f"{name} is empty (0 bytes), not an image. Re-export or re-download it.")
    fp.seek(0)
    try:
        # Pillow warns when the header is over its MAX_IMAGE_PIXELS; our own, usually lower, limit is
        # enforced right below with a clearer message, so the warning would only be noise. (The filter
        # is restored on exit; catch_warnings is process-wide, which is acceptable for a warning filter.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"{name} was refused by Pillow as a possible decompression bomb ({e}). If you trust it, the "
            "application must raise PIL.Image.MAX_IMAGE_PIXELS; better, downscale the image."
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageError(
            f"{name} is not an image Pillow can read (unknown format or corrupt header). "
            "Convert it to PNG or JPEG."
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name} has a corrupt image header ({e}). Re-export or re-download it.") from None
    _check_size(img.size, name, max_pixels)
    _decode(img, name)
    return img


def _check_size(size: tuple[int, int], name: str, max_pixels: int | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name} has zero size ({width}x{height} pixels); there is nothing to look at.")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"{name} is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the limit of "
            f"{max_pixels / 1e6:.1f} megapixels (a guard against decompression bombs). Downscale the image, "
            "or if you trust it pass a larger max_pixels."
        )


def _decode(img: Image.Image, name: str) -> None:
    """Force the full decode now: Pillow is lazy, and a truncated file would otherwise fail (or be
    half grey) later, far from the file name."""
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name} was refused by Pillow as a possible decompression bomb ({e}).") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(
            f"{name} is truncated or corrupt: decoding stopped with '{e}'. Re-export or re-download it."
        ) from None


def _image_from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ImageError(
            f"An image array must be H x W x 3 uint8 RGB; got shape {array.shape} and dtype {array.dtype}. "
            "Convert it first (e.g. np.clip(a * 255, 0, 255).astype(np.uint8) for floats in 0..1), "
            "or pass a PIL image."
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"The given image array has zero size (shape {array.shape}); there is nothing to look at.")
    return Image.fromarray(np.ascontiguousarray(array))


def _apply_exif_orientation(img: Image.Image, name: str) -> Image.Image:
    """Turn phone photos upright as viewers show them. The orientation tag is removed by
    ``exif_transpose``, so loading the result again does not rotate it twice."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation in (None, 1):
            return img
        return ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 - Pillow's EXIF parser raises many types on malformed data
        # Orientation is metadata: a malformed EXIF block must not make a good photo unusable.
        log.warning("%s: ignoring unreadable EXIF orientation (%s)", name, e)
        return img


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I;16"):
        # 16-bit greyscale (PNG/TIFF): Pillow's convert() clips at 255 instead of scaling.
        return _grey_to_rgb(np.asarray(img).astype(np.float64) / 257.0)
    if img.mode in ("I", "F"):
        return _grey_to_rgb(_wide_grey_to_8bit(img))
    if _has_alpha(img):
        return _composite_on_white(img, name)
    try:
        return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
    except ValueError as e:
        raise ImageError(f"{name} has colour mode {img.mode!r}, which cannot be converted to RGB ({e}).") from None


def _wide_grey_to_8bit(img: Image.Image) -> np.ndarray:
    """Mode 'I' (32-bit int) and 'F' (32-bit float) carry no range. Rule: values that fit 8 bits are
    8-bit data; otherwise 'I' is 16-bit (Pillow opened 16-bit PNGs as 'I' for years) and 'F' is 0..1
    (the float convention of imaging tools). An image misread by this rule would be < 0.4 % bright,
    i.e. black either way."""
    values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode == "I":
        fits_8bit = low >= 0 and high <= 255
        return values if fits_8bit else values / 257.0
    fits_01 = low >= 0 and high <= 1.0
    return values * 255.0 if fits_01 else values


def _grey_to_rgb(values: np.ndarray) -> Image.Image:
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))


def _has_alpha(img: Image.Image) -> bool:
    # 'transparency' in info: palette (P) images, and L/RGB PNGs with a tRNS colour key (the pixels of
    # that colour are transparent).
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _composite_on_white(img: Image.Image, name: str) -> Image.Image:
    """Transparent pixels become white, as browsers and viewers show logos, stickers and diagrams on a
    light page. ``convert('RGB')`` (LLaVA's own code) would expose whatever colour is stored under the
    transparency, usually black, so black text on a transparent background would vanish."""
    try:
        rgba = img.convert("LA").convert("RGBA") if img.mode == "La" else img.convert("RGBA")
    except ValueError as e:
        raise ImageError(f"{name} has colour mode {img.mode!r}, which cannot be converted to RGB ({e}).") from None
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.getchannel("A"))
    return white


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's ``expand2square``: pad the short side with ``background``, image centred (extra pixel,
    if any, at the bottom/right)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _resize_shortest_edge_and_crop(image: Image.Image, size: int, resample: int) -> Image.Image:
    """CLIP's resize + centre crop, with transformers' rounding (long side truncated, crop offset floored)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    resized = image.resize(new_size, resample=resample)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    return resized.crop((left, top, left + size, top + size))


@functools.lru_cache(maxsize=16)
def _normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Pixel value -> normalised float32, per channel: [3, 256]. Same operations, in the same precision,
    as transformers (x * (1/255) in float64, cast to float32, then (x - mean) / std in float32), so the
    result is bit-identical; a table lookup is also faster than the arithmetic on every pixel."""
    scaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean32, std32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    return ((scaled[None, :] - mean32[:, None]) / std32[:, None]).astype(np.float32)


def preprocess(image: ImageSource, config: PreprocessConfig) -> np.ndarray:
    """One image (anything :func:`load_image` takes) -> float32 pixel values [3, size, size]."""
    rgb = load_image(image)
    resample = RESAMPLE[config.resample]
    if config.pad:
        square = expand_to_square(rgb, config.background)
        resized = square.resize((config.size, config.size), resample=resample)
    else:
        resized = _resize_shortest_edge_and_crop(rgb, config.size, resample)
    pixels = np.asarray(resized, dtype=np.uint8)  # [S, S, 3]
    table = _normalisation_table(config.mean, config.std)
    return np.stack([table[c][pixels[:, :, c]] for c in range(3)])


def preprocess_batch(images: Iterable[ImageSource], config: PreprocessConfig) -> np.ndarray:
    """Several images -> float32 [N, 3, size, size] (N may be 0)."""
    arrays = [preprocess(image, config) for image in images]
    if not arrays:
        return np.empty((0, 3, config.size, config.size), dtype=np.float32)
    return np.stack(arrays)


def image_digest(image: ImageSource) -> str:
    """sha256 hex of what the model sees before preprocessing: the upright RGB pixels and the size.

    Runtimes key cached image embeddings on it: the same pixels give the same key whether they come
    from a PNG file, an array or a PIL image, and any change of a pixel or of the size gives another."""
    rgb = load_image(image)
    width, height = rgb.size
    digest = hashlib.sha256(f"RGB {width}x{height}\n".encode("ascii"))
    digest.update(rgb.tobytes())
    return digest.hexdigest()
