"""The selection report: vectorised per-class quantiles equal to numpy's, figures whose size does not grow
with the number of classes, byte-identical reruns, and a report path that never imports pandas."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline import manifest as mf
from stages.select import report
from stages.select.report import QUANTILES, class_quantiles, summarize
from stages.select.stage import select
from tests.factories import make_logits

REPO = Path(__file__).resolve().parents[1]


def rank_ordered_table(sizes: list[int], rng: np.random.Generator, copies: int = 3) -> pa.Table:
    """Originals of class c: ``sizes[c]`` rows, scores descending (half the classes from 4 values: ties);
    the first rows of each class get ``copies`` balance copies; rows sorted by (label, rank, dup)."""
    labels, scores, dups = [], [], []
    for c, n in enumerate(sizes):
        values = (rng.integers(0, 4, n) / 4 if c % 2 else rng.random(n)).astype(np.float32)
        for rank, score in enumerate(np.sort(values)[::-1]):
            for dup in range(1 + (copies if rank < 2 else 0)):
                labels.append(c), scores.append(score), dups.append(dup)
    return pa.table({"label": pa.array(labels, pa.int32()), "score": pa.array(scores, pa.float32()),
                     "dup": pa.array(dups, pa.int16())})


def params(classes: int) -> dict:
    return {"class_names": [f"c{c}" for c in range(classes)], "per_class": [5] * classes, "policy": "topk",
            "top_p": 1, "min_score": 0.0, "temperature": 1.0}


def stats(classes: int) -> dict:
    return {"candidates": list(range(classes)), "unique_images": 7, "multi_label_images": 0,
            "max_labels_per_image": 1}


def numpy_quantiles(table: pa.Table, label: int) -> np.ndarray:
    """What the report computed before: np.quantile of one class's original scores."""
    rows = table.to_pydict()
    scores = [s for lab, s, d in zip(rows["label"], rows["score"], rows["dup"]) if lab == label and d == 0]
    return np.quantile(np.array(scores, np.float32), QUANTILES)


SIZES = [0, 1, 2, 3, 0, 7, 10, 11, 40, 1, 0, 101, 5, 6, 0]  # empty first and last classes, single rows


def test_quantiles_are_numpys_bit_for_bit_with_ties_empty_and_single_row_classes():
    table = rank_ordered_table(SIZES, np.random.default_rng(0))
    originals = table.filter(pc.equal(table["dup"], 0))
    got = class_quantiles(originals["label"].to_numpy(), originals["score"].to_numpy(), len(SIZES))
    for label, n in enumerate(SIZES):
        if n:
            assert got[label].tolist() == numpy_quantiles(table, label).tolist()
        else:
            assert np.isnan(got[label]).all()


def test_summary_rows_round_the_quantiles_and_leave_empty_classes_none():
    table = rank_ordered_table(SIZES, np.random.default_rng(1))
    summary, rows = summarize(table, params(len(SIZES)), stats(len(SIZES)))
    for label, n in enumerate(SIZES):
        expected = [round(float(v), 6) for v in numpy_quantiles(table, label)] if n else [None] * 5
        assert [rows[label][f"score_q{int(q * 100):02d}"] for q in QUANTILES] == expected
        assert (rows[label]["selected"], rows[label]["copies"]) == (n, 3 * min(n, 2))
    assert summary["originals"] == sum(SIZES) and summary["num_classes_short"] == sum(n < 5 for n in SIZES)


def test_a_table_out_of_rank_order_gives_the_same_summary():
    table = rank_ordered_table(SIZES, np.random.default_rng(2))
    shuffled = table.take(np.random.default_rng(3).permutation(table.num_rows))
    assert summarize(shuffled, params(len(SIZES)), stats(len(SIZES))) == \
        summarize(table, params(len(SIZES)), stats(len(SIZES)))


def test_a_table_in_several_chunks_gives_the_same_summary():
    """As read from several selection parts: chunks, and slices with offsets into their buffers."""
    table = rank_ordered_table(SIZES, np.random.default_rng(7))
    chunked = pa.concat_tables([table.slice(0, 17), table.slice(17, 100), table.slice(117)])
    assert chunked.column("score").num_chunks == 3
    assert summarize(chunked, params(len(SIZES)), stats(len(SIZES))) == \
        summarize(table, params(len(SIZES)), stats(len(SIZES)))


def figure_children(monkeypatch, render, *args) -> list[int]:
    """Render a figure; return the number of artists of each of its axes."""
    shown = []
    monkeypatch.setattr(report, "png_bytes", lambda fig, dpi: shown.append(fig) or b"")
    render(*args)
    return [len(ax.get_children()) for ax in shown[0].axes]


@pytest.mark.parametrize("render", ["_counts_png", "_scores_png"])
def test_figures_have_as_many_artists_for_1200_classes_as_for_12(monkeypatch, render):
    sizes = {k: [3, 0, 1] * (k // 3) for k in (12, 1200)}
    tables = {k: rank_ordered_table(s, np.random.default_rng(4), copies=1) for k, s in sizes.items()}
    rows = {k: summarize(t, params(k), stats(k))[1] for k, t in tables.items()}
    args = {k: (rows[k],) if render == "_counts_png" else (tables[k], rows[k]) for k in sizes}
    small, large = (figure_children(monkeypatch, getattr(report, render), *args[k]) for k in (12, 1200))
    assert small == large and len(large) == (1 if render == "_counts_png" else 2)


def test_figures_are_byte_identical_for_equal_input():
    tables = [rank_ordered_table(SIZES, np.random.default_rng(5)) for _ in range(2)]
    rows = [summarize(t, params(len(SIZES)), stats(len(SIZES)))[1] for t in tables]
    assert report._scores_png(tables[0], rows[0]) == report._scores_png(tables[1], rows[1])
    assert report._counts_png(rows[0]) == report._counts_png(rows[1])


REWRITE = """
import json, shutil, sys
from pipeline import manifest as mf
from stages.select.report import write_report
selection = mf.load(sys.argv[1])
summary = json.loads((selection.folder / "report/selection_report.json").read_text())
shutil.rmtree(selection.folder / "report")
stats = {k: summary[k] for k in ("unique_images", "multi_label_images", "max_labels_per_image")}
write_report(selection, {**stats, "candidates": [r["candidates"] for r in summary["per_class"]]})
print(json.dumps("pandas" in sys.modules))
"""


def report_files(folder: Path) -> dict[str, bytes]:
    """The report's files but its manifest (which holds its creation time; its id is compared instead)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "manifest.json"}


def test_a_fresh_process_rewrites_the_same_report_without_importing_pandas(tmp_path):
    rng = np.random.default_rng(6)
    logits = make_logits(tmp_path / "l", [([f"i{i:03d}" for i in range(300)],
                                           rng.normal(size=(300, 5)).astype(np.float32))], topk=3)
    select(logits, tmp_path / "s", policy="threshold", per_class=80, min_score=0.2, balance=True, gallery=0)
    before, report_id = report_files(tmp_path / "s/report"), mf.load(tmp_path / "s/report", kind="report").id
    out = subprocess.run([sys.executable, "-c", REWRITE, str(tmp_path / "s")], capture_output=True, text=True,
                         cwd=REPO, check=True)
    assert json.loads(out.stdout) is False  # pandas was not imported
    assert report_files(tmp_path / "s/report") == before and mf.load(tmp_path / "s/report", kind="report").id == report_id
