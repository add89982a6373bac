"""Check stored views: rebuild the view of sampled logits rows, re-run the teacher, compare with the rows.

For each sampled row the view is rebuilt from its stored parameters (``artifacts.views.views_from_table``),
its pixels rendered from the dataset's original bytes (``views.render_view``), and the teacher run on
them. A row agrees when the recomputed logits give the stored top-K (the same classes; no other class
above the K-th stored logit) and the stored logits and lse to within ``ulps`` units of the stored
dtype's resolution at the row's largest |logit| (at least 1.0): float32 sums in another batch order
differ by a few float32 ulps, float16 storage rounds by half of one. The stored view must also be the
one the augmentation spec draws for that key. Single-view artifacts are checked too (centre view rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import manifest as mf
from pipeline.errors import InputError, IntegrityError, ManifestError
from stages.artifacts.cards import load_classifier
from stages.artifacts.logits_format import fixed_list_to_numpy
from stages.artifacts.logits_reader import LogitsSet, open_logits
from stages.artifacts.views import is_multiview, views_from_table
from stages.imaging import Preprocess, decode, find_image, normalise
from stages.logits.check_options import CheckViewsOptions
from stages.shardio import ShardStats, read_shard
from stages.views.render import PartnerPool, View, render_view, sample_views
from stages.views.spec import AugSpec

log = logging.getLogger(__name__)
_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class CheckReport:
    """What ``check_views`` found: rows checked, rows that agree, and every disagreement by reason."""

    checked: int = 0
    agreed: int = 0
    mismatches: list[dict] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        """Fraction of checked rows that agree (1.0 when nothing was checked)."""
        return self.agreed / self.checked if self.checked else 1.0


def check_views(logits: str | Path, sample: int = CheckViewsOptions.sample, *,
                data: str | Path | None = CheckViewsOptions.data, teacher: str | Path | None = CheckViewsOptions.teacher,
                seed: int = CheckViewsOptions.seed, ulps: float = CheckViewsOptions.ulps,
                batch_size: int = CheckViewsOptions.batch_size, device: str = CheckViewsOptions.device) -> CheckReport:
    """Re-run the teacher on the rebuilt views of ``sample`` random rows of a logits artifact.

    Args:
        logits: the logits manifest (file or folder).
        sample: how many rows to check (drawn uniformly without replacement with ``seed``).
        data, teacher: the dataset manifest and teacher card; default: the logits' recorded inputs.
        ulps: tolerance in units of the stored logit dtype at the row's largest |logit| (at least 1.0).
        batch_size, device: how the teacher is run (float32).
    """
    logits_set = open_logits(logits)
    dataset = mf.load(data or _lineage(logits_set, "data"), kind="dataset")
    model, card = load_classifier(teacher or _lineage(logits_set, "teacher"), device, kinds=("teacher", "model"))
    _check_ids(logits_set, dataset, card)
    spec = _spec(logits_set)
    pp = Preprocess.from_dict(logits_set.params["preprocess"])
    report = CheckReport()
    for part, rows in _pick_rows(logits_set, sample, seed).items():
        whole = logits_set.read_part(part)
        table = whole.take(rows)
        shard_keys = PartnerPool(whole.column("key").unique().to_pylist())  # sorted once per part, not per row
        images = _shard_images(dataset, int(table.column("shard")[0].as_py()), table)
        _check_rows(table, images, spec, shard_keys, pp, model, logits_set, report, ulps, batch_size, device)
    log.info("check_views: %d of %d rows agree", report.agreed, report.checked)
    return report


def _lineage(logits_set: LogitsSet, role: str) -> Path:
    """The manifest of the logits' input with ``role``, found through its recorded relative path."""
    for ref in logits_set.manifest.inputs:
        if ref.get("role") == role and ref.get("path"):
            return logits_set.manifest.folder / ref["path"]
    flag = "--data" if role == "data" else "--teacher"
    raise ManifestError(f"{logits_set.manifest.path}: no input with role {role!r} and a path; pass {flag}")


def _check_ids(logits_set: LogitsSet, dataset: mf.Manifest, card: mf.Manifest) -> None:
    for what, have, want in (("dataset", dataset, logits_set.dataset_id), ("teacher", card, logits_set.teacher_id)):
        if have.id != want:
            raise ManifestError(f"{have.path}: {what} id {have.id[:12]}... is not the {what} of "
                                f"{logits_set.manifest.path} ({want[:12]}...); pass the right one")


def _spec(logits_set: LogitsSet) -> AugSpec | None:
    views = logits_set.params["views"]
    return AugSpec.from_dict(views["aug"]) if views.get("aug") else None


def _pick_rows(logits_set: LogitsSet, sample: int, seed: int) -> dict[int, np.ndarray]:
    """Uniformly sampled row numbers, grouped by part (part order, row order)."""
    counts = np.array([int(f["rows"]) for f in logits_set.manifest.files])
    total = int(counts.sum())
    if sample < 1:
        raise InputError(f"--sample must be >= 1, got {sample}")
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(sample, total), replace=False))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    parts = np.searchsorted(bounds, picks, side="right") - 1
    return {int(p): picks[parts == p] - bounds[p] for p in np.unique(parts)}


def _shard_images(dataset: mf.Manifest, shard: int, table) -> dict[str, bytes]:
    """Image bytes of the rows' keys and their mixup partners, read from dataset shard ``shard``."""
    wanted = set(table.column("key").to_pylist())
    if "view_partner" in table.schema.names:
        wanted |= {k for k in table.column("view_partner").to_pylist() if k is not None}
    entry = dataset.files[shard]
    stats = ShardStats(str(entry["path"]))
    found = {key: find_image(fields) for key, fields in
             read_shard(dataset.file_path(entry), stats, entry.get("sha256"), entry.get("samples")) if key in wanted}
    missing = sorted(wanted - set(found))
    if missing:
        raise InputError(f"{dataset.path}: shard {shard} lacks keys {missing[:5]} named by the logits rows")
    return found


def _check_rows(table, images, spec, shard_keys, pp, model, logits_set, report, ulps, batch_size, device) -> None:
    """Render the rows' views, run the teacher in batches, compare each row."""
    keys = table.column("key").to_pylist()
    if spec is not None and not is_multiview(table.schema):
        raise IntegrityError(f"{logits_set.manifest.path}: params.views says {spec.views} views but a part "
                             "has no view columns; the artifact is not a multi-view one")
    stored = _stored(table, logits_set)
    views = views_from_table(table) if is_multiview(table.schema) else [None] * len(keys)
    dtype = _DTYPES[logits_set.params.get("logit_dtype", "float32")]
    for start in range(0, len(keys), batch_size):
        rows = range(start, min(start + batch_size, len(keys)))
        pixels = [_render_row(keys[i], views[i], images, spec, shard_keys, pp, report) for i in rows]
        for i, z in zip(rows, _run(model, pixels, pp, device)):
            reason, diff = compare_row(z, *(s[i] for s in stored), logits_set.temperature, dtype, ulps)
            _record(report, keys[i], views[i], reason, diff)


def _render_row(key: str, view: View | None, images: dict[str, bytes], spec: AugSpec | None,
                shard_keys: PartnerPool, pp: Preprocess, report: CheckReport) -> np.ndarray:
    """Pixels of a row's stored view (the centre view for single-view rows); a stored view that the spec
    would not draw for this key is recorded as ``view_not_from_spec`` (and still checked)."""
    img = decode(images[key])
    expected = sample_views(spec or AugSpec(), key, img.width, img.height, shard_keys, pp=pp)
    if view is None:
        view = expected[0]
    elif view.index >= len(expected) or expected[view.index] != view:
        report.mismatches.append({"key": key, "view": view.index, "reason": "view_not_from_spec",
                                  "max_abs_diff": None})
    partner = None if view.partner is None else decode(images[view.partner])
    return render_view(img, view, pp, partner)


def _stored(table, logits_set: LogitsSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = logits_set.topk
    return (fixed_list_to_numpy(table.column("topk_index"), k).astype(np.int64),
            fixed_list_to_numpy(table.column("topk_logit"), k), table.column("lse").to_numpy())


def _run(model, pixels: list[np.ndarray], pp: Preprocess, device: str) -> np.ndarray:
    batch = torch.from_numpy(np.stack(pixels)).to(device)
    with torch.inference_mode():
        return model(normalise(batch, pp)).float().cpu().numpy()


def compare_row(z: np.ndarray, topk_index: np.ndarray, topk_logit: np.ndarray, lse: float,
                temperature: float, dtype, ulps: float) -> tuple[str | None, float]:
    """Compare one row's recomputed full logits ``z`` with its stored top-K; return (reason or None, max diff).

    Reasons: ``topk_differs`` (bad ids, or a class outside the stored ones beats the K-th stored logit),
    ``logit_differs``, ``lse_differs``.
    """
    stored = topk_logit.astype(np.float64)
    tol = ulps * float(np.spacing(dtype(max(np.abs(stored).max(), 1.0))))
    if len(set(topk_index.tolist())) != len(topk_index) or topk_index.min() < 0 or topk_index.max() >= len(z):
        return "topk_differs", float("inf")
    diff = float(np.abs(z[topk_index].astype(np.float64) - stored).max())
    others = np.delete(z, topk_index)
    if others.size and others.max() > stored[-1] + tol:
        return "topk_differs", diff
    if diff > tol:
        return "logit_differs", diff
    scaled = z.astype(np.float64) / temperature
    recomputed = scaled.max() + np.log(np.exp(scaled - scaled.max()).sum())
    if abs(recomputed - float(lse)) > tol / temperature + ulps * float(np.spacing(np.float32(lse))):
        return "lse_differs", diff
    return None, diff


def _record(report: CheckReport, key: str, view: View | None, reason: str | None, diff: float) -> None:
    report.checked += 1
    index = 0 if view is None else view.index
    if reason is None and not any(m["key"] == key and m["view"] == index for m in report.mismatches):
        report.agreed += 1
    elif reason is not None:
        report.mismatches.append({"key": key, "view": index, "reason": reason, "max_abs_diff": diff})
