"""Bad tars built here: every sample is accounted for, or the shard fails with its path and reason."""

import io
import tarfile
from pathlib import Path

import pytest

from pipeline.errors import PartFailed
from pipeline.hashing import sha256_file
from stages.shardio import ShardStats, count_samples, read_shard, write_shard


def _tar(path: Path, members: list[tuple[str, bytes]], extra=None) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return path


def _read(path, expected=None, sha=None):
    stats = ShardStats(str(path))
    samples = list(read_shard(path, stats, expected_sha256=sha, expected_samples=expected))
    return samples, stats


GOOD = [("a.jpg", b"1"), ("a.cls", b"0"), ("b.jpg", b"2"), ("b.cls", b"1"), ("c.jpg", b"3"), ("c.cls", b"1")]


def test_a_good_shard_yields_every_sample_in_order(tmp_path):
    samples, stats = _read(_tar(tmp_path / "s.tar", GOOD), expected=3, sha=None)
    assert [k for k, _ in samples] == ["a", "b", "c"] and samples[1][1] == {"jpg": b"2", "cls": b"1"}
    assert stats.failed == 0 and stats.sha256 == sha256_file(tmp_path / "s.tar")


def test_truncated_at_a_member_boundary_is_caught_by_the_count(tmp_path):
    full = _tar(tmp_path / "full.tar", GOOD).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[: 512 * 8])  # 4 members of 2 blocks each: samples a and b only, no end marker
    with pytest.raises(PartFailed) as info:
        _read(cut, expected=3)
    assert info.value.reason == "sample_count_mismatch" and "cut.tar" in str(info.value)


def test_truncated_mid_member_fails_the_part(tmp_path):
    full = _tar(tmp_path / "full.tar", [("a.jpg", b"x" * 5000)]).read_bytes()
    (tmp_path / "mid.tar").write_bytes(full[:2048])
    with pytest.raises(PartFailed) as info:
        _read(tmp_path / "mid.tar", expected=1)
    assert info.value.reason == "unreadable_tar"


@pytest.mark.parametrize("payload", [b"", b"this is not a tar file at all" * 40])
def test_zero_bytes_or_garbage_fail_the_part(tmp_path, payload):
    (tmp_path / "bad.tar").write_bytes(payload)
    with pytest.raises(PartFailed):
        _read(tmp_path / "bad.tar", expected=1)


def test_checksum_mismatch_is_named(tmp_path):
    path = _tar(tmp_path / "s.tar", GOOD)
    with pytest.raises(PartFailed) as info:
        _read(path, expected=3, sha="0" * 64)
    assert info.value.reason == "checksum_mismatch"


def test_repeated_keys_are_counted_failures(tmp_path):
    members = [("a.jpg", b"1"), ("b.jpg", b"2"), ("a.jpg", b"3"), ("a.cls", b"x")]  # non-adjacent repeat
    samples, stats = _read(_tar(tmp_path / "s.tar", members), expected=3)
    assert [k for k, _ in samples] == ["a", "b"] and stats.failures == {"duplicate_key": ["a"]}
    adjacent = [("a.jpg", b"1"), ("a.jpg", b"2")]  # the same member twice: the later one wins, one sample
    samples, stats = _read(_tar(tmp_path / "t.tar", adjacent), expected=1)
    assert samples == [("a", {"jpg": b"2"})]


def test_unsafe_and_odd_names(tmp_path):
    members = [("../../etc/x.jpg", b"1"), ("/abs/y.jpg", b"2"), ("img.v2.jpg", b"3"), ("noext", b"4"),
               ("dir/ok.jpg", b"5"), ("k" * 300 + ".jpg", b"6"), ("caf\udce9.jpg", b"7"), ("café.jpg", b"8")]
    link = tarfile.TarInfo("link.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    folder = tarfile.TarInfo("folder")
    folder.type = tarfile.DIRTYPE
    samples, stats = _read(_tar(tmp_path / "s.tar", members, extra=[link, folder]))
    keys = [k for k, _ in samples]
    assert "img" in keys and dict(samples)["img"] == {"v2.jpg": b"3"}  # key up to the first dot
    assert "dir/ok" in keys and "k" * 300 in keys and "café" in keys  # a UTF-8 name is a key as it is
    assert stats.failures["unsafe_key"][-1] == "caf\udce9"  # bytes that are not UTF-8 are not
    assert set(stats.failures) == {"unsafe_key", "bad_member_name"}
    assert "../../etc/x" in stats.failures["unsafe_key"] and "/abs/y" in stats.failures["unsafe_key"]
    assert stats.failures["bad_member_name"] == ["noext"]
    assert not any("link" in k or "folder" in k for k in keys)  # symlinks and folders are not samples


def test_write_shard_is_deterministic_and_countable(tmp_path):
    samples = [{"__key__": f"k{i}", "png": b"x" * i, "cls": b"1"} for i in range(5)]
    write_shard(tmp_path / "a.tar", iter(samples))
    write_shard(tmp_path / "b.tar", iter(samples))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert count_samples(tmp_path / "a.tar") == 5
