"""Soft targets at any temperature from top-K storage: sparse ``(indices, probs, residual)`` or dense (N, C).

A stored row holds the top-K class ids, their raw logits z, and lse = logsumexp(z / T) over ALL C classes at
the stored temperature T. At T the stored classes' probabilities are exact, p_k = exp(z_k / T - lse), and the
other C - K classes hold the residual r = 1 - sum p_k. At another temperature T' the full normaliser is
unknown (the unstored logits are gone); the residual policy says what stands in for them:

- ``exact`` (default): the C - K unstored classes are taken to share one logit z_u, the one that gives them
  exactly the stored residual at T: (C - K) exp(z_u / T) = exp(lse) - sum_k exp(z_k / T). At T' the
  normaliser is Z' = sum_k exp(z_k / T') + (C - K) exp(z_u / T'); p'_k = exp(z_k / T') / Z' and
  r' = 1 - sum p'_k. At T' = T this is the stored distribution exactly (``logits_format.dense_targets``, the
  trainer's targets); at T' != T it is exact when the unstored logits are equal (and always when K = C),
  otherwise an estimate (the unstored classes' spread is not stored).
- ``renorm``: the residual is dropped: p'_k = softmax(z / T') over the K stored classes, r' = 0.

Dense targets put p'_k at the stored classes and spread r' evenly over the C - K others (the trainer's rule).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from stages.artifacts.logits_format import RESIDUAL_POLICIES, residual_mass, softened_topk


class Sparse(NamedTuple):
    """Soft targets as stored: class ids (.., K) int64, their probabilities (.., K) float32, and the residual
    (..,) float32: the mass of the C - K other classes together (0 under ``renorm``)."""

    indices: np.ndarray
    probs: np.ndarray
    residual: np.ndarray


def check_policy(policy: str) -> None:
    """Raise ``ValueError`` for a residual policy other than ``exact`` or ``renorm``."""
    if policy not in RESIDUAL_POLICIES:
        raise ValueError(f"residual policy {policy!r} is not one of {RESIDUAL_POLICIES}")


def sparse_targets(topk_index: np.ndarray, topk_logit: np.ndarray, lse: np.ndarray, stored_temperature: float,
                   num_classes: int, temperature: float | None = None, policy: str = "exact") -> Sparse:
    """(N, K) stored rows -> ``Sparse`` targets at ``temperature`` (default: the stored one), see the module."""
    probs, residual = _tempered(topk_logit, lse, stored_temperature, num_classes, temperature, policy)
    return Sparse(np.asarray(topk_index, dtype=np.int64), probs.astype(np.float32), residual.astype(np.float32))


def dense_at(topk_index: np.ndarray, topk_logit: np.ndarray, lse: np.ndarray, stored_temperature: float,
             num_classes: int, temperature: float | None = None, policy: str = "exact") -> np.ndarray:
    """(N, C) float32 targets at ``temperature``; at the stored one equal to ``logits_format.dense_targets``."""
    probs, residual = _tempered(topk_logit, lse, stored_temperature, num_classes, temperature, policy)
    return _dense(np.asarray(topk_index, dtype=np.int64), probs, residual, num_classes)


def _tempered(topk_logit: np.ndarray, lse: np.ndarray, stored_temperature: float, num_classes: int,
              temperature: float | None, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """float64 (probs (N, K), residual (N,)) at ``temperature`` under ``policy``."""
    check_policy(policy)
    stored = float(stored_temperature)
    wanted = stored if temperature is None else float(temperature)
    if not (stored > 0 and wanted > 0):
        raise ValueError(f"temperatures must be > 0 (stored {stored}, asked {wanted})")
    logit = np.asarray(topk_logit, dtype=np.float64)
    lse = np.asarray(lse, dtype=np.float64)
    others = num_classes - logit.shape[1]
    if wanted == stored:
        probs = softened_topk(logit, lse, stored)
        if policy == "renorm" or others <= 0:
            return probs / probs.sum(axis=1, keepdims=True), np.zeros(len(probs))
        return probs, residual_mass(probs)
    if policy == "renorm" or others <= 0:
        return _softmax(logit / wanted), np.zeros(len(logit))
    return _retempered(logit, lse, stored, wanted, others)


def _softmax(scaled: np.ndarray) -> np.ndarray:
    shifted = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _retempered(logit: np.ndarray, lse: np.ndarray, stored: float, wanted: float,
                others: int) -> tuple[np.ndarray, np.ndarray]:
    """``exact`` at T' != T: the unstored classes share the logit that reproduces the stored residual at T."""
    kept = softened_topk(logit, lse, stored).sum(axis=1)
    with np.errstate(divide="ignore"):
        log_rest = lse + np.log1p(-np.minimum(kept, 1.0))          # log sum over unstored of exp(z / T)
    log_others = np.log(others)
    rest = (stored / wanted) * (log_rest - log_others) + log_others  # log sum over unstored of exp(z_u / T')
    scaled = logit / wanted
    peak = scaled.max(axis=1)
    log_z = np.logaddexp(peak + np.log(np.exp(scaled - peak[:, None]).sum(axis=1)), rest)
    return np.exp(scaled - log_z[:, None]), np.exp(rest - log_z)


def dense_from_sparse(targets: Sparse, num_classes: int) -> np.ndarray:
    """(N, C) float32 from ``Sparse`` targets: the stored classes' probabilities, the residual spread evenly
    over the other classes."""
    indices = np.atleast_2d(np.asarray(targets.indices, dtype=np.int64))
    probs = np.atleast_2d(np.asarray(targets.probs, dtype=np.float64))
    return _dense(indices, probs, np.atleast_1d(np.asarray(targets.residual, dtype=np.float64)), num_classes)


def _dense(indices: np.ndarray, probs: np.ndarray, residual: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.zeros((len(probs), num_classes), dtype=np.float64)
    others = num_classes - probs.shape[1]
    if others > 0:
        out += (residual / others)[:, None]
    np.put_along_axis(out, indices, probs, axis=1)
    return out.astype(np.float32)
