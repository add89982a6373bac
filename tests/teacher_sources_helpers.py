"""Shared helpers of the teacher-source tests: a pool of real images (sklearn digits as PNGs of assorted sizes and
aspect ratios), kdpipe's stored logits by key, and a library's own full logits of the same images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from sklearn.datasets import load_digits

from pipeline import manifest as mf
from pipeline.cli import main
from stages import imaging
from stages.shardio import ShardStats, read_shard

SIZES = [(37, 53), (64, 40), (90, 120), (200, 150), (48, 48), (161, 97), (33, 33), (120, 64), (75, 210), (52, 39),
         (250, 180), (40, 41)]


def make_pool(root: Path) -> Path:
    """Ingest 12 digit scans rendered as RGB PNGs of the sizes above; return the dataset manifest."""
    folder = root / "images"
    folder.mkdir(parents=True)
    digits = load_digits()
    for i, (w, h) in enumerate(SIZES):
        gray = (digits.images[i] * (255 / 16)).astype(np.uint8)
        rgb = np.stack([gray, 255 - gray, (gray // 2 + 60)], axis=2).astype(np.uint8)
        Image.fromarray(rgb).resize((w, h), Image.NEAREST).save(folder / f"img{i:02d}.png")
    assert main(["ingest", str(folder), "--out", str(root / "pool"), "--shard-size", "5"]) == 0
    return root / "pool"


def pool_images(pool: Path) -> dict[str, Image.Image]:
    """key -> decoded RGB image of every sample of the pool."""
    manifest = mf.load(pool)
    out = {}
    for entry in manifest.files:
        for key, fields in read_shard(manifest.file_path(entry), ShardStats(entry["path"])):
            out[key] = imaging.decode(imaging.find_image(fields))
    return out


def stored(logits: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (top-K class ids, top-K logits as float32) from a logits artifact."""
    manifest = mf.load(logits)
    out = {}
    for entry in manifest.files:
        table = pq.read_table(manifest.file_path(entry))
        for key, idx, val in zip(table["key"].to_pylist(), table["topk_index"].to_pylist(),
                                 table["topk_logit"].to_pylist()):
            out[key] = (np.asarray(idx), np.asarray(val, dtype=np.float32))
    return out


def run_logits(pool: Path, teacher: Path, out: Path, topk: int = 3, *extra: str) -> dict:
    assert main(["logits", "--data", str(pool), "--teacher", str(teacher), "--topk", str(topk), "--temperature",
                 "2", "--out", str(out), "--num-workers", "0", "--threads", "1", *extra]) == 0
    return stored(out)


def assert_same_topk(kdpipe: dict, reference: dict[str, torch.Tensor], topk: int = 3) -> None:
    """kdpipe's top-K ids equal the reference's and its float16 logits agree within float16 rounding (2x)."""
    assert set(kdpipe) == set(reference)
    for key, (idx, val) in kdpipe.items():
        z = reference[key].float()
        ref_val, ref_idx = torch.sort(z, descending=True, stable=True)
        scale = float(z.abs().max())
        # float16 keeps 11 significant bits: a relative error up to 2^-11 (4.9e-4) is its rounding
        assert np.allclose(val, ref_val[:topk].numpy(), rtol=1e-3, atol=1e-4 * scale), (key, val, ref_val[:topk])
        gaps = np.diff(ref_val[: topk + 1].numpy())
        if np.all(np.abs(gaps) > 2e-3 * scale):  # ids compared where no two logits are within rounding
            assert list(idx) == ref_idx[:topk].tolist(), key
