"""Keys keep non-ASCII names, collisions say truthfully why, non-regular files are skipped (issue 16, case 7).

- ``中国.png`` and ``日本.png`` give the keys ``中国`` and ``日本`` (they used to both become ``__``); webdataset
  itself reads them back under those keys; a name is NFC-normalised, so an NFD ``café`` gives the NFC key;
- two names that still meet in one key are refused naming both and the true reason: the extension, Unicode
  normalisation, or the replaced characters (listed);
- ASCII names keep the keys they always had (the table below; ``tests/test_ingest.py`` has the older rows);
- a FIFO in a file list does not hang ingest (the FIFO is never opened); FIFOs, sockets and devices in a folder
  are skipped and counted by reason in the manifest's ``totals.skipped``; a source without them has no such key.
"""

from __future__ import annotations

import io
import os
import random
import re
import socket
import string
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from PIL import Image

from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.errors import InputError
from stages.ingest.sources import make_key
from stages.ingest.stage import ingest
from stages.shardio import ShardStats, read_shard

ROOT = Path(__file__).resolve().parents[1]


def _png(color: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (color, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _keys(folder: Path) -> list[str]:
    manifest = mf.load(folder)
    return [key for entry in manifest.files for key, _ in read_shard(manifest.file_path(entry), ShardStats("x"))]


def test_non_ascii_names_give_distinct_keys_that_webdataset_reads_back(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for index, name in enumerate(["中国.png", "日本.png", "Ελλάδα.png", "हिन्दी.png", "plain.png"]):
        (src / name).write_bytes(_png(index))
    assert main(["ingest", str(src), "--out", str(tmp_path / "out")]) == 0
    keys = sorted(_keys(tmp_path / "out"))
    assert keys == sorted(["中国", "日本", "Ελλάδα", "हिन्दी", "plain"])
    import webdataset as wds
    read = sorted(s["__key__"] for s in wds.WebDataset(str(tmp_path / "out" / "part-000000.tar"), shardshuffle=False))
    assert read == keys


def test_names_are_nfc_normalised(tmp_path):
    nfd = unicodedata.normalize("NFD", "café.png")
    assert make_key(nfd) == unicodedata.normalize("NFC", "café") != nfd.split(".")[0]


@pytest.mark.parametrize("first, second, why", [
    ("x.png", "x.jpg", r"the same name up to the extension"),
    (unicodedata.normalize("NFC", "café.png"), unicodedata.normalize("NFD", "café.png"),
     r"the same name once Unicode-normalised \(NFC\)"),
    ("a b.png", "a_b.png", r"differ only in such characters \(' '\)"),
    ("img.v2.png", "img_v2.png", r"differ only in such characters \('\.'\)"),
    ("中国!.png", "中国?.png", r"differ only in such characters \('!' '\?'\)"),
])
def test_a_collision_names_both_files_and_the_true_reason(tmp_path, first, second, why):
    (tmp_path / first).write_bytes(_png(1))
    (tmp_path / second).write_bytes(_png(2))
    a, b = (re.escape(n) for n in sorted([first, second]))
    with pytest.raises(InputError, match=rf"duplicate key .*{a} and .*{b} both map to it.*{why}"):
        ingest(str(tmp_path), tmp_path / "out")
    assert main(["ingest", str(tmp_path), "--out", str(tmp_path / "out")]) == 2


def _old_make_key(relative: str) -> str:
    """``make_key`` as it was before non-ASCII names were kept (the reference for ASCII names)."""
    stem = relative.rsplit(".", 1)[0] if "." in Path(relative).name else relative
    key = re.sub(r"[^A-Za-z0-9_\-/]", "_", stem.replace("\\", "/"))
    key = "/".join(part.strip("/") or "_" for part in key.split("/") if part not in ("", "."))
    return key.replace("..", "__") or "_"


def test_ascii_names_keep_their_keys():
    rng = random.Random(0)
    names = ["a/b.jpg", "img.v2.jpg", "../x.png", "we ird$.png", "n01440764/n01440764_10026.JPEG", "./a//b.png",
             "x.tar.gz", "tab\there.png", "noext", "a\\b.png", "..", ".", "/abs/p.png", "-x-.png"]
    names += ["".join(rng.choice(string.printable[:95]) for _ in range(rng.randint(1, 24))) for _ in range(3000)]
    assert [make_key(n) for n in names] == [_old_make_key(n) for n in names]


def test_a_fifo_in_a_file_list_does_not_hang_ingest_and_is_counted(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(1))
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "list.txt").write_text("a.png\npipe.png\n")
    code = ("import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "ingest", str(tmp_path / "list.txt"), "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    manifest = mf.load(tmp_path / "out")
    assert manifest.totals["samples"] == 1 and manifest.totals["skipped"] == {"fifo": 1}
    assert b"pipe.png" in done.stderr


def test_fifos_sockets_and_devices_in_a_folder_are_skipped_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(_png(1))
    os.mkfifo(src / "f.png")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(src / "s.png"))
    (src / "d.png").symlink_to("/dev/null")
    (src / "gone.png").symlink_to(src / "nowhere")
    try:
        assert main(["ingest", str(src), "--out", str(tmp_path / "out")]) == 0
    finally:
        server.close()
    manifest = mf.load(tmp_path / "out")
    assert manifest.totals["samples"] == 1
    assert manifest.totals["skipped"] == {"broken_link": 1, "device": 1, "fifo": 1, "socket": 1}


def test_an_ordinary_source_has_no_skipped_entry(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(_png(1))
    assert main(["ingest", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    assert "skipped" not in mf.load(tmp_path / "out").totals
