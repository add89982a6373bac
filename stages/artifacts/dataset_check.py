"""``kdpipe verify``'s content check of dataset shards: the sample count, and no key twice.

Each shard is read once (``stages.shardio.read_shard``: bytes only, nothing decoded): its sample count must be
the manifest's, and a key that reappears in the shard is a problem. Across shards, a dataset made by ``ingest``
promises unique keys (two source files never share one), so a key in two of its shards is a problem too (the
trace of a rerun over a changed source: a key twice, a file lost). Datasets of other producers (``kdpipe index``
over external tars) identify a sample by (shard, key), so only the within-shard rule applies to them.

Memory: 8 bytes (a 64-bit digest of the key) plus 4 (its shard) per sample of the dataset, for the cross-shard
rule; the key strings are read again only from the shards that hold a repeated digest, to name them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipeline import manifest as mf
from stages.shardio import ShardStats, read_shard

UNIQUE_ACROSS_SHARDS = ("ingest",)  # producers whose keys are unique in the whole dataset
_SHOWN = 5


class _Seen:
    """Key digests of the shards checked so far, for the manifest being verified."""

    manifest_id: str | None = None
    digests: list[np.ndarray] = []
    shards: list[np.ndarray] = []


def _digest(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def check_dataset_part(manifest: mf.Manifest, entry: dict, where: Path) -> list[str]:
    """Problems of one dataset shard (count, keys twice); with the last shard, keys in two shards."""
    files = manifest.data.get("files") or []
    if entry is (files[0] if files else None) or _Seen.manifest_id != manifest.id:
        _Seen.manifest_id, _Seen.digests, _Seen.shards = manifest.id, [], []
    stats = ShardStats(str(where))
    try:
        keys = [key for key, _ in read_shard(where, stats)]
    except Exception as exc:  # a damaged tar may raise anything from its reader
        return [f"{where}: unreadable ({type(exc).__name__}: {exc})"]
    problems = _count_problems(where, entry, len(keys) + stats.failed)
    twice = stats.failures.get("duplicate_key", [])
    if twice:
        problems.append(f"{where}: key(s) {', '.join(map(repr, twice[:_SHOWN]))} appear twice in this shard")
    _Seen.digests.append(np.array([_digest(k) for k in keys], dtype=np.uint64))
    _Seen.shards.append(np.full(len(keys), len(_Seen.shards), dtype=np.int32))  # verify checks files in order
    if files and entry is files[-1] and manifest.data.get("producer", {}).get("stage") in UNIQUE_ACROSS_SHARDS:
        problems += _across_shards(manifest)
    return problems


def _count_problems(where: Path, entry: dict, found: int) -> list[str]:
    expected = entry.get("samples")
    if expected is None or found == expected:
        return []
    return [f"{where}: {found} samples, manifest says {expected}"]


def _across_shards(manifest: mf.Manifest) -> list[str]:
    """Keys found in more than one shard of ``manifest``, named with their shards."""
    digests, shards = np.concatenate(_Seen.digests or [np.zeros(0, np.uint64)]), np.concatenate(
        _Seen.shards or [np.zeros(0, np.int32)])
    values, counts = np.unique(digests, return_counts=True)
    repeated = set(values[counts > 1].tolist())
    if not repeated:
        return []
    holders: dict[str, list[str]] = {}
    for index in sorted(set(shards[np.isin(digests, list(repeated))].tolist())):
        path = manifest.file_path(manifest.files[index])
        for key, _ in read_shard(path, ShardStats(str(path))):
            if _digest(key) in repeated:
                holders.setdefault(key, []).append(manifest.files[index]["path"])
    named = [f"{key!r} in {' and '.join(paths)}" for key, paths in sorted(holders.items()) if len(paths) > 1]
    return [f"{manifest.path}: {len(named)} key(s) appear in more than one shard ({'; '.join(named[:_SHOWN])}); "
            "an ingested dataset has each key once (a rerun over a changed source?): re-ingest it into a new "
            "--out"] if named else []
