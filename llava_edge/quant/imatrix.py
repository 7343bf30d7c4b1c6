"""Importance matrices ("imatrix") for llama.cpp's quantizer, computed from multimodal calibration.

An importance matrix holds, for every weight the quantizer converts, the sum over calibration tokens
of the *squared input activation* of each input channel, and the number of tokens (llama.cpp's
``llama-imatrix``: ``tools/imatrix/imatrix.cpp``, ``IMatrixCollector::collect_imatrix``). The
quantizer weights each value's rounding error by the channel's mean square input (``sum / count``),
so channels that carry large activations are rounded more carefully.

llama.cpp computes it from text alone. :func:`compute_imatrix` runs LLaVA conversations *with their
images* through the transformers model — the image rows come from the vision tower + projector and
are spliced in by the torch runtime's own code — so the decoder's statistics include the image
tokens it sees in use. As ``llama-imatrix`` does, it covers the linear layers of the decoder blocks
(``blk.*``; ``output.weight`` only with ``process_output``) and ignores forward passes over fewer
than 16 tokens. GGUF names come from the export's table (:mod:`llava_edge.export.gguf.names`).
Its ``image_weight`` option departs from llama.cpp's statistic on request (image rows weigh heavily).

Files (read by ``llama-quantize --imatrix``; ``common/imatrix-loader.cpp`` tries GGUF first):

* GGUF (what ``llama-imatrix`` writes by default): ``general.type = "imatrix"``,
  ``imatrix.datasets`` (strings), ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32; the
  quantize tool refuses a GGUF imatrix without all three), and per weight ``<name>.in_sum2``
  (F32, ne = [n_in, n_mat]: the sums of squares) and ``<name>.counts`` (F32, ne = [1, n_mat]).
  Newer ``llama-imatrix`` builds also write ``<name>.in_sum`` (plain sums, optional to the loader,
  unused by the quantizer); it is not written here.
* legacy ``.dat``: int32 entry count; per entry (names sorted) int32 name length, the name, int32
  ``ncall``, int32 ``nval``, float32[nval] = ``sum / count * ncall``; then int32 chunk count, int32
  length and the dataset name. The loader divides by ``ncall`` again, so values are the mean squares.

A "chunk" of ``llama-imatrix`` is one ``n_ctx`` window of text; here it is one conversation, and the
chunk size written is the longest conversation in tokens.

The file is not what the llama.cpp library takes: ``llama_model_quantize_params.imatrix`` is a
NULL-terminated array of ``{name, data, size}`` holding the mean squares; see
:func:`llava_edge.export.gguf.quantize.quantize_gguf`, which feeds it from an :class:`ImportanceMatrix`.
"""

from __future__ import annotations

import logging
import math
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llava_edge.errors import DataError, ModelError, UserError
from llava_edge.export.gguf import names as N

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# The file format (llama.cpp tools/imatrix/imatrix.cpp save_imatrix / save_imatrix_legacy)
# --------------------------------------------------------------------------------------------------
KEY_TYPE, TYPE_IMATRIX = "general.type", "imatrix"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUM2 = ".in_sum2"
SUFFIX_COUNTS = ".counts"
LEGACY_SUFFIX = ".dat"
UNNAMED_DATASET = "(unnamed)"  # written when an ImportanceMatrix names no data set
#: llama-imatrix ignores matrix multiplications over fewer rows (tokens) than this.
MIN_TOKENS = 16


@dataclass
class ImportanceMatrix:
    """Per GGUF weight name: ``sums`` [n_mat, n_in] (float32, sum of squared inputs per input
    channel; n_mat is 1 for a dense weight) and ``counts`` [n_mat] (tokens seen)."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def __post_init__(self) -> None:
        for name in list(self.sums):
            sums = np.asarray(self.sums[name], dtype=np.float32)
            self.sums[name] = sums.reshape(1, -1) if sums.ndim == 1 else sums
            counts = np.asarray(self.counts[name], dtype=np.float32).reshape(-1)
            if counts.size != self.sums[name].shape[0]:
                raise ValueError(f"{name}: {counts.size} counts for {self.sums[name].shape[0]} matrices")
            self.counts[name] = counts

    @property
    def names(self) -> list[str]:
        return sorted(self.sums)

    def __len__(self) -> int:
        return len(self.sums)

    def values(self, name: str) -> np.ndarray:
        """The importance the quantizer gets: ``sum / count`` in float32, 1 where nothing was seen
        (llama-quantize's ``load_imatrix``), flattened over the matrices."""
        sums, counts = self.sums[name], self.counts[name][:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(counts > 0, sums / np.where(counts > 0, counts, 1), np.float32(1))
        return np.ascontiguousarray(out, dtype=np.float32).reshape(-1)


# --------------------------------------------------------------------------------------------------
# Writing and reading
# --------------------------------------------------------------------------------------------------


def save_imatrix(imatrix: ImportanceMatrix, path: str | Path) -> Path:
    """Write ``path`` in llama.cpp's GGUF imatrix format, or the legacy binary format when the
    name ends in ``.dat`` (as ``llama-imatrix --output-format dat``)."""
    path = Path(path)
    if not len(imatrix):
        raise UserError(f"{path}: the importance matrix is empty; nothing to write")
    if path.suffix == LEGACY_SUFFIX:
        _save_legacy(imatrix, path)
    else:
        _save_gguf(imatrix, path)
    return path


def _save_gguf(imatrix: ImportanceMatrix, path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch=TYPE_IMATRIX)
    w.kv_data[0].pop(N.KEY_ARCH, None)  # llama-imatrix writes no architecture, only general.type
    w.add_string(KEY_TYPE, TYPE_IMATRIX)
    # llama-quantize refuses a GGUF imatrix without this key; gguf-py cannot write an empty array
    w.add_array(KEY_DATASETS, [str(d) for d in imatrix.datasets] or [UNNAMED_DATASET])
    w.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
    w.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
    for name in imatrix.names:  # sorted, as llama-imatrix does
        w.add_tensor(name + SUFFIX_SUM2, imatrix.sums[name])  # numpy [n_mat, n_in] = ggml ne [n_in, n_mat]
        w.add_tensor(name + SUFFIX_COUNTS, imatrix.counts[name].reshape(-1, 1))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def _save_legacy(imatrix: ImportanceMatrix, path: Path) -> None:
    chunk = max(int(imatrix.chunk_size), 1)
    out = [struct.pack("<i", len(imatrix))]
    for name in imatrix.names:
        counts = imatrix.counts[name]
        ncall = max(1, (int(counts.max()) + chunk - 1) // chunk)  # llama.cpp: ceiling, never 0
        raw = name.encode()
        # stored: mean square * ncall (1 where nothing was seen); the loader divides by ncall
        values = imatrix.values(name) * np.float32(ncall)
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size),
                values.astype("<f4").tobytes()]
    dataset = (imatrix.datasets[-1] if imatrix.datasets else "").encode()
    out += [struct.pack("<i", int(imatrix.chunk_count)), struct.pack("<i", len(dataset)), dataset]
    path.write_bytes(b"".join(out))


def load_imatrix(path: str | Path) -> ImportanceMatrix:
    """Read a GGUF or legacy imatrix file (either written here or by ``llama-imatrix``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such importance-matrix file (make one with compute_imatrix + "
                        "save_imatrix, or llama.cpp's llama-imatrix)")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _load_gguf(path) if magic == N.GGUF_MAGIC else _load_legacy(path)


def _load_gguf(path: Path) -> ImportanceMatrix:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises ValueError/struct errors on damaged files
        raise DataError(f"{path}: unreadable GGUF imatrix ({exc})") from None
    fields = {name: f.contents() for name, f in reader.fields.items()}
    if fields.get(KEY_TYPE) != TYPE_IMATRIX:
        raise DataError(f"{path}: a GGUF file whose general.type is {fields.get(KEY_TYPE)!r}, not "
                        f"{TYPE_IMATRIX!r}; expected an importance matrix")
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in fields]
    if missing:  # llama-quantize refuses these ("missing imatrix metadata")
        raise DataError(f"{path}: imatrix without {', '.join(missing)}; llama-quantize would refuse it")
    sums, counts = {}, {}
    for t in reader.tensors:
        data = np.array(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
        if t.name.endswith(SUFFIX_SUM2):
            sums[t.name.removesuffix(SUFFIX_SUM2)] = data
        elif t.name.endswith(SUFFIX_COUNTS):
            counts[t.name.removesuffix(SUFFIX_COUNTS)] = data.reshape(-1)
    if not sums or set(sums) != set(counts):
        odd = sorted(set(sums) ^ set(counts))
        raise DataError(f"{path}: sums and counts do not pair up (first unpaired: {odd[:3]})")
    return ImportanceMatrix(sums, counts, list(fields[KEY_DATASETS]), int(fields[KEY_CHUNK_COUNT]),
                            int(fields[KEY_CHUNK_SIZE]))


def _load_legacy(path: Path) -> ImportanceMatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise DataError(f"{path}: the imatrix file is cut short at byte {pos} (or is not an imatrix)")
        value = struct.unpack_from(fmt, data, pos)
        pos += size
        return value

    (n_entries,) = take("<i")
    if not 0 < n_entries < len(data):
        raise DataError(f"{path}: neither a GGUF nor a legacy .dat importance matrix")
    sums, counts = {}, {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length <= 1024:
            raise DataError(f"{path}: corrupt imatrix entry name (length {length})")
        name = take(f"<{length}s")[0].decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise DataError(f"{path}: entry {name!r} has {nval} values")
        values = np.array(take(f"<{nval}f"), dtype=np.float32)
        # llama-quantize divides the stored values by ncall (or keeps them when ncall is 0)
        sums[name], counts[name] = values, np.array([ncall], np.float32)
    chunk_count, dataset = 0, []
    if pos < len(data):  # the trailer is optional
        (chunk_count,) = take("<i")
        if pos < len(data):
            (length,) = take("<i")
            if length > 0:
                dataset = [take(f"<{length}s")[0].decode("utf-8", errors="replace")]
    imatrix = ImportanceMatrix(sums, counts, dataset, chunk_count, 0)
    for name, c in imatrix.counts.items():
        if c[0] == 0:  # "ncall 0: values as stored" — a count of 1 gives the same quotient
            imatrix.counts[name] = np.ones(1, np.float32)
    return imatrix


# --------------------------------------------------------------------------------------------------
# Computing it
# --------------------------------------------------------------------------------------------------


def decoder_weights(model, *, process_output: bool = False) -> dict[str, str]:
    """``{module name: GGUF weight name}`` for the decoder's linear layers llama.cpp quantizes and
    llama-imatrix collects: every ``blk.*`` weight; ``output.weight`` with ``process_output`` (and
    only when the LM head is not tied to the embeddings: a tied model's GGUF has no output.weight)."""
    import torch

    tied = model.lm_head.weight is model.get_input_embeddings().weight
    out = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        split = N.split_hf_name(module_name + ".weight")
        if split is None or split[0] not in (N.TEXT, N.LM_HEAD):
            continue  # vision tower and projector: the mmproj file, not the decoder
        hit = next((h for rule in N.TEXT_TENSORS if (h := rule.match(*split)) is not None), None)
        if hit is None:
            raise ModelError(f"decoder layer {module_name!r} has no GGUF name in the table "
                             "(llava_edge/export/gguf/names.py); the GGUF export does not know it")
        gguf_name, bid = hit
        if bid is None and not (process_output and split[0] == N.LM_HEAD and not tied):
            continue
        out[module_name] = gguf_name
    return out


@dataclass
class CalibrationConversation:
    """One calibration input: the prompt the decoder runs (ids with ``<image>`` expanded, image rows)
    and where it came from."""

    source: str
    prompt: object  # llava_edge.runtimes.base.Prompt


def calibration_prompts(runtime, calibration, n_samples: int, *, seed: int = 0,
                        image_root: str | Path | None = None,
                        max_tokens: int | None = None) -> tuple[list[CalibrationConversation], str]:
    """Prompts of up to ``n_samples`` conversations (answers included: their activations count too)
    and a name for the data set.

    ``calibration``: a LLaVA JSON/JSONL file (synth's ``stage2.json``/``eval.json``; images under
    ``meta.json``'s ``image_root`` beside it unless ``image_root`` is given), from which
    ``n_samples`` records are drawn at random with ``seed`` (all of them when there are fewer); or
    a sequence of :class:`llava_edge.quant.calibration.CalibrationSample`, of which the first
    ``n_samples`` are used. Conversations longer than ``max_tokens`` (default: the decoder's
    context) are left out."""
    from llava_edge.model.templates import IMAGE_PLACEHOLDER, encode_conversation
    from llava_edge.runtimes.base import Prompt

    if n_samples < 1:
        raise UserError(f"n_samples must be >= 1, got {n_samples}")
    if isinstance(calibration, (str, Path)):
        from llava_edge.train.data import open_records

        path = Path(calibration)
        if path.is_dir():
            raise DataError(f"{path}: a folder; pass the LLaVA file itself (e.g. {path / 'stage2.json'})")
        records = open_records(path, image_root, skip_bad=False)
        try:
            picked = sorted(random.Random(seed).sample(range(len(records)), min(n_samples, len(records))))
            items = [(f"{path.name}:{records[i].id}", records[i].image, records[i].turns) for i in picked]
        finally:
            records.close()
        dataset = str(path)
    else:
        from llava_edge.quant.calibration import _text, _with_image

        samples = list(calibration)[:n_samples]
        items = []
        for i, s in enumerate(samples):
            turns = list(s.turns)
            if s.image is not None and turns and not any(IMAGE_PLACEHOLDER in _text(t) for t in turns):
                turns[0] = _with_image(turns[0])  # as MultimodalCalibration does
            items.append((f"sample {i}", s.image, turns))
        dataset = f"{len(samples)} llava-edge calibration samples"
    if not items:
        raise DataError(f"no calibration conversations in {dataset}")

    limit = max_tokens or runtime.model.config.text_config.max_position_embeddings
    out = []
    for source, image, turns in items:
        ids = encode_conversation(runtime.tokenizer, runtime.template, turns,
                                  runtime.n_image_tokens).input_ids
        if len(ids) > limit:
            log.warning("%s: %d tokens, more than %d; left out of the calibration", source, len(ids), limit)
            continue
        embeds, keys = [], []
        n_images = ids.count(runtime.image_token_id) // runtime.n_image_tokens
        if image is not None and n_images:
            e, k = runtime._encode_with_key(image)  # the runtime's preprocessing and image encoder
            embeds, keys = [e] * n_images, [k] * n_images  # one image per record, at each <image>
        out.append(CalibrationConversation(source, Prompt(ids, embeds, keys)))
    return out, dataset


def compute_imatrix(model_dir: str | Path, calibration, n_samples: int = 64, *, seed: int = 0,
                    image_root: str | Path | None = None, process_output: bool = False,
                    min_tokens: int = MIN_TOKENS, max_tokens: int | None = None,
                    image_weight: float = 1.0) -> ImportanceMatrix:
    """The importance matrix of the decoder of ``model_dir`` on multimodal calibration conversations.

    Each conversation runs teacher-forced through the torch runtime (:class:`TorchRuntime`: image
    through the vision tower + projector, rows spliced at the ``<image>`` tokens); forward hooks on
    the decoder's linear layers add up the squared input of every channel and count the tokens.
    See :func:`calibration_prompts` for ``calibration``, ``n_samples``, ``seed``, ``image_root``,
    ``max_tokens``; :func:`decoder_weights` for ``process_output``. Passes over fewer than
    ``min_tokens`` tokens are ignored, as llama-imatrix does (16).

    ``image_weight``: how much each image-token row counts, relative to a text row. 1 (default) is
    llama.cpp's statistic, every row alike — then the image rows weigh heavily in it (64 of ~140
    rows of a demo conversation, 576 per LLaVA-1.5 conversation). Other values give a weighted mean
    (sums and counts both weighted; 0: the text rows only, still computed in the image's context)."""
    import torch

    from llava_edge.runtimes.torch_runtime import TorchRuntime

    if image_weight < 0:
        raise UserError(f"image_weight must be >= 0, got {image_weight}")
    runtime = TorchRuntime.open(model_dir)
    prompts, dataset = calibration_prompts(runtime, calibration, n_samples, seed=seed,
                                           image_root=image_root, max_tokens=max_tokens)
    weights = decoder_weights(runtime.model, process_output=process_output)
    modules = dict(runtime.model.named_modules())
    sums = {name: torch.zeros(modules[m].in_features, dtype=torch.float64) for m, name in weights.items()}
    counts = dict.fromkeys(weights.values(), 0.0)
    row_weight: list = [None]  # per-row weights of the conversation being run (None: all 1)

    def hook(name):
        def collect(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            if x.shape[0] < min_tokens:
                return
            squares = x.double().square()
            if row_weight[0] is None:
                sums[name] += squares.sum(0).cpu()
                counts[name] += x.shape[0]
            else:
                sums[name] += (row_weight[0][:, None] * squares).sum(0).cpu()
                counts[name] += float(row_weight[0].sum())
        return collect

    handles = [modules[m].register_forward_hook(hook(name)) for m, name in weights.items()]
    used, longest = 0, 0
    try:
        for conv in prompts:
            ids = conv.prompt.input_ids
            if len(ids) < min_tokens:
                continue
            if image_weight != 1.0:
                is_image = torch.from_numpy(ids == runtime.image_token_id)
                row_weight[0] = torch.where(is_image, image_weight, 1.0).double().to(runtime.device)
            runtime.logits(conv.prompt)
            used, longest = used + 1, max(longest, len(ids))
    finally:
        for h in handles:
            h.remove()
    if not used:
        raise DataError(f"{dataset}: no calibration conversation has {min_tokens} tokens or more")
    log.info("imatrix: %d conversations, %d rows per weight, %d weights", used,
             max(counts.values()), len(weights))
    return ImportanceMatrix(
        sums={name: s.numpy().astype(np.float32) for name, s in sums.items()},
        counts={name: np.array([c], np.float32) for name, c in counts.items()},
        datasets=[dataset], chunk_count=used, chunk_size=longest,
    )


def summary(imatrix: ImportanceMatrix) -> dict:
    """Facts for a manifest: data sets, chunks, entries, and how uneven the importance is."""
    spread = []
    for name in imatrix.names:
        v = imatrix.values(name)
        spread.append(float(v.max() / v.mean()) if v.mean() > 0 else math.nan)
    return {"datasets": list(imatrix.datasets), "chunks": int(imatrix.chunk_count),
            "chunk_size": int(imatrix.chunk_size), "entries": len(imatrix),
            "max_over_mean_median": float(np.nanmedian(spread)) if spread else math.nan}


def as_importance_matrix(imatrix: ImportanceMatrix | str | Path) -> ImportanceMatrix:
    """An :class:`ImportanceMatrix` as given, or read from a file path."""
    if isinstance(imatrix, ImportanceMatrix):
        return imatrix
    if isinstance(imatrix, (str, Path)):
        return load_imatrix(imatrix)
    raise UserError(f"imatrix must be an ImportanceMatrix or a file path, not {type(imatrix).__name__}")


__all__ = ["ImportanceMatrix", "MIN_TOKENS", "as_importance_matrix", "calibration_prompts",
           "compute_imatrix", "decoder_weights", "load_imatrix", "save_imatrix", "summary"]
