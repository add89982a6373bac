"""What a new user with an img2dataset pool meets: clear messages and rc 2 instead of confusing results, and a
``verify`` that re-hashes remote objects (tamper or unreadable -> failure, never "intact")."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from tests.s3_helpers import make_pool


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("upool")
    make_pool(root / "pool", shards=2, samples=4)
    return root / "pool"


def test_ingest_of_a_folder_of_tars_points_to_index(pool, tmp_path, caplog):
    assert main(["ingest", str(pool), "--out", str(tmp_path / "o")]) == 2
    assert "holds 2 WebDataset shard(s) (00000.tar, 00001.tar)" in caplog.text
    assert f"kdpipe index {pool} --out DIR" in caplog.text and not (tmp_path / "o" / "manifest.json").exists()


def test_ingest_of_a_list_of_tars_or_urls_or_a_url_points_to_index(pool, tmp_path, caplog):
    tars = tmp_path / "tars.txt"
    tars.write_text(f"{pool}/00000.tar\n{pool}/00001.tar\n")
    urls = tmp_path / "urls.txt"
    urls.write_text("https://host.invalid/pool/00000.tar\n")
    for src, said in [(tars, "holds 2 WebDataset shard(s)"), (urls, "lists 1 URL(s)"),
                      ("s3://bucket/pool/", "is a URL")]:
        caplog.clear()
        assert main(["ingest", str(src), "--out", str(tmp_path / "o")]) == 2
        assert said in caplog.text and "kdpipe index" in caplog.text


def test_ingest_of_files_that_are_no_images_is_an_error_not_an_empty_dataset(tmp_path, caplog):
    (tmp_path / "src").mkdir()
    for name in ("a.bin", "b.bin"):
        (tmp_path / "src" / name).write_bytes(b"not an image")
    assert main(["ingest", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 2
    assert "a dataset of 0 samples is refused" in caplog.text and not (tmp_path / "o" / "manifest.json").exists()


def test_verify_re_hashes_remote_objects(pool, tmp_path, s3_server, caplog):
    fs = s3_server.fs()
    fs.mkdir("verify-pool")
    s3_server.upload(pool, "verify-pool/pool")
    assert main(["index", "s3://verify-pool/pool/", "--out", str(tmp_path / "idx")]) == 0
    assert main(["verify", str(tmp_path / "idx"), "--jobs", "4"]) == 0 and "is intact" in caplog.text
    data = bytearray((pool / "00001.tar").read_bytes())
    data[700] ^= 1
    fs.pipe("verify-pool/pool/00001.tar", bytes(data))
    caplog.clear()
    assert main(["verify", str(tmp_path / "idx")]) == 1
    assert "s3://verify-pool/pool/00001.tar: sha256 differs" in caplog.text and "intact" not in caplog.text
    fs.rm("verify-pool/pool/00000.tar")
    caplog.clear()
    assert main(["verify", str(tmp_path / "idx"), "--jobs", "2"]) == 1
    assert "s3://verify-pool/pool/00000.tar: could not be read, so it is NOT verified" in caplog.text


def test_verify_of_urls_that_cannot_be_read_is_not_intact(pool, tmp_path, http_server, caplog):
    root, base = http_server
    (root / "gone").mkdir()
    for path in pool.glob("*.tar"):
        (root / "gone" / path.name).write_bytes(path.read_bytes())
    assert main(["index", f"{base}/gone/{{00000..00001}}.tar", "--out", str(tmp_path / "idx")]) == 0
    for path in (root / "gone").glob("*.tar"):
        path.unlink()
    caplog.clear()
    assert main(["verify", str(tmp_path / "idx")]) == 1
    assert caplog.text.count("NOT verified") == 2 and "intact" not in caplog.text


@pytest.mark.parametrize("command", [["reshard", "--selection", "S"], ["select", "--logits", "L", "--per-class", "1"],
                                     ["index", "pool"]])
def test_a_read_only_url_as_out_is_refused_by_name_and_makes_no_local_folder(command, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--out", "https://host/x"]) == 2
    assert "--out https://host/x: `kdpipe" in caplog.text and "http(s) is read-only" in caplog.text
    assert not (tmp_path / "https:").exists()


def test_an_object_storage_out_of_a_stage_that_writes_folders_only_is_refused_by_name(tmp_path, caplog):
    assert main(["dedup", "--query", "L", "--out", "s3://bucket/x"]) == 2
    assert "--out s3://bucket/x: `kdpipe dedup` writes its parts to a local or shared-filesystem folder" in caplog.text


def test_a_hand_written_manifest_pointing_outside_its_folder_points_to_index(pool, tmp_path, caplog):
    from pipeline import manifest as mf

    data = mf.build("dataset", stage="hand", params={"labeled": False},
                    files=[{"path": "x.tar", "bytes": 1, "sha256": "a" * 64, "samples": 4}], totals={"samples": 4})
    data["files"][0]["path"] = str(pool / "00000.tar")
    data["id"] = mf.content_id(data)
    mf.write(data, tmp_path / "hand")
    assert main(["logits", "--data", str(tmp_path / "hand"), "--teacher", "T", "--topk", "1", "--temperature", "1",
                 "--out", str(tmp_path / "o")]) == 2
    assert "is absolute" in caplog.text and "run `kdpipe index`" in caplog.text
