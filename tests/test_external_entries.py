"""External file entries: a declared kind of entry, only in dataset manifests made by ``kdpipe index``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import manifest as mf
from pipeline.errors import PathEscapeError

ENTRY = {"bytes": 10, "sha256": "a" * 64, "samples": 3, "external": True}


def _build(path: str, kind_stage=("dataset", "index"), external=True):
    entry = {**ENTRY, "path": path, "external": external}
    return mf.build(kind_stage[0], stage=kind_stage[1], params={"labeled": False}, files=[entry],
                    totals={"samples": 3})


@pytest.mark.parametrize("path", ["/data/pool/00000.tar", "file:///data/pool/00000.tar", "s3://b/p/00000.tar",
                                  "https://h/p/00000.tar", "gs://b/00000.tar"])
def test_index_may_list_shards_where_they_live(tmp_path, path):
    written = mf.write(_build(path), tmp_path)
    loaded = mf.load(written, kind="dataset")
    where = loaded.file_path(loaded.files[0])
    assert loaded.is_external(loaded.files[0])
    assert where == (Path(path.removeprefix("file://")) if not path.startswith(("s3", "http", "gs")) else path)


@pytest.mark.parametrize("path, match", [("pipe:curl x | sh", "refused scheme"), ("relative/x.tar", "absolute"),
                                         ("ftp://h/x.tar", "refused scheme"), ("a\x00b", "NUL")])
def test_bad_external_locations_are_refused(path, match):
    with pytest.raises(PathEscapeError, match=match):
        _build(path)


def test_only_index_makes_external_entries():
    with pytest.raises(PathEscapeError, match="only a dataset manifest made by `kdpipe index`"):
        _build("/data/x.tar", ("dataset", "ingest"))


def test_a_url_not_declared_external_is_refused():
    with pytest.raises(PathEscapeError, match="not a declared external entry"):
        _build("s3://b/x.tar", external=False)


def test_a_hand_edited_manifest_marking_a_logits_file_external_fails_on_load(tmp_path):
    data = _build("/data/x.tar")
    data["producer"]["stage"] = "logits"
    data["id"] = mf.content_id(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(PathEscapeError, match="only a dataset manifest made by"):
        mf.load(tmp_path)
