"""``compare``: run one reference and any number of candidates on the same inputs, through the
runtime protocol only, and measure how far each candidate strays.

Two passes. The reference pass encodes every eval image, generates its greedy reply and keeps the
teacher-forced logits of that reply. Each candidate is then opened, measured against those stored
results and released, so only the reference and one candidate are loaded at a time. Per item the
candidate runs:

1. ``encode_image``                             -> image-embedding drift
2. ``logits`` on the reference reply, own embeds   -> end-to-end drift
3. ``logits`` with the reference's image embeds    -> decoder-only drift
4. reference ``logits`` with the candidate's embeds -> vision-only drift
5. greedy ``generate``                          -> identical prefix, exact match, task accuracy

Steps 3 and 4 are skipped when the image embeddings are bit-identical (they would repeat 2 and the
reference). Every greedy reply starts from an empty KV cache (``reset()``), so a cache-reuse path
cannot make two items depend on their order.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from llava_edge.drift import metrics as M
from llava_edge.drift.evalset import EvalItem, load_eval_set, score_reply
from llava_edge.drift.report import CandidateResult, DriftReport, ReferenceResult
from llava_edge.drift.schema import ATTRIBUTIONS
from llava_edge.drift.spec import RuntimeSpec, model_bytes, parse_spec
from llava_edge.errors import UserError
from llava_edge.model.templates import encode_conversation
from llava_edge.model.tokenizer import StreamDecoder
from llava_edge.runtimes.base import Prompt, Runtime
from llava_edge.runtimes.sampling import GenerationConfig

#: The optional runtime method that gives vision-tower features before the projector.
VISION_FEATURES_METHOD = "encode_image_features"
RERUN = "rerun"


@dataclass
class _Side:
    """A reference, candidate or floor: a spec to open, or a runtime the caller already opened."""

    label: str
    spec: RuntimeSpec | None = None
    runtime: Runtime | None = None
    rerun: bool = False  # the noise floor "rerun": the reference's own runtime, measured again

    @property
    def text(self) -> str:
        if self.rerun:
            return "the reference, measured again"
        return str(self.spec) if self.spec else f"{self.label}=<{type(self.runtime).__name__} object>"

    @property
    def runtime_name(self) -> str:
        return self.spec.runtime if self.spec else getattr(self.runtime, "name", "") or "?"

    def open(self) -> Runtime:
        return self.runtime if self.runtime is not None else self.spec.open()


@dataclass
class _RefItem:
    item: EvalItem
    ids: list[int]  # the prompt
    embeds: list[np.ndarray]
    keys: list[str]
    features: list[np.ndarray] | None
    continuation: list[int]  # greedy reply tokens (+ end-of-sequence when it stopped there)
    reply: str
    logits: np.ndarray  # [len(continuation), vocab]: the rows that predict the continuation
    nll: np.ndarray
    correct: bool | None

    @property
    def forced_ids(self) -> np.ndarray:
        """Prompt + reply without its last token: the logits of this predict every reply token."""
        return np.array(self.ids + self.continuation[:-1], dtype=np.int64)

    def rows(self, logits: np.ndarray) -> np.ndarray:
        return logits[len(self.ids) - 1:]


def compare(
    reference,
    candidates,
    eval_set,
    *,
    floor=RERUN,
    limit: int | None = None,
    max_new_tokens: int = 32,
    attribution: bool = True,
    image_root=None,
    say: Callable[[str], None] | None = None,
) -> DriftReport:
    """Measure each candidate's drift from the reference on ``eval_set``.

    ``reference`` and each candidate: a spec string (``torch:model?dtype=float16``, see
    :func:`~llava_edge.drift.spec.parse_spec`), a :class:`RuntimeSpec`, or an opened runtime.
    ``floor``: the noise floor printed next to every figure — ``"rerun"`` (the reference measured
    against itself run again: run-to-run nondeterminism), a spec or runtime that should agree with
    the reference (fp16 for an fp32 reference), a candidate's label (reuses its numbers), or None.
    ``limit``: the first N eval records. ``max_new_tokens``: length of each greedy reply.
    ``attribution=False`` skips the decoder-only and vision-only passes (two of a candidate's three
    teacher-forced passes) when only the end-to-end figures are wanted.
    """
    say = say or (lambda text: None)
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    started = time.perf_counter()
    ref = _side(reference)
    cands = [_side(c) for c in ([candidates] if isinstance(candidates, (str, RuntimeSpec, Runtime))
                                else list(candidates))]
    if not cands:
        raise UserError("no candidates to compare; give at least one (--candidate SPEC)")
    _unique_labels([ref, *cands])
    floor_side, floor_label = _floor_side(floor, ref, cands)
    for side in [ref, *cands] + ([floor_side] if floor_side else []):
        if side.spec is not None:
            side.spec.check()  # a typo in the last candidate fails now, not after an hour
    items = load_eval_set(eval_set, limit=limit, image_root=image_root)

    t0 = time.perf_counter()
    ref_rt = ref.open()
    refs = [_reference_item(ref_rt, item, max_new_tokens) for item in items]
    ref_result = _reference_result(ref, ref_rt, refs, time.perf_counter() - t0)
    say(f"reference {ref.label}: {len(refs)} items in {ref_result.seconds:.1f} s")

    floor_result = None
    if floor_side is not None:
        floor_result = _run_side(floor_side, ref_rt, refs, ref_result, max_new_tokens, attribution,
                                 say, "floor")
    results = [_run_side(c, ref_rt, refs, ref_result, max_new_tokens, attribution, say) for c in cands]
    if floor_label is not None:
        floor_result = next(r for r in results if r.label == floor_label)

    return DriftReport(
        reference=ref_result, candidates=results, floor=floor_result, eval_set=str(eval_set),
        n_items=len(items),
        settings={"max_new_tokens": max_new_tokens, "limit": limit, "attribution": attribution,
                  "floor": floor_side.label if floor_side else floor_label},
        seconds=time.perf_counter() - started,
    )


# --- sides ------------------------------------------------------------------------------------------
def _side(source) -> _Side:
    if isinstance(source, Runtime):
        return _Side(getattr(source, "label", None) or source.name or type(source).__name__,
                     runtime=source)
    spec = parse_spec(source)
    return _Side(spec.label, spec=spec)


def _unique_labels(sides: list[_Side]) -> None:
    seen: dict[str, int] = {}
    for side in sides:
        n = seen.get(side.label, 0)
        seen[side.label] = n + 1
        if n:
            side.label = f"{side.label}#{n + 1}"
            if side.spec is not None:
                side.spec.label = side.label


def _floor_side(floor, ref: _Side, cands: list[_Side]) -> tuple[_Side | None, str | None]:
    """(a side to measure as the floor, or the label of a candidate whose numbers are the floor)."""
    if floor is None or (isinstance(floor, str) and floor.lower() == "none"):
        return None, None
    if isinstance(floor, str) and floor == RERUN:
        return _Side(f"{ref.label} (rerun)", spec=ref.spec, runtime=ref.runtime, rerun=True), None
    if isinstance(floor, str) and floor in {c.label for c in cands}:
        return None, floor
    side = _side(floor)
    if side.label in {c.label for c in cands} | {ref.label}:
        side.label = f"{side.label} (floor)"
    return side, None


def _run_side(side: _Side, ref_rt: Runtime, refs: list[_RefItem], ref_result: ReferenceResult,
              max_new_tokens: int, attribution: bool, say, role: str = "candidate") -> CandidateResult:
    t0 = time.perf_counter()
    if side.rerun:
        runtime = ref_rt
        if hasattr(runtime, "_image_cache"):
            runtime._image_cache.clear()  # encode again: the rerun must not reuse cached embeddings
    else:
        runtime = side.open()
    _check_compatible(ref_rt, runtime, side.label)
    result = _measure(side, runtime, ref_rt, refs, ref_result, max_new_tokens, attribution)
    result.role = role
    result.bytes = model_bytes(side.spec, runtime)
    result.seconds = time.perf_counter() - t0
    say(f"{role} {side.label}: KL {result.metrics['e2e.kl_mean']:.3g}, top-1 "
        f"{result.metrics['e2e.top1']:.1%} in {result.seconds:.1f} s")
    if runtime is not ref_rt and side.runtime is None:
        del runtime
        gc.collect()  # one candidate in memory at a time
    return result


def _check_compatible(ref: Runtime, cand: Runtime, label: str) -> None:
    """Same token ids must mean the same thing to both, or no comparison makes sense."""
    problems = []
    if cand.tokenizer.vocab_size != ref.tokenizer.vocab_size:
        problems.append(f"vocabulary {cand.tokenizer.vocab_size} vs {ref.tokenizer.vocab_size}")
    if cand.image_token_id != ref.image_token_id:
        problems.append(f"image token id {cand.image_token_id} vs {ref.image_token_id}")
    if cand.n_image_tokens != ref.n_image_tokens:
        problems.append(f"{cand.n_image_tokens} vs {ref.n_image_tokens} image tokens")
    if cand.template.name != ref.template.name:
        problems.append(f"chat template {cand.template.name!r} vs {ref.template.name!r}")
    if problems:
        raise UserError(f"candidate {label} is not the reference's model ({'; '.join(problems)}); "
                        "compare exports of the same checkpoint")


# --- the reference pass --------------------------------------------------------------------------------
def _reference_item(rt: Runtime, item: EvalItem, max_new_tokens: int) -> _RefItem:
    ids = encode_conversation(rt.tokenizer, rt.template, item.turns, rt.n_image_tokens,
                              add_generation_prompt=True).input_ids
    embeds, keys = _encode(rt, item)
    features = _features(rt, item)
    continuation, reply = greedy_reply(rt, Prompt(ids, embeds, keys), max_new_tokens)
    r = _RefItem(item, ids, embeds, keys, features, continuation, reply, np.empty(0), np.empty(0),
                 score_reply(item, reply))
    r.logits = r.rows(rt.logits(Prompt(r.forced_ids, embeds, keys)))
    r.nll = M.token_nll(r.logits, continuation)
    return r


def _reference_result(side: _Side, rt: Runtime, refs: list[_RefItem], seconds: float) -> ReferenceResult:
    nll = np.concatenate([r.nll for r in refs])
    metrics = {"e2e.ppl": M.perplexity(nll), **_accuracy([r.item for r in refs], [r.correct for r in refs])}
    result = ReferenceResult(label=side.label, spec=side.text, runtime=side.runtime_name,
                             bytes=model_bytes(side.spec, rt), seconds=seconds, metrics=metrics,
                             replies=[{"id": r.item.id, "answer": r.item.answer, "reply": r.reply,
                                       "correct": r.correct, "positions": len(r.continuation)}
                                      for r in refs])
    return result


def greedy_reply(rt: Runtime, prompt: Prompt, max_new_tokens: int) -> tuple[list[int], str]:
    """Greedy tokens from an empty KV cache, and the reply text cut at the template's stop strings.

    The tokens end with end-of-sequence when generation stopped there: predicting the end is part of
    the reply, and teacher-forced drift measures it too."""
    rt.reset()
    stops = tuple(s for s in rt.template.stop if s != rt.tokenizer.eos_token)
    decoder, tokens, text = StreamDecoder(rt.tokenizer), [], ""
    for token in rt.generate(prompt, GenerationConfig(max_new_tokens=max_new_tokens)):
        tokens.append(token)
        text += decoder.push(token)
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return tokens, text[:min(hits)].strip()
    if len(tokens) < max_new_tokens:
        tokens.append(rt.tokenizer.eos_id)
    return tokens, text.strip()


def _encode(rt: Runtime, item: EvalItem) -> tuple[list[np.ndarray], list[str]]:
    if item.image is None:
        return [], []
    embeds, key = rt._encode_with_key(item.image)
    return [embeds], [key]


def _features(rt: Runtime, item: EvalItem) -> list[np.ndarray] | None:
    method = getattr(rt, VISION_FEATURES_METHOD, None)
    if not callable(method) or item.image is None:
        return None
    return [np.asarray(method(item.image), dtype=np.float32)]


# --- the candidate pass ------------------------------------------------------------------------------
@dataclass
class _Pooled:
    cosines: list[np.ndarray] = field(default_factory=list)
    max_abs: list[float] = field(default_factory=list)
    rel_l2: list[float] = field(default_factory=list)

    def add(self, ref: np.ndarray, cand: np.ndarray, what: str, label: str) -> None:
        if ref.shape != cand.shape:
            raise UserError(f"candidate {label}: {what} of shape {cand.shape}, the reference's are "
                            f"{ref.shape}; it is not the same model")
        self.cosines.append(M.cosine_rows(ref, cand))
        self.max_abs.append(M.max_abs_error(ref, cand))
        self.rel_l2.append(M.relative_l2_error(ref, cand))

    def metrics(self, section: str) -> dict:
        if not self.cosines:
            return {}
        cos = np.concatenate(self.cosines)
        return {f"{section}.cosine_mean": float(cos.mean()), f"{section}.cosine_min": float(cos.min()),
                f"{section}.max_abs": float(max(self.max_abs)),
                f"{section}.rel_l2": float(np.mean(self.rel_l2))}


def _measure(side: _Side, rt: Runtime, ref_rt: Runtime, refs: list[_RefItem],
             ref_result: ReferenceResult, max_new_tokens: int, attribution: bool) -> CandidateResult:
    image, vision = _Pooled(), _Pooled()
    splits = ATTRIBUTIONS if attribution else ("e2e",)
    kl = {a: [] for a in splits}
    top1 = {a: [] for a in splits}
    nll = {a: [] for a in splits}
    items, correct = [], []
    for r in refs:
        embeds, keys = _encode(rt, r.item)
        for ref_e, cand_e in zip(r.embeds, embeds):
            image.add(ref_e, cand_e, "image embeddings", side.label)
        features = _features(rt, r.item) if r.features is not None else None
        if features is not None:
            for ref_f, cand_f in zip(r.features, features):
                vision.add(ref_f, cand_f, "vision features", side.label)

        forced = r.forced_ids
        same = all(np.array_equal(a, b) for a, b in zip(r.embeds, embeds))
        rows = {"e2e": r.rows(rt.logits(Prompt(forced, embeds, keys)))}
        if attribution:
            # Bit-identical embeddings: decoder-only is end to end, vision-only is the reference itself.
            rows["decoder_only"] = (rows["e2e"] if same
                                    else r.rows(rt.logits(Prompt(forced, r.embeds, r.keys))))
            rows["vision_only"] = (r.logits if same
                                   else r.rows(ref_rt.logits(Prompt(forced, embeds, keys))))
        for a in splits:
            if rows[a].shape != r.logits.shape:
                raise UserError(f"candidate {side.label}: logits of shape {rows[a].shape} where the "
                                f"reference gives {r.logits.shape}; it is not the same model")
            kl[a].append(M.kl_divergence(r.logits, rows[a]))
            top1[a].append(M.top1_agreement(r.logits, rows[a]))
            nll[a].append(M.token_nll(rows[a], r.continuation))

        continuation, reply = greedy_reply(rt, Prompt(r.ids, embeds, keys), max_new_tokens)
        ok = score_reply(r.item, reply)
        correct.append(ok)
        prefix = M.common_prefix_length(r.continuation, continuation)
        items.append({
            "id": r.item.id, "kind": r.item.kind, "answer": r.item.answer,
            "reference_reply": r.reply, "reply": reply, "reference_correct": r.correct, "correct": ok,
            "identical_prefix": prefix, "exact_match": continuation == r.continuation,
            "positions": len(r.continuation), "kl_mean": float(kl["e2e"][-1].mean()),
            "top1": float(top1["e2e"][-1].mean()),
        })

    ref_ppl = ref_result.metrics["e2e.ppl"]
    metrics = {**image.metrics("image"), **vision.metrics("vision")}
    for a in splits:
        k = np.concatenate(kl[a])
        metrics[f"{a}.kl_mean"] = float(k.mean())
        metrics[f"{a}.kl_p99"] = M.percentile(k, 99)
        metrics[f"{a}.top1"] = float(np.concatenate(top1[a]).mean())
        metrics[f"{a}.ppl_change"] = M.perplexity(np.concatenate(nll[a])) / ref_ppl - 1
    metrics["e2e.kl_max"] = float(np.concatenate(kl["e2e"]).max())
    metrics["e2e.ppl"] = M.perplexity(np.concatenate(nll["e2e"]))
    metrics["generation.prefix_mean"] = float(np.mean([i["identical_prefix"] for i in items]))
    metrics["generation.exact_match"] = float(np.mean([i["exact_match"] for i in items]))
    metrics.update(_accuracy([r.item for r in refs], correct))
    ref_acc = ref_result.metrics.get("task.accuracy")
    metrics["task.accuracy_drop"] = (None if ref_acc is None or metrics.get("task.accuracy") is None
                                     else ref_acc - metrics["task.accuracy"])
    metrics.update(_flips([r.correct for r in refs], correct))
    return CandidateResult(
        label=side.label, spec=side.text, runtime=side.runtime_name, metrics=metrics,
        kl_by_position={a: _by_position(kl[a]) for a in splits}, items=items,
    )


def _by_position(per_item: Sequence[np.ndarray]) -> list[float]:
    """Mean over items of the value at reply position t, for every t some item reaches."""
    longest = max(len(x) for x in per_item)
    sums, counts = np.zeros(longest), np.zeros(longest)
    for x in per_item:
        sums[:len(x)] += x
        counts[:len(x)] += 1
    return (sums / counts).tolist()


def _flips(ref_correct: list[bool | None], correct: list[bool | None]) -> dict:
    """Answers the candidate lost (right in the reference, wrong here) and gained, and how likely
    that many losses are by chance (:func:`~llava_edge.drift.metrics.sign_test_p`)."""
    pairs = [(r, c) for r, c in zip(ref_correct, correct) if r is not None and c is not None]
    if not pairs:
        return {"task.answers_lost": None, "task.answers_gained": None, "task.drop_p": None}
    lost = sum(r and not c for r, c in pairs)
    gained = sum(c and not r for r, c in pairs)
    return {"task.answers_lost": lost, "task.answers_gained": gained,
            "task.drop_p": M.sign_test_p(lost, gained)}


def _accuracy(items: list[EvalItem], correct: list[bool | None]) -> dict:
    out = {}
    for key, kinds in (("task.accuracy", None), ("task.accuracy_short", {"short"}),
                       ("task.accuracy_mc", {"mc"})):
        scored = [c for i, c in zip(items, correct) if c is not None and (kinds is None or i.kind in kinds)]
        out[key] = float(np.mean(scored)) if scored else None
    return out
