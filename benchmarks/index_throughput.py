"""``kdpipe index`` throughput against ``sha256sum`` of the same files, and logits with the pool in a local S3
server (moto_server) against the same pool on local disk. Ratios in the same run; nothing is asserted.

The pool is img2dataset-shaped (``NNNNN.tar`` with ``KEY.jpg``/``KEY.txt``/``KEY.json``, ``.parquet`` and
``_stats.json`` beside), photo-like 256x256 JPEGs made here. Index and ``sha256sum`` each run ``--repeats``
times on a warm page cache; the best time counts (shared machines). The logits part uses the stage itself
(``compute_logits``) with a seeded torchvision model (random weights), first over the local pool, then over the
bucket (``AWS_ENDPOINT_URL`` points at the moto server started here).

    .venv/bin/python benchmarks/index_throughput.py --shards 8 --samples 300 --logits-images 128
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.hashing import sha256_file
from stages.artifacts.cards import write_card
from stages.imaging import Preprocess
from stages.index.stage import index
from stages.logits.stage import compute_logits
from stages.models.classifiers import build_model


def photo(rng: np.random.Generator, size: int = 256) -> bytes:
    low = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    pixels = np.asarray(low, np.int16) + rng.normal(0, 6, (size, size, 3)).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_pool(folder: Path, shards: int, samples: int, seed: int = 0) -> list[Path]:
    """img2dataset-shaped shards (a few distinct images reused: generation is not what is measured)."""
    rng = np.random.default_rng(seed)
    images = [photo(rng) for _ in range(64)]
    folder.mkdir(parents=True)
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(samples):
                key = f"{shard:05d}{i:04d}"
                _add(tar, f"{key}.jpg", images[(shard * samples + i) % len(images)])
                _add(tar, f"{key}.txt", f"a photo {key}".encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "status": "success", "width": 256}).encode())
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": samples + 3, "successes": samples}))
        (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1")
    return sorted(folder.glob("*.tar"))


def index_vs_sha256sum(pool: Path, work: Path, repeats: int) -> None:
    """Best of ``repeats`` interleaved runs of each (a shared machine's load hits both alike)."""
    files = [str(p) for p in sorted(pool.glob("*.tar"))]
    total = sum(os.path.getsize(f) for f in files)
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    sha, ix, py = [], [], []
    for run in range(repeats):
        start = time.perf_counter()
        subprocess.run(["sha256sum", *files], stdout=subprocess.DEVNULL, check=True)
        sha.append(time.perf_counter() - start)
        start = time.perf_counter()
        for name in files:
            sha256_file(name)
        py.append(time.perf_counter() - start)
        start = time.perf_counter()
        index([str(pool)], work / f"index-{run}")
        ix.append(time.perf_counter() - start)
    mib, sha_s, ix_s = total / 2**20, min(sha), min(ix)
    print(f"pool: {len(files)} shards, {mib:.1f} MiB, {repeats} interleaved runs each")
    print(f"sha256sum    {mib / sha_s:8.1f} MiB/s  (best {sha_s:.3f} s)")
    print(f"hashlib      {mib / min(py):8.1f} MiB/s  (best {min(py):.3f} s; Python's sha256 alone, 1 MiB reads)")
    print(f"kdpipe index {mib / ix_s:8.1f} MiB/s  (best {ix_s:.3f} s)   ratio index/sha256sum = {sha_s / ix_s:.2f} "
          "(goal >= 0.8)")


def start_moto() -> subprocess.Popen:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto = shutil.which("moto_server") or str(Path(__file__).resolve().parents[1] / ".venv/bin/moto_server")
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto_server did not start")


def logits_s3_vs_local(work: Path, arch: str, images: int, workers: int, repeats: int) -> None:
    import s3fs

    pool = work / "lpool"
    make_pool(pool, shards=2, samples=images // 2, seed=1)
    proc = start_moto()
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench")
        fs.put(str(pool), "bench/pool", recursive=True)
        torch.manual_seed(0)
        pp = Preprocess()
        card = write_card(work / "card", build_model(arch, 1000), arch=arch,
                          class_names=[f"c{i}" for i in range(1000)], preprocess=pp, stage="benchmark")
        local = index([str(pool)], work / "idx-local").manifest
        remote = index(["s3://bench/pool/*.tar"], work / "idx-s3").manifest
        times = {"local": [], "s3": []}
        for run in range(repeats):  # interleaved: a shared machine's load hits both alike
            for name, data in (("local", local), ("s3", remote)):
                start = time.perf_counter()
                compute_logits(data, card, work / f"logits-{name}-{run}", topk=10, temperature=1.0,
                               num_workers=workers)
                times[name].append(time.perf_counter() - start)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    disk, s3 = min(times["local"]), min(times["s3"])
    print(f"logits ({arch}, {images} images, {workers} workers, best of {repeats}): local disk {images / disk:.1f} "
          f"img/s, S3 server {images / s3:.1f} img/s   ratio s3/local = {disk / s3:.2f} (goal >= 0.9)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--logits-images", type=int, default=128)
    parser.add_argument("--logits-repeats", type=int, default=2)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}, cores: {len(os.sched_getaffinity(0))}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_pool(work / "pool", args.shards, args.samples)
        index_vs_sha256sum(work / "pool", work, args.repeats)
        if args.logits_images:
            logits_s3_vs_local(work, args.arch, args.logits_images, args.workers, args.logits_repeats)


if __name__ == "__main__":
    main()
