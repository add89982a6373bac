"""Benchmark: can the training data pipeline feed the student? Loader samples/s against step samples/s.

In one run, on the same shards and the same student:
1. loader: ``stages.train.data.make_loader`` over reshard-shaped shards (image + cls + json soft targets):
   read + sha-checked tar streaming, shuffle buffer, explicit decode, random-resized-crop view, soft-target
   parsing, collation; ``--workers`` DataLoader workers; samples/s after a warm-up.
2. step: the student's training step on synthetic in-memory uint8 batches of the same shape (normalise,
   forward, teacher distribution rebuilt from top-K, mix loss, backward, SGD step); samples/s.
3. end to end: the loader feeding the step, as training runs it.
Prints the three rates and ratio = loader / step (goal >= 1.1 on a GPU: the loader must not be the
bottleneck) and end-to-end / min(loader, step).

    .venv/bin/python benchmarks/train_loader.py                       # digits: 8x8 PNG -> 28 px, smallcnn
    .venv/bin/python benchmarks/train_loader.py --source jpeg --arch resnet18 --size 224 --classes 1000
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import manifest as mf  # noqa: E402
from pipeline.parts import PartResult, PartStore, fingerprint  # noqa: E402
from pipeline.tasks import file_entries, finalize, run_parts  # noqa: E402
from stages import imaging  # noqa: E402
from stages.imaging import Preprocess  # noqa: E402
from stages.models.classifiers import build_model  # noqa: E402
from stages.shardio import count_samples, write_shard  # noqa: E402
from stages.train.config import TrainConfig  # noqa: E402
from stages.train.data import make_loader  # noqa: E402
from stages.train.inputs import load_inputs, make_plan  # noqa: E402
from stages.train.losses import distillation_loss, teacher_distribution  # noqa: E402

TOPK, TEMP = 10, 2.0


def images(source: str, count: int, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """(extension, bytes): the bundled digits as PNG, or smooth random 500x375 JPEGs (q90, ImageNet-like)."""
    if source == "digits":
        from sklearn.datasets import load_digits

        out = []
        for pixels in load_digits().images[:count]:
            buffer = io.BytesIO()
            Image.fromarray((pixels * 255 / 16).astype(np.uint8), "L").save(buffer, format="PNG")
            out.append(("png", buffer.getvalue()))
        return out
    out = []
    for _ in range(count):
        small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small, "RGB").resize((500, 375), Image.BICUBIC)
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=90)
        out.append(("jpg", buffer.getvalue()))
    return out


def soft_json(rng: np.random.Generator, classes: int) -> bytes:
    z = rng.normal(size=classes) * 2
    order = np.argsort(-z)[:TOPK]
    lse = float(np.log(np.exp(z / TEMP).sum()))
    return json.dumps({"score": 0.5, "source_key": "x", "source_shard": 0, "dup": 0, "topk_index": order.tolist(),
                       "topk_logit": z[order].tolist(), "lse": lse, "temperature": TEMP}).encode()


def make_shards(folder: Path, source: str, count: int, shards: int, classes: int) -> Path:
    """A reshard-shaped labeled dataset with soft targets, written through PartStore + finalize."""
    rng = np.random.default_rng(0)
    pics = images(source, count, rng)
    samples = [{"__key__": f"img-{i:06d}__l{i % classes}", ext: data, "cls": str(i % classes).encode(),
                "json": soft_json(rng, classes)} for i, (ext, data) in enumerate(pics)]
    store = PartStore(folder, ".tar", fingerprint("bench", {"source": source}, "1"), count_samples)
    produce = lambda i: store.commit(i, lambda tmp: PartResult(expected_rows=write_shard(tmp, iter(samples[i::shards]))))
    run_parts(store, range(shards), produce)
    params = {"labeled": True, "class_names": [str(c) for c in range(classes)], "num_classes": classes,
              "soft_targets": {"topk": TOPK, "temperature": TEMP, "teacher_id": None, "logits_id": None},
              "source": "reshard", "split": None}
    return finalize(store, shards, lambda r: mf.build("dataset", stage="bench", params=params,
                                                      files=file_entries(r, "samples"),
                                                      totals={"samples": sum(x["rows"] for x in r)}))


def loader_rate(plan, batches: int) -> float:
    """Samples/s of the loader alone (first 2 batches are warm-up)."""
    it = iter(make_loader(plan, 0, 0, 0, [0] * plan.streams))
    for _ in range(2):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * plan.batch_size / (time.perf_counter() - start)


def make_step(config: TrainConfig, classes: int):
    torch.manual_seed(0)
    model = build_model(config.arch, classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(batch: dict) -> None:
        x = imaging.normalise(batch["images"], config.preprocess)
        logits = model(x)
        probs = teacher_distribution(batch["topk_index"], batch["topk_logit"], batch["lse"], batch["temperature"],
                                     classes)
        loss = distillation_loss("mix", logits, batch["labels"], probs, batch["temperature"], 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def step_rate(step, batch: dict, steps: int) -> float:
    """Samples/s of training steps on one in-memory batch (first 2 steps are warm-up)."""
    for _ in range(2):
        step(batch)
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    return steps * len(batch["labels"]) / (time.perf_counter() - start)


def end_to_end(plan, step, batches: int) -> float:
    it = iter(make_loader(plan, 1, 0, 0, [0] * plan.streams))
    for _ in range(2):
        step(next(it))
    start = time.perf_counter()
    for _ in range(batches):
        step(next(it))
    return batches * plan.batch_size / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", choices=["digits", "jpeg"], default="digits")
    ap.add_argument("--arch", default="smallcnn")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=10, help="timed batches per measurement")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the step (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    crop = 1.0 if args.source == "digits" else 0.875
    config = TrainConfig(arch=args.arch, loss="mix", batch_size=args.batch_size, num_workers=args.workers,
                         preprocess=Preprocess(size=args.size, crop_fraction=crop), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_shards(Path(tmp) / "shards", args.source, args.images, args.shards, args.classes)
        plan = make_plan(load_inputs([manifest], None, config), config, world=1)
        loader = loader_rate(plan, args.batches)
        batch = next(iter(make_loader(plan, 2, 0, 0, [0] * plan.streams)))
        step = make_step(config, args.classes)
        compute = step_rate(step, batch, args.batches)
        both = end_to_end(plan, step, args.batches)
    print(f"source={args.source} arch={args.arch} size={args.size} batch={args.batch_size} workers={args.workers} "
          f"torch_threads={torch.get_num_threads()}")
    print(f"loader (decode+augment+soft targets): {loader:9.1f} samples/s")
    print(f"student step (in-memory batches):     {compute:9.1f} samples/s")
    print(f"end to end (loader feeding steps):    {both:9.1f} samples/s")
    print(f"ratio loader/step = {loader / compute:.2f} (goal >= 1.1 on GPU); "
          f"end-to-end/min = {both / min(loader, compute):.2f}")


if __name__ == "__main__":
    main()
