"""Teachers as users have them: timm, Hugging Face and open_clip models imported from local weights (random, no
downloads), each seen through its library's own eval transform; kdpipe's stored top-K equal a plain forward."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pipeline import manifest as mf
from pipeline.cli import main
from tests.teacher_sources_helpers import assert_same_topk, make_pool, pool_images, run_logits

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_pool(tmp_path_factory.mktemp("pool"))


def _timm_teacher(tmp_path, name: str, classes: int = 10, **flags):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=classes).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / f"{name}.safetensors"))
    argv = ["teacher", "--import", str(tmp_path / f"{name}.safetensors"), "--arch", f"timm:{name}", "--classes",
            str(classes), "--out", str(tmp_path / name)]
    for flag, value in flags.items():
        argv += [f"--{flag.replace('_', '-')}", *str(value).split()]
    assert main(argv) == 0
    return model, tmp_path / name


@torch.inference_mode()
def _timm_reference(model, images) -> dict:
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    return {k: model(transform(img)[None])[0] for k, img in images.items()}


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_a_timm_teacher_gives_the_logits_of_timms_own_eval_transform(pool, tmp_path, name):
    model, card = _timm_teacher(tmp_path, name)
    params = mf.load(card).params
    cfg = params["preprocess"]
    assert (cfg["size"], cfg["crop_fraction"], cfg["crop_mode"], cfg["resize"]) == (160, 0.95, "center", 168)
    assert params["preprocess_from"]["size"].startswith(f"timm pretrained_cfg {name}")
    kdpipe = run_logits(pool, card, tmp_path / "logits")
    assert_same_topk(kdpipe, _timm_reference(model, pool_images(pool)))


def test_flags_override_timm_values_and_the_card_says_so(tmp_path):
    _, card = _timm_teacher(tmp_path, "test_resnet", size=128, interpolation="bicubic")
    params = mf.load(card).params
    assert params["preprocess"]["size"] == 128 and params["preprocess"]["resize"] == 134  # floor(128 / 0.95)
    assert params["preprocess_from"]["size"] == "flag --size"
    assert params["preprocess_from"]["interpolation"] == "flag --interpolation"
    assert params["preprocess_from"]["mean"].startswith("timm pretrained_cfg")


def _hf_folder(tmp_path, kind: str):
    transformers = pytest.importorskip("transformers")
    labels = {i: f"class{i}" for i in range(5)}
    torch.manual_seed(0)
    if kind == "vit":
        config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64, num_labels=5, id2label=labels,
                                        label2id={v: k for k, v in labels.items()})
        model = transformers.ViTForImageClassification(config)
        processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    else:
        config = transformers.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                             num_labels=5, id2label=labels, label2id={v: k for k, v in labels.items()})
        model = transformers.ConvNextForImageClassification(config)
        processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 48}, crop_pct=0.875)
    folder = tmp_path / f"hf-{kind}"
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@torch.inference_mode()
def _hf_reference(folder, images) -> dict:
    import transformers

    processor = transformers.AutoImageProcessor.from_pretrained(str(folder))
    model = transformers.AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    return {k: model(**processor(images=img, return_tensors="pt")).logits[0] for k, img in images.items()}


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_a_hugging_face_classifier_gives_the_logits_of_its_image_processor(pool, tmp_path, kind):
    folder = _hf_folder(tmp_path, kind)
    assert main(["teacher", "--arch", f"hf:{folder}", "--out", str(tmp_path / "t")]) == 0
    params = mf.load(tmp_path / "t").params
    assert params["class_names"] == [f"class{i}" for i in range(5)] and params["arch"] == f"hf:{kind}"
    assert params["preprocess"]["crop_mode"] == {"vit": "squash", "convnext": "center"}[kind]
    kdpipe = run_logits(pool, tmp_path / "t", tmp_path / "logits")
    assert_same_topk(kdpipe, _hf_reference(folder, pool_images(pool)))


TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                             "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_an_open_clip_zero_shot_head_gives_scaled_cosines_of_open_clips_preprocess(pool, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    config = tmp_path / "kdpipe-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model("kdpipe-tiny-clip", pretrained=None).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "clip.pt")
    (tmp_path / "prompts.txt").write_text("a photo of a {}.\na scan of the digit {}\n")
    (tmp_path / "names.txt").write_text("\n".join(NAMES))
    assert main(["teacher", "--import", str(tmp_path / "clip.pt"), "--arch", f"openclip:{config}", "--classes",
                 str(tmp_path / "names.txt"), "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(tmp_path / "t")]) == 0
    kdpipe = run_logits(pool, tmp_path / "t", tmp_path / "logits")
    _, _, preprocess = open_clip.create_model_and_transforms("kdpipe-tiny-clip", pretrained=None)
    tokenizer = open_clip.get_tokenizer("kdpipe-tiny-clip")
    with torch.inference_mode():
        head = open_clip.build_zero_shot_classifier(model, tokenizer, NAMES, ["a photo of a {}.",
                                                    "a scan of the digit {}"], use_tqdm=False)
        scale = model.logit_scale.exp()
        reference = {k: scale * model.encode_image(preprocess(img)[None], normalize=True)[0] @ head
                     for k, img in pool_images(pool).items()}
    assert_same_topk(kdpipe, reference)


def test_the_comparison_tells_views_apart_kdpipes_box_differs_from_timms_transform(pool, tmp_path):
    model, card = _timm_teacher(tmp_path, "test_resnet", crop_mode="box")
    assert mf.load(card).params["preprocess_from"]["crop_mode"] == "flag --crop-mode"
    kdpipe = run_logits(pool, card, tmp_path / "logits")
    with pytest.raises(AssertionError):
        assert_same_topk(kdpipe, _timm_reference(model, pool_images(pool)))


def test_a_torchvision_import_takes_its_weights_transforms_not_the_digits_defaults(tmp_path):
    from stages.models.classifiers import build_model

    save_file(build_model("resnet18", 10).state_dict(), str(tmp_path / "r.safetensors"))
    assert main(["teacher", "--import", str(tmp_path / "r.safetensors"), "--arch", "resnet18", "--classes", "10",
                 "--out", str(tmp_path / "t")]) == 0
    params = mf.load(tmp_path / "t").params
    assert params["preprocess"] == {"size": 224, "crop_fraction": 224 / 256, "interpolation": "bilinear",
                                    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "policy_version": 1}
    assert params["preprocess_from"]["size"] == "torchvision ResNet18_Weights.IMAGENET1K_V1 transforms"


def test_a_box_policy_card_keeps_the_keys_and_bytes_it_always_had():
    from stages.imaging import Preprocess

    assert Preprocess(size=28, crop_fraction=1.0).to_dict() == {
        "size": 28, "crop_fraction": 1.0, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225], "policy_version": 1}
