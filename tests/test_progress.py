"""Live progress and throughput: periodic lines off a terminal, a tqdm bar on one (a real pty), samples/s in
receipts, ``kdpipe status`` throughput and ETA of a half-done folder, and receipts whose size does not grow with
the class count (the class names are kept once, in the manifest and the folder's fingerprint file)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.parts import FINGERPRINT_PREFIX
from pipeline.progress import INTERVAL_ENV, MODE_ENV, busy_seconds, throughput
from stages.artifacts.logits_format import read_metadata
from stages.logits.stage import compute_logits
from stages.reshard.stage import reshard
from stages.select.stage import select
from stages.train.config import TrainConfig
from stages.train.loop import train
from tests.test_logits_support import jpeg, make_dataset, train_card
from tests.test_train_data import digits

REPO = Path(__file__).resolve().parents[1]
KDPIPE = [sys.executable, "-m", "pipeline"]
LINE = re.compile(r"logits: (\d+)/(\d+) parts, (\d+) samples, ([\d.?]+) samples/s, ETA (\d+:\d\d:\d\d|\?)")
VOLATILE = ("bytes", "seconds", "samples_per_s", "finished_at", "rows")  # numbers that depend on data and time


def _names(n: int) -> list[str]:
    return [f"class-{i:04d}" for i in range(n)]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """An unlabeled pool of 3 shards x 4 JPEGs and seeded (untrained) cards with 10 and 1000 classes."""
    root = tmp_path_factory.mktemp("progress")
    rng = np.random.default_rng(0)
    shards = [[{"__key__": f"s{s}-{i:02d}", "jpg": jpeg(rng)} for i in range(4)] for s in range(3)]
    data = make_dataset(root / "data", shards)
    cards = {n: train_card(root / f"card{n}", None, classes=_names(n)) for n in (10, 1000)}
    return root, data, cards


def _lines(text: str) -> list[tuple[int, int, int, str, str]]:
    return [(int(a), int(b), int(c), d, e) for a, b, c, d, e in LINE.findall(text)]


def test_off_a_terminal_a_logits_run_logs_parts_samples_rate_and_eta_at_the_interval(pool, monkeypatch, caplog):
    root, data, cards = pool
    monkeypatch.setenv(INTERVAL_ENV, "0")
    monkeypatch.delenv(MODE_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="kdpipe.progress"):
        compute_logits(data, cards[10], root / "every", topk=3, temperature=1.0, num_workers=0, batch_size=2)
    lines = _lines(caplog.text)
    # a line per compute batch of 2 (the part in flight), per part, and the end
    assert [(d, s) for d, _, s, _, _ in lines] == [(0, 2), (0, 4), (1, 4), (1, 6), (1, 8), (2, 8), (2, 10),
                                                   (2, 12), (3, 12), (3, 12)]
    assert all(float(r) > 0 for *_, r, _ in lines) and lines[-1][4] == "0:00:00"
    assert all(e != "?" for *_, e in lines)  # the ETA is known from the manifest's sample counts
    caplog.clear()
    monkeypatch.setenv(INTERVAL_ENV, "3600")
    with caplog.at_level(logging.INFO, logger="kdpipe.progress"):
        compute_logits(data, cards[10], root / "hourly", topk=3, temperature=1.0, num_workers=0, batch_size=2)
    assert [line[:3] for line in _lines(caplog.text)] == [(3, 3, 12)]  # the interval not reached: the end only


def test_ingest_with_progress_interval_0_logs_every_image_and_every_part(tmp_path, monkeypatch, caplog):
    rng = np.random.default_rng(1)
    (tmp_path / "images").mkdir()
    for i in range(10):
        (tmp_path / "images" / f"img{i:02d}.jpg").write_bytes(jpeg(rng))
    monkeypatch.setenv(INTERVAL_ENV, "30")  # restored after the test: main() sets it from the flag
    monkeypatch.delenv(MODE_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="kdpipe.progress"):
        assert main(["--progress-interval", "0", "ingest", str(tmp_path / "images"), "--out", str(tmp_path / "out"),
                     "--shard-size", "4"]) == 0
    found = re.findall(r"ingest: (\d+)/3 parts, (\d+) samples, [\d.]+ samples/s, ETA \d+:\d\d:\d\d", caplog.text)
    assert [(int(d), int(n)) for d, n in found] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 4), (1, 5), (1, 6), (1, 7),
                                                    (1, 8), (2, 8), (2, 9), (2, 10), (3, 10), (3, 10)]


def test_receipts_carry_samples_seconds_and_samples_per_s(pool, monkeypatch):
    root, data, cards = pool
    started = time.time()
    out = compute_logits(data, cards[10], root / "rates", topk=3, temperature=1.0, num_workers=0).parent
    for index in range(3):
        receipt = json.loads((out / "_parts" / f"part-{index:06d}.json").read_text())
        assert receipt["samples"] == 4 and receipt["seconds"] > 0
        assert receipt["samples_per_s"] == pytest.approx(4 / receipt["seconds"], rel=0.05, abs=0.1)
        assert started <= receipt["finished_at"] <= time.time()


def _pty_run(argv: list[str], env: dict) -> str:
    """Run ``argv`` with stdout and stderr on a real pseudo-terminal (120 columns); return what it wrote."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd=REPO)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=120) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


def test_on_a_terminal_the_task_draws_a_tqdm_bar_with_parts_samples_rate_and_eta(pool):
    root, data, cards = pool
    env = {k: v for k, v in os.environ.items() if k not in (MODE_ENV, INTERVAL_ENV)}
    text = _pty_run(KDPIPE + ["logits", "--data", str(data), "--teacher", str(cards[10]), "--topk", "3",
                              "--temperature", "1", "--out", str(root / "tty"), "--num-workers", "0"],
                    {**env, "OMP_NUM_THREADS": "1"})
    bars = re.findall(r"logits: +(\d+)%\|([^|]*)\| (\d+)/3 parts, (\d+) samples, [\d.]+ samples/s, ETA [\d:]+", text)
    assert bars and bars[-1][0] == "100" and bars[-1][2:] == ("3", "12"), text[-2000:]
    assert "\r" in text and "\u2588" in bars[-1][1]  # redrawn in place, tqdm's full block
    assert "kdpipe.progress" not in text  # no log lines on a terminal: the bar is the progress


def test_status_of_a_half_done_logits_folder_shows_throughput_and_eta(pool, capsys, monkeypatch, caplog):
    root, data, cards = pool
    out = root / "half"
    assert compute_logits(data, cards[10], out, topk=3, temperature=1.0, num_workers=0, num_tasks=2) is None
    receipts = [json.loads(p.read_text()) for p in sorted((out / "_parts").glob("part-*.json"))]
    assert len(receipts) == 2  # task 0 of 2 owns parts 0 and 1; part 2 is missing
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"partial +2/3", text), text
    shown = re.search(r"throughput: 8 samples, ([\d.]+) samples/s \(([\d.]+) per task\), busy (\S+), ETA (\S+)", text)
    assert shown, text
    busy = busy_seconds([(r["finished_at"] - r["seconds"], r["finished_at"]) for r in receipts])
    assert float(shown.group(1)) == round(8 / busy, 1)  # one task: busy time = the parts' time, end to end
    assert float(shown.group(2)) == round(8 / sum(r["seconds"] for r in receipts), 1)
    assert main(["status", str(out), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)[0]["folders"][0]["throughput"]
    assert figures["parts"] == 2 and figures["samples"] == 8 and figures["eta_s"] == round(busy / 2, 1)
    monkeypatch.setenv(INTERVAL_ENV, "0")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kdpipe.progress"):  # the rest: done parts shown as done
        compute_logits(data, cards[10], out, topk=3, temperature=1.0, num_workers=0)
    assert [line[:3] for line in _lines(caplog.text)] == [(2, 3, 4), (3, 3, 4), (3, 3, 4)]


def test_throughput_counts_parallel_parts_once_and_pauses_not_at_all():
    receipts = [({"samples": 100, "seconds": 4.0}, 10.0), ({"samples": 100, "seconds": 4.0}, 12.0),
                ({"samples": 100, "seconds": 2.0}, 30.0)]  # spans 6-10 and 8-12 overlap; 12-28 is a pause
    figures = throughput(receipts, total=5)
    assert figures == {"parts": 3, "samples": 300, "seconds": 10.0, "busy_seconds": 8.0, "samples_per_s": 37.5,
                       "part_samples_per_s": 30.0, "eta_s": 5.3}
    assert throughput(receipts, total=3)["eta_s"] is None


def _normalised_size(path: Path) -> int:
    """Bytes of a receipt as written, with the numbers that depend on data and time set to 0."""
    receipt = json.loads(path.read_text())
    receipt.update({k: 0 for k in VOLATILE if k in receipt})
    return len(json.dumps(receipt, indent=1, sort_keys=True).encode())


def test_a_receipt_has_the_same_size_for_10_and_1000_classes(pool):
    root, data, cards = pool
    runs = {}
    for n, card in cards.items():
        logits = compute_logits(data, card, root / f"c{n}" / "logits", topk=3, temperature=1.0, num_workers=0)
        selection = select(logits, root / f"c{n}" / "select", per_class=1, top_p=3)
        resharded = reshard(selection, root / f"c{n}" / "reshard").manifest
        runs[n] = logits.parent, selection.parent, resharded.parent
    for (l10, s10, _), (l1000, s1000, _) in [(runs[10], runs[1000])]:
        pairs = [(l10 / "_parts" / f"part-{i:06d}.json", l1000 / "_parts" / f"part-{i:06d}.json") for i in range(3)]
        pairs.append((s10 / "_map" / "tasks-1" / "_parts" / "part-000000.json",
                      s1000 / "_map" / "tasks-1" / "_parts" / "part-000000.json"))
        for small, large in pairs:
            assert _normalised_size(small) == _normalised_size(large), (small, large)
            assert "class-0000" not in small.read_text() and "class-0999" not in large.read_text()
        part = l1000 / "part-000000.parquet"
        assert "class_names" not in read_metadata(pq.read_schema(part)) and b"class-0999" not in part.read_bytes()
        assert b"class-0999" not in (s1000 / "part-000000.parquet").read_bytes()
    for logits, selection, resharded in runs.values():  # the names are kept once: the manifest, the fingerprint
        names = mf.load(logits).params["class_names"]
        assert names == mf.load(selection).params["class_names"] == _names(len(names))
        out = mf.load(resharded)
        assert len(out.totals["per_class"]) == len(names) and sum(out.totals["per_class"]) == out.totals["samples"]
        receipt = json.loads((resharded / "_parts" / "part-000000.json").read_text())
        assert receipt["extra"] == {"failed_labels": {}} and "class-0000" not in json.dumps(receipt)
        (kept,) = (logits / "_parts").glob(f"{FINGERPRINT_PREFIX}*.json")
        assert json.loads(kept.read_text())["params"]["class_names"] == names


def test_training_logs_steps_samples_rate_and_eta_per_epoch(tmp_path, monkeypatch, caplog):
    made = digits(tmp_path / "digits", split="labeled=10/class", shard_size=50)
    monkeypatch.setenv(INTERVAL_ENV, "3600")
    monkeypatch.delenv(MODE_ENV, raising=False)
    config = TrainConfig(epochs=2, batch_size=16, lr=0.05, checkpoint_every=0, threads=1)
    with caplog.at_level(logging.INFO, logger="kdpipe.progress"):
        train([made["labeled"]], tmp_path / "model", config)
    found = re.findall(r"train epoch (\d): (\d+)/(\d+) steps, (\d+) samples, [\d.]+ samples/s, ETA 0:00:00",
                       caplog.text)
    steps = int(found[0][2])
    assert [(int(e), int(d)) for e, d, _, _ in found] == [(0, steps), (1, steps)] and steps >= 6
    assert all(int(n) == steps * 16 for *_, n in found)  # every step a full batch of 16
