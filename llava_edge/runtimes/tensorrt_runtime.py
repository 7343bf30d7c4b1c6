"""The ``tensorrt`` backend: runs a bundle's TensorRT engines (``llava-edge build-engines``) on an
NVIDIA GPU, with the same four primitives as the other backends.

Device memory is torch's (CUDA tensors): every engine input and output is a torch tensor whose
address is handed to the execution context, and the work is queued on torch's current stream, so
torch and TensorRT never race. The KV cache stays in device memory between steps: each decoder
call's ``present.*`` outputs are kept as CUDA tensors and bound as the next call's
``past_key_values.*`` inputs; only logits and image embeddings are copied to the host.

Engines are tied to the TensorRT version and GPU model they were built for (the manifest records
both, :mod:`llava_edge.export.tensorrt.builder`); opening a bundle on another refuses with a message
naming both, as a :class:`~llava_edge.errors.RuntimeNotAvailable` so ``runtime="auto"`` moves on to
the next runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

try:
    import tensorrt as trt
except ImportError as exc:  # the registry turns this into an install hint
    raise ImportError("tensorrt is not installed", name="tensorrt") from exc

from llava_edge.errors import ImageError, ModelError
from llava_edge.export.bundle import Manifest, component_path, read_manifest
from llava_edge.export.onnx.specs import (
    ATTENTION_MASK, IMAGE_EMBEDS, IMAGE_FEATURES, INPUT_IDS, INPUTS_EMBEDS, LOGITS, PARTS, PIXEL_VALUES,
    POSITION_IDS, past_name, present_name,
)
from llava_edge.export.tensorrt.builder import ENGINE_KEY, check_engine_matches, current_gpu, trt_logger
from llava_edge.model.templates import get_template
from llava_edge.model.tokenizer import Tokenizer
from llava_edge.runtimes.base import Prompt, Runtime


class _Engine:
    """One deserialized engine and its execution context; runs on torch CUDA tensors."""

    def __init__(self, runtime: trt.Runtime, data: bytes, path: Path):
        import torch

        self.torch = torch
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise ModelError(f"{path}: TensorRT cannot deserialize this engine (damaged, or built by "
                             "another TensorRT): rebuild it with `llava-edge build-engines`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                  trt.DataType.BF16: torch.bfloat16, trt.DataType.INT32: torch.int32,
                  trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        self._empty = torch.empty(1, dtype=torch.uint8, device="cuda")  # address for zero-size tensors

    def __call__(self, feeds: dict) -> dict:
        """Inputs (torch tensors, any device) -> outputs (CUDA tensors), queued on torch's stream."""
        torch = self.torch
        staged = []  # the inputs' device copies, alive until the work is queued
        for name in self.inputs:
            t = feeds[name].to("cuda", dtype=self.dtypes[name]).contiguous()
            staged.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr() if t.numel() else self._empty.data_ptr())
        out = {}
        for name in self.outputs:
            t = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device="cuda")
            out[name] = t
            self.context.set_tensor_address(name, t.data_ptr() if t.numel() else self._empty.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise ModelError("TensorRT failed to run the engine (shapes outside its profile?)")
        return out


class TensorRTRuntime(Runtime):
    name = "tensorrt"

    def __init__(self, engines: dict[str, _Engine], *, manifest: Manifest, bundle: Path, **kwargs):
        super().__init__(**kwargs)
        import torch

        self.torch = torch
        self.engines = engines
        self.manifest = manifest
        self.bundle = bundle
        decoder = engines["decoder"]
        self._past_names = [n for n in decoder.inputs if n.startswith("past_key_values.")]
        self._present_names = [present_name(*n.split(".")[1:]) for n in self._past_names]
        self.n_layers = len(self._past_names) // 2
        dims = manifest.components[f"{ENGINE_KEY}/decoder"].details["profile"][past_name(0, "key")][0]
        self._kv_heads, self._head_dim = dims[1], dims[3]
        self._kv_dtype = decoder.dtypes[past_name(0, "key")]
        self._past: list | None = None
        self._past_len = 0

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True, image_cache_size: int = 16) -> TensorRTRuntime:
        """Load the engines of the bundle at ``path`` (built here by ``llava-edge build-engines``).
        ``verify``: check every engine's sha256 against the manifest."""
        bundle = Path(path).expanduser()
        manifest = read_manifest(bundle)
        gpu = current_gpu()
        runtime = trt.Runtime(trt_logger(trt))
        engines = {}
        for part in PARTS:
            key = f"{ENGINE_KEY}/{part}"
            if key not in manifest.components:
                raise ModelError(f"{bundle}: no TensorRT engine for {part}; build the engines on this machine "
                                 f"with `llava-edge build-engines {bundle}`")
            check_engine_matches(bundle, key, manifest.components[key].details, trt.__version__, gpu)
            file = component_path(bundle, manifest, key, verify=verify)
            engines[part] = _Engine(runtime, file.read_bytes(), file)
        return cls(engines, manifest=manifest, bundle=bundle, tokenizer=Tokenizer.from_folder(bundle),
                   template=get_template(manifest.template), preprocess=manifest.preprocess_config,
                   n_image_tokens=manifest.n_image_tokens, image_token_id=manifest.image_token_id,
                   image_cache_size=image_cache_size)

    def model_files(self) -> list[Path]:
        return [self.bundle / self.manifest.components[f"{ENGINE_KEY}/{p}"].file for p in PARTS]

    # --- the four primitives -----------------------------------------------------------------------
    def _encode_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        size = self.preprocess_config.size
        pixels = np.asarray(pixel_values)
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise ImageError(f"pixel values of shape {tuple(pixels.shape)}; this model takes [n, 3, {size}, {size}]")
        features = self.engines["vision"]({PIXEL_VALUES: self.torch.from_numpy(pixels.astype(np.float32))})
        embeds = self.engines["projector"]({IMAGE_FEATURES: features[IMAGE_FEATURES]})[IMAGE_EMBEDS]
        return embeds.float().cpu().numpy()

    def _embeds(self, prompt: Prompt):
        """[seq, d_model] CUDA embeddings with the image rows spliced in at image-token positions."""
        torch = self.torch
        ids = torch.from_numpy(prompt.input_ids)
        embeds = self.engines["embeddings"]({INPUT_IDS: ids[None]})[INPUTS_EMBEDS][0]
        if prompt.image_embeds:
            rows = torch.from_numpy(np.concatenate(prompt.image_embeds)).to("cuda", embeds.dtype)
            embeds[(ids == self.image_token_id).to("cuda")] = rows
        return embeds

    def logits(self, prompt: Prompt) -> np.ndarray:
        prompt.check(self.image_token_id, self.n_image_tokens)
        saved = self._past, self._past_len
        self._reset_past()
        try:
            return self._decode(self._embeds(prompt)[None])
        finally:
            self._past, self._past_len = saved

    def _prefill(self, prompt: Prompt, reuse: int) -> np.ndarray:
        if reuse == 0 or self._past is None or self._past_len < reuse:
            self._reset_past()
        elif self._past_len > reuse:
            self._past = [p[:, :, :reuse].contiguous() for p in self._past]
            self._past_len = reuse
        return self._decode(self._embeds(prompt)[self._past_len:][None])[-1]

    def _step(self, token_id: int) -> np.ndarray:
        ids = self.torch.tensor([[token_id]], dtype=self.torch.int64)
        embeds = self.engines["embeddings"]({INPUT_IDS: ids})[INPUTS_EMBEDS]
        return self._decode(embeds)[-1]

    def reset(self) -> None:
        super().reset()
        self._past, self._past_len = None, 0

    # --- the KV cache, in device memory --------------------------------------------------------------
    def _reset_past(self) -> None:
        empty = self.torch.empty((1, self._kv_heads, 0, self._head_dim), dtype=self._kv_dtype, device="cuda")
        self._past, self._past_len = [empty] * len(self._past_names), 0

    def _decode(self, embeds) -> np.ndarray:
        """Run ``embeds`` [1, n, d] after the cached positions; the cache grows by n. -> logits [n, vocab]."""
        torch = self.torch
        start, n = self._past_len, embeds.shape[1]
        feeds = {INPUTS_EMBEDS: embeds, ATTENTION_MASK: torch.ones((1, start + n), dtype=torch.int64),
                 POSITION_IDS: torch.arange(start, start + n, dtype=torch.int64)[None]}
        feeds.update(zip(self._past_names, self._past))
        out = self.engines["decoder"](feeds)
        self._past, self._past_len = [out[name] for name in self._present_names], start + n
        return out[LOGITS][0].float().cpu().numpy()
