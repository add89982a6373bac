"""Evaluation metrics accumulated batch by batch: memory O(classes^2), never O(samples).

- accuracy: top-1, top-k (k = 5, or fewer when there are fewer classes), per-class accuracy, confusion
  matrix (rows = true class, columns = predicted class); rows without a known label are counted apart.
- teacher-student agreement, on rows that both artifacts hold: top-1 agreement (same argmax), top-5
  agreement (the teacher's argmax is among the student's top 5), and KL(p_teacher || p_student) at the
  teacher's temperature T in nats, where p_teacher is rebuilt from the stored top-K + residual mass
  (``logits_format.dense_targets``, policy ``exact``) and p_student = softmax(z_student / T) from the
  student's full logits.
- the teacher's stored labels (its top-1, and top-k when stored) against the true labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stages.artifacts.logits_format import dense_targets

TOP_K = 5


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log softmax(z / T) per row, in float64."""
    scaled = logits.astype(np.float64) / temperature
    peak = scaled.max(axis=1, keepdims=True)
    return scaled - peak - np.log(np.exp(scaled - peak).sum(axis=1, keepdims=True))


def kl_teacher_student(t_index: np.ndarray, t_logit: np.ndarray, t_lse: np.ndarray, temperature: float,
                       s_logits: np.ndarray) -> np.ndarray:
    """Per-row KL(p_teacher || p_student) at T (nats); the teacher from its top-K + residual mass."""
    p_t = dense_targets(t_index, t_logit, t_lse, temperature, s_logits.shape[1], "exact").astype(np.float64)
    p_t /= p_t.sum(axis=1, keepdims=True)  # float32 round-off of the rebuilt rows
    log_s = log_softmax(s_logits, temperature)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p_t > 0, p_t * (np.log(p_t) - log_s), 0.0)
    return terms.sum(axis=1)


def hits_in_topk(labels: np.ndarray, ranked: np.ndarray, k: int) -> np.ndarray:
    """Boolean per row: ``labels`` is among the first ``k`` columns of ``ranked`` (class ids, best first)."""
    return (ranked[:, :k] == labels[:, None]).any(axis=1)


@dataclass
class Accumulator:
    """Running counts of every metric; ``update_*`` take one batch, ``summary`` gives the report's numbers."""

    num_classes: int
    confusion: np.ndarray = None
    topk_hits: int = 0
    unlabeled: int = 0
    k: int = TOP_K
    agree: dict = field(default_factory=lambda: {"rows": 0, "top1": 0, "topk": 0, "kl_sum": 0.0})
    teacher: dict = field(default_factory=lambda: {"labeled": 0, "top1": 0, "topk": 0, "k": None})

    def __post_init__(self):
        self.k = min(self.k, self.num_classes)
        if self.confusion is None:
            self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update_accuracy(self, labels: np.ndarray, ranked: np.ndarray) -> None:
        """Add a batch: true labels (-1 = unknown) and the model's class ids by logit, best first."""
        known = labels >= 0
        self.unlabeled += int((~known).sum())
        labels, ranked = labels[known].astype(np.int64), ranked[known]
        np.add.at(self.confusion, (labels, ranked[:, 0].astype(np.int64)), 1)
        self.topk_hits += int(hits_in_topk(labels, ranked, self.k).sum())

    def update_agreement(self, ranked: np.ndarray, s_logits: np.ndarray, t_index: np.ndarray, t_logit: np.ndarray,
                         t_lse: np.ndarray, temperature: float) -> None:
        """Add a batch of rows held by both: student ranking + full logits, teacher stored top-K."""
        self.agree["rows"] += len(ranked)
        self.agree["top1"] += int((ranked[:, 0] == t_index[:, 0]).sum())
        self.agree["topk"] += int(hits_in_topk(t_index[:, 0], ranked, self.k).sum())
        self.agree["kl_sum"] += float(kl_teacher_student(t_index, t_logit, t_lse, temperature, s_logits).sum())

    def update_teacher_accuracy(self, labels: np.ndarray, t_index: np.ndarray) -> None:
        """Add a batch: true labels (-1 = unknown) and the teacher's stored class ids."""
        known = labels >= 0
        k = min(self.k, t_index.shape[1])
        self.teacher["k"] = k
        self.teacher["labeled"] += int(known.sum())
        self.teacher["top1"] += int((t_index[known, 0] == labels[known]).sum())
        self.teacher["topk"] += int(hits_in_topk(labels[known], t_index[known], k).sum())

    def summary(self, class_names: list[str]) -> dict:
        """The report's numbers (fractions in [0, 1]; None where nothing was measured)."""
        per_class_n = self.confusion.sum(axis=1)
        correct = np.diag(self.confusion)
        labeled = int(per_class_n.sum())
        per_class = [None if n == 0 else float(c / n) for c, n in zip(correct, per_class_n)]
        measured = [a for a in per_class if a is not None]
        out = {"labeled": labeled, "unlabeled": self.unlabeled, "k": self.k,
               "top1": _ratio(int(correct.sum()), labeled), "topk": _ratio(self.topk_hits, labeled),
               "mean_per_class": float(np.mean(measured)) if measured else None,
               "per_class": [{"class": i, "name": name, "samples": int(n), "accuracy": a}
                             for i, (name, n, a) in enumerate(zip(class_names, per_class_n, per_class))]}
        if self.agree["rows"]:
            rows = self.agree["rows"]
            out["agreement"] = {"rows": rows, "top1": self.agree["top1"] / rows, "topk": self.agree["topk"] / rows,
                                "kl": self.agree["kl_sum"] / rows}
        if self.teacher["k"] is not None:
            n = self.teacher["labeled"]
            out["teacher_labels"] = {"labeled": n, "k": self.teacher["k"], "top1": _ratio(self.teacher["top1"], n),
                                     "topk": _ratio(self.teacher["topk"], n)}
        return out


def _ratio(num: int, den: int) -> float | None:
    return None if den == 0 else num / den
