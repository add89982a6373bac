"""The selection report: vectorised per-class quantiles equal to numpy's (ties, empty and single-row classes,
balance copies, any row order)."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.select.report import QUANTILES, class_quantiles, summarize

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
