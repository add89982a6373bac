"""Dedup at scale: the exact flat method vs the sharded IVF steps, on random unit embeddings with planted pairs.

For each N (``--sizes``): a logits artifact of N random unit embeddings (D = ``--dim``, float16, shards of
``--shard-rows``) in which ``--dup-fraction`` of the rows of shard s >= 1 are near-copies (cosine ~0.96-0.999)
of rows of shard s-1 (pairs across parts). Then, each in a fresh subprocess (its own peak RSS,
``ru_maxrss``):

- ivf: ``dedup(method="ivf")`` one step at a time (train, assign, search, group), ``lists = N / --rows-per-list``,
  ``train_sample = 40 x lists``, ``--probe``; seconds and peak RSS per step;
- flat: the exact method's work (load every embedding, a flat index, the search) run in full for
  N <= ``--flat-max``; above it, its time is extrapolated from the measured one as N^2 and its memory (2 x N x D
  x 4 bytes: the matrix and the index) computed, both marked;
- exact reference pairs: ``--sample`` random query rows plus ``--sample`` rows of planted pairs, brute force
  against the whole pool part by part (streamed), every pair at cosine >= threshold.

Reported: recall of the planted pairs (those at cosine >= threshold) and of the exact pairs of the sample, the
precision against exact (IVF pairs of sampled rows that are exact pairs), the time slope (log-log fit), and the
throughput (GFLOP/s) of the brute-force reference here. Prints a markdown table.
With ``--pq 0 64``: each pool is also run with ``--pq 64`` (PQ codes in the search step, exact re-check), the
``--pq 0`` row its baseline in the same process.
Usage: ``nice python benchmarks/dedup_scale.py --sizes 100000 1000000 [--out DIR]``; OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = """
import json, resource, sys, time
args = json.loads(sys.argv[1])
start = time.perf_counter()
if args["what"] == "ivf":
    from stages.dedup.ivf import dedup_ivf
    dedup_ivf(args["query"], args["out"], step=args["step"], lists=args["lists"], probe=args["probe"],
              train_sample=args["train_sample"], list_block=args["list_block"], threshold=args["threshold"],
              pq=args["pq"], pq_margin=args["pq_margin"])
else:
    from stages.artifacts.logits_reader import open_logits
    from stages.dedup.core import load_embeddings
    from stages.dedup.stage import near_pairs
    keys, matrix = load_embeddings(open_logits(args["query"]), 16384)
    rows, cols, _ = near_pairs(matrix, args["threshold"], 32, 16384)
    json.dump({"rows": rows.tolist(), "cols": cols.tolist()}, open(args["pairs"], "w"))
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


class Pool:
    """Shard ``s``: seeded random unit rows; its first ``m`` rows are near-copies of rows m..2m of shard s-1."""

    def __init__(self, rows: int, shards: int, dim: int, dup_fraction: float, seed: int = 0):
        self.rows, self.shards, self.dim, self.seed = rows, shards, dim, seed
        self.m = int(rows * dup_fraction)

    def base(self, s: int) -> np.ndarray:
        x = np.random.default_rng((self.seed, s)).standard_normal((self.rows, self.dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def embeddings(self, s: int) -> np.ndarray:
        x = self.base(s)
        if s and self.m:
            src = self.base(s - 1)[self.m:2 * self.m]
            rng = np.random.default_rng((self.seed, s, 1))
            noise = rng.standard_normal(src.shape, dtype=np.float32)
            noise *= (rng.uniform(0.05, 0.28, len(src)) / np.linalg.norm(noise, axis=1))[:, None]
            y = src + noise
            x[:self.m] = y / np.linalg.norm(y, axis=1, keepdims=True)
        return x.astype(np.float16)

    def planted(self) -> list[tuple[int, int]]:
        """Planted pairs as (gid of the source, gid of the copy), gid = (part << 32) + row."""
        return [(((s - 1) << 32) + self.m + r, (s << 32) + r) for s in range(1, self.shards) for r in range(self.m)]


class _Lazy:
    def __init__(self, n, make):
        self.n, self.make = n, make

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.make(i)


def make_pool(out: Path, pool: Pool) -> Path:
    from tests.factories import make_logits

    logits = np.zeros((pool.rows, 2), np.float32)
    shards = _Lazy(pool.shards, lambda s: ([f"img-{s:06d}-{r:05d}" for r in range(pool.rows)], logits))
    return make_logits(out, shards, topk=1, embeddings=_Lazy(pool.shards, pool.embeddings))


def child(args: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=REPO, capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_sample(pool: Pool, queries: np.ndarray, threshold: float) -> tuple[set, float]:
    """Every pair (gid, gid) at cosine >= threshold with a sampled query, brute force; and GFLOP/s."""
    q = np.concatenate([unit(pool.embeddings(int(g >> 32))[[int(g & 0xFFFFFFFF)]]) for g in queries])
    found, start = set(), time.perf_counter()
    for s in range(pool.shards):
        sims = q @ unit(pool.embeddings(s)).T
        for i, r in zip(*np.nonzero(sims >= threshold)):
            g = (s << 32) + int(r)
            if g != queries[i]:
                found.add((min(g, int(queries[i])), max(g, int(queries[i]))))
    seconds = time.perf_counter() - start  # includes regenerating the shards: a lower bound of the GEMM rate
    return found, 2.0 * len(q) * pool.rows * pool.shards * pool.dim / seconds / 1e9


def ivf_pairs(out: Path) -> set:
    import pyarrow.parquet as pq
    found = set()
    for part in sorted((out / "_ivf/search").glob("part-*.parquet")):
        t = pq.read_table(part, columns=["a", "b"])
        found.update(zip(t.column("a").to_pylist(), t.column("b").to_pylist()))
    return found


def true_planted(pool: Pool, threshold: float) -> set:
    keep = set()
    for s in range(1, pool.shards):
        a, b = unit(pool.embeddings(s - 1)[pool.m:2 * pool.m]), unit(pool.embeddings(s)[:pool.m])
        ok = np.flatnonzero(np.einsum("ij,ij->i", a, b) >= threshold)
        keep.update((((s - 1) << 32) + pool.m + int(r), (s << 32) + int(r)) for r in ok)
    return keep


def run_size(n: int, opts, root: Path) -> list[dict]:
    """One row per ``--pq`` value, all on the same pool (the first value's row is the baseline of the others)."""
    pool = Pool(opts.shard_rows, n // opts.shard_rows, opts.dim, opts.dup_fraction)
    t0 = time.perf_counter()
    query = make_pool(root / f"pool-{n}", pool)
    made = time.perf_counter() - t0
    reference = {}  # the planted and sampled exact pairs, computed once per pool
    rows = [run_ivf(n, pool, query, m, opts, root, {"N": n, "make_s": made}, reference) for m in opts.pq]
    if not opts.keep:
        import shutil
        shutil.rmtree(root / f"pool-{n}", ignore_errors=True)
    return rows


def exact_reference(pool, opts) -> dict:
    """The planted pairs at or above the threshold, the sampled query rows and their exact pairs."""
    planted = true_planted(pool, opts.threshold)
    rng = np.random.default_rng(1)
    gids = np.array([(s << 32) + r for s in range(pool.shards) for r in range(pool.rows)], np.int64)
    pair_rows = np.array(sorted({g for p in planted for g in p}), np.int64)
    queries = np.unique(np.concatenate([rng.choice(gids, opts.sample, replace=False),
                                        rng.choice(pair_rows, min(opts.sample, len(pair_rows)), replace=False)]))
    exact, gflops = exact_sample(pool, queries, opts.threshold)
    return {"planted": planted, "queries": queries, "exact": exact, "gflops": gflops}


def run_ivf(n: int, pool, query: Path, m: int, opts, root: Path, row: dict, reference: dict) -> dict:
    lists = max(1, n // opts.rows_per_list)
    out = root / f"ivf-{n}-pq{m}"
    row["pq"] = m
    settings = {"what": "ivf", "query": str(query), "out": str(out), "lists": lists,
                "probe": opts.probe, "train_sample": 40 * lists, "list_block": opts.list_block,
                "threshold": opts.threshold, "pq": m, "pq_margin": opts.pq_margin}
    for step in ("train", "assign", "search", "group"):
        row[step] = child({**settings, "step": step})
        print(f"N={n} pq={m} {step}: {row[step]}", flush=True)
    found = ivf_pairs(out)
    reference.update(reference or exact_reference(pool, opts))
    planted, queries, exact = reference["planted"], reference["queries"], reference["exact"]
    row["recall_planted"] = len(planted & found) / max(1, len(planted))
    row["gflops"] = reference["gflops"]
    qset = set(queries.tolist())
    mine = {p for p in found if p[0] in qset or p[1] in qset}
    row["recall_exact"] = len(exact & found) / max(1, len(exact))
    row["precision_exact"] = len(mine & exact) / max(1, len(mine))
    row["exact_pairs_sampled"] = len(exact)
    if n <= opts.flat_max and m == opts.pq[0]:
        row["flat"] = child({"what": "flat", "query": str(query), "threshold": opts.threshold,
                             "pairs": str(root / f"flat-{n}.json")})
    print(json.dumps(row), flush=True)
    if not opts.keep:  # the assign parts hold N x probe embeddings: free the disk before the next size
        import shutil
        shutil.rmtree(out, ignore_errors=True)
    return row


def table(rows: list[dict], dim: int) -> str:
    measured = [r for r in rows if "flat" in r]
    base = measured[-1] if measured else None
    lines = ["| N | pq | flat s | flat peak RSS | ivf s (train / assign / search / group) | ivf peak RSS (max step) | "
             "recall planted | recall exact (sample) | precision vs exact |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        steps = [r[s]["seconds"] for s in ("train", "assign", "search", "group")]
        peak = max(r[s]["peak"] for s in ("train", "assign", "search", "group"))
        if "flat" in r:
            flat_s, flat_m = f"{r['flat']['seconds']:.1f}", f"{r['flat']['peak'] / 2**20:.0f} MiB"
        elif base:
            flat_s = f"~{base['flat']['seconds'] * (r['N'] / base['N']) ** 2:.0f} (N^2 extrapolated)"
            flat_m = f"~{2 * r['N'] * dim * 4 / 2**20:.0f} MiB (2 x N x D x 4 B)"
        else:
            flat_s = flat_m = "-"
        lines.append(f"| {r['N']:.0e} | {r.get('pq', 0) or '-'} | {flat_s} | {flat_m} | {sum(steps):.1f} ({' / '.join(f'{s:.1f}' for s in steps)})"
                     f" | {peak / 2**20:.0f} MiB | {r['recall_planted']:.4f} | {r['recall_exact']:.4f} "
                     f"({r['exact_pairs_sampled']} pairs) | {r['precision_exact']:.4f} |")
    return "\n".join(lines)


def slope(rows: list[dict]) -> float:
    if len(rows) < 2:
        return float("nan")
    n = np.log([r["N"] for r in rows])
    t = np.log([sum(r[s]["seconds"] for s in ("train", "assign", "search", "group")) for r in rows])
    return float(np.polyfit(n, t, 1)[0])


def quantizers(lists: int, dim: int, probe: int, queries: int = 2000) -> None:
    """Assign-step rate of the two coarse quantizers over ``lists`` random unit centroids: images/s, and how often
    an image's true nearest list is among the HNSW graph's ``probe`` lists."""
    from stages.dedup.ivf_compute import Settings, centroid_index

    rng = np.random.default_rng(0)
    cents, x = unit(rng.standard_normal((lists, dim), np.float32)), unit(rng.standard_normal((queries, dim), np.float32))
    x = unit(cents[rng.integers(0, lists, queries)] + 0.7 * x / np.sqrt(dim) * 8)  # images near some centroid
    base = dict(threshold=0.95, neighbors=32, batch_rows=16384, lists=lists, probe=probe, train_sample=lists, seed=0,
                list_block=64)
    found = {}
    for kind in ("flat", "hnsw"):
        start = time.perf_counter()
        index = centroid_index(cents, Settings(**base, quantizer=kind))
        built = time.perf_counter() - start
        start = time.perf_counter()
        found[kind] = index.search(x, probe)[1]
        rate = queries / (time.perf_counter() - start)
        print(f"quantizer {kind}: lists {lists}, build {built:.1f} s, {rate:.0f} images/s (1 thread)")
    hit = (found["hnsw"] == found["flat"][:, :1]).any(axis=1).mean()
    print(f"hnsw: the exact nearest list is among its {probe} lists for {hit:.4f} of the images")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--shard-rows", type=int, default=10_000)
    p.add_argument("--dup-fraction", type=float, default=0.01)
    p.add_argument("--rows-per-list", type=int, default=1000)
    p.add_argument("--probe", type=int, default=8)
    p.add_argument("--list-block", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--sample", type=int, default=1000)
    p.add_argument("--pq", type=int, nargs="+", default=[0],
                   help="ivf --pq values to run on each pool (0: exact embeddings; the first is the baseline)")
    p.add_argument("--pq-margin", type=float, default=0.1)
    p.add_argument("--flat-max", type=int, default=100_000)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep each size's pool and step folders")
    p.add_argument("--json", type=Path, default=None, help="append each size's row here (JSON lines)")
    p.add_argument("--report", type=Path, nargs="+", default=None,
                   help="only print the table and slope of the rows in these JSON-lines files (runs combined)")
    p.add_argument("--quantizers", type=int, default=0, help="only compare flat vs hnsw assignment at this many lists")
    opts = p.parse_args()
    if opts.quantizers:
        return quantizers(opts.quantizers, opts.dim, opts.probe)
    if opts.report:
        rows = sorted((json.loads(line) for f in opts.report for line in f.read_text().splitlines() if line),
                      key=lambda r: r["N"])
        return report(rows, opts.dim)
    root = opts.out or Path(tempfile.mkdtemp(prefix="dedup-scale-"))
    rows = []
    for n in opts.sizes:
        for row in run_size(n, opts, root):
            rows.append(row)
            if opts.json:
                with open(opts.json, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    report(rows, opts.dim)


def report(rows: list[dict], dim: int) -> None:
    print(table(rows, dim))
    print(f"\nivf time slope (log-log fit over N): {slope(rows):.2f}; brute-force GEMM here: "
          f"{np.mean([r['gflops'] for r in rows]):.1f} GFLOP/s (1 thread)")


if __name__ == "__main__":
    main()
