"""Parquet helpers every stage shares: deterministic writing, and opening a file or raising a named error."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import IntegrityError, KdpipeError
from pipeline.hashing import sha256_file
from pipeline.storage import classify, open_random, sha256_of

ROW_GROUP = 1 << 20


def write_parquet(table: pa.Table, path: Path, compression: str = "zstd", row_group: int = ROW_GROUP,
                  indexed: bool = True) -> None:
    """Deterministic Parquet write (fixed row groups; no dictionary or statistics for keys, they are unique).

    The bytes depend on the rows alone, not on how the table is chunked: a table of several chunks is made one
    chunk per column first (where a column falls back from dictionary to plain pages depends on the chunks it
    is handed: a 2M-row selection read back in 16 chunks and the same rows in one gave different bytes).
    ``indexed=False`` writes no dictionary and no statistics at all: for an intermediate that is only read back
    whole (half the write time of a 2M-row select map part; its bytes are its own, chunks and all).
    """
    others = [c for c in table.column_names if c not in ("key", "matched_key")] if indexed else False
    if indexed and any(column.num_chunks > 1 for column in table.columns):
        table = table.combine_chunks()
    pq.write_table(table, path, compression=compression, row_group_size=row_group, write_statistics=others,
                   use_dictionary=others)


def source(path) -> Path | str | object:
    """What pyarrow reads ``path`` from: the path itself, or a seekable stream of an object in a bucket
    (``s3://...`` strings and ``RemotePath``; pyarrow's own S3 client is not used: one set of credentials)."""
    return open_random(path) if classify(str(path)).remote else path


def checksum(path) -> str:
    """sha256 of a local file, or of an object streamed from its bucket."""
    return sha256_of(path)[0] if classify(str(path)).remote else sha256_file(path)


@contextlib.contextmanager
def named_errors(path: Path | str, what: str = "Parquet file", error: type[KdpipeError] = IntegrityError,
                 hint: str = "") -> Iterator[None]:
    """Turn whatever pyarrow raises for a missing, cut or garbage file into ``error`` naming ``path``."""
    try:
        yield
    except (OSError, ValueError, pa.ArrowException) as exc:  # ArrowInvalid for a cut footer, OSError for a missing file
        raise error(f"{path}: not a readable {what} ({type(exc).__name__}: {exc}){hint}") from None


def open_parquet(path: Path | str, what: str = "Parquet file", error: type[KdpipeError] = IntegrityError,
                 hint: str = "", pre_buffer: bool = True) -> pq.ParquetFile:
    """``pq.ParquetFile(path)`` or ``error`` naming the file (the footer is read here).

    ``pre_buffer=False`` streams each column chunk instead of buffering a whole row group's (for readers that
    iterate batches: on 1M-row logits parts, 31 instead of 81 MiB of Arrow memory, same speed).
    """
    with named_errors(path, what, error, hint):
        return pq.ParquetFile(source(path), pre_buffer=pre_buffer)


def read_parquet(path: Path | str, columns: list[str] | None = None, what: str = "Parquet file",
                 error: type[KdpipeError] = IntegrityError, hint: str = "") -> pa.Table:
    """``pq.read_table(path, columns)`` or ``error`` naming the file (damaged pages included)."""
    with named_errors(path, what, error, hint):
        return pq.read_table(source(path), columns=columns)
