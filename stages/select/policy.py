"""Selection policies: which (image, label, score) candidates a logits batch offers, and per-class quotas.

- ``topk`` (Yalniz et al. 2019): an image is a candidate of every class l among its top-P stored
  predictions, scored by the softened probability p(l|x) = exp(z_l / T - lse).
- ``threshold`` (Noisy Student): an image is a candidate of its argmax class only, kept when p >= min_score;
  a per-class cap bounds each class and ``balance`` duplicates rows of classes below the cap.

The score is defined once, here: float32(min(1, exp(float64(z) / T - float64(lse)))). ``--rank-temperature 1`` scores
at T = 1 with the stored ``lse1`` (logits schema 2) instead: p_1(l|x) = exp(z_l - lse1), e.g. to rank at
T = 1 logits stored at T = 4 for distillation; other temperatures cannot be rebuilt from top-K storage. Scoring streams: a float32
log-space prefilter against the per-class admission thresholds (with a safety margin) discards most
candidates, and only its survivors get the exact score, so the result equals scoring every candidate.
"""

from __future__ import annotations

import csv
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError
from stages.artifacts.arrays import to_numpy
from stages.artifacts.logits_format import LSE1, fixed_list_to_numpy
from stages.select.options import POLICIES

DEFAULT_TOP_P = 10  # Yalniz et al.: P = 10 at 1B images


@dataclass(frozen=True)
class SelectSpec:
    """What to select (every field changes the output, so all go into the fingerprint)."""

    policy: str
    quotas: tuple[int, ...]
    top_p: int
    min_score: float = 0.0
    balance: bool = False
    soft_targets: bool = False
    rank_temperature: float | None = None  # None: the stored T (and its lse); 1.0: lse1

    @property
    def depth(self) -> int:
        """How many stored predictions per image are candidates (top-P, or 1 for ``threshold``)."""
        return 1 if self.policy == "threshold" else self.top_p

    def to_params(self) -> dict:
        params = {"policy": self.policy, "per_class": list(self.quotas), "top_p": self.depth,
                  "min_score": self.min_score, "balance": self.balance, "soft_targets": self.soft_targets}
        return params if self.rank_temperature is None else {**params, "rank_temperature": self.rank_temperature}

    def ranking(self, stored_temperature: float) -> tuple[float, str]:
        """(T, normaliser column) that scores are computed with."""
        return (float(stored_temperature), "lse") if self.rank_temperature is None else (1.0, LSE1)


def rank_temperature(value: float | None, stored: float) -> float | None:
    """``--rank-temperature``: None (rank at the stored T) when absent or equal to it; 1.0; else refused."""
    if value is None or float(value) == float(stored):
        return None
    if float(value) != 1.0:
        raise InputError(f"--rank-temperature {value}: top-K storage rebuilds p at the stored T ({stored}) or, "
                         "with the lse1 column, at T = 1 only; use one of those")
    return 1.0


def make_spec(policy: str, per_class: str | int, top_p: int | None, class_names: list[str], topk: int,
              min_score: float = 0.0, balance: bool = False, soft_targets: bool = False,
              rank_at: float | None = None) -> SelectSpec:
    """Check the options against the logits (top-K stored, classes) and build a ``SelectSpec``.

    ``top_p`` None means min(``DEFAULT_TOP_P``, the stored top-K); ``rank_at`` from ``rank_temperature``.
    """
    top_p = min(DEFAULT_TOP_P, topk) if top_p is None else int(top_p)
    if policy not in POLICIES:
        raise InputError(f"--policy {policy!r}: expected one of {', '.join(POLICIES)}")
    if policy == "topk" and not 1 <= top_p <= topk:
        raise InputError(f"--top-p {top_p}: must be between 1 and the logits' stored top-K ({topk})")
    if not 0.0 <= min_score <= 1.0:
        raise InputError(f"--min-score {min_score}: must be a probability in [0, 1]")
    if balance and policy != "threshold":
        raise InputError("--balance applies to --policy threshold (duplicates to reach the per-class cap)")
    quotas = parse_per_class(per_class, class_names)
    return SelectSpec(policy, quotas, top_p, float(min_score), balance, soft_targets, rank_at)


def parse_per_class(value: str | int, class_names: list[str]) -> tuple[int, ...]:
    """K per class from a number, or a CSV (``class,k`` rows) / JSON (``{class: k}``) file.

    A class is named by its name or its index; classes the file does not list get K = 0.
    """
    text = str(value).strip()
    if text.isdigit():
        return (int(text),) * len(class_names)
    path = Path(text)
    if not path.is_file():
        raise InputError(f"--per-class {text!r}: neither a non-negative integer nor an existing CSV/JSON file")
    rows = _read_quota_file(path)
    index = {name: i for i, name in enumerate(class_names)}
    quotas = [0] * len(class_names)
    for name, k in rows:
        cls = index.get(name, int(name) if name.isdigit() and int(name) < len(class_names) else None)
        if cls is None:
            raise InputError(f"{path}: class {name!r} is neither a class name nor an index < {len(class_names)}")
        if not str(k).isdigit():
            raise InputError(f"{path}: class {name!r} has K={k!r}; expected a non-negative integer")
        quotas[cls] = int(k)
    return tuple(quotas)


def _read_quota_file(path: Path) -> list[tuple[str, str]]:
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise InputError(f"{path}: expected a JSON object {{class: k}}")
            return [(str(k), str(v)) for k, v in data.items()]
        with open(path, newline="") as handle:
            rows = [r for r in csv.reader(handle) if r and not r[0].startswith("#")]
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable per-class file ({exc})") from None
    if rows and rows[0][0].strip().lower() in ("class", "label", "name"):
        rows = rows[1:]
    if any(len(r) != 2 for r in rows):
        raise InputError(f"{path}: every CSV row must be 'class,k'")
    return [(r[0].strip(), r[1].strip()) for r in rows]


def exact_scores(logit: np.ndarray, lse: np.ndarray, temperature: float) -> np.ndarray:
    """The selection score: float32(exp(float64(z) / T - float64(lse))), at most 1 (float16 storage can round a
    dominant logit above its float32 normaliser: exp(z - lse1) of a near-one-hot row may come out 1.0002)."""
    scores = np.exp(logit.astype(np.float64) / temperature - lse.astype(np.float64))
    return np.minimum(scores, 1.0).astype(np.float32)


class Scorer:
    """Turns logits record batches into admitted candidates (labels, scores, source rows)."""

    def __init__(self, spec: SelectSpec, topk: int, temperature: float, num_classes: int):
        self.spec, self.topk = spec, topk
        self.temperature, self.lse_column = spec.ranking(temperature)
        self.candidates = np.zeros(num_classes, np.int64)
        self._counting = threading.Lock()  # batches are scored on several threads at once

    def __call__(self, batch: pa.RecordBatch, thr: np.ndarray,
                 excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidates of ``batch`` that pass the admission thresholds ``thr`` (score >= thr[label]).

        ``excluded`` marks rows dropped before ranking. Also counts every eligible candidate per class.
        """
        depth = self.spec.depth  # the top-P columns, contiguous: candidates are found in one flat pass
        labels = np.ascontiguousarray(fixed_list_to_numpy(batch.column("topk_index"), self.topk)[:, :depth])
        logits = np.ascontiguousarray(fixed_list_to_numpy(batch.column("topk_logit"), self.topk)[:, :depth])
        lse = to_numpy(batch.column(self.lse_column))
        if self.spec.min_score > 0:
            return self._with_floor(labels, logits, lse, thr, excluded)
        self._count(labels, excluded)
        flat = np.flatnonzero(self._prefilter(labels, logits, lse, thr, excluded))
        rows = flat // depth
        return self._admit(labels.ravel()[flat], logits.ravel()[flat], lse[rows], rows, thr)

    def _with_floor(self, labels, logits, lse, thr, excluded):
        floor = np.full(len(thr), self.spec.min_score, np.float32)
        flat = np.flatnonzero(self._prefilter(labels, logits, lse, floor, excluded))
        rows = flat // labels.shape[1]
        scores = exact_scores(logits.ravel()[flat], lse[rows], self.temperature)
        eligible = scores >= np.float32(self.spec.min_score)
        rows, labs, scores = rows[eligible], labels.ravel()[flat][eligible], scores[eligible]
        counts = np.bincount(labs, minlength=len(self.candidates))
        with self._counting:
            self.candidates += counts
        admit = scores >= thr[labs]
        return labs[admit].astype(np.int32), scores[admit], rows[admit]

    def _count(self, labels: np.ndarray, excluded: np.ndarray | None) -> None:
        counted = labels if excluded is None else labels[~excluded]
        counts = np.bincount(counted.ravel(), minlength=len(self.candidates))
        with self._counting:
            self.candidates += counts

    def _prefilter(self, labels, logits, lse, thr, excluded) -> np.ndarray:
        """float32 log-space test with a margin: never drops a candidate whose exact score passes."""
        with np.errstate(divide="ignore", invalid="ignore"):
            log_thr = np.log(thr.astype(np.float64))
            lower = (log_thr - 1e-4 - 1e-6 * np.abs(log_thr)).astype(np.float32)
        lse32 = np.asarray(lse, np.float32)
        shift = lse32 - (1e-4 + 1e-6 * np.abs(lse32))
        logp = logits.astype(np.float32) * np.float32(1.0 / self.temperature) - shift[:, None]
        mask = logp >= lower[labels]
        if excluded is not None:
            mask[excluded] = False
        return mask

    def _admit(self, labels, logits, lse, rows, thr):
        scores = exact_scores(logits, lse, self.temperature)
        admit = scores >= thr[labels]
        return labels[admit].astype(np.int32), scores[admit], rows[admit]


def excluded_rows(keys: pa.Array, exclusion: pa.Array | None) -> np.ndarray | None:
    """Boolean mask of the batch rows whose key is in the exclusion set (None when nothing is excluded)."""
    if exclusion is None or len(exclusion) == 0:
        return None
    mask = to_numpy(pc.is_in(keys, value_set=exclusion))
    return mask if mask.any() else None


def balance_plan(counts: np.ndarray, quotas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Copies per selected row to reach each class's cap: for a class of n rows and cap q, row r (rank)
    appears q // n + (r < q % n) times. Returns (repeats per row, in label/rank order, dup numbers).

    Args:
        counts: rows per class (classes in label order, rows within a class by rank).
        quotas: cap per class.
    """
    reps = []
    for n, q in zip(counts, quotas):
        if n == 0:
            continue
        base, extra = divmod(max(int(q), int(n)), int(n))
        reps.append(base + (np.arange(n) < extra))
    repeats = np.concatenate(reps) if reps else np.zeros(0, np.int64)
    starts = np.repeat(np.cumsum(repeats) - repeats, repeats)
    dup = np.arange(int(repeats.sum())) - starts
    return repeats, dup.astype(np.int16)
