"""Ensembles of teacher cards (each member seeing the image its own way, one pass over the pool) and class-space
maps: their stored logits equal the combination / mapping of the members' full logits computed separately."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline import manifest as mf
from pipeline.cli import main
from tests.teacher_sources_helpers import make_pool, run_logits

timm = pytest.importorskip("timm")
NAMES = [f"c{i}" for i in range(10)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A pool and two timm teachers that see images differently (160 px bilinear; 128 px bicubic)."""
    root = tmp_path_factory.mktemp("ens")
    (root / "names.txt").write_text("\n".join(NAMES))
    cards = []
    for seed, (name, flags) in enumerate([("test_resnet", []), ("test_convnext", ["--size", "128"])]):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, num_classes=10)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / f"{name}.safetensors"))
        assert main(["teacher", "--import", str(root / f"{name}.safetensors"), "--arch", f"timm:{name}",
                     "--classes", str(root / "names.txt"), "--out", str(root / name), *flags]) == 0
        cards.append(root / name)
    pool = make_pool(root)
    full = [_full(pool, card, root / f"full-{card.name}") for card in cards]
    return {"root": root, "pool": pool, "cards": cards, "full": full}


def _full(pool, card, out) -> dict[str, np.ndarray]:
    """Every class's logit (float32), by key, from a card's own run."""
    rows = run_logits(pool, card, out, 10, "--logit-dtype", "float32")
    return {k: val[np.argsort(idx)] for k, (idx, val) in rows.items()}


def _topk_of(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-logits, kind="stable")[:k]
    return order, logits[order]


@pytest.mark.parametrize("combine", ["mean-logits", "mean-probs"])
def test_an_ensemble_cards_logits_are_the_combination_of_its_members(setup, tmp_path, combine):
    card = tmp_path / "ens"
    assert main(["teacher", "--ensemble", *map(str, setup["cards"]), "--combine", combine, "--out", str(card)]) == 0
    params = mf.load(card).params
    assert params["combine"] == combine and [m["arch"] for m in params["members"]] == ["timm:test_resnet",
                                                                                       "timm:test_convnext"]
    assert [m["preprocess"]["size"] for m in params["members"]] == [160, 128]
    got = run_logits(setup["pool"], card, tmp_path / "logits", 4, "--logit-dtype", "float32")
    for key, (idx, val) in got.items():
        z = np.stack([f[key] for f in setup["full"]]).astype(np.float64)
        if combine == "mean-logits":
            want = z.mean(0)
        else:
            logp = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
            want = np.log(np.exp(logp).mean(0))
        order, values = _topk_of(want, 4)
        assert list(idx) == list(order) and np.allclose(val, values, rtol=1e-5, atol=1e-5), key


def test_members_with_other_classes_or_changed_since_are_refused(setup, tmp_path, caplog):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert main(["teacher", "--import", str(tmp_path / "w.safetensors"), "--arch", "timm:test_resnet", "--classes",
                 "3", "--out", str(tmp_path / "three")]) == 0
    assert main(["teacher", "--ensemble", str(setup["cards"][0]), str(tmp_path / "three"), "--out",
                 str(tmp_path / "e")]) == 2
    assert "differ from" in caplog.text and "--class-map" in caplog.text
    assert main(["teacher", "--ensemble", str(setup["cards"][0]), "--out", str(tmp_path / "e1")]) == 2
    ens = tmp_path / "ok"
    assert main(["teacher", "--ensemble", *map(str, setup["cards"]), "--out", str(ens)]) == 0
    assert main(["verify", str(ens)]) == 0 and main(["show", str(ens)]) == 0
    argv = ["logits", "--data", str(setup["pool"]), "--teacher", str(ens), "--topk", "2", "--temperature", "1",
            "--num-workers", "0", "--out"]
    assert main([*argv, str(tmp_path / "l1"), "--embeddings"]) == 2 and "is an ensemble" in caplog.text
    shutil.copytree(setup["cards"][0], tmp_path / "m0")  # a member replaced by another card after the fact
    assert main(["teacher", "--ensemble", str(tmp_path / "m0"), str(setup["cards"][1]), "--out",
                 str(tmp_path / "ens2")]) == 0
    shutil.rmtree(tmp_path / "m0")
    shutil.copytree(setup["cards"][1], tmp_path / "m0")
    assert main([*argv, str(tmp_path / "l2"), "--teacher", str(tmp_path / "ens2")]) == 2
    assert "rebuild the ensemble card" in caplog.text


def test_a_class_map_gives_the_top_k_of_the_full_logits_mapped_by_hand(setup, tmp_path):
    cmap = {"even": ["c0", "c2", "c4", "c6", "c8"], "one": "c1", "three": ["3"], "seven": ["c7", "c5"]}
    (tmp_path / "map.json").write_text(json.dumps(cmap))
    root = setup["root"]
    assert main(["teacher", "--import", str(root / "test_resnet.safetensors"), "--arch", "timm:test_resnet",
                 "--classes", str(root / "names.txt"), "--class-map", str(tmp_path / "map.json"),
                 "--out", str(tmp_path / "mapped")]) == 0
    params = mf.load(tmp_path / "mapped").params
    assert params["class_names"] == ["even", "one", "three", "seven"] and params["num_classes"] == 4
    assert params["class_map"]["groups"] == [[0, 2, 4, 6, 8], [1], [3], [5, 7]]
    got = run_logits(setup["pool"], tmp_path / "mapped", tmp_path / "logits", 3, "--logit-dtype", "float32")
    for key, (idx, val) in got.items():
        z = setup["full"][0][key].astype(np.float64)
        want = np.array([np.log(np.exp(z[g]).sum()) for g in params["class_map"]["groups"]])
        order, values = _topk_of(want, 3)
        assert list(idx) == list(order) and np.allclose(val, values, rtol=1e-5, atol=1e-5), key


def test_a_text_class_map_and_its_errors(setup, tmp_path, caplog):
    root = setup["root"]
    argv = ["teacher", "--import", str(root / "test_resnet.safetensors"), "--arch", "timm:test_resnet",
            "--classes", str(root / "names.txt"), "--class-map"]
    (tmp_path / "map.txt").write_text("# target: teacher classes\nsmall: c0, c1\nc9\n")
    assert main([*argv, str(tmp_path / "map.txt"), "--out", str(tmp_path / "a")]) == 0
    assert mf.load(tmp_path / "a").params["class_map"]["groups"] == [[0, 1], [9]]
    (tmp_path / "bad.txt").write_text("small: c0, c11x\n")
    assert main([*argv, str(tmp_path / "bad.txt"), "--out", str(tmp_path / "b")]) == 2
    assert "takes 'c11x', which is not a teacher class" in caplog.text
    (tmp_path / "twice.txt").write_text("a: c0\nb: c0, c1\n")
    assert main([*argv, str(tmp_path / "twice.txt"), "--out", str(tmp_path / "c")]) == 2
    assert "is mapped to both 'a' and 'b'" in caplog.text


def test_the_cli_choices_are_the_library_values():
    from stages.imaging import CROP_MODES
    from stages.models.sources.compose import COMBINES
    from stages.teacher import options

    assert options.COMBINE == COMBINES and options.CROP_MODES == CROP_MODES
