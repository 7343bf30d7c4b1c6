"""Write the language-model GGUF and the mmproj GGUF of a checkpoint, streaming tensor by tensor.

``gguf.GGUFWriter.add_tensor`` keeps every array until the file is written, so a 7B conversion would
hold the whole model. Here the writer's state machine is driven by hand instead: all tensor *infos*
are declared first (shapes and types are known from the safetensors headers), the header, metadata
and tensor infos are written, then each tensor is read, converted and written with
``write_tensor_data`` before the next one is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_edge.errors import ModelError
from llava_edge.export.gguf import names as N
from llava_edge.export.gguf.source import Checkpoint, TextFacts, VisionFacts


@dataclass(frozen=True)
class Planned:
    """One output tensor: where it comes from and what it becomes."""

    source: str  # checkpoint key
    name: str  # GGUF name
    shape: tuple[int, ...]
    dtype: type  # np.float16 / np.float32
    transform: str | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def output_dtype(precision: str, shape: tuple[int, ...]) -> type:
    """F16 files keep 1-D tensors (norms, biases, the CLS embedding) in F32, as llama.cpp does."""
    if precision == "F32" or len(shape) < 2:
        return np.float32
    if precision == "F16":
        return np.float16
    raise ModelError(f"the GGUF writer writes F32 or F16, not {precision!r} (others come from the quantizer)")


def plan(ckpt: Checkpoint, rules: tuple[N.TensorRule, ...], parts: set[str], precision: str, *,
         expected_layers: dict[str, int], optional: set[str] = frozenset(),
         drop: Callable[[N.TensorRule, int | None], bool] = lambda rule, bid: False) -> list[Planned]:
    """Map every checkpoint tensor of ``parts`` through ``rules``; an unknown tensor or a missing
    expected one is an error (a silently dropped or invented tensor is a wrong model)."""
    found: list[tuple[int, int, Planned]] = []
    for key in ckpt.keys():
        split = N.split_hf_name(key)
        if split is None or split[0] not in parts or N.is_skipped(*split):
            continue
        for index, rule in enumerate(rules):
            hit = rule.match(*split)
            if hit is not None:
                break
        else:
            raise ModelError(f"{ckpt.folder}: tensor {key!r} has no GGUF name in the table "
                             "(llava_edge/export/gguf/names.py); the architecture has parts the GGUF "
                             "export does not know")
        name, bid = hit
        if drop(rule, bid):
            continue
        shape = ckpt.shape(key)
        found.append((-1 if bid is None else bid, index,
                      Planned(key, name, shape, output_dtype(precision, shape), rule.transform)))
    found.sort(key=lambda item: item[:2])
    planned = [p for _, _, p in found]
    names = [p.name for p in planned]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ModelError(f"{ckpt.folder}: two checkpoint tensors map to {dup!r}")
    missing = sorted(_expected(rules, parts, expected_layers) - set(names) - set(optional))
    if missing:
        raise ModelError(f"{ckpt.folder}: {len(missing)} tensors needed by the GGUF file are missing "
                         f"from the checkpoint (first: {missing[:3]})")
    return planned


def _expected(rules, parts, layers: dict[str, int]) -> set[str]:
    out = set()
    for rule in rules:
        if rule.part not in parts:
            continue
        if "{bid}" in rule.gguf:
            out.update(rule.gguf.format(bid=b) for b in range(layers[rule.part]))
        else:
            out.add(rule.gguf)
    return out


def _transform(p: Planned, array: np.ndarray, text: TextFacts | None) -> np.ndarray:
    if p.transform == N.PERMUTE_Q:
        return N.permute_qk(array, text.n_heads)
    if p.transform == N.PERMUTE_K:
        return N.permute_qk(array, text.n_heads, text.n_kv_heads)
    return array


def _add_keys(w, table, facts) -> None:
    add = {
        N.V.U32: lambda k, v: w.add_uint32(k, int(v)),
        N.V.F32: lambda k, v: w.add_float32(k, float(v)),
        N.V.BOOL: lambda k, v: w.add_bool(k, bool(v)),
        N.V.STR: lambda k, v: w.add_string(k, str(v)),
        N.V.F32_ARRAY: lambda k, v: w.add_array(k, [float(x) for x in v]),
        N.V.I32_ARRAY: lambda k, v: w.add_array(k, [int(x) for x in v]),
    }
    for key, source, kind in table:
        add[kind](key, getattr(facts, source) if isinstance(source, str) else source)


def write_streaming(path: Path, arch: str, planned: list[Planned], ckpt: Checkpoint,
                    add_metadata: Callable, text: TextFacts | None = None) -> None:
    """Header, metadata and tensor infos first; then each tensor read, converted and written."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    try:
        add_metadata(w)
        for p in planned:
            w.add_tensor_info(p.name, p.shape, np.dtype(p.dtype), p.nbytes)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for p in planned:
            array = _transform(p, ckpt.read(p.source), text)
            w.write_tensor_data(np.ascontiguousarray(array, dtype=p.dtype))
            del array
        w.flush()
    finally:
        w.close()


# --------------------------------------------------------------------------------------------------
# The two files
# --------------------------------------------------------------------------------------------------


def write_text_model(path: Path, ckpt: Checkpoint, facts: TextFacts, precision: str, *,
                     tokenizer_dir: Path, chat_template: str, name: str) -> list[Planned]:
    planned = plan(
        ckpt, N.TEXT_TENSORS, {N.TEXT, N.LM_HEAD}, precision,
        expected_layers={N.TEXT: facts.n_layers},
        optional={"output.weight"} if facts.tie_word_embeddings else set(),
        drop=lambda rule, bid: rule.part == N.LM_HEAD and facts.tie_word_embeddings,
    )
    n_rows = next(p.shape[0] for p in planned if p.name == "token_embd.weight")

    def metadata(w) -> None:
        w.add_name(name)
        w.add_file_type(N.QUANT_TYPES[precision].ftype)
        w.add_quantization_version(2)
        _add_keys(w, N.TEXT_KEYS, facts)
        add_tokenizer(w, tokenizer_dir, n_rows, chat_template)

    write_streaming(path, N.TEXT_ARCH, planned, ckpt, metadata, text=facts)
    return planned


def write_mmproj(path: Path, ckpt: Checkpoint, facts: VisionFacts, precision: str, *,
                 name: str) -> list[Planned]:
    planned = plan(
        ckpt, N.MMPROJ_TENSORS, {N.VISION, N.PROJECTOR}, precision,
        expected_layers={N.VISION: facts.n_layers_stored},
        drop=lambda rule, bid: bid is not None and bid >= facts.n_layers_stored,
    )
    out_dim = next(p.shape[0] for p in planned if p.name == "mm.2.weight")
    if out_dim != facts.projection_dim:
        raise ModelError(f"{ckpt.folder}: the projector outputs {out_dim} values per token but the "
                         f"language model is {facts.projection_dim} wide")

    def metadata(w) -> None:
        w.add_name(name)
        w.add_description("LLaVA CLIP vision tower + mlp2x_gelu projector (llava-edge)")
        w.add_file_type(N.QUANT_TYPES[precision].ftype)
        _add_keys(w, N.MMPROJ_KEYS, facts)

    write_streaming(path, N.MMPROJ_ARCH, planned, ckpt, metadata)
    return planned


# --------------------------------------------------------------------------------------------------
# Tokenizer: our byte-level BPE as llama.cpp's "gpt2" model
# --------------------------------------------------------------------------------------------------


def add_tokenizer(w, folder: Path, n_rows: int, chat_template: str) -> None:
    from llava_edge.model.tokenizer import Tokenizer

    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    model = data.get("model", {})
    if model.get("type") != "BPE" or not _is_byte_level(data):
        raise ModelError(f"{path}: the GGUF export writes byte-level BPE tokenizers (llama.cpp 'gpt2'); "
                         f"this one is {model.get('type')!r} without a ByteLevel pre-tokenizer "
                         "(sentencepiece tokenizers such as Vicuna's are not supported yet)")
    tok = Tokenizer.from_folder(folder)
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise ModelError(f"{path}: token ids are not contiguous 0..{n - 1}")
    if n > n_rows:
        raise ModelError(f"{path}: {n} tokens but the embedding has only {n_rows} rows")
    tokens = [""] * n
    for token, tid in vocab.items():
        tokens[tid] = token
    special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    types = [N.TokenType.CONTROL if i in special else N.TokenType.NORMAL for i in range(n)]
    tokens += [N.PAD_TOKEN_FORMAT.format(i) for i in range(n, n_rows)]
    types += [N.TokenType.UNUSED] * (n_rows - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    w.add_tokenizer_model(N.TOKENIZER_MODEL)
    w.add_tokenizer_pre(N.TOKENIZER_PRE)
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    unk = tok.backend.token_to_id("<unk>")
    if unk is not None:
        w.add_unk_token_id(unk)
    w.add_pad_token_id(tok.pad_id)
    # The chat template starts with {{ bos_token }}; llama.cpp strips a template's leading BOS when
    # add_bos is set, and our own runtimes tokenize in Python with the BOS already in the ids.
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template)


def _is_byte_level(data: dict) -> bool:
    pre = data.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "ByteLevel" for p in items)

