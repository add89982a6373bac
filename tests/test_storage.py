"""The storage layer: locations classified (``pipe:`` refused by name), streaming reads and sha256 of local
files, ``file://``, http(s) (http.server) and s3 (moto_server) objects, endpoints from ``AWS_ENDPOINT_URL``."""

from __future__ import annotations

import hashlib

import pytest

from pipeline import storage
from pipeline.errors import StorageError


@pytest.mark.parametrize("text, scheme, target", [
    ("pool/00000.tar", "local", "pool/00000.tar"), ("/abs/x.tar", "local", "/abs/x.tar"),
    ("file:///abs/x.tar", "local", "/abs/x.tar"), ("s3://b/p/x.tar", "s3", "s3://b/p/x.tar"),
    ("HTTPS://h/x.tar", "https", "HTTPS://h/x.tar"), ("gs://b/x.tar", "gs", "gs://b/x.tar"),
    ("run:2/x.tar", "local", "run:2/x.tar"), ("C:/x.tar", "local", "C:/x.tar")])
def test_locations_are_classified(text, scheme, target):
    loc = storage.classify(text)
    assert (loc.scheme, loc.target) == (scheme, target)


@pytest.mark.parametrize("text, match", [("pipe:curl http://x | tar", "shell command"),
                                         ("ftp://h/x.tar", "not read by kdpipe"), ("s3:b/x", "not read")])
def test_refused_locations_are_named(text, match):
    with pytest.raises(StorageError, match=match):
        storage.classify(text)


def test_local_and_file_url_stream_the_same_bytes(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc" * 100_000)
    want = (hashlib.sha256(path.read_bytes()).hexdigest(), 300_000)
    assert storage.sha256_of(path) == want == storage.sha256_of(f"file://{path}")
    assert storage.size_of(f"file://{path}") == 300_000


def test_http_objects_stream_and_a_missing_one_is_an_oserror(http_server):
    root, base = http_server
    (root / "x.bin").write_bytes(b"k" * 3_000_000)
    assert storage.sha256_of(f"{base}/x.bin") == (hashlib.sha256(b"k" * 3_000_000).hexdigest(), 3_000_000)
    with pytest.raises(OSError):
        storage.sha256_of(f"{base}/missing.bin")


def test_s3_objects_stream_through_the_endpoint_from_the_environment(s3_server, tmp_path):
    fs = s3_server.fs()
    fs.mkdir("store-test")
    fs.pipe("store-test/a/x.bin", b"z" * 5_000_000)
    assert storage.sha256_of("s3://store-test/a/x.bin") == (hashlib.sha256(b"z" * 5_000_000).hexdigest(), 5_000_000)
    assert storage.size_of("s3://store-test/a/x.bin") == 5_000_000
    assert storage.expand_remote("s3://store-test/a/*.bin") == ["s3://store-test/a/x.bin"]
    with pytest.raises(OSError):
        storage.sha256_of("s3://store-test/a/missing.bin")


def test_storage_options_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(storage.OPTIONS_ENV, '{"s3": {"anon": true}}')
    assert storage.storage_options("s3") == {"anon": True} and storage.storage_options("gs") == {}
    monkeypatch.setenv(storage.OPTIONS_ENV, "{broken")
    with pytest.raises(StorageError, match=storage.OPTIONS_ENV):
        storage.storage_options("s3")
