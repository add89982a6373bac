"""``wds_targets``: a webdataset pipeline stage yielding ``(image, hard_label, soft_targets)``.

For reshard output (each sample's ``json`` holds its teacher targets and, since this version, ``num_classes``)
and for any shards whose samples are joined by key with a logits artifact (``logits=M``: e.g. the unlabeled
pool itself, for blind distillation)::

    urls = kdpipe.shard_urls("runs/train-pl")
    ds = wds.WebDataset(urls, shardshuffle=100).shuffle(1000).decode("pil").compose(kdpipe.wds_targets())

webdataset 1.0's ``compose`` appends a callable that takes the iterator of samples and returns an iterator;
``WdsTargets`` is that callable (picklable, so it runs in DataLoader workers). The image is passed through as
the decoder made it; ``hard_label`` is ``cls`` as an int (-1 when absent); soft targets are dense (C,) float32
or ``Sparse(indices, probs, residual)`` (``kdpipe.soft_targets``' meaning). A sample without usable targets
raises ``InputError`` naming its key and shard, unless ``handler(exc)`` returns True (then it is skipped),
as webdataset's handlers do. This module imports neither webdataset nor torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from kdpipe.logits import Logits, open_logits
from kdpipe.targets import COLUMNS
from pipeline import manifest as mf
from pipeline.errors import InputError, KdpipeError
from stages.artifacts.targets import Sparse, check_policy, dense_at, sparse_targets
from stages.imaging import IMAGE_EXTENSIONS


def shard_urls(manifest: str | Path) -> list[str]:
    """The shards of a dataset manifest (reshard output, an ingested or indexed pool) as absolute paths or URLs."""
    data = mf.load(Path(manifest).absolute(), kind="dataset")
    return [str(data.file_path(entry)) for entry in data.files]


def wds_targets(num_classes: int | None = None, *, temperature: float | None = None, dense: bool = True,
                policy: str = "exact", logits: str | Path | Logits | None = None,
                handler: Callable[[Exception], bool] | None = None) -> WdsTargets:
    """The pipeline stage (see the module).

    Args:
        num_classes: C; default the sample's ``json["num_classes"]`` (or the joined logits').
        temperature: T' of the soft targets; default the stored T (the trainer's targets).
        dense: (C,) targets; else ``Sparse(indices, probs, residual)`` of the stored K classes.
        policy: ``exact`` or ``renorm`` (docs/api.md says what each gives at T' != T).
        logits: a logits manifest (or ``open_logits`` result): targets come from its rows, joined by the
            sample's ``__key__`` within the part of the sample's shard (``__url__``), not from ``json``.
        handler: called with the error of a bad sample; True skips the sample, False/None re-raises.
    """
    check_policy(policy)
    joined = open_logits(logits) if isinstance(logits, (str, Path)) else logits
    return WdsTargets(num_classes, temperature, dense, policy, joined, handler)


class WdsTargets:
    """samples -> ``(image, hard_label, soft_targets)``; see ``wds_targets``."""

    def __init__(self, num_classes: int | None, temperature: float | None, dense: bool, policy: str,
                 logits: Logits | None, handler: Callable[[Exception], bool] | None):
        self.num_classes, self.temperature, self.dense, self.policy = num_classes, temperature, dense, policy
        self.logits, self.handler = logits, handler
        self._part: tuple[int, dict[str, dict]] | None = None

    def __call__(self, samples: Iterable[dict]) -> Iterator[tuple]:
        for sample in samples:
            try:
                yield self.convert(sample)
            except KdpipeError as exc:
                if self.handler is None or not self.handler(exc):
                    raise

    def convert(self, sample: dict) -> tuple:
        """One sample -> ``(image, hard_label, soft_targets)``."""
        where = f"sample {sample.get('__key__')!r} of {sample.get('__url__', 'its shard')}"
        record = self._record(sample, where)
        classes = self.num_classes or record.get("num_classes")
        if not classes:
            raise InputError(f"{where}: no num_classes in its json (reshard output of an older kdpipe); "
                             "pass wds_targets(num_classes=C)")
        index, logit, lse, stored = _checked(record, int(classes), where)
        return _image(sample, where), _label(sample.get("cls"), int(classes), where), self._targets(
            index, logit, lse, stored, int(classes))

    def _targets(self, index, logit, lse, stored: float, classes: int) -> np.ndarray | Sparse:
        rows = (index[None], logit[None], np.array([lse]), stored, classes, self.temperature, self.policy)
        if self.dense:
            return dense_at(*rows)[0]
        out = sparse_targets(*rows)
        return Sparse(out.indices[0], out.probs[0], out.residual[0])

    def _record(self, sample: dict, where: str) -> dict:
        if self.logits is not None:
            return self._joined(sample, where)
        if "json" not in sample:
            raise InputError(f"{where}: no json member with soft targets; give wds_targets(logits=M) to join "
                             "stored logits by key")
        body = sample["json"]
        if isinstance(body, (bytes, str)):
            try:
                body = json.loads(body)
            except ValueError:
                raise InputError(f"{where}: its json member is not JSON") from None
        if not isinstance(body, dict):
            raise InputError(f"{where}: its json member is not an object")
        return body

    def _joined(self, sample: dict, where: str) -> dict:
        """The sample's stored row, from the logits part of its shard (one part held at a time)."""
        if "__url__" not in sample:
            raise InputError(f"{where}: no __url__ to find its logits part (use wds.WebDataset, which sets it)")
        part = self.logits.part_of(sample["__url__"])
        if self._part is None or self._part[0] != part:
            table = self.logits.read_part(part, ["key", *COLUMNS])
            self._part = (part, {row["key"]: row for row in table.to_pylist()})
        row = self._part[1].get(sample.get("__key__"))
        if row is None:
            raise InputError(f"{where}: key not in {self.logits.manifest.path} (a failed sample, or other shards)")
        return {**row, "temperature": self.logits.temperature, "num_classes": self.logits.num_classes}


def _checked(record: dict, classes: int, where: str) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(topk_index, topk_logit, lse, stored T) of a record, checked for shape, range and finiteness."""
    try:
        index = np.asarray(record["topk_index"], dtype=np.int64)
        logit = np.asarray(record["topk_logit"], dtype=np.float64)
        lse, stored = float(record["lse"]), float(record["temperature"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: soft targets unreadable ({type(exc).__name__}: {exc})") from None
    if index.ndim != 1 or index.shape != logit.shape or not index.size:
        raise InputError(f"{where}: top-K shapes {index.shape} and {logit.shape} differ or are empty")
    if index.min() < 0 or index.max() >= classes:
        raise InputError(f"{where}: class ids outside [0, {classes})")
    if not (np.isfinite(logit).all() and math.isfinite(lse) and stored > 0):
        raise InputError(f"{where}: non-finite logits or lse, or temperature <= 0")
    return index, logit, lse, stored


def _image(sample: dict, where: str) -> Any:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise InputError(f"{where}: no image member ({', '.join(IMAGE_EXTENSIONS)})")


def _label(value: Any, classes: int, where: str) -> int:
    """``cls`` as decoded (int) or raw (ascii bytes); -1 when absent."""
    if value is None:
        return -1
    try:
        label = int(value.decode("ascii").strip() if isinstance(value, bytes) else value)
    except (UnicodeDecodeError, ValueError, TypeError):
        raise InputError(f"{where}: cls {value!r:.20} is not an integer") from None
    if not 0 <= label < classes:
        raise InputError(f"{where}: label {label} outside [0, {classes})")
    return label
