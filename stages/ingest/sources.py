"""Ingest sources: a labeled folder of class subfolders, a flat folder or file list, or bundled digits.

Each source becomes a list of ``Item``s with deterministic, unique, filesystem-safe keys. Image bytes of
image files are kept as they are (no re-encoding); the bundled digits are encoded once as lossless PNG.

Keys keep non-ASCII names: a relative path is Unicode-normalised (NFC), its extension dropped, and every
character that is not a key character (``stages.shardio.key_char_ok``: letters and digits of any script,
combining marks, ``_``, ``-``) nor ``/`` becomes ``_``; ASCII names give the keys they always gave. Two files
that still map to one key are refused, naming both and saying why (extension, normalisation, or which replaced
characters). Entries that are not regular files (FIFO, socket, device, a broken link) are never opened: they are
skipped and counted by reason in ``Source.skipped``.
"""

from __future__ import annotations

import io
import os
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from pipeline.errors import InputError
from pipeline.storage import scheme_of
from stages.shardio import key_char_ok

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
    mtime_ns: int | None = None  # at discovery; None for bundled items (their bytes are compared instead)


@dataclass
class Source:
    """A discovered source: items in a deterministic order, and class names when labeled."""

    kind: str
    items: list[Item]
    class_names: list[str] | None
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> paths never opened

    @property
    def labeled(self) -> bool:
        return self.class_names is not None


def make_key(relative: str) -> str:
    """A webdataset-safe key from a relative path: NFC-normalised, no dots, no '..', only key characters and '/'."""
    relative = unicodedata.normalize("NFC", relative)
    stem = relative.rsplit(".", 1)[0] if "." in Path(relative).name else relative
    key = "".join(c if c == "/" or key_char_ok(c) else "_" for c in stem.replace("\\", "/"))
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
    skipped: dict[str, list[str]] = {}
    top = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    subdirs = [p for p in top if p.is_dir()]
    if subdirs and not any(p.is_file() for p in top):
        _regular([p for p in top if not p.is_dir()], skipped)  # count what sits beside the class folders
        return _labeled_folder(path, subdirs, skipped)
    return _flat(path, _regular(sorted(path.rglob("*")), skipped), "folder", skipped)


def skip_reason(path: Path) -> str | None:
    """Why ``path`` is not read (``fifo``, ``socket``, ``device``, ``broken_link``), ``folder``, or None for a
    regular file (symlinks followed). Decided by ``stat`` alone: a FIFO is never opened, so it cannot hang."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "broken_link" if path.is_symlink() else "unreadable_entry"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "folder"
    return "fifo" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"


def _regular(paths: list[Path], skipped: dict[str, list[str]]) -> list[Path]:
    """The regular, non-hidden files among ``paths``; the others (folders aside) are counted in ``skipped``."""
    files = []
    for path in paths:
        if path.name.startswith("."):
            continue
        reason = skip_reason(path)
        if reason is None:
            files.append(path)
        elif reason != "folder":
            skipped.setdefault(reason, []).append(str(path))
    return files


def read_regular(path: Path) -> bytes:
    """The bytes of a regular file; ``OSError`` for anything else (opened non-blocking: a FIFO swapped in after
    discovery cannot hang the read)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        return handle.read()


def _file_item(root: Path, path: Path, label: int | None) -> Item:
    relative = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
    try:
        info = path.stat()
        size, mtime = info.st_size, info.st_mtime_ns
    except OSError:
        size, mtime = 0, None
    return Item(make_key(relative), str(path), size, lambda: read_regular(path), label, mtime)


def _labeled_folder(root: Path, subdirs: list[Path], skipped: dict[str, list[str]]) -> Source:
    items = []
    for label, folder in enumerate(subdirs):
        paths = list(_regular(sorted(folder.rglob("*")), skipped))
        _refuse_shards(root, paths)
        items += [_file_item(root, path, label) for path in paths]
    return Source("labeled_folder", _unique(items), [d.name for d in subdirs], skipped)


def _flat(root: Path, paths: list[Path], kind: str, skipped: dict[str, list[str]]) -> Source:
    _refuse_shards(root, paths)
    return Source(kind, _unique([_file_item(root, p, None) for p in paths]), None, skipped)


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
    skipped: dict[str, list[str]] = {}
    kept = []
    for path in paths:
        reason = skip_reason(path)
        if reason in ("fifo", "socket", "device"):
            skipped.setdefault(reason, []).append(str(path))
        else:  # a missing or unreadable file stays an item: its part counts it as unreadable_file
            kept.append(path)
    return _flat(root, kept, "file_list", skipped)


def _unique(items: list[Item]) -> list[Item]:
    """Refuse two source files that map to the same key, naming both and saying why."""
    seen: dict[str, str] = {}
    for item in items:
        if item.key in seen:
            raise InputError(f"duplicate key {item.key!r}: {seen[item.key]} and {item.origin} both map to it "
                             f"({why_same_key(seen[item.key], item.origin)}); rename one of them")
        seen[item.key] = item.origin
    return items


def why_same_key(first: str, second: str) -> str:
    """Why two different paths give one key: the extension, Unicode normalisation, or replaced characters."""
    stems = [p.rsplit(".", 1)[0] if "." in Path(p).name else p for p in (first, second)]
    if stems[0] == stems[1]:
        return "the same name up to the extension"
    if unicodedata.normalize("NFC", stems[0]) == unicodedata.normalize("NFC", stems[1]):
        return "the same name once Unicode-normalised (NFC): one spells a letter with combining characters"
    common = len(os.path.commonprefix(stems))
    replaced = sorted({c for s in stems for c in s[common:] if c != "/" and not key_char_ok(c)})
    shown = " ".join(repr(c) for c in replaced)
    return (f"keys replace characters other than letters, digits, '_', '-' and '/' by '_', and the names differ "
            f"only in such characters ({shown})")


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
