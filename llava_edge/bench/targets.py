"""What one bench target measures, run inside its own worker process (:mod:`.worker`).

Three kinds of target, measured the same way where they can be:

* a llava-edge runtime (``llamacpp``, ``onnx``, ``torch``, or a registered third-party one), opened
  with :func:`llava_edge.load`;
* ``raw-llamacpp``: llama.cpp with nothing of ours, driven through llama-cpp-python's C bindings the
  way llama.cpp's own ``llama-mtmd-cli`` does (mtmd encodes the image, ``llama_decode`` prefills and
  decodes, llama.cpp's greedy sampler picks) — the floor our ``llamacpp`` runtime's overhead is
  measured against;
* ``llama-cpp-python``: its high-level ``Llama`` + ``MTMDChatHandler`` on the same GGUF and mmproj —
  what an app would otherwise use.

``load_ms``: opening the model, after the backend's library is imported (as for the baselines).
Per repeat (after one warm-up pass that is not recorded), from a cold state (no KV cache, no cached
image embeddings):

* ``image_encode_ms``: image file -> embeddings (decode, preprocess, vision tower, projector);
* ``prefill_ms``: the prompt (text + image rows) from an empty cache to the first token's logits;
* ``ttft_ms``: image file to first token id: encode + prompt tokenization + prefill + sampling;
* ``decode_tok_s``: ``n_tokens - 1`` further greedy tokens, end-of-sequence ignored so every target
  decodes the same number;
* ``chat_ttft_ms``: the same first turn through the public chat API (image file in, first text piece
  out), and ``turn2_ttft_ms``: a follow-up question in that conversation, to its first text piece
  (our runtimes keep the image embeddings and the KV prefix; llama-cpp-python re-encodes the image
  and re-runs the whole prompt).
"""

from __future__ import annotations

import base64
import ctypes
import os
import time
from pathlib import Path

import numpy as np

RAW_LLAMACPP = "raw-llamacpp"
LLAMA_CPP_PYTHON = "llama-cpp-python"
BASELINES = (RAW_LLAMACPP, LLAMA_CPP_PYTHON)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def measure(spec: dict) -> dict:
    """Run the target ``spec["target"]``; a dict of per-repeat lists plus facts (files, notes)."""
    if spec["target"] == RAW_LLAMACPP:
        return measure_raw_llamacpp(spec)
    if spec["target"] == LLAMA_CPP_PYTHON:
        return measure_llama_cpp_python(spec)
    return measure_runtime(spec)


# --------------------------------------------------------------------------------------------------
# our runtimes
# --------------------------------------------------------------------------------------------------
def measure_runtime(spec: dict) -> dict:
    from llava_edge.api import load
    from llava_edge.model.templates import USER, encode_conversation
    from llava_edge.runtimes.base import Prompt
    from llava_edge.runtimes.registry import get_runtime_class

    name, threads, n_tokens = spec["target"], spec.get("threads"), spec["n_tokens"]
    source = spec["model_dir"] if name == "torch" and spec.get("model_dir") else spec["source"]
    if name == "torch" and threads:
        import torch

        torch.set_num_threads(threads)
    get_runtime_class(name)  # the backend's module and library imported untimed, as the baselines'
    start = time.perf_counter()
    assistant = load(source, runtime=name, threads=threads, **spec.get("options", {}))
    load_ms = _ms(time.perf_counter() - start)
    rt = assistant.runtime
    image, text = spec["image"], spec["prompt"]

    def one_pass() -> dict:
        rt.reset()
        rt._image_cache.clear()
        t0 = time.perf_counter()
        embeds, key = rt._encode_with_key(image)
        t1 = time.perf_counter()
        ids = encode_conversation(rt.tokenizer, rt.template, [(USER, f"<image>\n{text}")],
                                  rt.n_image_tokens, add_generation_prompt=True).input_ids
        prompt = Prompt(ids, [embeds], [key])
        t2 = time.perf_counter()
        token = int(np.argmax(rt._prefill(prompt, 0)))
        t3 = time.perf_counter()
        for _ in range(n_tokens - 1):
            token = int(np.argmax(rt._step(token)))
        t4 = time.perf_counter()
        rt.reset()
        rt._image_cache.clear()
        chat = assistant.chat(max_new_tokens=n_tokens)
        t5 = time.perf_counter()
        reply = chat.send(text, image=image)
        next(reply, None)
        t6 = time.perf_counter()
        for _ in reply:
            pass
        t7 = time.perf_counter()
        next(chat.send(spec["followup"], max_new_tokens=1), None)
        t8 = time.perf_counter()
        return {"image_encode_ms": _ms(t1 - t0), "prefill_ms": _ms(t3 - t2), "ttft_ms": _ms(t3 - t0),
                "decode_tok_s": round((n_tokens - 1) / (t4 - t3), 2) if n_tokens > 1 else None,
                "chat_ttft_ms": _ms(t6 - t5), "turn2_ttft_ms": _ms(t8 - t7),
                "prompt_tokens": len(ids)}

    one_pass()  # warm-up: first-call allocations, graph optimisation
    runs = [one_pass() for _ in range(spec["repeats"])]
    files = runtime_files(rt, Path(source))
    facts = {"vision": getattr(rt, "vision", None), "files": [str(f) for f in files],
             "file_bytes": sum(f.stat().st_size for f in files), "load_ms": load_ms, "notes": []}
    assistant.close()
    return {**facts, "runs": runs}


def runtime_files(rt, source: Path) -> list[Path]:
    """The files a runtime loaded: its ``model_files()`` if it has one; for our backends, the bundle
    components they open; for torch, the weights."""
    files = getattr(rt, "model_files", None)
    if callable(files):
        return [Path(f) for f in files()]
    from llava_edge.export.bundle import is_bundle, read_manifest

    if not is_bundle(source):
        return sorted(source.glob("*.safetensors"))
    manifest = read_manifest(source)
    if rt.name == "llamacpp":
        keys = [k for k, c in manifest.components.items()
                if (source / c.file) in (Path(rt.files["model"]), Path(rt.files.get("mmproj") or "-"))]
        if rt.vision != "mmproj":
            keys = [k for k in keys if not k.startswith("gguf/mmproj")]
        if rt.vision == "onnx":
            keys += ["onnx/vision", "onnx/projector"]
    else:
        keys = [k for k in manifest.components if k.startswith(f"{rt.name}/")]
    out = []
    for key in keys:
        comp = manifest.components[key]
        out += [source / comp.file, *(source / rel for rel in comp.extra_files)]
    return out


# --------------------------------------------------------------------------------------------------
# baselines: llama.cpp without us
# --------------------------------------------------------------------------------------------------
def _gguf_files(source: Path) -> tuple[Path, Path]:
    from llava_edge.errors import ModelError
    from llava_edge.export.bundle import component_path, read_manifest

    manifest = read_manifest(source)
    if "gguf/mmproj" not in manifest.components:
        raise ModelError(f"{source}: the llama.cpp baselines need gguf/model and gguf/mmproj components")
    return (component_path(source, manifest, "gguf/model"), component_path(source, manifest, "gguf/mmproj"))


def _prompt_ids(source: Path, text: str) -> tuple[list[int], int]:
    """Our prompt's token ids with one image token where the image goes, and that token's id."""
    from llava_edge.export.bundle import load_bundle_tokenizer, read_manifest
    from llava_edge.model.templates import USER, encode_conversation, get_template

    manifest = read_manifest(source)
    ids = encode_conversation(load_bundle_tokenizer(source), get_template(manifest.template),
                              [(USER, f"<image>\n{text}")], 1, add_generation_prompt=True).input_ids
    return ids, manifest.image_token_id


def measure_raw_llamacpp(spec: dict) -> dict:
    import llama_cpp
    from llama_cpp import mtmd_cpp

    from llava_edge.errors import ModelError
    from llava_edge.export.gguf.llamacpp import llama_logs, model_params

    source, n_tokens = Path(spec["source"]), spec["n_tokens"]
    threads = spec.get("threads") or os.cpu_count() or 1
    model_path, mmproj_path = _gguf_files(source)
    ids, image_id = _prompt_ids(source, spec["prompt"])
    cut = ids.index(image_id)
    before, after = ids[:cut], ids[cut + 1:]

    start = time.perf_counter()
    with llama_logs() as logs:  # llama.cpp's log, kept off the terminal
        model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), model_params())
        if not model:
            raise ModelError(f"llama.cpp could not load {model_path}: {logs.last_error()}")
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = min(llama_cpp.llama_model_n_ctx_train(model), 4096)
        p.n_batch = p.n_ubatch = min(512, p.n_ctx)
        p.n_threads = p.n_threads_batch = threads
        ctx = llama_cpp.llama_init_from_model(model, p)
        mp = mtmd_cpp.mtmd_context_params_default()
        mp.use_gpu, mp.print_timings, mp.n_threads, mp.warmup = False, False, threads, False
        mtmd = mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), model, mp)
        if not ctx or not mtmd:
            raise ModelError(f"llama.cpp could not create a context: {logs.last_error()}")
    load_ms = _ms(time.perf_counter() - start)
    sampler = llama_cpp.llama_sampler_init_greedy()
    no_callback = mtmd_cpp.mtmd_helper_post_decode_callback()  # a NULL function pointer
    mem = llama_cpp.llama_get_memory(ctx)
    n_batch = p.n_batch

    def decode_tokens(tokens: list[int]) -> None:
        arr = (llama_cpp.llama_token * len(tokens))(*tokens)
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(tokens))) != 0:
            raise ModelError("llama_decode failed")

    def one_pass() -> dict:
        llama_cpp.llama_memory_clear(mem, True)
        t0 = time.perf_counter()
        bitmap = mtmd_cpp.mtmd_helper_bitmap_init_from_file(mtmd, str(spec["image"]).encode(), False)
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        marker = mtmd_cpp.mtmd_default_marker()
        text = mtmd_cpp.mtmd_input_text(marker, len(marker), False, True)
        bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
        try:
            if mtmd_cpp.mtmd_tokenize(mtmd, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise ModelError("mtmd_tokenize failed")
            chunk = next(mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                         for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks))
                         if mtmd_cpp.mtmd_input_chunk_get_type(mtmd_cpp.mtmd_input_chunks_get(chunks, i))
                         == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE)
            if mtmd_cpp.mtmd_encode_chunk(mtmd, chunk) != 0:
                raise ModelError("mtmd_encode_chunk failed")
            embd = mtmd_cpp.mtmd_get_output_embd(mtmd)
            n_image = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
            t1 = time.perf_counter()
            decode_tokens(before)
            new_n_past = llama_cpp.llama_pos(0)
            if mtmd_cpp.mtmd_helper_decode_image_chunk(mtmd, ctx, chunk, embd, len(before), 0, n_batch,
                                                       ctypes.byref(new_n_past), no_callback, None) != 0:
                raise ModelError("mtmd_helper_decode_image_chunk failed")
            decode_tokens(after)
            token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
            t2 = time.perf_counter()
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            mtmd_cpp.mtmd_bitmap_free(bitmap)
        one = (llama_cpp.llama_token * 1)()
        for _ in range(n_tokens - 1):
            one[0] = token
            if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) != 0:
                raise ModelError("llama_decode failed")
            token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
        t3 = time.perf_counter()
        return {"image_encode_ms": _ms(t1 - t0), "prefill_ms": _ms(t2 - t1), "ttft_ms": _ms(t2 - t0),
                "decode_tok_s": round((n_tokens - 1) / (t3 - t2), 2) if n_tokens > 1 else None,
                "chat_ttft_ms": None, "turn2_ttft_ms": None,
                "prompt_tokens": len(before) + n_image + len(after)}

    one_pass()
    runs = [one_pass() for _ in range(spec["repeats"])]
    llama_cpp.llama_sampler_free(sampler)
    mtmd_cpp.mtmd_free(mtmd)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    files = [model_path, mmproj_path]
    return {"vision": "mmproj", "files": [str(f) for f in files],
            "file_bytes": sum(f.stat().st_size for f in files), "load_ms": load_ms, "runs": runs,
            "notes": ["llama.cpp's C API through llama-cpp-python's ctypes bindings: mtmd encodes, "
                      "llama_decode prefills/decodes, llama.cpp's greedy sampler; image resized by mtmd"]}


def measure_llama_cpp_python(spec: dict) -> dict:
    import contextlib
    import io

    import llama_cpp
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from llava_edge.export.gguf.llamacpp import our_model_params

    source, n_tokens = Path(spec["source"]), spec["n_tokens"]
    threads = spec.get("threads") or os.cpu_count() or 1
    model_path, mmproj_path = _gguf_files(source)
    uri = "data:image/png;base64," + base64.b64encode(Path(spec["image"]).read_bytes()).decode()
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()), our_model_params():  # the runtime's model settings
        llm = llama_cpp.Llama(
            str(model_path), chat_handler=MTMDChatHandler(str(mmproj_path), verbose=False, use_gpu=False),
            n_ctx=0, n_threads=threads, n_threads_batch=threads, verbose=False)
    load_ms = _ms(time.perf_counter() - start)
    first = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": spec["prompt"]}]}
    greedy = {"temperature": 0.0, "repeat_penalty": 1.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0}

    def stream(messages, max_tokens) -> tuple[float, float, str]:
        """Seconds to the first chunk with text (or to the end), seconds from there to the end, and
        the whole reply."""
        t0 = time.perf_counter()
        first_at, text = None, []
        for chunk in llm.create_chat_completion(messages=messages, max_tokens=max_tokens, stream=True,
                                                **greedy):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                first_at = first_at or time.perf_counter()
                text.append(piece)
        end = time.perf_counter()
        first_at = first_at or end
        return first_at - t0, end - first_at, "".join(text)

    def one_pass() -> dict:
        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
        ttft, rest, reply = stream([first], n_tokens)
        perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
        turn2, _, _ = stream([first, {"role": "assistant", "content": reply},
                              {"role": "user", "content": spec["followup"]}], 1)
        return {"image_encode_ms": None, "prefill_ms": round(perf.t_p_eval_ms, 3), "ttft_ms": _ms(ttft),
                # single-token llama_decode calls after the first text, over the wall time they took
                "decode_tok_s": round(perf.n_eval / rest, 2) if perf.n_eval and rest > 0 else None,
                "decode_tok_s_llamacpp_compute": round(perf.n_eval / (perf.t_eval_ms / 1000.0), 2)
                if perf.n_eval and perf.t_eval_ms else None,
                "chat_ttft_ms": _ms(ttft), "turn2_ttft_ms": _ms(turn2), "prompt_tokens": perf.n_p_eval,
                "decode_tokens": perf.n_eval + 1}

    one_pass()
    runs = [one_pass() for _ in range(spec["repeats"])]
    files = [model_path, mmproj_path]
    return {"vision": "mmproj", "files": [str(f) for f in files],
            "file_bytes": sum(f.stat().st_size for f in files), "load_ms": load_ms, "runs": runs,
            "notes": ["Llama + MTMDChatHandler, streamed create_chat_completion, greedy; prefill_ms is "
                      "llama.cpp's own prompt-eval time (perf counters, no Python), image encoding is "
                      "inside the handler (in TTFT only); decode stops at end-of-sequence"]}
