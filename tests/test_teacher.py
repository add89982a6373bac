"""``kdpipe teacher``: train a teacher card on labeled digits, or import weights (never running a pickle)."""

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from stages.artifacts.cards import load_teacher
from stages.imaging import Preprocess
from stages.models.classifiers import build_model
from stages.teacher.stage import class_names_from, import_teacher
from tests.test_train_data import digits

PP = Preprocess(size=28, crop_fraction=1.0)


class Planted:
    """Unpickling this object creates a file: proof that the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return digits(tmp_path_factory.mktemp("digits"), split="labeled=10/class,test=200,unlabeled=rest", shard_size=25)


def test_teacher_trained_on_labeled_digits_has_a_card_with_its_accuracy(data, tmp_path):
    out = tmp_path / "teacher"
    assert main(["teacher", "--train", str(data["labeled"]), "--eval", str(data["test"]), "--out", str(out),
                 "--epochs", "10", "--batch-size", "16", "--threads", "1"]) == 0
    model, card = load_teacher(out)
    assert card.kind == "teacher" and card.params["arch"] == "smallcnn" and card.params["class_names"] == list("0123456789")
    assert card.params["metrics"]["top1"] > 0.5 and card.params["metrics"]["eval_manifest_id"] == mf.load(data["test"]).id
    assert card.params["preprocess"]["size"] == 28 and card.params["preprocess"]["crop_fraction"] == 1.0
    assert {i["role"] for i in card.inputs} == {"train", "eval"} and not model.training


def test_import_of_safetensors_and_of_a_weights_only_state_dict(data, tmp_path):
    torch.manual_seed(1)
    model = build_model("smallcnn", 10)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        card = import_teacher(tmp_path / name, tmp_path / name.replace(".", "-"), arch="smallcnn",
                              class_names=class_names_from(data["labeled"]), preprocess=PP, eval_data=data["test"])
        loaded, manifest = load_teacher(card)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
        assert manifest.params["metrics"]["eval_samples"] == 200


def test_cli_import_with_class_names(tmp_path):
    save_file(build_model("smallcnn", 3).state_dict(), str(tmp_path / "w.safetensors"))
    assert main(["teacher", "--import", str(tmp_path / "w.safetensors"), "--classes", "cat,dog,owl",
                 "--out", str(tmp_path / "t")]) == 0
    assert mf.load(tmp_path / "t").params["class_names"] == ["cat", "dog", "owl"]


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_planted_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pt"
    payload = {"fc.weight": Planted(marker)}
    if writer == "torch.save":
        torch.save(payload, weights)
    else:
        weights.write_bytes(pickle.dumps(payload))
    assert not marker.exists()
    with pytest.raises(InputError, match="refused"):
        import_teacher(weights, tmp_path / "t", arch="smallcnn", class_names=["a", "b"], preprocess=PP)
    assert main(["teacher", "--import", str(weights), "--classes", "2", "--out", str(tmp_path / "u")]) == 2
    assert not marker.exists() and not (tmp_path / "t").exists()
    # the control: an unsafe load does run the planted code
    torch.load(weights, weights_only=False) if writer == "torch.save" else pickle.loads(weights.read_bytes())
    assert marker.exists()


def test_weights_of_another_head_size_are_refused_naming_the_mismatch(tmp_path):
    save_file(build_model("smallcnn", 4).state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(InputError, match="does not fit smallcnn with 10 classes.*fc.weight"):
        import_teacher(tmp_path / "w.safetensors", tmp_path / "t", arch="smallcnn", class_names=list("0123456789"),
                       preprocess=PP)


def test_a_pinned_sha256_is_checked_before_the_weights_are_loaded(tmp_path, monkeypatch):
    save_file(build_model("smallcnn", 3).state_dict(), str(tmp_path / "w.safetensors"))
    digest = sha256_file(tmp_path / "w.safetensors")
    import stages.models.sources.weights as card_module  # where every weights file is loaded
    loads = []
    monkeypatch.setattr(card_module, "load_file", lambda p: loads.append(p) or pytest.fail("loaded before the check"))
    with pytest.raises(InputError, match=r"w.safetensors: sha256 .* differs from the pinned 0{64}"):
        import_teacher(tmp_path / "w.safetensors", tmp_path / "t", arch="smallcnn", class_names=list("abc"),
                       preprocess=PP, weights_sha256="0" * 64)
    assert not loads and not (tmp_path / "t").exists()
    monkeypatch.undo()
    assert main(["teacher", "--import", str(tmp_path / "w.safetensors"), "--classes", "3", "--sha256", digest,
                 "--out", str(tmp_path / "u")]) == 0
    assert main(["teacher", "--import", str(tmp_path / "w.safetensors"), "--classes", "3", "--sha256", "1" * 64,
                 "--out", str(tmp_path / "v")]) == 2
