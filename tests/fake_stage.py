"""A tiny fake map stage for the cluster tests: ``python -m tests.fake_stage slow --parts N --out DIR``.

It behaves like a real array stage (``--task-index/--num-tasks`` from flags or SLURM, ``--no-finalize``,
``--finalize``) and goes through the framework (``PartStore.commit``, ``run_parts``, ``finalize``), but each part
is a small deterministic tar (``--rows`` members) that takes ``--sleep`` seconds, so a test can signal or kill
it mid-part. It imports neither torch nor webdataset, so it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import tarfile
import time
from pathlib import Path

from pipeline import manifest as mf
from pipeline.cli.commands.common import add_task_args, resolve_task
from pipeline.errors import KdpipeError, PartFailed
from pipeline.log import setup_logging
from pipeline.parts import PartResult, PartStore, fingerprint
from pipeline.planning import plan_block
from pipeline.tasks import file_entries, finalize, run_parts, task_info

CODE_VERSION = "fake-1"


def count_members(path: Path) -> int:
    """Samples of a fake part (one tar member each); raises on a damaged tar."""
    with tarfile.open(path) as tar:
        return len(tar.getmembers())


def write_part(index: int, rows: int, sleep_s: float, fail: bool = False):
    """A writer of part ``index``: ``rows`` members ``p<index>-<j>.txt``, sleeping ``sleep_s`` in slices."""
    def write(tmp: Path) -> PartResult:
        if fail:
            raise PartFailed(f"part {index}: planted failure (--fail-part)", reason="planted")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for j in range(rows):
                data = f"part {index} row {j}\n".encode()
                info = tarfile.TarInfo(f"p{index:04d}-{j:04d}.txt")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
                time.sleep(sleep_s / max(rows, 1))
        return PartResult(expected_rows=rows, input={"part": index})
    return write


def run_slow(args) -> int:
    """Commit this task's block of parts; finalize into a dataset manifest when asked and complete."""
    params = {"parts": args.parts, "rows": args.rows}
    store = PartStore(args.out, ".tar", fingerprint("fake", params, CODE_VERSION), count_members)
    index, count = resolve_task(args)
    if not args.finalize:
        block = plan_block(index, count, args.parts)
        produce = lambda i: store.commit(i, write_part(i, args.rows, args.sleep, i in args.fail_part),
                                              task_info(index, count))
        report = run_parts(store, block, produce, desc="fake", num_parts=args.parts)
        if report.exit_code or args.no_finalize:
            return report.exit_code
        if any(store.committed(i, verify=False) is None for i in range(args.parts)):
            return 0
    build = lambda receipts: mf.build(
        "dataset", stage="fake", params={**params, "labeled": False, "class_names": [], "num_classes": 0},
        files=file_entries(receipts, "samples"), totals={"samples": sum(r["rows"] for r in receipts)})
    finalize(store, args.parts, build)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fake_stage")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("slow")
    p.add_argument("--parts", type=int, default=6)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per part")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fail-part", type=int, action="append", default=[], help="this part always fails")
    add_task_args(p)
    p.set_defaults(func=run_slow)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point (``kdpipe run`` calls it in-process for stages with ``entry: tests.fake_stage``)."""
    args = build_parser().parse_args(argv)
    setup_logging("INFO")
    try:
        return args.func(args)
    except KdpipeError as exc:
        logging.getLogger("fake_stage").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
