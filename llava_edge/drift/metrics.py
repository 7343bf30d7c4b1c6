"""Drift metrics as plain numpy functions: one formula each, no runtime, no I/O.

Every function takes the reference first. Logits are [positions, vocab]; embeddings are
[tokens, dim]. Arithmetic is float64 so that the metric's own rounding stays far below the drift it
measures (an fp16 candidate differs from fp32 by ~1e-9 nats/token on small models).
"""

from __future__ import annotations

import math

import numpy as np

from llava_edge.runtimes.base import common_prefix_length  # noqa: F401  (a drift metric too)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, float64, stable for any finite logits."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """KL(ref || cand) in nats at each position: sum_v p_ref(v) (log p_ref(v) - log p_cand(v)).

    The direction is llama.cpp's (``perplexity --kl-divergence``): the expectation is under the
    reference, so tokens the reference finds likely weigh most. Tiny negative values from rounding
    are clipped to 0 (KL is never negative)."""
    ref, cand = _same_shape(ref_logits, cand_logits, "logits")
    log_p, log_q = log_softmax(ref), log_softmax(cand)
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):  # 0 * (-inf - x): a token the reference never picks adds 0
        terms = np.where(p > 0, p * (log_p - log_q), 0.0)
    kl = terms.sum(axis=-1)
    return np.where(np.isnan(kl), kl, np.maximum(kl, 0.0))


def top1_agreement(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """Per position: 1.0 where both pick the same most likely token, else 0.0."""
    ref, cand = _same_shape(ref_logits, cand_logits, "logits")
    return (ref.argmax(axis=-1) == cand.argmax(axis=-1)).astype(np.float64)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood (nats) of ``targets[i]`` under ``logits[i]``."""
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    logits = np.asarray(logits)
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"{logits.shape[0]} logit rows for {targets.shape[0]} targets")
    return -log_softmax(logits)[np.arange(len(targets)), targets]


def perplexity(nll: np.ndarray) -> float:
    """exp(mean NLL): token-weighted perplexity of a pooled set of positions."""
    nll = np.asarray(nll, dtype=np.float64)
    return float(np.exp(nll.mean())) if nll.size else float("nan")


def cosine_rows(ref: np.ndarray, cand: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Cosine similarity of each row (image token) of ``ref`` with the same row of ``cand``."""
    a, b = _same_shape(ref, cand, "embeddings")
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(axis=-1) / np.maximum(norms, eps)


def max_abs_error(ref: np.ndarray, cand: np.ndarray) -> float:
    a, b = _same_shape(ref, cand, "arrays")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0


def relative_l2_error(ref: np.ndarray, cand: np.ndarray, eps: float = 1e-12) -> float:
    """||cand - ref|| / ||ref|| (Frobenius): scale-free, unlike max abs error."""
    a, b = _same_shape(ref, cand, "arrays")
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(b - a) / max(np.linalg.norm(a), eps))


def percentile(values: np.ndarray, q: float) -> float:
    """The q-th percentile (linear interpolation, numpy's default); NaN for no values."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.percentile(values, q)) if values.size else float("nan")


def sign_test_p(lost: int, gained: int) -> float:
    """One-sided exact sign test on paired answers: the chance of ``lost`` or more losses among the
    ``lost + gained`` answers that changed, if each change were a fair coin (no real drop).

    McNemar's exact test: only the answers that flipped carry evidence. 3 lost and 0 gained gives
    0.125 (chance does that often); 6 and 0 gives 0.016. 1.0 when nothing flipped."""
    n = lost + gained
    return sum(math.comb(n, k) for k in range(lost, n + 1)) / 2 ** n


def _same_shape(a, b, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"{what} of different shapes: reference {a.shape}, candidate {b.shape}")
    return a, b
