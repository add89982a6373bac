"""The bad-tar / bad-image corpus, built here, THROUGH the logits stage (a seeded smallcnn card, 28 px).

Expected outcome of every case (rows + counted failures = each intact shard's sample count):

shard 0, images: a row, converted by the documented rule, for CMYK JPEG, 16-bit grey PNG (scaled: its logits equal
those of the 8-bit image 1000*255/65535 = 4, not of 255), palette with transparency, LA, RGBA, 1-bit, EXIF
orientation 6, animated GIF (first frame), PNG bytes in a ``.jpg`` member, 1x1, 1x100000; a named, counted failure
for truncated JPEG and random bytes (``corrupt_image``), zero bytes (``empty_image``), a 20000x20000 PNG header and
one in Pillow's warning-only band (``too_many_pixels``), TIFF (``format_not_allowed``).

shard 1, names: ``img.v2.jpg`` has key ``img`` and extension ``v2.jpg`` (webdataset's first-dot rule), not an
image extension: ``missing_image``; a sample with only ``cls``: ``missing_image``; a key repeated non-adjacently:
``duplicate_key`` (the first one is the row); the same member twice in a row: one sample (the later bytes);
``../`` and leading-``/`` names: ``unsafe_key`` (no path is ever built from them); a name without a dot:
``bad_member_name``; a non-UTF-8 name: ``unsafe_key`` (keys are letters, digits and marks of any script, ``_-/``:
``stages.shardio.key_char_ok``); a 300-character
key and a nested ``dir/ok`` key: rows; symlink and
directory members: ignored (not samples).

shard 2: the key ``twin`` is also in shard 1: decided outcome: both are rows, each in its own shard's part
(a key is unique within a shard; an image's identity is (shard, key); the committed parts pass the content
checks of ``kdpipe verify``).

shards 3-6: a tar truncated exactly at a member boundary (read silently as shorter by webdataset) and mid-member,
a zero-byte tar, bytes that are not a tar: each part fails with the shard's path and reason
(``checksum_mismatch`` / ``unreadable_tar``), ``PartFailed`` names them, the other parts commit.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import manifest as mf
from pipeline.errors import PartFailed
from pipeline.hashing import sha256_file
from pipeline.parts import full_fingerprint
from stages.artifacts.checks import CHECKS
from stages.logits.stage import compute_logits
from stages.shardio import count_samples
from tests.test_imaging import _jpeg, _png_header_only, _save
from tests.test_logits_support import NAMES, train_card
from tests.test_shardio import _tar

ROW = "row"


def _png(img: Image.Image) -> bytes:
    return _save(img, "PNG")


def _image_cases() -> dict[str, tuple[bytes, str]]:
    pal = Image.new("P", (6, 4), 0)
    pal.putpalette([0, 0, 255, 9, 9, 9] + [0] * 762)
    pal.putpixel((1, 0), 1)
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("P", (5, 5), i) for i in range(2)]
    for frame in frames:
        frame.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    return {
        "good": (_jpeg(), ROW),
        "truncated_jpeg": (_jpeg()[:300], "corrupt_image"),
        "zero_bytes": (b"", "empty_image"),
        "random_bytes": (bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)), "corrupt_image"),
        "bomb": (_png_header_only(20000, 20000), "too_many_pixels"),
        "bomb_warning_band": (_png_header_only(10000, 10000), "too_many_pixels"),
        "cmyk": (_save(Image.new("CMYK", (9, 7), (0, 255, 255, 0)), "JPEG"), ROW),
        "grey16": (_png(Image.fromarray(np.full((8, 8), 1000, dtype=np.uint16))), ROW),
        "grey8_4": (_png(Image.fromarray(np.full((8, 8), 4, dtype=np.uint8))), ROW),
        "grey8_255": (_png(Image.fromarray(np.full((8, 8), 255, dtype=np.uint8))), ROW),
        "palette_transparency": (_save(pal, "PNG", transparency=1), ROW),
        "la": (_png(Image.new("LA", (5, 5), (10, 100))), ROW),
        "rgba": (_png(Image.new("RGBA", (5, 5), (200, 10, 10, 90))), ROW),
        "one_bit": (_png(Image.new("1", (6, 6), 1)), ROW),
        "exif6": (_save(Image.new("RGB", (12, 6), (0, 255, 0)), "JPEG", exif=exif.tobytes()), ROW),
        "animated_gif": (_save(frames[0], "GIF", save_all=True, append_images=frames[1:]), ROW),
        "png_in_jpg": (_png(Image.new("RGB", (7, 7), (1, 2, 3))), ROW),
        "tiff": (_save(Image.new("RGB", (4, 4)), "TIFF"), "format_not_allowed"),
        "one_by_one": (_png(Image.new("L", (1, 1), 128)), ROW),
        "one_by_100000": (_png(Image.new("L", (1, 100000), 128)), ROW),
    }


NON_UTF8 = "caf\udce9.jpg"  # written as the bytes b"caf\xe9.jpg", not UTF-8: tarfile reads back a surrogate
LONG = "k" * 300


def _name_members(jpg: bytes) -> tuple[list[tuple[str, bytes]], list[tarfile.TarInfo]]:
    members = [("img.v2.jpg", jpg), ("labelonly.cls", b"3"), ("rep.jpg", jpg), ("other.jpg", jpg), ("rep.jpg", jpg),
               ("same.jpg", b"first"), ("same.jpg", jpg), ("../../etc/x.jpg", jpg), ("/abs/y.jpg", jpg),
               ("noext", jpg), (LONG + ".jpg", jpg), ("dir/ok.jpg", jpg), (NON_UTF8, jpg), ("twin.jpg", jpg)]
    link = tarfile.TarInfo("link.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    folder = tarfile.TarInfo("folder")
    folder.type = tarfile.DIRTYPE
    return members, [link, folder]


NAME_OUTCOMES = {"img": "missing_image", "labelonly": "missing_image", "rep": "row+duplicate_key", "other": ROW,
                 "same": ROW,
                 "../../etc/x": "unsafe_key", "/abs/y": "unsafe_key", "noext": "bad_member_name", LONG: ROW,
                 "dir/ok": ROW, NON_UTF8.split(".")[0]: "unsafe_key", "twin": ROW}


def _dataset(root: Path) -> Path:
    root.mkdir(parents=True)
    images = _image_cases()
    jpg = images["good"][0]
    names, extra = _name_members(jpg)
    tars = [_tar(root / "part-000000.tar", [(f"{key}.jpg", body) for key, (body, _) in images.items()]),
            _tar(root / "part-000001.tar", names, extra),
            _tar(root / "part-000002.tar", [("twin.jpg", _jpeg((20, 20))), ("solo.jpg", jpg)])]
    full = _tar(root / "full.tar", [(f"s{i}.jpg", jpg) for i in range(4)])
    counts = [count_samples(p) for p in tars] + [4, 4, 4, 4]
    for index, body in ((3, full.read_bytes()[: 2 * 512 + 1024]), (4, full.read_bytes()[:1500]), (5, b""),
                        (6, b"definitely not a tar " * 50)):
        tars.append(root / f"part-{index:06d}.tar")
        tars[-1].write_bytes(body)
    sha = sha256_file(full)
    files = [{"path": p.name, "bytes": p.stat().st_size, "samples": n,
              "sha256": sha if i >= 3 else sha256_file(p)} for i, (p, n) in enumerate(zip(tars, counts))]
    params = {"labeled": False, "class_names": NAMES, "num_classes": len(NAMES)}
    data = mf.build("dataset", stage="test", params=params, files=files,
                    totals={"samples": sum(f["samples"] for f in files)})
    return mf.write(data, root)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    data = _dataset(root / "data")
    card = train_card(root / "teacher", None, steps=0)
    with pytest.raises(PartFailed) as failed:
        compute_logits(data, card, root / "logits", topk=3, temperature=2.0, num_workers=0, logit_dtype="float32")
    return root / "logits", data, str(failed.value)


def _outcomes(out: Path, index: int) -> dict[str, str]:
    """key -> its outcome (``row`` or the failure reason); a key seen twice -> ``"row+<reason>"``."""
    receipt = json.loads((out / "_parts" / f"part-{index:06d}.json").read_text())
    found = {key: reason for reason, keys in receipt["failures"].items() for key in keys}
    for key in pq.read_table(out / f"part-{index:06d}.parquet", columns=["key"]).column("key").to_pylist():
        found[key] = f"{ROW}+{found[key]}" if key in found else ROW
    return found


def test_every_image_case_is_a_row_by_the_rule_or_a_named_counted_failure(corpus):
    out, _, _ = corpus
    assert _outcomes(out, 0) == {key: outcome for key, (_, outcome) in _image_cases().items()}


def test_sixteen_bit_grey_reaches_the_teacher_scaled_not_clamped(corpus):
    out, _, _ = corpus
    table = pq.read_table(out / "part-000000.parquet").to_pylist()
    row = {r["key"]: (r["topk_index"], r["topk_logit"], r["lse"]) for r in table}
    assert row["grey16"] == row["grey8_4"] and row["grey16"] != row["grey8_255"]


def test_every_name_case_has_its_outcome_and_the_same_key_in_two_shards_gives_two_rows(corpus):
    out, data, _ = corpus
    assert _outcomes(out, 1) == NAME_OUTCOMES
    assert _outcomes(out, 2) == {"twin": ROW, "solo": ROW}
    same = pq.read_table(out / "part-000001.parquet").to_pylist()
    assert [r for r in same if r["key"] == "same"]  # the later bytes of an adjacent repeat (a JPEG) decoded
    manifest = mf.load(data)
    for index in (0, 1, 2):
        receipt = json.loads((out / "_parts" / f"part-{index:06d}.json").read_text())
        assert receipt["rows"] + receipt["failure_count"] == manifest.files[index]["samples"]


@pytest.mark.parametrize("index, reason", [(3, "checksum_mismatch"), (4, "unreadable_tar"), (5, "unreadable_tar"),
                                           (6, "unreadable_tar")])
def test_damaged_tars_fail_their_part_with_path_and_reason_while_the_others_commit(corpus, index, reason):
    out, data, message = corpus
    record = json.loads((out / "_parts" / f"part-{index:06d}.failed.json").read_text())
    shard = f"part-{index:06d}.tar"
    assert record["reason"] == reason and shard in record["message"], record
    assert f"part-{index:06d}" in message and not (out / f"part-{index:06d}.parquet").exists()
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-{i:06d}.parquet" for i in range(3)]


def test_committed_parts_of_the_corpus_pass_the_content_checks_of_kdpipe_verify(corpus):
    out, _, _ = corpus
    receipt = json.loads((out / "_parts" / "part-000000.json").read_text())
    manifest = mf.Manifest(out / "x.json", {"params": full_fingerprint(out, receipt["fingerprint"])["params"]})
    for index in range(3):
        name = f"part-{index:06d}.parquet"
        assert CHECKS["logits"](manifest, {"path": name}, out / name) == []
