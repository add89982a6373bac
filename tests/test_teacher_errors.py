"""Teacher imports that cannot work are refused with rc 2 and a message naming the file and the mismatch (never a
traceback); a close name is suggested; a missing optional library names the extra to install."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from pipeline import manifest as mf
from pipeline.cli import main

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """test_resnet weights with 10 classes, as safetensors."""
    folder = tmp_path_factory.mktemp("w")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "r.safetensors"))
    return folder / "r.safetensors", model


def _import(tmp_path, weights, arch, classes="10", *extra) -> int:
    return main(["teacher", "--import", str(weights), "--arch", arch, "--classes", classes,
                 "--out", str(tmp_path / "t"), *extra])


@pytest.mark.parametrize("arch, says", [
    ("convnext_atto", "timm has it: use --arch timm:convnext_atto"),
    ("timm/convnext_atto", "timm has it: use --arch timm:convnext_atto"),
    ("timm:convnext_attoo", "did you mean timm:convnext_atto"),
    ("resnet500", "did you mean resnet50"),
])
def test_an_unknown_architecture_is_refused_with_the_close_name(tmp_path, resnet, caplog, arch, says):
    assert _import(tmp_path, resnet[0], arch) == 2
    assert says in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "t").exists()


def test_a_wrong_class_count_names_the_head_and_the_flag(tmp_path, resnet, caplog):
    assert _import(tmp_path, resnet[0], "timm:test_resnet", "5") == 2
    assert f"{resnet[0]}: does not fit timm:test_resnet with 5 classes" in caplog.text
    assert "first fc.weight: the file has [10, 96], the model [5, 96]" in caplog.text
    assert "--classes" in caplog.text


def test_weights_of_another_architecture_name_the_first_missing_and_unexpected_keys(tmp_path, resnet, caplog):
    assert _import(tmp_path, resnet[0], "timm:test_vit") == 2
    assert "80 missing key(s), first cls_token, pos_embed" in caplog.text
    assert "92 unexpected key(s), first bn1.num_batches_tracked" in caplog.text


def test_a_file_that_is_not_safetensors_is_named(tmp_path, caplog):
    (tmp_path / "bad.safetensors").write_bytes(b"this is not a safetensors file at all")
    assert _import(tmp_path, tmp_path / "bad.safetensors", "timm:test_resnet") == 2
    assert f"{tmp_path / 'bad.safetensors'}: not a valid safetensors file" in caplog.text


def test_a_timm_training_checkpoint_and_a_state_dict_bin_import_like_the_safetensors(tmp_path, resnet):
    weights, model = resnet
    state = model.state_dict()
    torch.save({"epoch": 7, "arch": "test_resnet", "state_dict": state, "version": 2}, tmp_path / "last.pth.tar")
    torch.save(state, tmp_path / "pytorch_model.bin")
    digests = set()
    for name, path in [("a", weights), ("b", tmp_path / "last.pth.tar"), ("c", tmp_path / "pytorch_model.bin")]:
        assert main(["teacher", "--import", str(path), "--arch", "timm:test_resnet", "--classes", "10",
                     "--out", str(tmp_path / name)]) == 0
        digests.add(mf.load(tmp_path / name).params["weights_sha256"])
    assert len(digests) == 1


def test_a_missing_library_names_the_extra_to_install(tmp_path, resnet, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without timm gives: ImportError
    assert _import(tmp_path, resnet[0], "timm:test_resnet") == 2
    assert "needs the 'timm' package" in caplog.text and "pip install 'kdpipe[timm]'" in caplog.text


def test_preprocessing_that_cannot_be_resolved_is_refused_naming_the_flags(tmp_path, caplog):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, num_labels=3)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "hf")
    # shorter side to 40 and no crop: a non-square input kdpipe cannot give the way the processor does
    transformers.CLIPImageProcessor(size={"shortest_edge": 40}, do_center_crop=False).save_pretrained(tmp_path / "hf")
    argv = ["teacher", "--arch", f"hf:{tmp_path / 'hf'}", "--out"]
    assert main([*argv, str(tmp_path / "t")]) == 2
    assert "its preprocessing is not in the model's own config; give --size --crop-fraction" in caplog.text
    assert main([*argv, str(tmp_path / "u"), "--size", "32", "--crop-fraction", "0.8", "--crop-mode", "center"]) == 0
    params = mf.load(tmp_path / "u").params
    assert params["preprocess"]["resize"] == 40 and params["preprocess_from"]["size"] == "flag --size"
    assert params["preprocess_from"]["mean"].startswith("HF CLIPImageProcessor")


def test_open_clip_without_prompts_is_refused_naming_the_flag(tmp_path, caplog):
    pytest.importorskip("open_clip")
    (tmp_path / "c.pt").write_bytes(b"")
    (tmp_path / "tiny.json").write_text(json.dumps({"embed_dim": 8}))
    assert _import(tmp_path, tmp_path / "c.pt", f"openclip:{tmp_path / 'tiny.json'}", "a,b") == 2
    assert "needs --prompts FILE" in caplog.text
