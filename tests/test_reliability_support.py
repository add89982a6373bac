"""Helpers of the reliability tests (no tests here): the real digits chain logits -> select -> reshard, built once
per session, and file snapshots (sha256 + mtime) to prove that a rerun changes nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline import manifest as mf
from pipeline.hashing import sha256_file
from stages.logits.stage import compute_logits
from stages.reshard.stage import reshard
from stages.select.stage import select
from tests.test_faults import _fork
from tests.test_logits_support import digits_data, train_card


@dataclass
class Chain:
    """Inputs and clean outputs of the real chain: 80 digits in 4 shards, a seeded smallcnn teacher."""

    data: Path
    card: Path
    logits: Path
    select: Path
    reshard: Path


def run_logits(chain: Chain, out: Path, **options):
    return compute_logits(chain.data, chain.card, out, **{"topk": 3, "temperature": 2.0, "num_workers": 0,
                                                          "batch_size": 32, **options})


def run_select(chain: Chain, out: Path, **options):
    return select(chain.logits, out, **{"per_class": 5, "top_p": 2, "soft_targets": True, **options})


def run_reshard(chain: Chain, out: Path, **options):
    return reshard(chain.select, out, **{"shard_size": 5, **options})


RUNS = {"logits": run_logits, "select": run_select, "reshard": run_reshard}
_BUILT: dict[str, Chain] = {}


def clean_chain(tmp_path_factory) -> Chain:
    """The chain's clean outputs, each stage run to completion in a forked child (built once per session)."""
    if "chain" not in _BUILT:
        root = tmp_path_factory.mktemp("chain")
        data = digits_data(root / "data", shard_size=20, samples=80)
        card = train_card(root / "teacher", data, steps=25)
        made = Chain(data, card, root / "logits", root / "select", root / "reshard")
        for stage, run in RUNS.items():
            assert _fork(lambda: run(made, getattr(made, stage)), {}) == 0
        assert len(mf.load(made.reshard).files) >= 3
        _BUILT["chain"] = made
    return _BUILT["chain"]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """(sha256, mtime_ns) of every file under ``folder``, by relative path."""
    out = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            out[str(path.relative_to(folder))] = (sha256_file(path), os.stat(path).st_mtime_ns)
    return out
