"""Shard sources of ``kdpipe index``: local paths, folders, globs, ``{a..b}``/``{x,y}`` patterns, list files, URLs.

Every source expands to shard locations in a deterministic order (the order given, each expansion sorted), so
all array tasks plan the same parts. Only ``.tar`` files are shards: img2dataset's ``.parquet`` and
``_stats.json`` beside them are skipped when a folder or glob is expanded, and refused when named.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

from pipeline.errors import InputError
from pipeline.storage import classify, expand_remote

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LIST_SUFFIXES = (".txt", ".lst", ".list", ".urls")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_CHOICE = re.compile(r"\{([^{}]*,[^{}]*)\}")
_GLOB = re.compile(r"[*?\[]")


def expand_braces(text: str) -> list[str]:
    """``pool/{00000..00002}.tar`` -> three names (zero padding kept); ``{a,b}`` -> two; nested ones too."""
    match = _RANGE.search(text) or _CHOICE.search(text)
    if match is None:
        return [text]
    if match.re is _RANGE:
        first, last = match.group(1), match.group(2)
        if int(last) < int(first):
            raise InputError(f"{text}: the range {{{first}..{last}}} runs backwards")
        width = len(first) if first.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        choices = match.group(1).split(",")
    head, tail = text[: match.start()], text[match.end():]
    return [out for choice in choices for out in expand_braces(head + choice + tail)]


def is_shard(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def expand_sources(sources: list[str]) -> list[str]:
    """Shard locations (absolute local paths or URLs) of ``sources``; ``InputError`` naming a bad source."""
    out: list[str] = []
    for source in sources:
        for text in expand_braces(str(source)):
            out += _expand_one(text)
    seen: set[str] = set()
    for location in out:
        if location in seen:
            raise InputError(f"{location}: listed twice by the sources {' '.join(map(str, sources))}; "
                             "a shard is indexed once")
        seen.add(location)
    return out


def _expand_one(text: str) -> list[str]:
    loc = classify(text)
    if loc.remote:
        return _remote(text, loc.scheme)
    if _GLOB.search(loc.target):
        return sorted(str(Path(p).resolve()) for p in glob.glob(loc.target, recursive=True) if is_shard(p))
    path = Path(loc.target)
    if path.is_dir():
        return sorted(str(p.resolve()) for p in path.rglob("*") if p.is_file() and is_shard(p.name))
    if not path.exists():
        raise InputError(f"{text}: no such shard, folder or list file")
    if is_shard(path.name):
        return [str(path.resolve())]
    if path.name.lower().endswith(LIST_SUFFIXES):
        return _listing(path)
    raise InputError(f"{text}: not a shard (.tar), a folder of shards or a list file ({', '.join(LIST_SUFFIXES)}); "
                     "img2dataset's .parquet and _stats.json files sit beside the tars and are not shards")


def _remote(text: str, scheme: str) -> list[str]:
    if text.endswith("/"):
        text += "*"
    if not _GLOB.search(text.split("://", 1)[1]):
        if not is_shard(text):
            raise InputError(f"{text}: a URL of a shard ends in .tar (list a prefix as {text.rstrip('/')}/*.tar)")
        return [text]
    if scheme in ("http", "https"):
        raise InputError(f"{text}: an http(s) server cannot be listed; give {{a..b}} patterns or a list file")
    return [u for u in expand_remote(text) if is_shard(u)]


def _listing(path: Path) -> list[str]:
    """The shards a list file names, one a line (``#`` comments); relative paths are from its folder."""
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        loc = classify(line)
        text = line if loc.remote or Path(loc.target).is_absolute() else str(path.parent / loc.target)
        for name in expand_braces(text):
            out += _expand_one(name)
    return out
