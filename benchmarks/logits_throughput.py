"""Logits stage throughput: model-only, decode-only and end-to-end images/s, and Parquet bytes per image.

One run, same images and model: JPEGs of ImageNet-like size (about 500x375, quality 90) made here, a seeded
torchvision model (random weights: throughput does not depend on them), the stage's own ``Engine`` (fixed
compute batch, channels_last) for model-only, the stage's own ``ShardBlock`` DataLoader for decode-only, and
``compute_logits`` for end-to-end. Prints the ratio end-to-end / min(model-only, decode-only) and the bytes
per image of K=10 parts with float16 and float32 logits. Not a test: nothing is asserted.

With ``--arch timm:NAME`` the teacher is imported through kdpipe's timm source (its own preprocessing) and the
run adds, in the same process: a bare timm forward (``model(x)`` over tensors made by timm's
``create_transform``, NCHW and channels_last) with the ratio end-to-end / bare, and an ensemble of two members
(seeds 0 and 1, the second at 32 px less) whose model-only time is compared with the sum of its members'.

    .venv/bin/python benchmarks/logits_throughput.py --images 256 --arch resnet18
    .venv/bin/python benchmarks/logits_throughput.py --images 128 --arch timm:resnet10t
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import manifest as mf
from stages.artifacts.cards import load_runnable, write_card
from stages.imaging import Preprocess, centre_view
from stages.ingest.stage import ingest
from stages.logits.data import ShardBlock, ShardRef, make_loader
from stages.logits.inference import Engine, resolve_device
from stages.logits.stage import compute_logits, default_workers
from stages.logits.write import PartRows, part_table, write_part
from stages.models.classifiers import build_model
from stages.teacher.ensemble import write_ensemble
from stages.teacher.stage import import_teacher


def cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (DataLoader workers): robust to a shared machine's
    load, unlike wall time."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def make_jpegs(folder: Path, count: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs (smooth colour fields plus grain), 500x375 or 375x500, quality 90."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    blobs = []
    for i in range(count):
        size = (500, 375) if i % 4 else (375, 500)
        low = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        pixels = np.asarray(low, np.int16) + rng.normal(0, 6, (size[1], size[0], 3)).astype(np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
        (folder / f"img{i:05d}.jpg").write_bytes(blobs[-1])
    return blobs


def model_only(engine: Engine, views: np.ndarray, repeats: int) -> tuple[float, list]:
    """Images/s of the forward (+ on-device top-K/lse) over already decoded uint8 views; also the outputs."""
    batch = engine.compute_batch
    engine.run(torch.from_numpy(views[:batch]))  # warm-up
    outputs, start = [], time.perf_counter()
    for _ in range(repeats):
        outputs = [engine.run(torch.from_numpy(views[i:i + batch])) for i in range(0, len(views), batch)]
    return repeats * len(views) / (time.perf_counter() - start), outputs


def decode_only(data: Path, pp: Preprocess, workers: int) -> float:
    """Images/s of the stage's DataLoader alone (tar read, decode, centre view), with ``workers`` workers."""
    manifest = mf.load(data)
    refs = [ShardRef(i, str(manifest.file_path(f)), f["sha256"], f["samples"]) for i, f in enumerate(manifest.files)]
    start, count = time.perf_counter(), 0
    for record in make_loader(ShardBlock(refs, pp), workers):
        count += len(record["positions"])
    return count / (time.perf_counter() - start)


def bytes_per_image(keys: list[str], outputs: list, work: Path, dtype: str) -> float:
    """Size of one K=10 part per row, for the given logit storage type."""
    rows = PartRows()
    for i, out in enumerate(outputs):
        rows.append(keys[i * len(out.lse):(i + 1) * len(out.lse)], out.index, out.logit, out.lse, None)
    path = work / f"bytes-{dtype}.parquet"
    write_part(part_table(rows, 0, num_classes=1000, topk=10, logit_dtype=dtype, embedding_dim=None,
                          metadata={"schema_version": 1}), path)
    return path.stat().st_size / len(rows)


def synthetic_bytes_per_image(work: Path, dtype: str, rows: int = 10000, classes: int = 1000) -> float:
    """Bytes/img of a K=10 part of ``rows`` rows with teacher-like logits (a peaked class over N(0, 2) noise)."""
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(rows, classes)) * 2).astype(np.float32)
    z[np.arange(rows), rng.integers(0, classes, rows)] += rng.uniform(2, 12, rows).astype(np.float32)
    order = np.argsort(-z, axis=1, kind="stable")[:, :10]
    lse = np.log(np.exp(z.astype(np.float64)).sum(axis=1)).astype(np.float32)
    keys = [f"train/n{i // 1300:08d}/n{i // 1300:08d}_{i:05d}" for i in range(rows)]
    part = PartRows()
    part.append(keys, order, np.take_along_axis(z, order, axis=1), lse, None)
    path = work / f"synthetic-{dtype}.parquet"
    write_part(part_table(part, 0, num_classes=classes, topk=10, logit_dtype=dtype, embedding_dim=None,
                          metadata={"schema_version": 1}), path)
    return path.stat().st_size / rows


def timm_card(work: Path, arch: str, seed: int, size: int | None = None):
    """A kdpipe card of a seeded timm model imported through the timm source; (card, timm model)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(arch.split(":", 1)[1], pretrained=False, num_classes=1000).eval()
    weights = work / f"w{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    card = import_teacher(weights, work / f"teacher{seed}", arch=arch, class_names=[f"c{i}" for i in range(1000)],
                          flags={"size": size})
    return card, model


def bare_loop(model, blobs: list[bytes], batch: int) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of a user's plain timm loop in one process: decode, ``create_transform``,
    ``model(x)`` (NCHW)."""
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.inference_mode():
        start, cpu = time.perf_counter(), cpu_seconds()
        for i in range(0, len(blobs), batch):
            model(torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs[i:i + batch]]))
    return len(blobs) / (time.perf_counter() - start), (cpu_seconds() - cpu) / len(blobs)


def bare_timm(model, blobs: list[bytes], batch: int, channels_last: bool) -> float:
    """Images/s of a plain timm forward over tensors made by timm's own eval transform (decode not timed)."""
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    x = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    net = model.to(memory_format=torch.channels_last) if channels_last else model
    with torch.inference_mode():
        net(x[:batch].contiguous(memory_format=torch.channels_last) if channels_last else x[:batch])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            chunk = x[i:i + batch]
            net(chunk.contiguous(memory_format=torch.channels_last) if channels_last else chunk)
    return len(x) / (time.perf_counter() - start)


def ensemble_vs_members(work: Path, arch: str, blobs: list[bytes], batch: int, device, repeats: int = 3) -> dict:
    """Model-only seconds of a 2-member ensemble card and of each member alone (same views, same Engine); the
    three are timed in turn ``repeats`` times and the fastest of each kept (a shared machine's load moves)."""
    work.mkdir(parents=True, exist_ok=True)
    first_card = timm_card(work, arch, 0)[0]
    first = mf.load(first_card).params["preprocess"]["size"]
    cards = [first_card, timm_card(work, arch, 1, first - 32)[0]]
    ens = write_ensemble(cards, work / "ensemble", "mean-logits")
    runs = {name: _engine_run(card, blobs, batch, device)
            for name, card in [("member0", cards[0]), ("member1", cards[1]), ("ensemble", ens)]}
    seconds = {name: (float("inf"), float("inf")) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = run()
            seconds[name] = (min(seconds[name][0], wall), min(seconds[name][1], cpu))
    return seconds


def _engine_run(card: Path, blobs: list[bytes], batch: int, device):
    """A function timing one model-only pass of ``card`` over the views of ``blobs`` (after a warm-up)."""
    model, pp, _ = load_runnable(card)
    pps = pp if isinstance(pp, tuple) else (pp,)
    views = [torch.from_numpy(np.stack([centre_view(b, p) for b in blobs])) for p in pps]
    engine = Engine(model, pp, topk=10, temperature=1.0, compute_batch=batch, device=device)

    def pick(i: int):
        return tuple(v[i:i + batch] for v in views) if isinstance(pp, tuple) else views[0][i:i + batch]

    engine.run(pick(0))  # warm-up

    def run() -> tuple[float, float]:
        start, cpu = time.perf_counter(), cpu_seconds()
        for i in range(0, len(blobs), batch):
            engine.run(pick(i))
        return time.perf_counter() - start, cpu_seconds() - cpu
    return run


def bare_both(model, blobs: list[bytes], batch: int) -> np.ndarray:
    """(forward NCHW, forward channels_last, whole loop NCHW) images/s of bare timm, and the loop's CPU s/image."""
    return np.array([bare_timm(model, blobs, batch, False), bare_timm(model, blobs, batch, True),
                     *bare_loop(model.to(memory_format=torch.contiguous_format), blobs, batch)])


def report_timm(args, work: Path, blobs: list[bytes], bare: np.ndarray, e2e: tuple[float, float], device) -> None:
    """The timm lines: end-to-end / bare timm forward (bracketing the end-to-end run), and the ensemble."""
    nchw, cl, loop, loop_cpu = bare
    e2e_ips, e2e_cpu = e2e
    print(f"bare timm    {nchw:8.1f} img/s NCHW, {cl:.1f} img/s channels_last (model(x) on create_transform "
          f"tensors); {loop:.1f} img/s as a plain loop with decode and transform (NCHW, one process)")
    print(f"ratio end-to-end / bare timm forward = {e2e_ips / nchw:.2f} (NCHW), {e2e_ips / cl:.2f} (channels_last); "
          f"/ bare timm loop = {e2e_ips / loop:.2f}")
    print(f"CPU per image: bare timm loop {loop_cpu * 1e3:.1f} ms, kdpipe end-to-end {e2e_cpu * 1e3:.1f} ms "
          f"(workers included): ratio bare / kdpipe {loop_cpu / e2e_cpu:.2f}")
    sec = ensemble_vs_members(work / "ens", args.arch, blobs[:96], args.batch_size, device)
    for j, clock in enumerate(("wall", "CPU")):
        ens, m0, m1 = sec["ensemble"][j], sec["member0"][j], sec["member1"][j]
        print(f"ensemble of 2 model-only (96 images, best of 3, {clock}) {ens:.2f} s vs members {m0:.2f} + "
              f"{m1:.2f} s: ratio {ens / (m0 + m1):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--gpu-decode", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    workers = default_workers(device) if args.workers is None else args.workers
    print(f"load average before: {os.getloadavg()}, cores: {len(os.sched_getaffinity(0))}, "
          f"torch threads: {torch.get_num_threads()}, workers: {workers}, device: {device}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        blobs = make_jpegs(work / "jpegs", args.images)
        print(f"{len(blobs)} JPEGs, mean {np.mean([len(b) for b in blobs]) / 1024:.1f} KiB")
        data = ingest(str(work / "jpegs"), work / "data", shard_size=128)["all"]
        if args.arch.startswith("timm:"):
            card, timm_model = timm_card(work, args.arch, 0)
            model, pp, _ = load_runnable(card)
        else:
            pp = Preprocess()
            torch.manual_seed(0)
            model = build_model(args.arch, 1000)
            card = write_card(work / "teacher", model, arch=args.arch, class_names=[f"c{i}" for i in range(1000)],
                              preprocess=pp, stage="benchmark")
        views = np.stack([centre_view(b, pp) for b in blobs])
        engine = Engine(model, pp, topk=10, temperature=1.0, compute_batch=args.batch_size, device=device,
                        compile_model=args.compile)
        model_before, outputs = model_only(engine, views, repeats=1)
        decode_ips = decode_only(data, pp, workers)
        bare = bare_both(timm_model, blobs, args.batch_size) if args.arch.startswith("timm:") else None
        start, cpu = time.perf_counter(), cpu_seconds()
        path = compute_logits(data, card, work / "logits", topk=10, temperature=1.0, batch_size=args.batch_size,
                              num_workers=workers, device=args.device, compile_model=args.compile,
                              gpu_decode=args.gpu_decode)
        e2e_ips = len(blobs) / (time.perf_counter() - start)
        e2e_cpu = (cpu_seconds() - cpu) / len(blobs)
        model_after, _ = model_only(engine, views, repeats=1)  # brackets the end-to-end run (shared machines)
        model_ips = (model_before + model_after) / 2
        keys = [f"img{i:05d}" for i in range(len(blobs))]
        stored = sum(f["bytes"] for f in mf.load(path).files) / len(blobs)
        b16, b32 = (bytes_per_image(keys, outputs, work, d) for d in ("float16", "float32"))
        s16, s32 = (synthetic_bytes_per_image(work, d) for d in ("float16", "float32"))
        if args.arch.startswith("timm:"):
            bare = (bare + bare_both(timm_model, blobs, args.batch_size)) / 2  # before and after end-to-end
            report_timm(args, work, blobs, bare, (e2e_ips, e2e_cpu), device)
    print(f"model-only   {model_ips:8.1f} img/s  ({args.arch}, {pp.size} px, batch {args.batch_size}; "
          f"{model_before:.1f} before and {model_after:.1f} after the end-to-end run)")
    print(f"decode-only  {decode_ips:8.1f} img/s  ({workers} DataLoader worker(s))")
    print(f"end-to-end   {e2e_ips:8.1f} img/s  (compute_logits, model load and Parquet included)")
    print(f"ratio end-to-end / min(model, decode) = {e2e_ips / min(model_ips, decode_ips):.2f}")
    print(f"Parquet K=10: {stored:.1f} B/img as written (float16, {len(blobs)} rows in parts of 128); "
          f"one part of {len(blobs)} rows: float16 {b16:.1f} B/img, float32 {b32:.1f} B/img")
    print(f"Parquet K=10, 10k-row part, C=1000, teacher-like logits: float16 {s16:.1f} B/img, "
          f"float32 {s32:.1f} B/img")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
