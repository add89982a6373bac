"""A per-class image gallery of a selection: its top images and the last ones admitted, for eyeballing labels.

The images are found through the lineage (selection -> logits manifest ``inputs`` -> dataset manifest), or
a dataset manifest given explicitly; shards are read with ``stages.shardio.read_shard`` (checksums and
counts checked) and images rendered with ``stages.imaging`` (the project's one decode policy). Only the
shards holding a wanted image are read; memory is the thumbnails (classes x 2N small images).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import manifest as mf
from pipeline.errors import KdpipeError
from stages.artifacts.arrays import to_numpy
from stages.artifacts.lineage import resolve_lineage
from stages.artifacts.reports import new_figure, png_bytes
from stages.imaging import Preprocess, SampleError, centre_box, decode, find_image, render
from stages.shardio import ShardStats, read_shard

log = logging.getLogger(__name__)
THUMB = Preprocess(size=64, crop_fraction=1.0)
GALLERY_DPI = 80
PAD, TILE, CAPTION, TITLE = 4, 72, 22, 16  # pixels: around a thumbnail, a thumbnail's column, its caption, the title


def find_dataset(selection: mf.Manifest, dataset: str | Path | None) -> mf.Manifest | None:
    """The dataset behind ``selection``: ``dataset`` if given (its id must match), else via the lineage."""
    try:
        return resolve_lineage(selection, dataset, need_logits=False).dataset
    except KdpipeError as exc:
        if dataset is not None:
            raise
        log.warning("gallery skipped: the dataset is not reachable through the lineage (%s); pass --dataset", exc)
        return None


def pick(table: pa.Table, per_class: int) -> dict[int, tuple[list[int], list[int]]]:
    """Row indices per label: the ``per_class`` top originals and the ``per_class`` last admitted."""
    labels = to_numpy(table.column("label"))
    originals = np.flatnonzero(to_numpy(table.column("dup")) == 0)
    out = {}
    for label in np.unique(labels[originals]):
        rows = originals[labels[originals] == label]
        top = rows[:per_class].tolist()
        out[int(label)] = (top, [r for r in rows[-per_class:].tolist() if r not in top])
    return out


def gallery_files(selection: mf.Manifest, table: pa.Table, per_class: int,
                  dataset: str | Path | None = None) -> dict[str, bytes]:
    """The PNG of each selected class, by its path in the report: ``gallery/class-<label>.png``."""
    data = find_dataset(selection, dataset)
    if data is None:
        return {}
    picks = pick(table, per_class)
    wanted = {int(i) for top, last in picks.values() for i in top + last}
    keys = table.column("key").to_pylist()
    shards = to_numpy(table.column("shard"))
    thumbs = fetch_thumbnails(data, {keys[i]: int(shards[i]) for i in wanted})
    scores = to_numpy(table.column("score"))
    files = {}
    for label, (top, last) in sorted(picks.items()):
        name = f"gallery/class-{label:05d}.png"
        title = f"class {selection.params['class_names'][label]}: top {len(top)} / last {len(last)} admitted"
        panels = [[(keys[i], scores[i], thumbs.get(keys[i])) for i in row] for row in (top, last)]
        files[name] = _grid_png(title, panels)
    return files


def fetch_thumbnails(data: mf.Manifest, wanted: dict[str, int]) -> dict[str, np.ndarray | None]:
    """Thumbnails (HWC uint8) of the wanted keys (key -> shard index); None for an image that fails."""
    out: dict[str, np.ndarray | None] = {}
    for shard in sorted(set(wanted.values())):
        entry = data.files[shard]
        stats = ShardStats(str(entry["path"]))
        for key, fields in read_shard(data.file_path(entry), stats, entry["sha256"], entry.get("samples")):
            if wanted.get(key) == shard:
                out[key] = _thumbnail(key, fields)
    return out


def _thumbnail(key: str, fields: dict) -> np.ndarray | None:
    try:
        img = decode(find_image(fields))
        return render(img, centre_box(*img.size, THUMB), THUMB)
    except SampleError as exc:
        log.warning("gallery: %s not shown (%s)", key, exc.reason)
        return None


def _grid_png(title: str, panels: list[list[tuple]]) -> bytes:
    """Two rows of thumbnails (top, last admitted) with key and score above each: one mosaic image in one axes
    (an axes per thumbnail made a 4-image gallery cost ~0.2 s a class, this ~0.02 s)."""
    cols = max(1, max(len(row) for row in panels))
    mosaic = np.full((2 * (CAPTION + TILE), cols * TILE, 3), 255, np.uint8)
    fig = new_figure(figsize=(cols * TILE / GALLERY_DPI, (len(mosaic) + TITLE) / GALLERY_DPI))
    ax = fig.add_axes((0, 0, 1, len(mosaic) / (len(mosaic) + TITLE)))
    ax.axis("off")
    for r, row in enumerate(panels):
        for c, (key, score, thumb) in enumerate(row):
            top, left = r * (CAPTION + TILE) + CAPTION, c * TILE + PAD
            if thumb is not None:
                tile = thumb[:TILE - 2 * PAD, :TILE - 2 * PAD]
                mosaic[top:top + tile.shape[0], left:left + tile.shape[1]] = tile
            ax.text(left + (TILE - 2 * PAD) / 2, top - 2, f"{key[-12:]}\n{score:.3f}", fontsize=6, ha="center",
                    va="bottom")
    ax.imshow(mosaic, interpolation="nearest")
    fig.suptitle(title, fontsize=8, y=1 - 2 / (len(mosaic) + TITLE))
    return png_bytes(fig, dpi=GALLERY_DPI)
