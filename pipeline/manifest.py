"""Manifests: build, content id, create-only atomic write, load + validate (schema, id, paths).

A manifest is the identity of an artifact and the only thing one team hands another: it lists every file
(relative path, bytes, sha256, rows or samples), the parameters, the lineage (input ids) and the totals.
Consumers read only the files a manifest lists, never a glob.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource

from pipeline import __version__
from pipeline.atomic import write_atomic
from pipeline.errors import ManifestError
from pipeline.hashing import canonical_json, sha256_json
from pipeline.paths import check_entry, check_file, resolve_file
from pipeline.storage import RemotePath, classify

MANIFEST_NAME = "manifest.json"
_ID_FIELDS = ("kind", "schema_version", "params", "files", "totals")


@functools.lru_cache(maxsize=None)
def _schemas() -> tuple[Registry, dict[str, dict]]:
    """Load every ``manifests/*.schema.json`` into a local registry (no network look-ups)."""
    by_kind: dict[str, dict] = {}
    registry = Registry()
    for item in resources.files("manifests").iterdir():
        if item.name.endswith(".schema.json"):
            schema = json.loads(item.read_text())
            registry = registry.with_resource(schema["$id"], Resource.from_contents(schema))
            by_kind[item.name[: -len(".schema.json")]] = schema
    return registry, by_kind


def known_kinds() -> list[str]:
    """Kinds that have a schema."""
    return sorted(k for k in _schemas()[1] if k != "common")


def schema_version_of(kind: str) -> int:
    """The schema version this kdpipe writes for ``kind`` (the schema's ``const``)."""
    schema = _schema_for(kind)
    return int(schema.get("properties", {}).get("schema_version", {}).get("const", 1))


def _schema_for(kind: str) -> dict:
    try:
        return _schemas()[1][kind]
    except KeyError:
        raise ManifestError(f"no schema for manifest kind {kind!r} (known: {', '.join(known_kinds())})") from None


def content_id(data: dict) -> str:
    """sha256 of the canonical JSON of the manifest's content: kind, version, params, files, totals, input ids.

    An external entry (``kdpipe index``) counts by its bytes, sha256 and counts, not its location: the same
    pool on a disk and in a bucket has one id (every reader re-hashes what the location serves)."""
    body = {key: data.get(key) for key in _ID_FIELDS}
    if isinstance(body["files"], list):  # an external shard is its bytes, wherever it lives (disk, bucket, URL)
        body["files"] = [_identity(entry) for entry in body["files"]]
    body["inputs"] = [{"kind": i["kind"], "id": i["id"], "role": i.get("role")} for i in data.get("inputs", [])]
    return sha256_json(body)


def _identity(entry: Any) -> Any:
    """What of a file entry is content: all of it, except the location of an external entry."""
    if isinstance(entry, dict) and entry.get("external") is True:
        return {k: v for k, v in entry.items() if k != "path"}
    return entry


def input_ref(manifest: "Manifest", out_dir: Path, role: str | None = None) -> dict:
    """Lineage entry for ``manifest`` as seen from a new manifest in ``out_dir`` (path is informational)."""
    if isinstance(manifest.path, RemotePath) or classify(str(out_dir)).remote:  # absolute across stores
        where = str(manifest.path if isinstance(manifest.path, RemotePath) else manifest.path.resolve())
    else:
        where = os.path.relpath(manifest.path.resolve(), Path(out_dir).resolve())
    ref = {"kind": manifest.kind, "id": manifest.id, "path": where}
    if role:
        ref["role"] = role
    return ref


def build(kind: str, *, stage: str, params: dict, files: list[dict], totals: dict,
          inputs: list[dict] | None = None, config_hash: str | None = None) -> dict:
    """Return a complete manifest dict (with its content id) for ``kind``."""
    for entry in files:
        check_file(entry, kind, stage, f"new {kind} manifest")
    data: dict[str, Any] = {
        "kind": kind,
        "schema_version": schema_version_of(kind),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "producer": {"kdpipe_version": __version__, "stage": stage, "host": socket.gethostname(),
                     "config_hash": config_hash or os.environ.get("KDPIPE_CONFIG_HASH")},
        "inputs": list(inputs or []),
        "params": params,
        "files": files,
        "totals": totals,
    }
    data = json.loads(canonical_json(data))  # a deep, JSON-pure copy: later edits of the inputs do not leak in
    data["id"] = content_id(data)
    validate(data, where=f"new {kind} manifest")
    return data


def validate(data: Any, where: str) -> None:
    """Raise ``ManifestError`` naming the field when ``data`` fails its kind's schema."""
    if not isinstance(data, dict) or "kind" not in data:
        raise ManifestError(f"{where}: not a kdpipe manifest (no 'kind' field)")
    registry, _ = _schemas()
    schema = _schema_for(str(data["kind"]))
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        field = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ManifestError(f"{where}: field {field!r} fails the {data['kind']} schema: {err.message}")


def write(data: dict, out_dir: Path) -> Path:
    """Write ``data`` as ``out_dir/manifest.json``, create-only (a second writer gets ``ManifestError``)."""
    final = Path(out_dir) / MANIFEST_NAME
    body = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
    try:
        write_atomic(final, body, exclusive=True)
    except FileExistsError:
        raise ManifestError(f"{final} already exists; manifests are never edited in place "
                            "(verify it with `kdpipe verify`, or write to a new folder)") from None
    return final


@dataclass(frozen=True)
class Manifest:
    """A loaded, validated manifest and the folder its relative paths are resolved against."""

    path: Path
    data: dict

    kind = property(lambda self: self.data["kind"])
    id = property(lambda self: self.data["id"])
    params = property(lambda self: self.data["params"])
    files = property(lambda self: self.data["files"])
    totals = property(lambda self: self.data["totals"])
    inputs = property(lambda self: self.data["inputs"])
    folder = property(lambda self: self.path.parent)

    def file_path(self, entry: dict) -> Path | str:
        """Local path (checked to stay in the folder, unless the entry is external) or URL of one file entry."""
        return resolve_file(self.folder, entry, str(self.path))

    @staticmethod
    def is_external(entry: dict) -> bool:
        """True for an entry ``kdpipe index`` made: a shard where it already lives, re-hashed by every reader."""
        return bool(entry.get("external"))

    def input_ids(self, kind: str | None = None) -> list[str]:
        """Ids of the inputs, optionally of one kind."""
        return [i["id"] for i in self.inputs if kind is None or i["kind"] == kind]


class RemoteManifest(Manifest):
    """A manifest that lives in object storage: its relative entries are objects under its prefix."""

    def file_path(self, entry: dict) -> Path | str | RemotePath:
        if entry.get("external"):
            return resolve_file(Path("/"), entry, str(self.path))
        check_entry(entry["path"], str(self.path))
        return self.folder / entry["path"]


def load(path: str | Path, kind: str | None = None, remote_ok: bool = True) -> Manifest:
    """Load and validate a manifest (JSON, schema, version, id, every file path) before any work starts.

    Args:
        path: the manifest file, or a folder holding ``manifest.json``; also an object URL or prefix
            (``s3://b/run/logits``): its relative entries are then ``RemotePath`` objects under that prefix.
        kind: the expected kind; another kind is refused.
        remote_ok: False for a reader that only reads local files (a URL is then refused by name).
    """
    loc = classify(str(path))
    if loc.remote and not remote_ok:
        raise ManifestError(f"{loc.target}: this reader takes a local manifest only; copy "
                            "the prefix to a folder (or mount the bucket)")
    path = RemotePath(loc.target) if loc.remote else Path(path)
    if (path.name != MANIFEST_NAME) if isinstance(path, RemotePath) else path.is_dir():
        path = path / MANIFEST_NAME
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest (has the stage that makes it been finalized?)") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: unreadable or not JSON: {exc}") from None
    validate(data, str(path))
    if kind is not None and data["kind"] != kind:
        raise ManifestError(f"{path}: is a {data['kind']!r} manifest, expected {kind!r}")
    if content_id(data) != data["id"]:
        raise ManifestError(f"{path}: field 'id' does not match the manifest's content (edited or corrupted)")
    manifest = (RemoteManifest if isinstance(path, RemotePath) else Manifest)(path, data)
    for entry in data["files"]:
        check_file(entry, data["kind"], data["producer"].get("stage"), str(path))
        manifest.file_path(entry)
    return manifest


def canonical_bytes(data: dict) -> bytes:
    """Canonical bytes of a manifest, for comparisons in tests and tools."""
    return canonical_json(data)
