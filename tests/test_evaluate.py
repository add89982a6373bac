"""Evaluate: golden metric values, confusion CSV, teacher agreement/KL, refusals, precision, CLI + verify."""

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.errors import InputError, ManifestError
from stages.artifacts.cards import write_card
from stages.evaluate.metrics import Accumulator, kl_teacher_student
from stages.evaluate.report import confusion_csv
from stages.evaluate.stage import evaluate, precision_report, pseudo_label_precision
from stages.imaging import Preprocess
from stages.ingest.stage import ingest
from stages.logits.stage import compute_logits
from stages.models.classifiers import build_model
from tests.factories import make_selection

PP = Preprocess(size=16)
NAMES = [str(d) for d in range(10)]


def _card(out, seed, names=NAMES, kind="model"):
    torch.manual_seed(seed)
    return write_card(out, build_model("smallcnn", len(names)), arch="smallcnn", class_names=names, preprocess=PP,
                      stage="test", kind=kind)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """digits: a labeled test split and an unlabeled split (hidden labels), a teacher and a student card."""
    root = tmp_path_factory.mktemp("evaluate")
    made = ingest("digits", root / "data", shard_size=25, split="test=50,unlabeled=40,rest=rest", seed=1)
    teacher = _card(root / "teacher", 0, kind="teacher")
    student = _card(root / "student", 1)
    t_logits = compute_logits(made["test"], teacher, root / "t_logits", topk=3, temperature=2.0, num_workers=0)
    return {"root": root, "test": made["test"], "unlabeled": made["unlabeled"], "teacher": teacher,
            "student": student, "t_logits": t_logits, "hidden": root / "data" / "_hidden" / "unlabeled-labels.parquet"}


def test_accuracy_golden_values():
    acc = Accumulator(7)
    labels = np.array([0, 1, 2, 2, -1])
    ranked = np.array([[0, 1, 2, 3, 4, 5, 6],      # right
                       [3, 1, 0, 2, 4, 5, 6],      # wrong, label 2nd: a top-5 hit
                       [2, 0, 1, 3, 4, 5, 6],      # right
                       [0, 1, 3, 4, 5, 2, 6],      # wrong, label 6th: a top-5 miss
                       [6, 5, 4, 3, 2, 1, 0]])     # no label: not counted
    acc.update_accuracy(labels, ranked)
    summary = acc.summary([f"c{i}" for i in range(7)])
    assert (summary["top1"], summary["topk"], summary["k"], summary["labeled"], summary["unlabeled"]) == \
        (0.5, 0.75, 5, 4, 1)
    assert [c["accuracy"] for c in summary["per_class"]][:4] == [1.0, 0.0, 0.5, None]
    assert summary["mean_per_class"] == 0.5
    text = confusion_csv(acc.confusion, [f"c{i}" for i in range(7)]).decode().splitlines()
    assert text[0] == "true\\predicted,c0,c1,c2,c3,c4,c5,c6"
    assert text[2] == "c1,0,0,0,1,0,0,0" and text[3] == "c2,1,0,1,0,0,0,0"


def test_kl_golden_values_from_top_k_plus_residual():
    # teacher z = [2, 1, 0, 0] at T = 2, only the top 2 stored: the residual (classes 2, 3) is spread evenly,
    # which is exact here; student z = [1, 0, 0, 1]. KL = sum p_t log(p_t / p_s) = 0.0805056 (closed form).
    lse = np.log(np.exp(np.array([2.0, 1.0, 0.0, 0.0]) / 2).sum())
    kl = kl_teacher_student(np.array([[0, 1]]), np.array([[2.0, 1.0]]), np.array([lse]), 2.0,
                            np.array([[1.0, 0.0, 0.0, 1.0]]))
    assert kl == pytest.approx([0.0805056], abs=1e-6)
    # teacher softmax([2, 1, 0]) against a uniform student: log 3 - H(p) = 0.2662167
    full = kl_teacher_student(np.array([[0, 1, 2]]), np.array([[2.0, 1.0, 0.0]]),
                              np.array([np.log(np.exp([2.0, 1.0, 0.0]).sum())]), 1.0, np.zeros((1, 3)))
    assert full == pytest.approx([0.2662167], abs=1e-6)


def test_agreement_and_teacher_label_golden_values():
    acc = Accumulator(6)
    ranked = np.array([[0, 1, 2, 3, 4, 5], [1, 0, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    t_index = np.array([[0, 2], [0, 1], [0, 1]])   # agree on row 0; row 1: teacher 0 in student top 5; row 2: not
    t_logit = np.zeros((3, 2))
    t_lse = np.full(3, np.log(6.0))
    acc.update_agreement(ranked, np.zeros((3, 6)), t_index, t_logit, t_lse, 1.0)
    acc.update_teacher_accuracy(np.array([0, 1, -1]), t_index)
    summary = acc.summary([str(i) for i in range(6)])
    assert summary["agreement"]["top1"] == pytest.approx(1 / 3) and summary["agreement"]["topk"] == pytest.approx(2 / 3)
    assert summary["agreement"]["kl"] == pytest.approx(0.0, abs=1e-9)       # uniform teacher vs uniform student
    assert summary["teacher_labels"] == {"labeled": 2, "k": 2, "top1": 0.5, "topk": 1.0}


def test_evaluation_report_confusion_and_verify(world):
    out = world["root"] / "eval"
    path = evaluate(world["student"], world["test"], out, teacher_logits=world["t_logits"], num_workers=0)
    report = json.loads((out / "report.json").read_text())
    metrics = report["metrics"]
    with open(out / "confusion_matrix.csv") as handle:
        rows = list(csv.reader(handle))[1:]
    counts = np.array([[int(v) for v in row[1:]] for row in rows])
    assert counts.sum() == metrics["labeled"] == report["rows"] == 50
    assert metrics["top1"] == pytest.approx(np.trace(counts) / 50)
    assert [c["samples"] for c in metrics["per_class"]] == counts.sum(axis=1).tolist()
    assert metrics["agreement"]["rows"] == 50 and metrics["agreement"]["kl"] > 0
    manifest = mf.load(path, kind="report")
    assert {f["path"] for f in manifest.files} == {"report.json", "report.md", "confusion_matrix.csv",
                                                   "confusion_matrix.png", "per_class_accuracy.png"}
    assert [i["role"] for i in manifest.inputs] == ["model", "data", "logits", "teacher_logits"]
    assert (out / "confusion_matrix.png").read_bytes().startswith(b"\x89PNG")
    assert main(["verify", str(path)]) == 0 and main(["verify", str(out / "logits" / "manifest.json")]) == 0
    assert evaluate(world["student"], world["test"], out, teacher_logits=world["t_logits"], num_workers=0) == path


def test_a_teacher_agrees_with_its_own_stored_logits(world):
    out = world["root"] / "self"
    evaluate(world["teacher"], world["test"], out, teacher_logits=world["t_logits"], num_workers=0)
    metrics = json.loads((out / "report.json").read_text())["metrics"]
    assert metrics["agreement"]["top1"] == 1.0 and metrics["agreement"]["topk"] == 1.0
    assert metrics["teacher_labels"]["top1"] == metrics["top1"]   # the stored labels are the card's predictions
    assert 0 <= metrics["agreement"]["kl"] < 0.05                  # only the residual spread differs


def test_hidden_labels_of_an_unlabeled_split(world):
    out = world["root"] / "hidden"
    evaluate(world["student"], world["unlabeled"], out, labels=world["hidden"], num_workers=0)
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == "parquet:unlabeled-labels.parquet" and report["metrics"]["labeled"] == 40
    no_labels = world["root"] / "nolabels"
    evaluate(world["student"], world["unlabeled"], no_labels, num_workers=0)
    report = json.loads((no_labels / "report.json").read_text())
    assert report["metrics"]["top1"] is None and report["metrics"]["unlabeled"] == 40
    assert not (no_labels / "confusion_matrix.csv").exists()


def test_model_with_another_class_count_is_refused(world, tmp_path):
    three = _card(tmp_path / "three", 0, names=["a", "b", "c"])
    with pytest.raises(InputError, match="3 classes.*10"):
        evaluate(three, world["test"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dataset_manifest_without_sample_counts_is_refused(world, tmp_path):
    data = json.loads(world["test"].read_text())
    for entry in data["files"]:
        del entry["samples"]
    data["id"] = mf.content_id(data)
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="samples"):
        evaluate(world["student"], bad, tmp_path / "out")


def test_teacher_logits_of_other_data_are_refused(world, tmp_path):
    with pytest.raises(InputError, match="same data"):
        evaluate(world["student"], world["unlabeled"], tmp_path / "out", teacher_logits=world["t_logits"])


def test_a_different_report_in_the_same_folder_is_refused(world, tmp_path):
    out = tmp_path / "out"
    evaluate(world["student"], world["test"], out, num_workers=0)
    with pytest.raises(ManifestError, match="another report"):
        evaluate(world["student"], world["test"], out, teacher_logits=world["t_logits"], num_workers=0)


def test_pseudo_label_precision_golden(world, tmp_path):
    selection = make_selection(tmp_path / "sel", world["t_logits"], per_class=2)
    rows = pq.read_table(selection.parent / "part-000000.parquet").to_pylist()
    truth = [(r["key"], r["label"] if i % 3 else (r["label"] + 1) % 10) for i, r in enumerate(rows)][1:]
    labels = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"key": [k for k, _ in truth], "label": pa.array([v for _, v in truth], pa.int32())}),
                   labels)
    result = pseudo_label_precision(selection, labels)
    wrong = sum(1 for i in range(1, len(rows)) if i % 3 == 0)
    assert (result["rows"], result["known"], result["correct"]) == (len(rows), len(rows) - 1, len(rows) - 1 - wrong)
    assert result["precision"] == pytest.approx((len(rows) - 1 - wrong) / (len(rows) - 1))
    assert sum(c["rows"] for c in result["per_class"]) == len(rows)
    out = precision_report(selection, labels, tmp_path / "prec")
    assert mf.load(out, kind="report").params["precision"] == result["precision"]


def test_cli_round_trips(world, tmp_path, capsys):
    assert main(["evaluate", "--model", str(world["student"]), "--data", str(world["test"]),
                 "--out", str(tmp_path / "e"), "--num-workers", "0"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "e" / "manifest.json")]) == 0
    selection = make_selection(tmp_path / "sel", world["t_logits"], per_class=2)
    assert main(["evaluate", "--selection", str(selection), "--labels", str(world["hidden"]),
                 "--out", str(tmp_path / "p")]) == 0
    assert "pseudo-label precision" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "p" / "manifest.json")]) == 0
    assert main(["evaluate", "--selection", str(selection), "--out", str(tmp_path / "q")]) == 2
    assert main(["evaluate", "--model", str(world["student"]), "--out", str(tmp_path / "r")]) == 2

