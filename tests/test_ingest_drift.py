"""An ingest records what it read; a rerun over a changed source is refused, naming the files (issue 16, case 4).

Each scenario: a real ``kdpipe ingest`` of 12 PNGs (4 shards of 3) SIGKILLed right after its second receipt
(``KDPIPE_FAULT=part.receipt:2``), the source changed, then a plain rerun:
- a file modified in place with the same size (in a committed part), a file added (before the committed parts,
  and after them where no part is committed yet), a file removed (from the uncommitted tail): exit 2 naming the
  file and the kind of change; nothing in the output folder changes;
- the source unchanged (or restored): the rerun completes, byte-identical to a clean run (manifest id, every part);
- receipts name each part's listing (``_source/listing-NNNNNN.json``: origin, key, bytes, mtime, sha256 per item).
And ``kdpipe verify`` never calls a dataset with a key twice intact: the same key in two shards of an ingested
dataset, or twice in one shard, is named (exit 1).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.hashing import sha256_file
from tests.test_reliability_support import snapshot

ROOT = Path(__file__).resolve().parents[1]
NAMES = [f"img{i:02d}.png" for i in range(12)]


def _png(color: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), (color, 255 - color, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def _source(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for index, name in enumerate(NAMES):
        (folder / name).write_bytes(_png(10 * index))
    return folder


def _ingest(src: Path, out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KDPIPE_FAULT", None)
    if fault:
        env["KDPIPE_FAULT"] = fault
    code = "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "ingest", str(src), "--out", str(out), "--shard-size", "3"],
                          cwd=ROOT, env=env, capture_output=True, timeout=120)


def _parts(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.glob("part-*.tar"))}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    src = _source(root / "src")
    assert _ingest(src, root / "out").returncode == 0
    return root / "out"


@pytest.fixture()
def interrupted(tmp_path):
    """(source, output) of an ingest killed right after its second part's receipt."""
    src = _source(tmp_path / "src")
    done = _ingest(src, tmp_path / "out", fault="part.receipt:2")
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert len(list((tmp_path / "out" / "_parts").glob("part-*.json"))) == 2
    assert not (tmp_path / "out" / mf.MANIFEST_NAME).exists()
    return src, tmp_path / "out"


def _same_size_edit(src: Path) -> str:
    old = (src / "img01.png").read_bytes()
    new = _png(250)
    assert len(new) == len(old) and new != old
    (src / "img01.png").write_bytes(new)
    return "modified: " + str(src / "img01.png")


@pytest.mark.parametrize("change", ["modified_same_size", "added_before", "added_after", "removed_after"])
def test_a_changed_source_is_refused_naming_the_file_and_nothing_changes(interrupted, change, caplog):
    src, out = interrupted
    if change == "modified_same_size":
        expected = _same_size_edit(src)
    elif change == "added_before":
        (src / "img00b.png").write_bytes(_png(3))
        expected = "added: " + str(src / "img00b.png")
    elif change == "added_after":
        (src / "zz.png").write_bytes(_png(5))
        expected = "added: " + str(src / "zz.png")
    else:
        (src / "img11.png").unlink()
        expected = "removed: " + str(src / "img11.png")
    before = snapshot(out)
    with caplog.at_level(logging.ERROR):
        assert main(["ingest", str(src), "--out", str(out), "--shard-size", "3"]) == 2
    message = caplog.records[-1].getMessage()
    assert expected in message and "the source changed since the ingest" in message and "--out" in message
    assert snapshot(out) == before


def test_an_unchanged_or_restored_source_reruns_to_the_clean_bytes(interrupted, tmp_path):
    src, out = interrupted
    original = (src / "img01.png").read_bytes()
    _same_size_edit(src)
    assert main(["ingest", str(src), "--out", str(out), "--shard-size", "3"]) == 2
    (src / "img01.png").write_bytes(original)  # restored: same bytes, a new mtime (hashed, found equal)
    assert main(["ingest", str(src), "--out", str(out), "--shard-size", "3"]) == 0
    assert _ingest(src, tmp_path / "clean").returncode == 0  # the manifest records the source path: same src
    assert _parts(out) == _parts(tmp_path / "clean") and mf.load(out).id == mf.load(tmp_path / "clean").id
    before = snapshot(out)
    assert main(["ingest", str(src), "--out", str(out), "--shard-size", "3"]) == 0
    assert snapshot(out) == before


def test_receipts_name_a_listing_with_sizes_and_hashes_of_what_was_read(clean):
    receipt = json.loads((clean / "_parts" / "part-000001.json").read_bytes())
    listing = clean / receipt["input"]["listing"]
    assert hashlib.sha256(listing.read_bytes()).hexdigest() == receipt["input"]["listing_sha256"]
    rows = json.loads(listing.read_bytes())["items"]
    src = clean.parent / "src"
    assert [r[:3] for r in rows] == [[str(src / n), n[:-4], len((src / n).read_bytes())] for n in NAMES[3:6]]
    assert [r[4] for r in rows] == [hashlib.sha256((src / n).read_bytes()).hexdigest() for n in NAMES[3:6]]


def _rewrite(out: Path, shard: Path, members: list[tuple[str, bytes]]) -> None:
    """Replace ``shard`` by a tar of ``members`` and rewrite the manifest so that every byte matches it."""
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    old = mf.load(out)
    files = [{**e, "bytes": (out / e["path"]).stat().st_size, "sha256": sha256_file(out / e["path"]),
              "samples": e["samples"]} for e in old.files]
    data = mf.build("dataset", stage="ingest", params=old.params, files=files, totals=old.totals)
    (out / mf.MANIFEST_NAME).unlink()
    mf.write(data, out)


def test_verify_names_a_key_in_two_shards_of_an_ingested_dataset(clean, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    assert main(["verify", str(out)]) == 0
    png = _png(1)
    _rewrite(out, out / "part-000001.tar", [("img00.png", png), ("img04.png", png), ("img05.png", png)])
    with caplog.at_level(logging.ERROR):
        assert main(["verify", str(out)]) == 1
    assert "'img00' in part-000000.tar and part-000001.tar" in caplog.text


def test_verify_names_a_key_twice_in_one_shard(clean, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    png = _png(1)
    _rewrite(out, out / "part-000001.tar", [("img03.png", png), ("img04.png", png), ("img03.png", png)])
    with caplog.at_level(logging.ERROR):
        assert main(["verify", str(out)]) == 1
    assert "key(s) 'img03' appear twice in this shard" in caplog.text


def test_a_grown_dataset_rerun_over_a_changed_new_source_is_refused(clean, tmp_path, caplog):
    src = _source(tmp_path / "new")
    for name in NAMES:  # other keys than the base's
        (src / name).rename(src / f"n{name}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDPIPE_FAULT": "part.receipt:6"}  # 4 base links, 2 new parts
    code = "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["ingest", str(src), "--out", str(tmp_path / "grown"), "--shard-size", "3", "--base", str(clean)]
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    (src / "nimg00.png").unlink()
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert "removed: " + str(src / "nimg00.png") in caplog.records[-1].getMessage()
    (src / "nimg00.png").write_bytes(_png(0))
    assert main(argv) == 0 and len(mf.load(tmp_path / "grown").files) == 8
