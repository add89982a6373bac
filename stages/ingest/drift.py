"""Source drift: what an ingest read is recorded, and a rerun over a changed source is refused, naming the files.

Two records per output folder, in ``OUT/_source/`` (never read by other stages):

- ``source.json``: the folder's planned items in order, ``[origin, key, size]`` each. Written before the first
  part (and rewritten while no part is committed); a rerun compares the current source with it, so a file added,
  removed or resized anywhere in the source is found, also where no part is committed yet.
- ``listing-000123.json``: per part, what it was made from: ``[origin, key, bytes, mtime_ns, sha256]`` per item
  (``bytes``/``sha256`` null for a file that could not be read). The part's receipt holds the listing's sha256.
  A rerun re-checks the items of its committed parts: a file whose size or mtime differs is hashed, and one whose
  bytes differ from the recorded sha256 is a change (a same-size edit included); bundled items are always hashed.

A change is an ``InputError`` (exit 2) naming the changed files before any part is written: the rerun would
otherwise mix parts of two sources (a key twice, a file lost). An unchanged source reruns to byte-identical parts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from pipeline.atomic import remove_stale_temps, write_atomic
from pipeline.errors import InputError
from pipeline.parts import PartStore, part_name
from stages.ingest.sources import Item

log = logging.getLogger(__name__)
SOURCE_DIR = "_source"
SOURCE_NAME = "source.json"
_SHOWN = 10


def listing_path(out_dir: Path, index: int) -> Path:
    """``OUT/_source/listing-000123.json``: what part 123 was made from."""
    return Path(out_dir) / SOURCE_DIR / f"listing-{index:06d}.json"


def listing_row(item: Item, data: bytes | None) -> list:
    """One item's row of a part listing: origin, key, bytes read, mtime at discovery, sha256 of the bytes."""
    return [item.origin, item.key, None if data is None else len(data), item.mtime_ns,
            None if data is None else hashlib.sha256(data).hexdigest()]


def write_listing(out_dir: Path, index: int, rows: list[list]) -> dict:
    """Publish part ``index``'s listing (atomic); return what its receipt records about it."""
    body = json.dumps({"part": index, "items": rows}, ensure_ascii=False, separators=(",", ":")).encode()
    path = listing_path(out_dir, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, body)
    return {"listing": f"{SOURCE_DIR}/{path.name}", "listing_sha256": hashlib.sha256(body).hexdigest()}


def check_drift(store: PartStore, items: list[Item], shards: list[range], indices: list[int], src: str) -> None:
    """Refuse (``InputError`` naming the files) a rerun whose source differs from what committed parts read;
    record the source's plan when no part is committed yet. Temps of killed writers in ``_source`` are removed."""
    remove_stale_temps(Path(store.out_dir) / SOURCE_DIR)
    receipts = store.receipts()
    if any(r.get("fingerprint", {}).get("hash") != store.fp["hash"] for r in receipts.values()):
        return  # parts of other parameters: the part store refuses the folder, naming the difference
    planned = [[i.origin, i.key, i.size] for i in items]
    changes = _plan_changes(store.out_dir, planned) if receipts else {}
    for index in (i for i in indices if i in receipts and i < len(shards)):
        for kind, names in _part_changes(store.out_dir, index, receipts[index], [items[j] for j in shards[index]]):
            changes.setdefault(kind, []).extend(n for n in names if n not in changes.get(kind, []))
    if any(changes.values()):
        raise InputError(_message(src, store.out_dir, len(receipts), changes))
    if not receipts:
        _write_plan(store.out_dir, planned)


def _write_plan(out_dir: Path, planned: list[list]) -> None:
    path = Path(out_dir) / SOURCE_DIR / SOURCE_NAME
    body = json.dumps({"items": planned}, ensure_ascii=False, separators=(",", ":")).encode()
    if _read_bytes(path) != body:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, body)


def _plan_changes(out_dir: Path, planned: list[list]) -> dict[str, list[str]]:
    """Files added, removed or resized since ``source.json`` was written (empty when it is missing)."""
    recorded = _read_json(Path(out_dir) / SOURCE_DIR / SOURCE_NAME)
    if recorded is None:
        log.warning("%s: no readable %s/%s (made by an older kdpipe?): only committed parts' listings are "
                    "compared with the source", out_dir, SOURCE_DIR, SOURCE_NAME)
        return {}
    if recorded.get("items") == planned:
        return {}
    old = {row[0]: row for row in recorded.get("items", [])}
    new = {row[0]: row for row in planned}
    changes = {"added": [o for o in new if o not in old], "removed": [o for o in old if o not in new],
               "modified": [o for o in new if o in old and old[o] != new[o]]}
    if not any(changes.values()):  # same files and sizes in another order or under other keys
        changes["reordered"] = [o for o, row in zip(new, recorded.get("items", [])) if row[0] != o][:_SHOWN]
    return {kind: names for kind, names in changes.items() if names}


def _part_changes(out_dir: Path, index: int, receipt: dict, items: list[Item]) -> list[tuple[str, list[str]]]:
    """What differs between the items part ``index`` was made from and the current ones."""
    recorded = _committed_listing(out_dir, index, receipt)
    if recorded is None:
        return []
    if [row[0] for row in recorded] != [i.origin for i in items]:
        then, now = {row[0] for row in recorded}, {i.origin for i in items}
        if then == now:
            return [("reordered", [f"the items of {part_name(index)}"])]
        return [("added", sorted(now - then)), ("removed", sorted(then - now))]
    return [("modified", [i.origin for i, row in zip(items, recorded) if _changed(i, row)])]


def _committed_listing(out_dir: Path, index: int, receipt: dict) -> list[list] | None:
    expected = (receipt.get("input") or {}).get("listing_sha256")
    body = _read_bytes(listing_path(out_dir, index))
    if expected is None or body is None or hashlib.sha256(body).hexdigest() != expected:
        if expected is not None:
            log.warning("%s: the listing of %s is missing or damaged; its items cannot be compared with the source",
                        out_dir, part_name(index))
        return None
    return json.loads(body)["items"]


def _changed(item: Item, row: list) -> bool:
    """True when ``item``'s bytes now differ from the recorded row (hashed only when size or mtime moved, or
    for bundled items, which have no mtime)."""
    _, _, size, mtime, digest = row
    if item.mtime_ns is not None and item.mtime_ns == mtime and item.size == size:
        return False
    try:
        data = item.read()
    except OSError:
        return digest is not None
    return hashlib.sha256(data).hexdigest() != digest


def _message(src: str, out_dir: Path, committed: int, changes: dict[str, list[str]]) -> str:
    listed = "; ".join(f"{kind}: {', '.join(names[:_SHOWN])}{' ...' if len(names) > _SHOWN else ''}"
                       f" ({len(names)})" for kind, names in changes.items() if names)
    return (f"{src}: the source changed since the ingest into {out_dir} began ({committed} part(s) committed "
            f"from it): {listed}. An interrupted ingest resumes only over the same source: restore those files, "
            f"or write to a new --out (or delete {out_dir} to start over)")


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _read_json(path: Path) -> dict | None:
    body = _read_bytes(path)
    try:
        data = json.loads(body) if body is not None else None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
