"""Helpers of the logits tests (no tests here): tiny datasets, seeded teacher cards, a plain reference forward."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import manifest as mf
from pipeline.hashing import canonical_json, sha256_file
from stages import imaging
from stages.artifacts.cards import load_classifier, preprocess_of, write_card
from stages.ingest.stage import ingest
from stages.models.classifiers import build_model
from stages.shardio import ShardStats, read_shard, write_shard

DIGITS_PP = imaging.Preprocess(size=28, crop_fraction=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
NAMES = [str(d) for d in range(10)]


def digits_data(out: Path, shard_size: int = 100, samples: int = 400) -> Path:
    """A labeled dataset of ``samples`` of the bundled digits (a seeded split of the 1797; the rest unused)."""
    return ingest("digits", out, shard_size=shard_size, split=f"sub={samples},rest=rest")["sub"]


def shard_images(data: Path, pp: imaging.Preprocess = DIGITS_PP) -> list[tuple[list[str], np.ndarray]]:
    """Per shard: keys and centre views (N, S, S, 3) uint8 of every decodable sample, in shard order."""
    manifest = mf.load(data)
    out = []
    for entry in manifest.files:
        keys, views = [], []
        for key, fields in read_shard(manifest.file_path(entry), ShardStats("x")):
            try:
                views.append(imaging.centre_view(imaging.find_image(fields), pp))
                keys.append(key)
            except imaging.SampleError:
                pass
        out.append((keys, np.stack(views) if views else np.zeros((0, pp.size, pp.size, 3), np.uint8)))
    return out


def train_card(out: Path, data: Path | None, *, steps: int = 25, seed: int = 0, kind: str = "teacher",
               classes: list[str] = NAMES, pp: imaging.Preprocess = DIGITS_PP) -> Path:
    """A seeded smallcnn card, trained ``steps`` SGD steps on ``data`` (labels from ``cls``) when given."""
    torch.manual_seed(seed)
    model = build_model("smallcnn", len(classes))
    if data is not None and steps:
        x, y = _labeled_tensors(data, pp)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            pick = torch.randint(0, len(y), (32,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x[pick]), y[pick])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return write_card(out, model.eval(), arch="smallcnn", class_names=classes, preprocess=pp, stage="test",
                      kind=kind)


def _labeled_tensors(data: Path, pp: imaging.Preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    manifest = mf.load(data)
    views, labels = [], []
    for entry in manifest.files:
        for _, fields in read_shard(manifest.file_path(entry), ShardStats("x")):
            views.append(imaging.centre_view(imaging.find_image(fields), pp))
            labels.append(int(fields["cls"]))
    return imaging.normalise(torch.from_numpy(np.stack(views)), pp), torch.tensor(labels)


def plain_logits(card: Path, views: np.ndarray) -> torch.Tensor:
    """Full logits of a plain float32 NCHW forward over all ``views`` at once (the reference)."""
    model, manifest = load_classifier(card)
    with torch.no_grad():
        return model(imaging.normalise(torch.from_numpy(views), preprocess_of(manifest))).float()


def jpeg(rng: np.random.Generator, size=(40, 30), quality: int = 90) -> bytes:
    """A small random-content JPEG."""
    buffer = io.BytesIO()
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_dataset(out: Path, shards: list[list[dict]], class_names: list[str] | None = None,
                 extra_params: dict | None = None) -> Path:
    """A dataset manifest over hand-made shards (samples are webdataset dicts with ``__key__``)."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, samples in enumerate(shards):
        path = out / f"part-{i:06d}.tar"
        write_shard(path, iter(samples))
        files.append({"path": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path),
                      "samples": len(samples)})
    names = class_names or []
    params = {"labeled": bool(names), "class_names": names, "num_classes": len(names), **(extra_params or {})}
    data = mf.build("dataset", stage="test", params=params, files=files,
                    totals={"samples": sum(f["samples"] for f in files)})
    return mf.write(data, out)


def relist(manifest_path: Path, index: int, new_bytes: bytes, out: Path, rows: int | None = None) -> Path:
    """A copy of a manifest's folder whose part ``index`` holds ``new_bytes``, listed with matching sha256."""
    src = Path(manifest_path).parent
    out.mkdir(parents=True, exist_ok=True)
    data = json.loads(Path(manifest_path).read_bytes())
    for entry in data["files"]:
        (out / entry["path"]).write_bytes((src / entry["path"]).read_bytes())
    entry = data["files"][index]
    (out / entry["path"]).write_bytes(new_bytes)
    entry["bytes"], entry["sha256"] = len(new_bytes), sha256_file(out / entry["path"])
    if rows is not None:
        entry["rows"] = rows
    data["id"] = mf.content_id(json.loads(canonical_json(data)))
    (out / "manifest.json").write_text(json.dumps(data))
    return out / "manifest.json"
