"""Benchmark: ``kdpipe select`` (policy topk) against the DuckDB SQL a user would write, same Parquet files.

Writes a synthetic logits artifact (C=1000 classes, top-K=10, N images in parts of ``--part-rows``) per the
logits contract, then for each N in ``--scales`` runs, each in its own interpreter, timed from its start to
its exit (peak RSS is that run's alone, from ``wait4``): ``kdpipe select --per-class 2000 --top-p 5`` as the
command line runs it (report included), and a Python script of DuckDB SQL (unnest the top-P, window per label
ordered by score desc and key asc, keep rank < K, ORDER BY and COPY to Parquet). Checks that both give the
same rows (key, label, rank, score), prints images/s, the speed ratio (DuckDB s / kdpipe s), peak RSS of each
and their ratio (kdpipe / DuckDB). With ``--repeat R`` each N runs R times, the engines' order alternating (the
machine may be shared: the 1-minute load average before each run is printed too).

    .venv/bin/python benchmarks/select_throughput.py --n 5000000 --scales 2000000,5000000 --repeat 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import manifest as mf  # noqa: E402
from pipeline.parts import PartResult, PartStore, fingerprint  # noqa: E402
from pipeline.tasks import file_entries, run_parts  # noqa: E402
from pipeline.verify import parquet_rows  # noqa: E402
from stages.artifacts.logits_format import SCHEMA_VERSION, arrow_schema  # noqa: E402
from stages.imaging import Preprocess  # noqa: E402

C, K, T = 1000, 10, 1.0
PER_CLASS, TOP_P = 2000, 5
STRIDES = np.array([s for s in range(1, C) if np.gcd(s, C) == 1])


def synthetic_part(rng: np.random.Generator, part: int, rows: int, meta: dict) -> pa.Table:
    """``rows`` images: K distinct classes (base + j * stride mod C, skewed base), sorted logits, exact-ish lse."""
    base = (rng.power(0.7, rows) * C).astype(np.int64) % C
    stride = STRIDES[rng.integers(0, len(STRIDES), rows)]
    index = ((base[:, None] + np.arange(K) * stride[:, None]) % C).astype(np.int16)
    gaps = rng.exponential(0.6, size=(rows, K)).astype(np.float32)
    gaps[:, 0] = 0
    logit = (rng.normal(4.0, 2.0, rows).astype(np.float32)[:, None] - np.cumsum(gaps, axis=1)).astype(np.float32)
    rest = (C - K) * np.exp((logit[:, -1].astype(np.float64) - 1.0) / T)
    lse = np.log(np.exp(logit.astype(np.float64) / T).sum(axis=1) + rest).astype(np.float32)
    numbers = pc.cast(pa.array(np.arange(rows, dtype=np.int64)), pa.string())
    keys = pc.binary_join_element_wise(f"img-{part:05d}-", pc.utf8_lpad(numbers, 9, "0"), "")
    schema = arrow_schema(C, K, metadata=meta)
    return pa.table({"key": keys, "shard": pa.array(np.full(rows, part, np.int32)),
                     "topk_index": pa.FixedSizeListArray.from_arrays(pa.array(index.ravel()), K),
                     "topk_logit": pa.FixedSizeListArray.from_arrays(pa.array(logit.ravel()), K),
                     "lse": pa.array(lse)}, schema=schema)


def write_parts(folder: Path, num_parts: int, part_rows: int) -> tuple[PartStore, dict]:
    """The synthetic parts (each through ``PartStore.commit``; existing ones are kept)."""
    meta = {"schema_version": SCHEMA_VERSION, "temperature": T, "topk": K, "num_classes": C,
            "teacher_id": "b" * 64, "dataset_id": "c" * 64}
    store = PartStore(folder, ".parquet", fingerprint("bench-logits", {**meta, "rows": part_rows}, "bench-1"),
                      parquet_rows)

    def produce(index: int) -> dict:
        table = synthetic_part(np.random.default_rng(index), index, part_rows, meta)
        def write(tmp: Path) -> PartResult:
            pq.write_table(table, tmp, compression="zstd", row_group_size=128 * 1024)
            return PartResult(expected_rows=part_rows)
        return store.commit(index, write)

    run_parts(store, range(num_parts), produce)
    return store, meta


def logits_manifest(folder: Path, store: PartStore, meta: dict, num_parts: int) -> Path:
    """A logits manifest over the first ``num_parts`` parts (hard links into ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    receipts = store.receipts()
    for i in range(num_parts):
        link = folder / receipts[i]["file"]
        if not link.exists():
            os.link(store.part_path(i), link)
    params = {k: v for k, v in meta.items() if k != "schema_version"}
    params.update({"class_names": [str(c) for c in range(C)], "preprocess": Preprocess().to_dict(),
                   "views": {"count": 1, "policy": "centre", "aug": None}, "embedding_dim": None,
                   "logit_dtype": "float32", "parquet_schema_version": SCHEMA_VERSION})
    rows = sum(receipts[i]["rows"] for i in range(num_parts))
    data = mf.build("logits", stage="bench", params=params, files=file_entries([receipts[i] for i in range(num_parts)]),
                    totals={"samples": rows, "rows": rows})
    if (folder / mf.MANIFEST_NAME).exists():
        return folder / mf.MANIFEST_NAME
    return mf.write(data, folder)


def kdpipe_argv(manifest: Path, out: Path) -> list[str]:
    """``kdpipe select`` as a user runs it (``python -m pipeline`` is the ``kdpipe`` script)."""
    return [sys.executable, "-m", "pipeline", "--log-level", "WARNING", "select", "--logits", str(manifest),
            "--out", str(out), "--per-class", str(PER_CLASS), "--top-p", str(TOP_P), "--gallery", "0"]


DUCKDB = """
import json, sys
from pathlib import Path
import duckdb
folder, out = Path(sys.argv[1]), sys.argv[2]
entries = json.loads((folder / "manifest.json").read_text())["files"]
files = ", ".join(repr(str(folder / e["path"])) for e in entries)
con = duckdb.connect()
con.execute("SET threads = 2")
con.execute(f'''
    COPY (
      WITH cand AS (
        SELECT key, shard, unnest(topk_index[1:{TOP_P}]) AS label, unnest(topk_logit[1:{TOP_P}]) AS z, lse
        FROM read_parquet([{files}])
      )
      SELECT key, shard, CAST(label AS INTEGER) AS label,
             CAST(exp(CAST(z AS DOUBLE) / {T} - CAST(lse AS DOUBLE)) AS FLOAT) AS score,
             CAST(row_number() OVER (PARTITION BY label ORDER BY
                  CAST(exp(CAST(z AS DOUBLE) / {T} - CAST(lse AS DOUBLE)) AS FLOAT) DESC, key ASC) - 1
                  AS INTEGER) AS rank
      FROM cand
      QUALIFY rank < {PER_CLASS}
      ORDER BY label, rank
    ) TO '{out}' (FORMAT parquet, COMPRESSION zstd)''')
"""


def duckdb_argv(manifest: Path, out: Path) -> list[str]:
    """The DuckDB SQL a user would write, as a script of its own (it imports duckdb and nothing of kdpipe)."""
    folder = manifest.parent if manifest.is_file() else manifest
    return [sys.executable, "-c", f"TOP_P, T, PER_CLASS = {TOP_P}, {T}, {PER_CLASS}\n" + DUCKDB, str(folder),
            str(out)]


def run_child(kind: str, manifest: Path, out: Path) -> dict:
    """Run one engine in a fresh interpreter, timed from its start to its exit (interpreter start and imports
    included, for both); its seconds and peak RSS (MiB, from ``wait4``)."""
    argv = (kdpipe_argv if kind == "kdpipe" else duckdb_argv)(manifest, out)
    started = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = child.stderr.read()
    child.stderr.close()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    if status:
        raise SystemExit(f"{kind} failed:\n{stderr.decode()[-3000:]}")
    return {"seconds": seconds, "rss_mib": usage.ru_maxrss / 1024}


def same_rows(kdpipe_part: Path, duck_file: Path) -> tuple[bool, str]:
    """Compare (label, rank, key, score) of both outputs."""
    cols = ["key", "label", "rank", "score"]
    a = pq.read_table(kdpipe_part, columns=cols)
    b = pq.read_table(duck_file, columns=cols).sort_by([("label", "ascending"), ("rank", "ascending")])
    if a.num_rows != b.num_rows:
        return False, f"rows {a.num_rows} vs {b.num_rows}"
    diffs = {c: int((~pc.equal(a.column(c), b.column(c)).to_numpy(zero_copy_only=False)).sum()) for c in cols}
    return not any(diffs.values()), f"{a.num_rows} rows; differing values per column: {diffs}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000_000, help="images in the largest run")
    parser.add_argument("--scales", default=None, help="comma-separated N values to time (default: N)")
    parser.add_argument("--part-rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kdpipe-select-bench"))
    parser.add_argument("--skip-duckdb", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="runs per N; the engines' order alternates")
    args = parser.parse_args()
    scales = [int(s) for s in args.scales.split(",")] if args.scales else [args.n]
    num_parts = -(-max(scales) // args.part_rows)
    started = time.perf_counter()
    store, meta = write_parts(args.workdir / "parts", num_parts, args.part_rows)
    print(f"synthetic logits: {num_parts} parts x {args.part_rows:,} rows, C={C}, K={K} "
          f"({time.perf_counter() - started:.0f} s; load {os.getloadavg()[0]:.2f})", flush=True)
    print(f"{'N':>12} {'kdpipe s':>9} {'img/s':>11} {'RSS MiB':>8} {'duckdb s':>9} {'img/s':>11} {'RSS MiB':>8} "
          f"{'speed x':>8} {'RSS k/d':>7}  same rows  order (1-min load before kdpipe/duckdb)")
    for n in scales:
        parts = n // args.part_rows
        manifest = logits_manifest(args.workdir / f"n{n}", store, meta, parts)
        for rep in range(args.repeat):
            engines = ["kdpipe"] + ([] if args.skip_duckdb else ["duckdb"])
            order = engines if rep % 2 == 0 else engines[::-1]  # alternate who runs first (shared machine)
            print_row(parts * args.part_rows, time_pair(args.workdir, n, manifest, order), "".join(e[0] for e in order))


def time_pair(workdir: Path, n: int, manifest: Path, order: list[str]) -> dict:
    """Run the engines in ``order`` on the same logits; their timings, the load before each, same rows."""
    outs = {"kdpipe": workdir / f"sel-{n}-{time.time_ns()}", "duckdb": workdir / f"duck-{n}.parquet"}
    result = {"duckdb": {"seconds": float("nan"), "rss_mib": float("nan"), "load": float("nan")},
              "same": (True, "not compared")}
    for engine in order:
        load = os.getloadavg()[0]
        result[engine] = {**run_child(engine, manifest, outs[engine]), "load": load}
    if "duckdb" in order:
        result["same"] = same_rows(outs["kdpipe"] / "part-000000.parquet", outs["duckdb"])
    return result


def print_row(rows: int, r: dict, order: str) -> None:
    k, d = r["kdpipe"], r["duckdb"]
    print(f"{rows:>12,} {k['seconds']:>9.2f} {rows / k['seconds']:>11,.0f} {k['rss_mib']:>8.0f} "
          f"{d['seconds']:>9.2f} {rows / d['seconds']:>11,.0f} {d['rss_mib']:>8.0f} "
          f"{d['seconds'] / k['seconds']:>8.2f} {k['rss_mib'] / d['rss_mib']:>7.2f}  {r['same'][0]} ({r['same'][1]})"
          f"  {order} ({k['load']:.2f}/{d['load']:.2f})", flush=True)

if __name__ == "__main__":
    main()
