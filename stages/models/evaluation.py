"""Top-1 accuracy of a classifier on a labeled dataset manifest, seen through the centre view.

A small helper for training (per-epoch eval metrics) and for the teacher card's accuracy; the full
evaluation stage (top-5, per-class, confusion, agreement) is ``kdpipe evaluate``. Shards are read in
manifest order with ``read_shard`` (checked against the manifest), memory bounded by the batch.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch

from pipeline import manifest as mf
from pipeline.errors import InputError
from stages import imaging
from stages.imaging import Preprocess, SampleError
from stages.shardio import ShardStats, parse_label, read_shard, with_cls

log = logging.getLogger(__name__)


def _labeled_batches(manifest: mf.Manifest, pp: Preprocess, batch_size: int,
                     failures: dict[str, list[str]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    num_classes = len(manifest.params.get("class_names") or [])
    pixels, labels = [], []
    for entry in manifest.files:
        stats = ShardStats(str(entry["path"]))
        for key, fields in read_shard(manifest.file_path(entry), stats, entry["sha256"], entry.get("samples")):
            try:
                label = parse_label(with_cls(fields, manifest.params.get("label_from"),
                                             manifest.params.get("class_names") or ()), num_classes)
                pixels.append(imaging.centre_view(imaging.find_image(fields), pp))
                labels.append(label)
            except SampleError as exc:
                failures.setdefault(exc.reason, []).append(key)
            if len(labels) == batch_size:
                yield np.stack(pixels), np.asarray(labels)
                pixels, labels = [], []
        for reason, keys in stats.failures.items():
            failures.setdefault(reason, []).extend(keys)
    if labels:
        yield np.stack(pixels), np.asarray(labels)


@torch.inference_mode()
def accuracy(model: torch.nn.Module, data: str | mf.Manifest, pp: Preprocess, batch_size: int = 256,
             device: torch.device | str = "cpu") -> dict:
    """Top-1 accuracy of ``model`` on the labeled manifest ``data``.

    Returns:
        ``{"top1", "samples", "failures": {reason: count}, "manifest_id"}``; the model is left in eval mode.
    """
    manifest = data if isinstance(data, mf.Manifest) else mf.load(data, kind="dataset")
    if not manifest.params.get("labeled"):
        raise InputError(f"{manifest.path}: is not labeled; accuracy needs a labeled dataset manifest")
    model.eval()
    correct, total, failures = 0, 0, {}
    for pixels, labels in _labeled_batches(manifest, pp, batch_size, failures):
        x = imaging.normalise(torch.from_numpy(pixels).to(device), pp)
        pred = model(x).argmax(dim=1).cpu().numpy()
        correct += int((pred == labels).sum())
        total += len(labels)
    for reason, keys in failures.items():
        log.warning("%s: %d sample(s) skipped (%s), e.g. %s", manifest.path, len(keys), reason, keys[:3])
    return {"top1": correct / total if total else None, "samples": total,
            "failures": {k: len(v) for k, v in sorted(failures.items())}, "manifest_id": manifest.id}
