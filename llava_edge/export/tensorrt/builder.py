"""Build TensorRT engines from a bundle's TensorRT ONNX parts, on the machine that will run them.

    llava-edge build-engines BUNDLE [--max-seq 2048 --max-past 2048 --max-batch 1 --max-images 1]
                                    [--timing-cache FILE] [--weakly-typed]

For each part (vision, projector, embeddings, decoder) the ``tensorrt-onnx/<part>`` file is parsed
with TensorRT's ONNX parser (``parse_from_file``, which reads the external weights beside it), one
optimization profile gives min/opt/max of every dynamic axis (:class:`Profile`), and the serialized
engine is written to ``tensorrt/engines/<part>.engine`` as component ``tensorrt/<part>``. Each
component records the TensorRT version and the GPU (name, compute capability) it was built for:
engines are not portable across TensorRT versions or GPU models, and the ``tensorrt`` runtime
refuses a mismatch with a message naming both. The bundle is rewritten atomically.

Networks are built **strongly typed** by default: the types come from the ONNX file (fp16
activations, INT4/INT8 weights dequantized to fp16), which TensorRT recommends for Q/DQ networks
with precisions other than int8. ``--weakly-typed`` builds the older way, with the FP16 flag.
A timing cache file, when given, is read first and written back: later builds on the same GPU
skip the kernel timing they already did.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from llava_edge.errors import ModelError, RuntimeNotAvailable, UserError
from llava_edge.export.bundle import component_path, extend_bundle, read_manifest
from llava_edge.export.onnx.specs import (
    ATTENTION_MASK, IMAGE_FEATURES, INPUT_IDS, INPUTS_EMBEDS, PARTS, PIXEL_VALUES, POSITION_IDS, ModelDims,
    past_name,
)
from llava_edge.utils.atomic import atomic_write_bytes

ONNX_KEY = "tensorrt-onnx"  # components the engines are built from
ENGINE_KEY = "tensorrt"  # components "tensorrt/<part>"
ENGINE_DIR = "tensorrt/engines"
NOT_PORTABLE = ("a TensorRT engine runs only with the TensorRT version and on the GPU model it was built "
                "for; rebuild it elsewhere with `llava-edge build-engines BUNDLE`")
INSTALL_HINT = ("TensorRT's Python package from NVIDIA (pip install tensorrt, on a machine with an NVIDIA GPU "
                "and driver) and torch with CUDA")


@dataclass(frozen=True)
class Profile:
    """min / opt / max of the axes the engines accept. ``seq``: tokens per decoder call (1 when
    decoding, the prompt when prefilling); ``past``: cached positions; ``images`` per call."""

    batch: tuple[int, int, int] = (1, 1, 1)
    seq: tuple[int, int, int] = (1, 128, 2048)
    past: tuple[int, int, int] = (0, 512, 2048)
    images: tuple[int, int, int] = (1, 1, 1)

    def __post_init__(self) -> None:
        for name, (lo, opt, hi) in asdict(self).items():
            floor = 0 if name == "past" else 1
            if not floor <= lo <= opt <= hi:
                raise UserError(f"profile {name}: need {floor} <= min <= opt <= max, got {lo}, {opt}, {hi}")

    def shapes(self, part: str, d: ModelDims) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Input name -> (min, opt, max) shapes for one part."""

        def triple(make) -> tuple[tuple[int, ...], ...]:
            return tuple(make(i) for i in range(3))

        b, s, p, n = self.batch, self.seq, self.past, self.images
        if part == "vision":
            return {PIXEL_VALUES: triple(lambda i: (n[i], 3, d.image_size, d.image_size))}
        if part == "projector":
            return {IMAGE_FEATURES: triple(lambda i: (n[i], d.n_image_tokens, d.vision_hidden))}
        if part == "embeddings":
            return {INPUT_IDS: triple(lambda i: (b[i], s[i]))}
        shapes = {
            INPUTS_EMBEDS: triple(lambda i: (b[i], s[i], d.d_model)),
            ATTENTION_MASK: triple(lambda i: (b[i], p[i] + s[i])),
            POSITION_IDS: triple(lambda i: (b[i], s[i])),
        }
        for layer in range(d.n_layers):
            for kind in ("key", "value"):
                shapes[past_name(layer, kind)] = triple(lambda i: (b[i], d.n_kv_heads, p[i], d.head_dim))
        return shapes


def import_tensorrt():
    """``tensorrt``, or :class:`RuntimeNotAvailable` naming what to install."""
    try:
        import tensorrt
    except ImportError:
        raise RuntimeNotAvailable(f"TensorRT is not installed; it needs {INSTALL_HINT}") from None
    return tensorrt


@functools.cache
def trt_logger(trt):
    """One logger per process, as TensorRT expects (builders and runtimes share it)."""
    return trt.Logger(trt.Logger.WARNING)


def current_gpu() -> dict:
    """Name and compute capability of the CUDA device in use (engines are tied to both)."""
    try:
        import torch
    except ImportError:
        raise RuntimeNotAvailable(f"torch is not installed; TensorRT here needs {INSTALL_HINT}") from None
    if not torch.cuda.is_available():
        raise RuntimeNotAvailable("no CUDA GPU is visible (torch.cuda.is_available() is False); "
                                  "TensorRT engines are built and run on an NVIDIA GPU")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def check_engine_matches(bundle: Path, key: str, details: dict, version: str, gpu: dict) -> None:
    """The engine ``key`` was built for this TensorRT version and GPU model, or a clear refusal."""
    built_version, built_gpu = details.get("tensorrt_version"), details.get("gpu", {})
    if built_version != version or built_gpu.get("name") != gpu["name"] \
            or built_gpu.get("compute_capability") != gpu["compute_capability"]:
        raise RuntimeNotAvailable(
            f"{bundle}: engine {key} was built with TensorRT {built_version} for "
            f"{built_gpu.get('name')} (compute capability {built_gpu.get('compute_capability')}); this "
            f"machine has TensorRT {version} and {gpu['name']} (compute capability "
            f"{gpu['compute_capability']}). Engines are not portable: rebuild them here with "
            f"`llava-edge build-engines {bundle}`")


def build_engine(trt, onnx_file: Path, shapes: dict, *, strongly_typed: bool = True,
                 workspace_bytes: int | None = None, timing_cache: bytes | None = None) -> tuple[bytes, bytes]:
    """(serialized engine, serialized timing cache) for one ONNX file and its profile shapes."""
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelError(f"{onnx_file}: TensorRT's ONNX parser rejected the file: " + "; ".join(errors[:5]))
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, False)  # a cache from another GPU or version is an error, not ignored
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ModelError(f"{onnx_file}: TensorRT could not build an engine (see its log above)")
    return bytes(engine), bytes(config.get_timing_cache().serialize())


def build_engines(bundle: str | Path, profile: Profile = Profile(), *, parts: tuple[str, ...] = PARTS,
                  timing_cache: str | Path | None = None, strongly_typed: bool = True,
                  workspace_bytes: int | None = None, say: Callable[[str], None] | None = None) -> Path:
    """Build one engine per part from ``bundle``'s TensorRT ONNX parts and add them to the bundle."""
    say = say or (lambda text: None)
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    missing = [p for p in parts if f"{ONNX_KEY}/{p}" not in manifest.components]
    if missing:
        raise ModelError(f"{bundle}: no TensorRT ONNX parts for {', '.join(missing)}; write them first with "
                         "`llava-edge export MODEL --format tensorrt --out BUNDLE`")
    trt = import_tensorrt()
    gpu = current_gpu()
    cache = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else None
    with extend_bundle(bundle, ENGINE_DIR) as writer:
        for part in parts:
            key = f"{ONNX_KEY}/{part}"
            source = component_path(writer.root, writer.manifest, key, verify=True)
            dims = ModelDims(**writer.manifest.components[key].details["dims"])
            shapes = profile.shapes(part, dims)
            say(f"building the {part} engine (TensorRT {trt.__version__}, {gpu['name']})")
            engine, cache = build_engine(trt, source, shapes, strongly_typed=strongly_typed,
                                         workspace_bytes=workspace_bytes, timing_cache=cache)
            rel = f"{ENGINE_DIR}/{part}.engine"
            atomic_write_bytes(writer.path(rel), engine)
            writer.add(f"{ENGINE_KEY}/{part}", rel, format="tensorrt",
                       precision=writer.manifest.components[key].precision,
                       details={"tensorrt_version": trt.__version__, "gpu": gpu, "built_from": key,
                                "built_from_sha256": writer.manifest.components[key].sha256,
                                "profile": {n: [list(s) for s in v] for n, v in shapes.items()},
                                "strongly_typed": strongly_typed, "portable": False, "note": NOT_PORTABLE})
    if timing_cache:
        atomic_write_bytes(Path(timing_cache), cache)
    return bundle
