"""Parquet bytes per image of multi-view logits (V views per image), written by the logits stage's own writer.

Two measurements, each against the single-view layout measured in the same process:

1. Synthetic, ImageNet-like: K=10, C=1000, ``--images`` images in one part, keys like
   ``train/n12345678_0000001``, 200-800 px images, views drawn by ``stages.views.sample_views`` with
   ``--aug``, random normal logits (incompressible: an upper bound; real views of an image share most top-K
   classes), written by ``logits_write.part_table`` + ``views_format.with_views`` + ``logits_write.write_part``
   (zstd 9 and the stage's encodings).
2. Real: the bundled digits' 1267-image pool through ``compute_logits`` (a seeded smallcnn, K=5, C=10),
   single view vs ``--views V --aug``; bytes of all parts / images.

Not a test: nothing is asserted.

    .venv/bin/python benchmarks/views_storage.py --images 10000
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline import manifest as mf
from stages.artifacts.cards import write_card
from stages.artifacts.views import with_views
from stages.imaging import Preprocess
from stages.ingest.stage import ingest
from stages.logits.stage import compute_logits
from stages.logits.write import PartRows, part_table, write_part
from stages.models.classifiers import build_model
from stages.views.render import sample_views
from stages.views.spec import parse_aug


def synthetic_bytes(n: int, views: int, dtype: str, aug: str, folder: Path, seed: int = 0) -> int:
    """File size of one part of ``n`` images x ``views`` rows (plain layout when ``views`` is 0)."""
    rng = np.random.default_rng(seed)
    keys = [f"train/n{rng.integers(1e8):08d}_{i:07d}" for i in range(n)]
    sizes = [(int(rng.integers(200, 800)), int(rng.integers(200, 800))) for _ in range(n)]
    v = max(views, 1)
    logits = rng.normal(size=(n * v, 1000)).astype(np.float32) * 3
    order = np.argsort(-logits, axis=1, kind="stable")[:, :10]
    rows = PartRows()
    rows.append([k for k in keys for _ in range(v)], order, np.take_along_axis(logits, order, 1),
                np.log(np.exp(logits).sum(axis=1)).astype(np.float32), None)
    meta = {"schema_version": 1}
    table = part_table(rows, 0, num_classes=1000, topk=10, logit_dtype=dtype, embedding_dim=None, metadata=meta)
    if views:
        spec = parse_aug(aug, views=views, seed=0)
        drawn = [x for k, (w, h) in zip(keys, sizes) for x in sample_views(spec, k, w, h, keys, pp=Preprocess())]
        table = with_views(table, drawn, spec)
    path = folder / f"syn-{views}-{dtype}.parquet"
    write_part(table, path)
    return path.stat().st_size


def real_bytes(folder: Path, views: int, aug: str) -> tuple[int, int]:
    """(bytes of all logits parts, images) of the digits pool with ``views`` views (1: plain)."""
    data = folder / "ds" / "unlabeled" / mf.MANIFEST_NAME
    if not data.exists():
        ingest("digits", folder / "ds", shard_size=200, split="labeled=3/class,test=500,unlabeled=rest", seed=0)
    card = folder / "card"
    if not (card / mf.MANIFEST_NAME).exists():
        torch.manual_seed(0)
        write_card(card, build_model("smallcnn", 10).eval(), arch="smallcnn", class_names=[str(d) for d in range(10)],
                   preprocess=Preprocess(size=28, crop_fraction=1.0), stage="benchmark")
    spec = parse_aug(aug, views=views, seed=0) if views > 1 else None
    out = compute_logits(data, card, folder / f"real-{views}", topk=5, temperature=2.0, num_workers=0, aug=spec)
    manifest = mf.load(out, kind="logits")
    return sum(int(f["bytes"]) for f in manifest.files), int(manifest.totals["samples"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--aug", default="rrc:0.08-1,flip:0.5,mixup:0.2")
    parser.add_argument("--digits-aug", default="rrc:0.6-1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"synthetic K=10 C=1000, {args.images} images, aug {args.aug!r} (stage writer, zstd 9)")
        print("| V | logit dtype | bytes / image | bytes / row | x single-view |")
        print("| --- | --- | --- | --- | --- |")
        for dtype in ("float16", "float32"):
            base = synthetic_bytes(args.images, 0, dtype, args.aug, folder) / args.images
            print(f"| 1 (plain) | {dtype} | {base:.1f} | {base:.1f} | 1.00 |")
            for v in (1, 4, 8):
                per = synthetic_bytes(args.images, v, dtype, args.aug, folder) / args.images
                print(f"| {v} | {dtype} | {per:.1f} | {per / v:.1f} | {per / base:.2f} |")
        print(f"\nreal: digits pool, seeded smallcnn, K=5 C=10 float16, aug {args.digits_aug!r}")
        base, images = real_bytes(folder, 1, args.digits_aug)
        print(f"V=1 (plain): {base / images:.1f} B/image ({images} images)")
        for v in (4, 8):
            total, _ = real_bytes(folder, v, args.digits_aug)
            print(f"V={v}: {total / images:.1f} B/image, {total / images / v:.1f} B/row, x{total / base:.2f} "
                  "single-view")


if __name__ == "__main__":
    main()
