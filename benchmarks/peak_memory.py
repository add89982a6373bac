"""Peak memory of the logits, select and reshard stages at two dataset sizes 10x apart.

Builds two datasets of random 16x16 PNG images (``--small`` images and 10x that, shards of ``--shard-size``),
a seeded ``smallcnn`` teacher card (16 px), then runs each stage in a fresh subprocess and reads its peak
resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and its resident memory right after the imports
(``psutil``), so that the stage's own growth (peak - imports) is visible apart from torch's import cost.

- logits: the whole dataset, one task, ``num_workers=0`` (decode in the measured process), compute batch 64;
- select: ``per_class`` fixed (50): memory should not grow with the images read;
- reshard: a selection of half of the images (grows with the dataset, as its input does), ``shard_size`` 500,
  with the default ``max_rows`` (1M selection rows held per wave: the whole selection here) and with
  ``max_rows=1000`` (``reshard_1k``: the bound is the parameter, not the selection).

The claim under test (design.md): memory is bounded by batch and parameters, never by the dataset's size, so
the large/small ratio of every stage's growth should be about 1 (part-sized buffers aside).
Usage: ``python benchmarks/peak_memory.py [--small 2000] [--shard-size 500]``.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import json, resource, sys, time
import psutil
import torch
torch.set_num_threads(1)
from stages.logits.stage import compute_logits
from stages.select.stage import select
from stages.reshard.stage import reshard
base = psutil.Process().memory_info().rss
stage, args = sys.argv[1], json.loads(sys.argv[2])
start = time.perf_counter()
if stage == "logits":
    compute_logits(args["data"], args["card"], args["out"], topk=5, temperature=2.0, num_workers=0, batch_size=64)
elif stage == "select":
    select(args["logits"], args["out"], per_class=args["per_class"], top_p=1, soft_targets=True)
else:
    reshard(args["selection"], args["out"], shard_size=500, max_rows=args["max_rows"])
seconds = time.perf_counter() - start
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "base": base,
                  "seconds": seconds}))
"""


def make_dataset(out: Path, images: int, shard_size: int) -> Path:
    """A dataset manifest over tar shards of random 16x16 PNGs (keys ``img-<i>``)."""
    from PIL import Image

    from pipeline import manifest as mf
    from pipeline.hashing import sha256_file
    from pipeline.parts import part_name
    from stages.shardio import write_shard

    rng = np.random.default_rng(0)
    out.mkdir(parents=True)
    files = []
    for shard, start in enumerate(range(0, images, shard_size)):
        samples = []
        for i in range(start, min(images, start + shard_size)):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
            samples.append({"__key__": f"img-{i:07d}", "png": buffer.getvalue()})
        path = out / f"{part_name(shard)}.tar"
        write_shard(path, iter(samples))
        files.append({"path": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path),
                      "samples": len(samples)})
    names = [str(c) for c in range(10)]
    data = mf.build("dataset", stage="benchmark", params={"labeled": False, "class_names": names, "num_classes": 10},
                    files=files, totals={"samples": images})
    return mf.write(data, out)


def make_card(out: Path) -> Path:
    """A seeded, untrained smallcnn teacher card that sees 16 px images."""
    import torch

    from stages.artifacts.cards import write_card
    from stages.imaging import Preprocess
    from stages.models.classifiers import build_model

    torch.manual_seed(0)
    pp = Preprocess(size=16, crop_fraction=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return write_card(out, build_model("smallcnn", 10).eval(), arch="smallcnn", class_names=[str(c) for c in range(10)],
                      preprocess=pp, stage="benchmark", kind="teacher")


def measure(stage: str, args: dict) -> dict:
    """Run ``stage`` in a fresh interpreter; return its peak RSS, RSS after imports and seconds."""
    done = subprocess.run([sys.executable, "-c", CHILD, stage, json.dumps(args)], cwd=REPO, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(f"{stage} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_size(root: Path, images: int, shard_size: int, card: Path) -> dict[str, dict]:
    """Build the dataset of ``images`` and measure the three stages on it."""
    data = make_dataset(root / "data", images, shard_size)
    results = {"logits": measure("logits", {"data": str(data), "card": str(card), "out": str(root / "logits")})}
    results["select"] = measure("select", {"logits": str(root / "logits"), "out": str(root / "select"),
                                           "per_class": 50})
    measure("select", {"logits": str(root / "logits"), "out": str(root / "half"), "per_class": images // 20})
    for name, max_rows in (("reshard", 1_000_000), ("reshard_1k", 1000)):
        results[name] = measure("reshard", {"selection": str(root / "half"), "out": str(root / name),
                                            "max_rows": max_rows})
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=2000, help="images of the small dataset (large: 10x)")
    parser.add_argument("--shard-size", type=int, default=500)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        card = make_card(Path(tmp) / "teacher")
        sizes = (args.small, args.small * 10)
        results = {n: run_size(Path(tmp) / f"n{n}", n, args.shard_size, card) for n in sizes}
    mib = lambda b: b / 2**20
    print(f"{'stage':8} {'images':>7} {'peak MiB':>9} {'imports':>8} {'growth':>7} {'seconds':>8}")
    for stage in ("logits", "select", "reshard", "reshard_1k"):
        for n in sizes:
            r = results[n][stage]
            print(f"{stage:8} {n:7d} {mib(r['peak']):9.1f} {mib(r['base']):8.1f} {mib(r['peak'] - r['base']):7.1f} "
                  f"{r['seconds']:8.2f}")
        small, large = results[sizes[0]][stage], results[sizes[1]][stage]
        print(f"{stage:8} ratio large/small: peak {large['peak'] / small['peak']:.2f}, growth "
              f"{(large['peak'] - large['base']) / max(small['peak'] - small['base'], 1):.2f}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
