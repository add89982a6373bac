"""The exclusion artifact (from dedup, read by select): reasons, the verify check of a part, loading its keys."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import manifest as mf
from pipeline.errors import InputError, IntegrityError
from stages.artifacts.parquet import read_parquet

REASONS = ("contaminated", "near_duplicate")


def check_exclusion_part(manifest, entry: dict, path: Path) -> list[str]:
    """``kdpipe verify`` content check of an exclusion part: columns, types, reasons, unique sorted keys."""
    try:
        table = read_parquet(path, what="exclusion part")
    except IntegrityError as exc:
        return [str(exc)]
    wanted = {"key": pa.string(), "reason": pa.string(), "matched_key": pa.string(), "similarity": pa.float32()}
    problems = [f"{path}: column {name} missing or not {kind}" for name, kind in wanted.items()
                if name not in table.column_names or table.schema.field(name).type != kind]
    if problems:
        return problems
    if not pc.all(pc.is_in(table.column("reason"), value_set=pa.array(REASONS))).as_py() and table.num_rows:
        problems.append(f"{path}: reason other than {', '.join(REASONS)}")
    keys = table.column("key")
    if table.num_rows and not table.sort_by([("key", "ascending")]).column("key").equals(keys):
        problems.append(f"{path}: keys are not sorted")
    if pc.count_distinct(keys).as_py() != table.num_rows:
        problems.append(f"{path}: a key is excluded twice")
    return problems


class Exclusion:
    """Keys to drop before ranking, from an exclusion manifest (memory: the excluded keys)."""

    def __init__(self, manifest: mf.Manifest, keys: pa.Array):
        self.manifest, self.keys = manifest, keys


def load_exclusion(path: str | Path) -> Exclusion:
    """Load an exclusion manifest and its keys (every listed file)."""
    manifest = mf.load(path, kind="exclusion")
    chunks = []
    for entry in manifest.files:
        where = manifest.file_path(entry)
        if isinstance(where, str) or not where.is_file():
            raise InputError(f"{manifest.path}: exclusion file {entry['path']} is missing or remote")
        chunks.append(read_parquet(where, ["key"], "exclusion part", InputError).column("key"))
    keys = pa.chunked_array(chunks, pa.string()).combine_chunks() if chunks else pa.array([], pa.string())
    return Exclusion(manifest, keys.unique())
