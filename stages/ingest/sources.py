"""Ingest sources: a labeled folder of class subfolders, a flat folder or file list, or bundled digits.

Each source becomes a list of ``Item``s with deterministic, unique, filesystem-safe keys. Image bytes of
image files are kept as they are (no re-encoding); the bundled digits are encoded once as lossless PNG.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from pipeline.errors import InputError
from pipeline.storage import scheme_of

BUNDLED = ("digits",)
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class Item:
    """One source sample: its key, how to read its bytes, its label (or None), and where it came from."""

    key: str
    origin: str
    size: int
    read: Callable[[], bytes]
    label: int | None = None


@dataclass
class Source:
    """A discovered source: items in a deterministic order, and class names when labeled."""

    kind: str
    items: list[Item]
    class_names: list[str] | None

    @property
    def labeled(self) -> bool:
        return self.class_names is not None


def make_key(relative: str) -> str:
    """A webdataset-safe key from a relative path: no dots, no '..', only [A-Za-z0-9_-/]."""
    stem = relative.rsplit(".", 1)[0] if "." in Path(relative).name else relative
    key = re.sub(r"[^A-Za-z0-9_\-/]", "_", stem.replace("\\", "/"))
    key = "/".join(part.strip("/") or "_" for part in key.split("/") if part not in ("", "."))
    return key.replace("..", "__") or "_"


def discover(src: str) -> Source:
    """Turn ``src`` (folder, file list, or a bundled name) into a ``Source``; raise ``InputError``."""
    if src in BUNDLED:
        return _digits()
    if scheme_of(src) not in (None, "file"):
        raise InputError(_shards_hint(src, "is a URL; ingest packs local image files into new shards"))
    path = Path(src)
    if path.is_file():
        return _file_list(path)
    if not path.is_dir():
        raise InputError(f"{src}: no such folder or file list (or bundled name: {', '.join(BUNDLED)})")
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if subdirs and not files:
        return _labeled_folder(path, subdirs)
    return _flat(path, [p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")], "folder")


def _file_item(root: Path, path: Path, label: int | None) -> Item:
    relative = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    return Item(make_key(relative), str(path), size, path.read_bytes, label)


def _labeled_folder(root: Path, subdirs: list[Path]) -> Source:
    items = []
    for label, folder in enumerate(subdirs):
        paths = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        _refuse_shards(root, paths)
        items += [_file_item(root, path, label) for path in paths]
    return Source("labeled_folder", _unique(items), [d.name for d in subdirs])


def _flat(root: Path, paths: list[Path], kind: str) -> Source:
    _refuse_shards(root, paths)
    return Source(kind, _unique([_file_item(root, p, None) for p in paths]), None)


def _shards_hint(src, what: str) -> str:
    return (f"{src}: {what}. To use existing WebDataset shards where they live, index them: "
            f"`kdpipe index {src} --out DIR` (paths, globs, {{a..b}} patterns, list files and URLs)")


def _refuse_shards(src, paths: list[Path]) -> None:
    """A source holding WebDataset tars is a pool to index, not images to pack: say so instead of failing later."""
    tars = [p for p in paths if p.name.lower().endswith(SHARD_SUFFIXES)]
    if tars:
        shown = ", ".join(p.name for p in tars[:3]) + (", ..." if len(tars) > 3 else "")
        raise InputError(_shards_hint(src, f"holds {len(tars)} WebDataset shard(s) ({shown}); ingest packs image "
                                           "files into new shards"))


def _file_list(listing: Path) -> Source:
    root = listing.parent
    lines = [ln.strip() for ln in listing.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    remote = [ln for ln in lines if scheme_of(ln) not in (None, "file")]
    if remote:
        raise InputError(_shards_hint(listing, f"lists {len(remote)} URL(s) ({remote[0]}, ...); ingest reads "
                                               "local image files"))
    paths = [Path(ln) if Path(ln).is_absolute() else root / ln for ln in lines]
    return _flat(root, paths, "file_list")


def _unique(items: list[Item]) -> list[Item]:
    """Refuse two source files that map to the same key, naming both."""
    seen: dict[str, str] = {}
    for item in items:
        if item.key in seen:
            raise InputError(f"duplicate key {item.key!r}: {seen[item.key]} and {item.origin} "
                             "(same name up to the extension); rename one of them")
        seen[item.key] = item.origin
    return items


def _digits() -> Source:
    """scikit-learn's bundled handwritten digits (1797 real 8x8 scans, 10 classes) as PNG items."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError("the bundled digits need scikit-learn: pip install 'kdpipe[demo]'") from None
    digits = load_digits()
    items = []
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        png = _png(np.clip(np.rint(image * (255.0 / 16.0)), 0, 255).astype(np.uint8))
        items.append(Item(f"digits-{index:05d}", f"sklearn:digits[{index}]", len(png), lambda b=png: b, int(label)))
    return Source("bundled_digits", items, [str(d) for d in range(10)])


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()
