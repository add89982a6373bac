"""Errors a user can cause are named (file, cause, what to do) and exit 2, never a traceback (issue 16, case 6).

- output on a read-only filesystem (a real read-only tmpfs as root, a 0555 folder otherwise): ``ingest``,
  ``logits`` and ``select`` exit 2 naming the folder/file and "read-only", for a new ``--out`` and for an ``--out``
  whose folders already exist (the first part's write fails: the task stops at once, nothing is published);
- ENOSPC at every write site of ``select`` (a real 512 KiB tmpfs filled to several levels so that the disk runs
  out in the map, the reduce, the report or the manifest): exit 0 when it fits, else exit 2 naming the file and
  "No space left"; no temp file left, and every visible part has its receipt; ``ingest`` on a full disk names the
  first failed shard and the cause;
- a ``.safetensors`` file that is not one ("header too large") -> named ``InputError``, exit 2;
- a manifest entry that is a symlink loop: ``verify`` names it (exit 1, "damaged") and ``select`` exits 2;
- a YAML alias bomb (a ~370-byte billion laughs) is refused in well under a second, named; a recursive alias and
  a config over 1 MiB (refused before it is read) too; anchors within the limits still work.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import manifest as mf
from pipeline.atomic import TEMP_PREFIX
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.safe_yaml import MAX_BYTES, load_yaml
from tests.factories import make_logits, random_shards
from tests.test_logits_support import digits_data, train_card

BOMB = "\n".join([
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
    *(f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")),
    "stages: {x: {command: ingest, args: {v: *i}}}", ""])  # args values are walked by the config hash


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


@pytest.fixture()
def readonly(tmp_path):
    """A folder that cannot be written, holding ``old/_parts`` (an existing output): a read-only tmpfs as root,
    a 0555 folder otherwise; skipped (saying why) when neither works."""
    root = tmp_path / "ro"
    if os.geteuid() != 0:
        (root / "old" / "_parts").mkdir(parents=True)
        for folder in (root / "old" / "_parts", root / "old", root):
            folder.chmod(0o555)
        yield root
        for folder in (root, root / "old", root / "old" / "_parts"):
            folder.chmod(0o755)
        return
    if not _mount_tmpfs(root, "size=1m"):
        pytest.skip("running as root and cannot mount a tmpfs: no way to make a folder read-only")
    (root / "old" / "_parts").mkdir(parents=True)
    subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
    yield root
    subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 40-sample digits dataset, a seeded teacher card and synthetic logits (10 classes, 2 shards)."""
    root = tmp_path_factory.mktemp("inputs")
    data = digits_data(root / "data", shard_size=20, samples=40)
    card = train_card(root / "teacher", None, steps=0)
    logits = make_logits(root / "logits", random_shards(np.random.default_rng(0), 2, 30, 10), topk=3)
    return {"data": data, "card": card, "logits": logits}


def _argv(stage: str, inputs: dict, out: Path) -> list[str]:
    return {"ingest": ["ingest", "digits", "--shard-size", "500"],
            "logits": ["logits", "--data", str(inputs["data"]), "--teacher", str(inputs["card"]), "--topk", "3",
                       "--temperature", "2", "--num-workers", "0"],
            "select": ["select", "--logits", str(inputs["logits"]), "--per-class", "3", "--top-p", "2"],
            }[stage] + ["--out", str(out)]


def _no_half_written(out: Path) -> None:
    """No temp file anywhere; every JSON file parses; every part with a receipt has the receipt's size; a
    manifest, if one was published, loads (schema, id, every file path)."""
    assert not [p for p in out.rglob(f"{TEMP_PREFIX}*")]
    for path in out.rglob("*.json"):
        receipt = json.loads(path.read_bytes())
        part = path.parent.parent / str(receipt.get("file", ""))
        if path.parent.name == "_parts" and "file" in receipt:
            assert part.stat().st_size == receipt["bytes"], part
    if (out / mf.MANIFEST_NAME).exists():
        mf.load(out)


@pytest.mark.parametrize("stage", ["ingest", "logits", "select"])
@pytest.mark.parametrize("folder", ["new", "old"])
def test_readonly_output_is_named_and_exits_2(stage, folder, inputs, readonly, caplog):
    out = readonly / folder
    with caplog.at_level(logging.ERROR):
        assert main(_argv(stage, inputs, out)) == 2
    message = caplog.records[-1].getMessage()
    assert str(out) in message and ("Read-only" in message or "Permission denied" in message)
    assert "--out" in message and "Traceback" not in caplog.text
    assert not [p for p in out.rglob("part-*")] if out.exists() else True


@pytest.fixture()
def tiny_disk(tmp_path):
    mount = tmp_path / "tiny"
    if not _mount_tmpfs(mount, "size=512k"):
        pytest.skip("cannot mount a tmpfs here (needs root): no real full disk to test")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_enospc_at_every_select_write_site_is_named_and_publishes_nothing_half_written(inputs, tiny_disk, caplog):
    free = os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize
    outcomes = set()
    for left in (0, 8 << 10, 24 << 10, 48 << 10, 96 << 10, 160 << 10, free):
        for path in tiny_disk.iterdir():
            subprocess.run(["rm", "-rf", str(path)], check=True)
        (tiny_disk / "filler").write_bytes(b"\0" * max(0, free - left))
        caplog.clear()
        out = tiny_disk / "sel"
        with caplog.at_level(logging.ERROR):
            rc = main(_argv("select", inputs, out))
        outcomes.add(rc)
        assert rc in (0, 2), caplog.text
        if rc == 2:
            message = caplog.records[-1].getMessage()
            assert "No space left on device" in message and str(out) in message, message
        assert "Traceback" not in caplog.text
        _no_half_written(out)
    assert outcomes == {0, 2}


def test_ingest_on_a_full_disk_names_the_shard_and_the_cause(tiny_disk, caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["ingest", "digits", "--out", str(tiny_disk / "ds"), "--shard-size", "400"]) == 2
    message = caplog.records[-1].getMessage()
    assert f"{tiny_disk / 'ds' / 'part-000000.tar'}: [Errno 28] No space left on device" in message
    _no_half_written(tiny_disk / "ds")


def test_a_safetensors_file_that_is_not_one_is_a_named_error(tmp_path, caplog):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"\xff" * 64)  # its first 8 bytes read as a header length of 2^64 - 1
    with caplog.at_level(logging.ERROR):
        assert main(["teacher", "--import", str(bad), "--classes", "10", "--arch", "smallcnn", "--size", "28",
                     "--out", str(tmp_path / "t")]) == 2
    message = caplog.records[-1].getMessage()
    assert str(bad) in message and "not a valid safetensors file" in message and "header too large" in message


def _loop(folder: Path, name: str) -> None:
    """Replace ``folder/name`` by a symlink loop (name -> loop -> name)."""
    (folder / name).unlink()
    (folder / "loop").symlink_to(name)
    (folder / name).symlink_to("loop")


def test_a_symlink_loop_in_a_manifest_is_named_by_verify_and_select(inputs, tmp_path, caplog):
    data, logits = tmp_path / "data", tmp_path / "logits"
    subprocess.run(["cp", "-r", str(Path(inputs["data"]).parent), str(data)], check=True)
    subprocess.run(["cp", "-r", str(Path(inputs["logits"]).parent), str(logits)], check=True)
    _loop(data, "part-000001.tar")
    _loop(logits, "part-000001.parquet")
    with caplog.at_level(logging.ERROR):
        assert main(["verify", str(data)]) == 1
        assert "'part-000001.tar' cannot be resolved" in caplog.text and "symlink loop" in caplog.text
        caplog.clear()
        assert main(_argv("select", inputs, tmp_path / "sel")[:2] + [str(logits)] +
                    _argv("select", inputs, tmp_path / "sel")[3:]) == 2
    assert "'part-000001.parquet' cannot be resolved" in caplog.text and "Traceback" not in caplog.text


def test_a_yaml_alias_bomb_is_refused_in_well_under_a_second(tmp_path, caplog):
    config = tmp_path / "bomb.yaml"
    config.write_text(BOMB)
    assert len(BOMB) < 700
    started = time.perf_counter()
    with caplog.at_level(logging.ERROR):
        assert main(["run", str(config)]) == 2
    assert time.perf_counter() - started < 1.0
    assert str(config) in caplog.text and "alias bomb" in caplog.text


def test_recursive_aliases_and_oversized_configs_are_refused_and_normal_anchors_load(tmp_path):
    with pytest.raises(InputError, match="recursive YAML structure"):
        load_yaml("a: &a [1, *a]\n", "x.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_BYTES + "\nstages: {}\n")
    with pytest.raises(InputError, match=rf"big.yaml: {big.stat().st_size} bytes, more than the {MAX_BYTES}"):
        load_config(big)
    assert load_yaml("d: &d {k: 1}\ne: *d\nf: [*d, *d]\n") == {"d": {"k": 1}, "e": {"k": 1}, "f": [{"k": 1}] * 2}
