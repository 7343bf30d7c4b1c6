"""The ``onnx`` backend: runs an ONNX bundle with onnxruntime, numpy, Pillow and tokenizers only.

Neither torch nor transformers is imported (a desktop app installs onnxruntime and our core
dependencies; tests/test_onnx_runtime.py proves it in a subprocess where importing them fails).

The KV cache never leaves onnxruntime between steps: the decoder runs with IO binding, its
``present.*`` outputs are kept as ``OrtValue``s (on the provider's device) and bound as the next
step's ``past_key_values.*`` inputs, so no step copies the cache into numpy and back. Only a prefix
reuse that drops cached positions (a new turn that diverges from the cache) copies it once.

Everything a user can get wrong — a missing, truncated or altered file, a missing execution provider,
pixels of the wrong size — is a :class:`~llava_edge.errors.UserError` with a message that says what
and where, checked before onnxruntime sees it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

try:
    import onnxruntime as ort
except ImportError as exc:  # the registry turns this into "pip install 'llava-edge[onnx]'"
    raise ImportError("onnxruntime is not installed", name="onnxruntime") from exc

from llava_edge.errors import ImageError, ModelError, RuntimeNotAvailable
from llava_edge.export.bundle import Manifest, component_path, read_manifest
from llava_edge.export.onnx.specs import (
    ATTENTION_MASK, IMAGE_EMBEDS, IMAGE_FEATURES, INPUT_IDS, INPUTS_EMBEDS, LOGITS, PARTS,
    PIXEL_VALUES, POSITION_IDS, past_name, present_name,
)
from llava_edge.model.templates import get_template
from llava_edge.model.tokenizer import Tokenizer
from llava_edge.runtimes.base import Prompt, Runtime

#: Our provider names -> onnxruntime's, and how to get each.
PROVIDERS = {
    "cpu": ("CPUExecutionProvider", "it is part of every onnxruntime package"),
    "cuda": ("CUDAExecutionProvider", "pip install onnxruntime-gpu (instead of onnxruntime), with CUDA 12"),
    "dml": ("DmlExecutionProvider", "pip install onnxruntime-directml (Windows)"),
    "coreml": ("CoreMLExecutionProvider", "use the onnxruntime wheel for macOS"),
    "openvino": ("OpenVINOExecutionProvider", "pip install onnxruntime-openvino"),
}
_DEVICE_OF_PROVIDER = {"cuda": "cuda", "dml": "dml"}  # where the KV cache lives between steps
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def resolve_providers(provider: str) -> list[str]:
    """onnxruntime provider list for one of our names; a clear error when it is not installed."""
    if provider not in PROVIDERS:
        raise RuntimeNotAvailable(f"unknown execution provider {provider!r}; choose one of: "
                                  f"{', '.join(PROVIDERS)}")
    ort_name, hint = PROVIDERS[provider]
    available = ort.get_available_providers()
    if ort_name not in available:
        have = [name for name, (o, _) in PROVIDERS.items() if o in available]
        raise RuntimeNotAvailable(
            f"execution provider {provider!r} ({ort_name}) is not available in this onnxruntime "
            f"{ort.__version__} (available: {', '.join(have) or 'none'}); to get it: {hint}")
    return [ort_name] if ort_name == "CPUExecutionProvider" else [ort_name, "CPUExecutionProvider"]


def _check_extra_files(bundle: Path, manifest: Manifest, key: str) -> None:
    """External-data files must have the size recorded at export: a truncated one would otherwise
    reach onnxruntime, which reads weights from it by offset."""
    comp = manifest.components[key]
    for rel, size in comp.details.get("extra_bytes", {}).items():
        actual = (bundle / rel).stat().st_size
        if actual != size:
            raise ModelError(f"{bundle / rel}: {actual} bytes, the manifest says {size}: the external "
                             f"weights of {key!r} are truncated or were replaced; re-export the bundle")


def _load_session(path: Path, providers: list[str], options) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's pybind errors share no useful base class
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: onnxruntime cannot load this file ({first[:300]}); the file or its "
                         "external data is damaged or incompatible: re-export the bundle") from None


class OnnxRuntime(Runtime):
    name = "onnx"

    def __init__(self, sessions: dict[str, ort.InferenceSession], *, manifest: Manifest, bundle: Path,
                 device: str = "cpu", components: str = "onnx", **kwargs):
        super().__init__(**kwargs)
        self.sessions = sessions
        self.manifest = manifest
        self.bundle = bundle
        self.device = device
        self._check_contract()
        decoder = sessions["decoder"]
        inputs = {i.name: i for i in decoder.get_inputs()}
        self.n_layers = sum(1 for n in inputs if n.startswith("past_key_values.")) // 2
        past = inputs[past_name(0, "key")]
        self._kv_heads, self._head_dim = past.shape[1], past.shape[3]
        self._kv_dtype = _ORT_TYPES.get(past.type, np.float32)
        self._past_names = [past_name(i, k) for i in range(self.n_layers) for k in ("key", "value")]
        self._present_names = [present_name(i, k) for i in range(self.n_layers) for k in ("key", "value")]
        self._past: list | None = None  # OrtValues, one per past input
        self._past_len = 0
        self.components = components  # the manifest's component prefix the sessions were loaded from

    # --- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, provider: str = "cpu", verify: bool = True,
             threads: int | None = None, components: str = "onnx", image_cache_size: int = 16) -> OnnxRuntime:
        """Load the ONNX components of the bundle at ``path``.

        ``provider``: cpu (default), cuda, dml, coreml or openvino. ``verify``: check every file's
        sha256 against the manifest (seconds per GB; ``False`` checks sizes only). ``threads``:
        onnxruntime intra-op threads (default: onnxruntime's choice, one per core). ``components``:
        which ONNX parts to run, ``onnx`` (default) or ``tensorrt-onnx`` (the TensorRT flavour,
        standard operators only: how its files are checked where TensorRT is absent)."""
        bundle = Path(path).expanduser()
        manifest = read_manifest(bundle)
        providers = resolve_providers(provider)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        sessions = {}
        for part in PARTS:
            key = f"{components}/{part}"
            if key not in manifest.components:
                raise ModelError(f"{bundle}: the bundle has no {key} component (it has: "
                                 f"{', '.join(manifest.components) or 'none'}); export it with "
                                 f"`llava-edge export MODEL --format {components.removesuffix('-onnx')}`")
            file = component_path(bundle, manifest, key, verify=verify)
            _check_extra_files(bundle, manifest, key)
            sessions[part] = _load_session(file, providers, options)
        tokenizer = Tokenizer.from_folder(bundle)
        return cls(
            sessions, manifest=manifest, bundle=bundle, device=_DEVICE_OF_PROVIDER.get(provider, "cpu"),
            components=components,
            tokenizer=tokenizer, template=get_template(manifest.template),
            preprocess=manifest.preprocess_config, n_image_tokens=manifest.n_image_tokens,
            image_token_id=manifest.image_token_id, image_cache_size=image_cache_size,
        )

    def model_files(self) -> list[Path]:
        """The files this runtime loaded (for sizes in drift and bench reports)."""
        comps = [self.manifest.components[f"{self.components}/{part}"] for part in PARTS]
        return [self.bundle / rel for comp in comps for rel in (comp.file, *comp.extra_files)]

    def _check_contract(self) -> None:
        """The sessions have the inputs and outputs of our ONNX parts, with consistent sizes."""
        expected = {
            "vision": ([PIXEL_VALUES], [IMAGE_FEATURES]),
            "projector": ([IMAGE_FEATURES], [IMAGE_EMBEDS]),
            "embeddings": ([INPUT_IDS], [INPUTS_EMBEDS]),
            "decoder": ([INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS, past_name(0, "key")],
                        [LOGITS, present_name(0, "key")]),
        }
        for part, (ins, outs) in expected.items():
            session = self.sessions[part]
            have_in = {i.name for i in session.get_inputs()}
            have_out = {o.name for o in session.get_outputs()}
            missing = [n for n in ins if n not in have_in] + [n for n in outs if n not in have_out]
            if missing:
                raise ModelError(f"{self.bundle}: the ONNX {part} file lacks {missing}; it was not "
                                 "written by llava-edge's ONNX export: re-export the bundle")
        pixels = self.sessions["vision"].get_inputs()[0].shape
        self._image_size = pixels[2] if isinstance(pixels[2], int) else None
        size = self.preprocess_config.size
        if self._image_size is not None and self._image_size != size:
            raise ModelError(f"{self.bundle}: the vision model takes {self._image_size} px images but the "
                             f"manifest preprocesses to {size} px; the bundle is inconsistent: re-export it")

    # --- the four primitives -----------------------------------------------------------------------
    def _encode_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixel_values)
        size = self._image_size or self.preprocess_config.size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise ImageError(
                f"pixel values of shape {tuple(pixels.shape)}; this model takes [n, 3, {size}, {size}] "
                "(preprocess images with llava_edge.model.image.preprocess, or pass images to "
                "encode_image, which does)")
        features = self.sessions["vision"].run(None, {PIXEL_VALUES: pixels.astype(np.float32, copy=False)})[0]
        return self.sessions["projector"].run(None, {IMAGE_FEATURES: features})[0]

    def _embeds(self, prompt: Prompt) -> np.ndarray:
        """[seq, d_model] input embeddings with the image rows spliced in at image-token positions."""
        ids = prompt.input_ids
        embeds = self.sessions["embeddings"].run(None, {INPUT_IDS: ids[None]})[0][0]
        if prompt.image_embeds:
            embeds[ids == self.image_token_id] = np.concatenate(prompt.image_embeds).astype(embeds.dtype)
        return embeds

    def logits(self, prompt: Prompt) -> np.ndarray:
        prompt.check(self.image_token_id, self.n_image_tokens)
        embeds = self._embeds(prompt)[None]
        n = embeds.shape[1]
        feeds = {INPUTS_EMBEDS: embeds, ATTENTION_MASK: np.ones((1, n), np.int64),
                 POSITION_IDS: np.arange(n, dtype=np.int64)[None]}
        empty = self._empty_past()
        feeds.update({name: empty for name in self._past_names})
        return self.sessions["decoder"].run([LOGITS], feeds)[0][0].astype(np.float32, copy=False)

    def _prefill(self, prompt: Prompt, reuse: int) -> np.ndarray:
        if reuse == 0 or self._past is None or self._past_len < reuse:
            self._reset_past()
        elif self._past_len > reuse:
            self._crop_past(reuse)
        embeds = self._embeds(prompt)[self._past_len:]
        return self._decode(embeds[None])[-1]

    def _step(self, token_id: int) -> np.ndarray:
        embeds = self.sessions["embeddings"].run(None, {INPUT_IDS: np.array([[token_id]], np.int64)})[0]
        return self._decode(embeds)[-1]

    def reset(self) -> None:
        super().reset()
        self._past, self._past_len = None, 0

    # --- the KV cache ------------------------------------------------------------------------------
    def _empty_past(self) -> np.ndarray:
        return np.zeros((1, self._kv_heads, 0, self._head_dim), self._kv_dtype)

    def _reset_past(self) -> None:
        empty = ort.OrtValue.ortvalue_from_numpy(self._empty_past(), self.device, 0)
        self._past, self._past_len = [empty] * len(self._past_names), 0

    def _crop_past(self, length: int) -> None:
        """Keep the first ``length`` positions (a new turn diverged from the cache): one copy."""
        self._past = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :length]), self.device, 0)
            for v in self._past
        ]
        self._past_len = length

    def _decode(self, embeds: np.ndarray) -> np.ndarray:
        """Run ``embeds`` [1, n, d] after the cached positions; the cache grows by n. -> logits [n, vocab]."""
        start, n = self._past_len, embeds.shape[1]
        binding = self.sessions["decoder"].io_binding()
        binding.bind_cpu_input(INPUTS_EMBEDS, np.ascontiguousarray(embeds, dtype=np.float32))
        binding.bind_cpu_input(ATTENTION_MASK, np.ones((1, start + n), np.int64))
        binding.bind_cpu_input(POSITION_IDS, np.arange(start, start + n, dtype=np.int64)[None])
        for name, value in zip(self._past_names, self._past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(LOGITS, "cpu")
        for name in self._present_names:
            binding.bind_output(name, self.device)
        self.sessions["decoder"].run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self._past, self._past_len = list(outputs[1:]), start + n
        return outputs[0].numpy()[0].astype(np.float32, copy=False)
