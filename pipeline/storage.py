"""Storage: where a file lives (local path, ``file://``, ``http(s)://``, ``s3://``, ``gs://``) and streaming reads.

Remote locations are opened through fsspec (``s3fs``, ``gcsfs``, its own HTTP file system) as sequential
streams; nothing is downloaded whole. Endpoints and credentials come the standard way, never from a manifest:
the ``AWS_*`` variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), ``GOOGLE_APPLICATION_CREDENTIALS``,
or fsspec storage options by scheme in ``KDPIPE_STORAGE_OPTIONS`` (JSON text, or the path of a JSON file;
a config sets it in its ``env:``). ``pipe:`` locations (a shell command) are refused by name.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import posixpath
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import fsspec

from pipeline.errors import StorageError

REMOTE_SCHEMES = ("http", "https", "s3", "gs", "gcs")
OPTIONS_ENV = "KDPIPE_STORAGE_OPTIONS"
CHUNK = 1 << 20
_BLOCK = 16 << 20  # s3/gs read-ahead block: a few ranged GETs per shard
_KNOWN = (*REMOTE_SCHEMES, "file", "pipe", "ftp", "sftp", "az", "abfs", "hf")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_QUIET = ("aiobotocore.credentials", "botocore.credentials", "botocore.configprovider")  # one INFO line per client
_BACKEND = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}


@dataclass(frozen=True)
class Location:
    """A classified location: ``scheme`` is ``local`` for a path (``file://`` is turned into one)."""

    scheme: str
    target: str

    @property
    def remote(self) -> bool:
        return self.scheme != "local"

    def __str__(self) -> str:
        return self.target


def scheme_of(text: str) -> str | None:
    """The URL scheme of ``text`` in lower case (``s3``, ``pipe``), or None for a plain path.

    ``NAME://...`` is a URL; so is ``NAME:...`` for a scheme kdpipe knows (``pipe:cmd``, ``s3:/b`` as argparse's
    ``Path`` leaves ``s3://b``); any other ``word:rest`` (``run:2/x``) is a path, as is a drive letter."""
    match = _SCHEME.match(text)
    if not match or len(match.group(1)) < 2:
        return None
    scheme = match.group(1).lower()
    return scheme if text[match.end():].startswith("//") or scheme in _KNOWN else None


def classify(where: str | Path) -> Location:
    """Classify a location; ``StorageError`` for ``pipe:`` and any scheme kdpipe does not read."""
    text = str(where)
    scheme = scheme_of(text)
    if scheme is None:
        return Location("local", text)
    if scheme == "file":
        if not text.lower().startswith("file://"):
            raise StorageError(f"{text}: a file URL is file:///absolute/path")
        return Location("local", text[len("file://"):] or "/")
    if scheme == "pipe":
        raise StorageError(f"{text}: 'pipe:' locations run a shell command and are refused; give the path or "
                           "URL of the file itself (s3://, gs://, http(s)://)")
    rest = text[len(scheme) + 1:]
    if scheme in REMOTE_SCHEMES and rest.startswith("/") and not rest.startswith("//"):
        text = f"{text[:len(scheme)]}:/{rest}"  # argparse's Path turned s3://b/x into s3:/b/x
    if scheme not in REMOTE_SCHEMES or not text.lower().startswith(f"{scheme}://"):
        raise StorageError(f"{text}: scheme {scheme!r} is not read by kdpipe "
                           f"(local paths, file://, {', '.join(s + '://' for s in REMOTE_SCHEMES)})")
    return Location(scheme, text)


def storage_options(scheme: str) -> dict:
    """fsspec options for ``scheme`` from ``KDPIPE_STORAGE_OPTIONS`` (``{"s3": {...}}``); {} when unset."""
    return dict(_all_options(os.environ.get(OPTIONS_ENV, "")).get(scheme, {}))


@functools.lru_cache(maxsize=8)
def _all_options(text: str) -> dict:
    if not text.strip():
        return {}
    try:
        body = Path(text).read_text() if not text.lstrip().startswith("{") else text
        data = json.loads(body)
    except (OSError, ValueError) as exc:
        raise StorageError(f"{OPTIONS_ENV}: not JSON text nor a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise StorageError(f'{OPTIONS_ENV}: expected {{"SCHEME": {{OPTION: VALUE}}}}, got {text[:80]!r}')
    return data


def filesystem(scheme: str):
    """The fsspec file system of a remote scheme, built with its storage options."""
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return fsspec.filesystem("gcs" if scheme == "gs" else scheme, **storage_options(scheme))
    except ImportError as exc:
        raise StorageError(f"{scheme}:// needs the {_BACKEND.get(scheme, scheme)} package "
                           f"(pip install 'kdpipe[storage]'): {exc}") from None


@contextmanager
def open_read(where: str | Path) -> Iterator[BinaryIO]:
    """A sequential binary stream of a local file or remote object; ``OSError`` when it cannot be read."""
    loc = classify(where)
    if not loc.remote:
        with open(loc.target, "rb") as handle:
            yield handle
        return
    fs = filesystem(loc.scheme)
    fs.invalidate_cache(loc.target)  # a listing's cached size/etag must not hide an object replaced since
    kwargs = {"block_size": 0} if loc.scheme in ("http", "https") else {"block_size": _BLOCK,
                                                                          "cache_type": "readahead"}
    try:
        handle = fs.open(loc.target, "rb", **kwargs)
    except OSError:
        raise
    except Exception as exc:  # fsspec backends raise their own types (aiohttp, botocore) for a bad object
        raise OSError(f"{loc.target}: cannot open ({type(exc).__name__}: {exc})") from exc
    with handle:
        yield _Guarded(handle, loc.target)


class _Guarded:
    """A remote stream whose backend errors (aiohttp, botocore) surface as ``OSError`` naming the object."""

    def __init__(self, handle, name: str):
        self.handle, self.name = handle, name

    def read(self, size: int = -1) -> bytes:
        try:
            return self.handle.read(size)
        except OSError:
            raise
        except Exception as exc:
            raise OSError(f"{self.name}: read failed ({type(exc).__name__}: {exc})") from exc

    def readable(self) -> bool:
        return True


def open_random(where: str | Path) -> BinaryIO:
    """A seekable binary file of a local path or remote object (Parquet reads its footer first); the caller
    closes it. ``OSError`` naming the object when it cannot be opened."""
    loc = classify(where)
    if not loc.remote:
        return open(loc.target, "rb")
    fs = filesystem(loc.scheme)
    fs.invalidate_cache(loc.target)
    try:
        return fs.open(loc.target, "rb", block_size=_BLOCK)
    except OSError:
        raise
    except Exception as exc:  # botocore / aiohttp errors of a bad object
        raise OSError(f"{loc.target}: cannot open ({type(exc).__name__}: {exc})") from exc


def put_object(url: str, body: bytes) -> None:
    """Write one object whole (a single PUT); ``StorageError`` naming it when the store refuses."""
    loc = classify(url)
    try:
        filesystem(loc.scheme).pipe_file(loc.target, body)
    except Exception as exc:  # botocore / gcsfs errors of a refused write
        raise StorageError(f"{loc.target}: cannot write ({type(exc).__name__}: {exc})") from None


def sha256_of(where: str | Path) -> tuple[str, int]:
    """(hex sha256, bytes) of a local file or remote object, streamed in 1 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    with open_read(where) as stream:
        for chunk in iter(lambda: stream.read(CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def size_of(where: str | Path) -> int:
    """Bytes of a local file or remote object (``OSError`` when it is missing)."""
    loc = classify(where)
    if not loc.remote:
        return os.stat(loc.target).st_size
    try:
        return int(filesystem(loc.scheme).size(loc.target))
    except OSError:
        raise
    except Exception as exc:
        raise OSError(f"{loc.target}: cannot stat ({type(exc).__name__}: {exc})") from exc


def expand_remote(pattern: str) -> list[str]:
    """The objects matching a remote glob (``s3://b/pool/*.tar``), sorted, as full URLs."""
    loc = classify(pattern)
    fs = filesystem(loc.scheme)
    try:
        found = fs.glob(loc.target)
    except Exception as exc:
        raise StorageError(f"{pattern}: cannot list ({type(exc).__name__}: {exc})") from None
    prefix = f"{loc.scheme}://"
    return sorted(f if f.startswith(prefix) else prefix + f.lstrip("/") for f in found)


class RemotePath:
    """The few ``Path`` operations readers use, on an object URL (``/``, ``name``, ``parent``, ``is_file``,
    ``exists``, ``read_bytes``): a manifest that lives in a bucket (``kdpipe verify s3://b/run/logits``)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.name = self.url.rsplit("/", 1)[-1]

    def __truediv__(self, name: str) -> "RemotePath":
        scheme, rest = self.url.split("://", 1)
        return RemotePath(f"{scheme}://{posixpath.normpath(f'{rest}/{name}')}")  # run/sel/../logits: run/logits

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.url.rsplit("/", 1)[0])

    def exists(self) -> bool:
        return bool(filesystem(classify(self.url).scheme).exists(self.url))

    def is_file(self) -> bool:
        return bool(filesystem(classify(self.url).scheme).isfile(self.url))

    def is_dir(self) -> bool:
        return bool(filesystem(classify(self.url).scheme).isdir(self.url))

    def stat(self) -> os.stat_result:
        """Only ``st_size`` is meaningful (the object's bytes)."""
        return os.stat_result((0, 0, 0, 0, 0, 0, size_of(self.url), 0, 0, 0))

    def read_bytes(self) -> bytes:
        with open_read(self.url) as stream:
            return stream.read()

    def resolve(self) -> "RemotePath":
        return self

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)
