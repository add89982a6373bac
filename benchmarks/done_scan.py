"""How long does "what is done" take for a stage with many parts?

Writes N receipts (default 100,000) into a temp folder the way ``PartStore`` does, then times, in one
process: the receipt scan (``PartStore.receipts``: one scandir, one small read per receipt), and, as the
baseline a naive tool would use, one ``stat`` per expected part file (what "done decided by listing files"
costs). Prints both and their ratio. Usage: ``python benchmarks/done_scan.py [--parts N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from pipeline.parts import PartStore, fingerprint, part_name


def _write_receipts(store: PartStore, parts: int) -> None:
    store.receipts_dir.mkdir(parents=True, exist_ok=True)
    for index in range(parts):
        receipt = {"part": index, "file": f"{part_name(index)}.parquet", "rows": 10000, "bytes": 300000,
                   "sha256": "0" * 64, "fingerprint": store.fp, "failures": {}, "seconds": 1.0}
        (store.receipts_dir / f"{part_name(index)}.json").write_text(json.dumps(receipt))
        (store.out_dir / f"{part_name(index)}.parquet").touch()


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", type=int, default=100_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store = PartStore(Path(tmp), ".parquet", fingerprint("bench", {}, "bench-1"), lambda p: 0)
        _write_receipts(store, args.parts)
        os.sync()
        scan_s, found = _timed(store.receipts)
        stat_s, _ = _timed(lambda: [store.part_path(i).stat() for i in range(args.parts)])
    assert len(found) == args.parts
    print(f"parts: {args.parts}")
    print(f"receipt scan (scandir + read each receipt): {scan_s:.2f} s ({args.parts / scan_s:,.0f} receipts/s)")
    print(f"baseline: one stat per part file:          {stat_s:.2f} s")
    print(f"ratio receipt scan / stat-only: {scan_s / stat_s:.1f}x (the scan also yields rows, bytes and "
          "failures per part)")


if __name__ == "__main__":
    main()
