"""Teacher import: existing weights -> a teacher card (``stages.artifacts.cards.write_card``); training a teacher
on labels is ``stages.train.teacher.train_teacher``.

Imported weights load only from safetensors or through ``torch.load(weights_only=True)``: a pickle that
carries code is refused before anything in it runs. ``--arch`` picks the source (``stages.models.sources``:
``timm:NAME``, ``hf:FOLDER``, ``openclip:NAME``, torchvision names, ``smallcnn``); the card records the
preprocessing and where each value came from (``preprocess_from``: the model's config or a flag), and an import
whose preprocessing is neither resolved nor given is refused naming the flags. ``--class-map`` maps the model's
classes onto target classes (``classmap``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import manifest as mf
from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from stages.artifacts.cards import write_card
from stages.imaging import Preprocess
from stages.models import sources
from stages.models.evaluation import accuracy
from stages.teacher.classmap import read_class_map

log = logging.getLogger(__name__)


def class_names_from(spec: str | Path) -> list[str]:
    """Class names from a dataset manifest (file or folder), a text file (one per line), ``a,b,c`` or ``N``."""
    path = Path(spec)
    if path.is_dir() or path.name.endswith(".json"):
        names = list(mf.load(path).params.get("class_names") or [])
    elif path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif str(spec).isdigit():
        names = [str(i) for i in range(int(spec))]
    else:
        names = [name.strip() for name in str(spec).split(",") if name.strip()]
    if not names:
        raise InputError(f"--classes {spec}: no class names found (give a dataset manifest, a file, a,b,c or N)")
    return names


def import_teacher(weights: str | Path | None, out: str | Path, *, arch: str, class_names: list[str] | None,
                   preprocess: Preprocess | None = None, flags: dict | None = None,
                   eval_data: str | Path | None = None, device: str = "cpu", weights_sha256: str | None = None,
                   prompts: str | Path | None = None, class_map: str | Path | None = None) -> Path:
    """Wrap existing weights in a teacher card (weights re-saved as safetensors); return the manifest path.

    Args:
        weights: a ``.safetensors`` file or a tensor state dict loadable with ``torch.load(weights_only=True)``
            (``hf:FOLDER``: default the folder's own weights).
        out: the teacher folder.
        arch: the source and architecture (``timm:NAME``, ``hf:FOLDER``, ``openclip:NAME``, torchvision, smallcnn).
        class_names: class id -> name, in head order (``hf``: default ``id2label``).
        preprocess: how the teacher sees images, given in full (origin ``given``); None: resolved from the
            model's own config, with ``flags`` (``size``, ``crop_fraction``, ``interpolation``, ``mean``, ``std``,
            ``crop_mode``; None = not given) overriding values.
        eval_data: labeled manifest whose top-1 goes into the card's metrics.
        device: where to run the evaluation.
        weights_sha256: the digest the weights must have (checked before loading them).
        prompts: ``openclip``: the prompt templates file.
        class_map: a class-map file (``stages.teacher.classmap``): the card's classes become its targets.
    """
    out = Path(out)
    if (out / mf.MANIFEST_NAME).exists():
        raise InputError(f"{out}: already holds a card; write to a new --out folder")
    got = sources.import_model(arch, weights, class_names, prompts=prompts, weights_sha256=weights_sha256)
    pp, origin = _preprocess(got, preprocess, flags or {})
    names, extra = got.class_names, {**got.params, "preprocess_from": origin}
    if class_map is not None:
        names, extra["class_map"] = read_class_map(class_map, got.class_names)
    if weights is not None:
        # a pinned digest was checked against the file by load_state_dict: do not hash it twice
        digest = weights_sha256.lower() if weights_sha256 is not None else sha256_file(weights)
        extra["imported_from"] = {"file": Path(weights).name, "sha256": digest}
    params = {"arch": got.arch, "num_classes": len(names), **extra}
    metrics, inputs = _evaluate(sources.runnable(got.model, params), eval_data, pp, out, device)
    return write_card(out, got.model.cpu(), arch=got.arch, class_names=names, preprocess=pp,
                      stage="teacher-import", inputs=inputs, metrics=metrics, extra=extra, kind="teacher")


def _preprocess(got: sources.Imported, preprocess: Preprocess | None, flags: dict) -> tuple[Preprocess, dict]:
    if preprocess is not None:
        return preprocess, {k: "given" for k in preprocess.to_dict() if k != "policy_version"}
    return sources.preprocess_for(got.resolved, flags, got.arch)


def _evaluate(model, eval_data, pp: Preprocess, out: Path, device: str) -> tuple[dict, list]:
    if eval_data is None:
        return {}, []
    manifest = mf.load(eval_data, kind="dataset")
    result = accuracy(model.to(device), manifest, pp, device=device)
    return ({"top1": result["top1"], "eval_samples": result["samples"], "eval_manifest_id": result["manifest_id"]},
            [mf.input_ref(manifest, out, "eval")])
