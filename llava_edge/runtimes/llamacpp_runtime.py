"""The ``llamacpp`` backend: a bundle's GGUF files on llama.cpp (llama-cpp-python's low-level API).

The decoder is llama.cpp's; image embeddings reach it through a ``llama_batch`` carrying ``embd`` rows,
so they can come from either vision path:

* ``vision="onnx"``: the bundle's ONNX vision tower + projector (``onnx/vision``, ``onnx/projector``)
  on onnxruntime — numerically the transformers model.
* ``vision="mmproj"``: llama.cpp's own CLIP encoder (mtmd) on the bundle's ``gguf/mmproj`` file. In
  the llama.cpp this was built against, CLIP-encoder LLaVA models get wrong image embeddings
  (llama.cpp issue #25814: the graph puts CLS after the patches; see shared/DESIGN.md and
  ``tests/test_gguf_runtime.py``, which measures it).
* ``vision="auto"`` (default): ONNX when the bundle has it and the mmproj is affected by that defect;
  otherwise the mmproj, with a warning when it is the affected one.

Unlike llama-cpp-python's chat handlers, the KV cache is kept across turns: a new prompt only drops
the positions after the prefix it shares with the cache (``llama_memory_seq_rm``) and the image is
encoded once (the image-embedding cache of :class:`~llava_edge.runtimes.base.Runtime`).

Imports numpy, tokenizers, Pillow, llama-cpp-python (and onnxruntime for the ONNX path) only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import warnings
from pathlib import Path

import llama_cpp  # an ImportError here: the registry answers "pip install 'llava-edge[gguf]'"
import numpy as np
from llama_cpp import mtmd_cpp

from llava_edge.errors import ModelError, RuntimeNotAvailable, UserError
from llava_edge.export.bundle import Manifest, component_path, load_bundle_tokenizer, read_manifest
from llava_edge.export.gguf import check as gguf_check
from llava_edge.export.gguf.llamacpp import llama_logs, model_params
from llava_edge.model.templates import TEMPLATES, get_template
from llava_edge.runtimes.base import Prompt, Runtime

VISION_PATHS = ("auto", "onnx", "mmproj")
ONNX_VISION_PARTS = ("onnx/vision", "onnx/projector")


# --------------------------------------------------------------------------------------------------
# Batches: one for token ids, one for embedding rows, allocated once and reused
# --------------------------------------------------------------------------------------------------
class _Batch:
    def __init__(self, capacity: int, n_embd: int = 0):
        self.capacity = capacity
        self.batch = llama_cpp.llama_batch_init(capacity, n_embd, 1)
        b = self.batch
        if n_embd:
            self.embd = np.ctypeslib.as_array(b.embd, shape=(capacity, n_embd))
        else:
            self.token = np.ctypeslib.as_array(b.token, shape=(capacity,))
        self.pos = np.ctypeslib.as_array(b.pos, shape=(capacity,))
        self.logits = np.ctypeslib.as_array(b.logits, shape=(capacity,))
        np.ctypeslib.as_array(b.n_seq_id, shape=(capacity,))[:] = 1
        for i in range(capacity):
            b.seq_id[i][0] = 0

    def free(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None


class LlamaCppRuntime(Runtime):
    name = "llamacpp"

    def __init__(self, *, model, ctx, mtmd_ctx, onnx_sessions, vision: str, n_ctx: int, n_batch: int,
                 n_embd: int, n_vocab: int, n_threads: int, files: dict, **kwargs):
        super().__init__(**kwargs)
        self._model, self._ctx, self._mtmd = model, ctx, mtmd_ctx
        self._onnx = onnx_sessions
        self.vision = vision  # the path in use: "onnx", "mmproj" or "none"
        self.n_ctx, self.n_batch, self.n_embd, self.n_vocab = n_ctx, n_batch, n_embd, n_vocab
        self.n_threads = n_threads
        self.files = files
        self._tokens = _Batch(n_batch)
        self._embeds = _Batch(n_batch, n_embd)
        self._n_past = 0

    # --- opening a bundle ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, vision: str = "auto", quant: str | None = None,
             mmproj_quant: str | None = None, n_threads: int | None = None, n_ctx: int | None = None,
             n_batch: int = 512, kv_f32: bool = False, flash_attn: bool | None = None,
             verify: bool = False, **kwargs) -> LlamaCppRuntime:
        """Load a bundle's GGUF decoder (``quant``: which of its precisions; default the bundle's
        ``gguf/model``) and the chosen vision path.

        ``kv_f32``: an F32 KV cache, and (unless ``flash_attn`` says otherwise) no flash attention —
        the exact path for parity checks: llama.cpp's default F16 cache moves logits by ~5e-3 and its
        CPU flash attention, which rounds Q to F16, by ~1e-4. ``flash_attn``: None is llama.cpp's
        automatic choice. ``verify``: check the files' sha256 against the manifest first."""
        if vision not in VISION_PATHS:
            raise UserError(f"vision={vision!r}; choose one of: {', '.join(VISION_PATHS)}")
        bundle = Path(path)
        manifest = read_manifest(bundle)
        model_path = component_path(bundle, manifest, _pick(manifest, "gguf/model", quant), verify=verify)
        model_info = gguf_check.read_gguf_info(model_path, what="language-model GGUF")
        width = gguf_check.check_text_model(model_info)
        if width != manifest.d_model:
            raise ModelError(f"{model_path}: {width} wide, but the bundle's model is {manifest.d_model} wide")

        mmproj_path, mmproj_info = None, None
        if any(k.startswith("gguf/mmproj") for k in manifest.components):
            mmproj_path = component_path(bundle, manifest, _pick(manifest, "gguf/mmproj", mmproj_quant),
                                         verify=verify)
            mmproj_info = gguf_check.read_gguf_info(mmproj_path, what="mmproj GGUF")
            gguf_check.check_pair(model_info, mmproj_info)
            if gguf_check.mmproj_n_tokens(mmproj_info) != manifest.n_image_tokens:
                raise ModelError(f"{mmproj_path}: gives {gguf_check.mmproj_n_tokens(mmproj_info)} image "
                                 f"tokens; the bundle expects {manifest.n_image_tokens}")
        has_onnx = all(k in manifest.components for k in ONNX_VISION_PARTS)
        chosen = _choose_vision(vision, has_onnx, mmproj_info, bundle)

        n_threads = n_threads or os.cpu_count() or 1
        template = _template_from_gguf(model_info, manifest)
        tokenizer = load_bundle_tokenizer(bundle)
        sessions = _onnx_sessions(bundle, manifest, n_threads, verify) if chosen == "onnx" else None
        if flash_attn is None:  # llama.cpp's CPU flash attention rounds Q to F16 (1e-4)
            flash_attn = False if kv_f32 else None
        model, ctx, n_ctx, n_batch = _load_llama(model_path, n_ctx=n_ctx, n_batch=n_batch,
                                                 n_threads=n_threads, kv_f32=kv_f32, flash_attn=flash_attn)
        mtmd_ctx = None
        if chosen == "mmproj":
            try:
                mtmd_ctx = _load_mtmd(mmproj_path, model, n_threads)
            except BaseException:
                llama_cpp.llama_free(ctx)
                llama_cpp.llama_model_free(model)
                raise
        vocab = llama_cpp.llama_model_get_vocab(model)
        return cls(
            model=model, ctx=ctx, mtmd_ctx=mtmd_ctx, onnx_sessions=sessions, vision=chosen,
            n_ctx=n_ctx, n_batch=n_batch, n_embd=width, n_vocab=llama_cpp.llama_vocab_n_tokens(vocab),
            n_threads=n_threads, files={"model": model_path, "mmproj": mmproj_path},
            tokenizer=tokenizer, template=template,
            preprocess=manifest.preprocess_config, n_image_tokens=manifest.n_image_tokens,
            image_token_id=manifest.image_token_id, **kwargs,
        )

    # --- the four primitives ---------------------------------------------------------------------
    def _encode_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        if self.vision == "onnx":
            return self._encode_onnx(pixel_values)
        if self.vision == "mmproj":
            return np.stack([self._encode_mmproj(p) for p in pixel_values])
        raise UserError("this runtime has no vision path: the bundle has neither an mmproj GGUF nor "
                        "ONNX vision parts; re-export it with images")

    def logits(self, prompt: Prompt) -> np.ndarray:
        """Teacher-forced logits of the whole prompt. Runs in the one KV sequence, so the chat cache
        is cleared (the next ``generate`` recomputes its prompt)."""
        prompt.check(self.image_token_id, self.n_image_tokens)
        self._cached_keys = []
        self._clear()
        try:
            return self._decode(prompt, 0, all_logits=True)
        finally:
            self._clear()

    def _prefill(self, prompt: Prompt, reuse: int) -> np.ndarray:
        mem = llama_cpp.llama_get_memory(self._ctx)
        if reuse == 0 or not llama_cpp.llama_memory_seq_rm(mem, 0, reuse, -1):
            if reuse:  # a cache that cannot drop a tail: recompute (correct, only slower)
                self.stats["reused_tokens"] -= reuse
                self.stats["prefill_tokens"] += reuse
            reuse = 0
            self._clear()
        self._n_past = reuse
        return self._decode(prompt, reuse)[-1]

    def _step(self, token_id: int) -> np.ndarray:
        self._check_room(1)
        b = self._tokens
        b.token[0], b.pos[0], b.logits[0] = token_id, self._n_past, 1
        self._run(b, 1)
        self._n_past += 1
        return self._read_logits(1)[-1]

    def reset(self) -> None:
        super().reset()
        self._clear()

    # --- decoding --------------------------------------------------------------------------------
    def _clear(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        self._n_past = 0

    def _check_room(self, n: int) -> None:
        if self._n_past + n > self.n_ctx:
            raise UserError(f"the conversation needs {self._n_past + n} positions but the context holds "
                            f"{self.n_ctx}; open the runtime with a larger n_ctx or start a new chat")

    def _decode(self, prompt: Prompt, start: int, all_logits: bool = False) -> np.ndarray:
        """Run positions ``start..`` of the prompt; logits of every run position, or of the last."""
        ids = prompt.input_ids
        self._n_past = start
        self._check_room(len(ids) - start)
        is_image = ids == self.image_token_id
        rows = (np.ascontiguousarray(np.concatenate(prompt.image_embeds), dtype=np.float32)
                if prompt.image_embeds else np.zeros((0, self.n_embd), np.float32))
        if rows.shape[1:] != (self.n_embd,):
            raise UserError(f"image embeddings are {rows.shape[1:]} wide; the model takes {self.n_embd}")
        row_of = np.cumsum(is_image) - 1  # index into rows at image positions
        out, pos = [], start
        while pos < len(ids):
            image = bool(is_image[pos])
            end = pos
            while end < len(ids) and bool(is_image[end]) == image and end - pos < self.n_batch:
                end += 1
            n = end - pos
            b = self._embeds if image else self._tokens
            if image:
                b.embd[:n] = rows[row_of[pos]:row_of[pos] + n]
            else:
                b.token[:n] = ids[pos:end]
            b.pos[:n] = np.arange(pos, end)
            b.logits[:n] = 1 if all_logits else 0
            if not all_logits and end == len(ids):
                b.logits[n - 1] = 1
            self._run(b, n)
            if all_logits:
                out.append(self._read_logits(n))
            pos = end
            self._n_past = end
        return np.concatenate(out) if all_logits else self._read_logits(1)

    def _run(self, b: _Batch, n: int) -> None:
        b.batch.n_tokens = n
        with llama_logs() as logs:
            rc = llama_cpp.llama_decode(self._ctx, b.batch)
        if rc != 0:
            raise ModelError(f"llama_decode failed (code {rc}) at position {self._n_past}: "
                             f"{logs.last_error() or 'no message'}")

    def _read_logits(self, n: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab)).astype(np.float32, copy=True)

    # --- vision paths ----------------------------------------------------------------------------
    def _encode_onnx(self, pixel_values: np.ndarray) -> np.ndarray:
        x = pixel_values
        for session in self._onnx:  # vision, then projector; fp16 parts may keep fp16 inputs
            inp = session.get_inputs()[0]
            dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
            x = session.run(None, {inp.name: np.ascontiguousarray(x, dtype=dtype)})[0]
        return np.asarray(x, dtype=np.float32)

    def _encode_mmproj(self, pixels: np.ndarray) -> np.ndarray:
        """llama.cpp's encoder takes 8-bit RGB and normalises itself. Our pixels are normalised 8-bit
        values, so inverting the normalisation gives back those exact bytes; at the model's input size
        mtmd neither pads nor resizes, so it sees exactly what the other paths see."""
        cfg = self.preprocess_config
        mean = np.asarray(cfg.mean, np.float64)[:, None, None]
        std = np.asarray(cfg.std, np.float64)[:, None, None]
        rgb = np.rint((pixels.astype(np.float64) * std + mean) * 255.0)
        rgb = np.ascontiguousarray(np.clip(rgb, 0, 255).astype(np.uint8).transpose(1, 2, 0))
        h, w = rgb.shape[:2]
        data = rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        bitmap = mtmd_cpp.mtmd_bitmap_init(w, h, data)
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        try:
            marker = mtmd_cpp.mtmd_default_marker()
            text = mtmd_cpp.mtmd_input_text(marker, len(marker), False, True)
            bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
            with llama_logs() as logs:
                rc = mtmd_cpp.mtmd_tokenize(self._mtmd, chunks, ctypes.byref(text), bitmaps, 1)
                if rc != 0:
                    raise ModelError(f"mtmd_tokenize failed (code {rc}): {logs.last_error()}")
                for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
                    chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                    if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                        break
                else:
                    raise ModelError("mtmd produced no image chunk")
                n_tokens = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
                if n_tokens != self.n_image_tokens:
                    raise ModelError(f"llama.cpp's encoder gives {n_tokens} image tokens; the model "
                                     f"expects {self.n_image_tokens}")
                rc = mtmd_cpp.mtmd_encode_chunk(self._mtmd, chunk)
                if rc != 0:
                    raise ModelError(f"mtmd_encode_chunk failed (code {rc}): {logs.last_error()}")
            ptr = mtmd_cpp.mtmd_get_output_embd(self._mtmd)
            return np.ctypeslib.as_array(ptr, shape=(n_tokens, self.n_embd)).astype(np.float32, copy=True)
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            mtmd_cpp.mtmd_bitmap_free(bitmap)

    # --- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Free llama.cpp's memory now (also done when the runtime is garbage collected)."""
        for b in (getattr(self, "_tokens", None), getattr(self, "_embeds", None)):
            if b is not None:
                b.free()
        if getattr(self, "_mtmd", None):
            mtmd_cpp.mtmd_free(self._mtmd)
            self._mtmd = None
        if getattr(self, "_ctx", None):
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> LlamaCppRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# helpers of open()
# --------------------------------------------------------------------------------------------------
def _load_llama(path: Path, *, n_ctx: int | None, n_batch: int, n_threads: int, kv_f32: bool,
                flash_attn: bool | None):
    """(model, context, n_ctx, n_batch) — or a ModelError quoting llama.cpp's log."""
    with llama_logs() as logs:
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params())
        if not model:
            raise ModelError(f"llama.cpp could not load {path}: {logs.last_error() or 'no message'}")
        n_ctx = int(n_ctx or min(llama_cpp.llama_n_ctx_train(model), 4096))
        n_batch = min(n_batch, n_ctx)
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, n_batch, 1
        p.n_threads = p.n_threads_batch = n_threads
        p.no_perf = True
        p.flash_attn_type = {None: -1, False: 0, True: 1}[flash_attn]
        if kv_f32:
            p.type_k = p.type_v = llama_cpp.GGML_TYPE_F32
        ctx = llama_cpp.llama_init_from_model(model, p)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise ModelError(f"llama.cpp could not create a context for {path}: "
                             f"{logs.last_error() or 'no message'}")
    return model, ctx, n_ctx, n_batch


def _load_mtmd(path: Path, model, n_threads: int):
    with llama_logs() as logs:
        p = mtmd_cpp.mtmd_context_params_default()
        p.use_gpu, p.print_timings, p.n_threads, p.warmup = False, False, n_threads, False
        ctx = mtmd_cpp.mtmd_init_from_file(str(path).encode(), model, p)
        if not ctx:
            raise ModelError(f"llama.cpp could not load the projector {path}: "
                             f"{logs.last_error() or 'no message'}")
    return ctx


def _pick(manifest: Manifest, part: str, precision: str | None) -> str:
    """The component key of ``part`` ("gguf/model" or "gguf/mmproj") at ``precision`` (None: default)."""
    if precision is None:
        if part not in manifest.components:
            raise ModelError(f"the bundle has no {part!r} component; export it with --format gguf")
        return part
    keys = [k for k, c in manifest.components.items()
            if (k == part or k.startswith(part + "-")) and c.precision.upper() == precision.upper()]
    if not keys:
        have = [c.precision for k, c in manifest.components.items() if k == part or k.startswith(part + "-")]
        raise ModelError(f"the bundle has no {part} at {precision}; it has: {', '.join(have) or 'none'}")
    return keys[0]


def _choose_vision(vision: str, has_onnx: bool, mmproj_info, bundle: Path) -> str:
    affected = mmproj_info is not None and gguf_check.has_cls_token(mmproj_info)
    if vision == "onnx":
        if not has_onnx:
            raise ModelError(f"{bundle}: vision='onnx' needs the bundle's ONNX vision parts "
                             f"({', '.join(ONNX_VISION_PARTS)}); export them with --format onnx,gguf")
        return "onnx"
    if vision == "mmproj":
        if mmproj_info is None:
            raise ModelError(f"{bundle}: vision='mmproj' needs a gguf/mmproj component")
        return "mmproj"
    if has_onnx and (affected or mmproj_info is None):
        return "onnx"
    if mmproj_info is not None:
        if affected:
            warnings.warn(
                f"{bundle}: using llama.cpp's own CLIP encoder, which gives wrong image embeddings for "
                "CLIP-encoder LLaVA models in this llama.cpp (issue #25814, CLS order); export the ONNX "
                "vision parts into the bundle to get the correct path", stacklevel=3)
        return "mmproj"
    return "none"


def _template_from_gguf(info, manifest: Manifest):
    """The chat template the GGUF carries, as one of ours; it must agree with the manifest."""
    jinja = info.get("tokenizer.chat_template")
    match = next((t for t in TEMPLATES.values() if jinja and t.jinja == jinja), None)
    if match is None:
        warnings.warn(f"{info.path}: its chat template is not one of llava-edge's; using the bundle's "
                      f"{manifest.template!r}", stacklevel=3)
        return get_template(manifest.template)
    if match.name != manifest.template:
        raise ModelError(f"{info.path}: its chat template is {match.name!r} but the bundle says "
                         f"{manifest.template!r}; the GGUF comes from another export")
    return match


def _onnx_sessions(bundle: Path, manifest: Manifest, n_threads: int, verify: bool) -> list:
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeNotAvailable(
            "vision='onnx' needs onnxruntime (pip install 'llava-edge[onnx]')") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = n_threads
    return [ort.InferenceSession(str(component_path(bundle, manifest, key, verify=verify)), options,
                                 providers=["CPUExecutionProvider"])
            for key in ONNX_VISION_PARTS]
