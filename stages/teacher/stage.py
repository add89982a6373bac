"""Teacher import: existing weights -> a teacher card (``stages.artifacts.cards.write_card``); training a teacher
on labels is ``stages.train.teacher.train_teacher``.

Imported weights load only from safetensors or through ``torch.load(weights_only=True)``: a pickle that
carries code is refused before anything in it runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import manifest as mf
from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from stages.artifacts.cards import load_state_dict, write_card
from stages.imaging import Preprocess
from stages.models.classifiers import build_model
from stages.models.evaluation import accuracy

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


def import_teacher(weights: str | Path, out: str | Path, *, arch: str, class_names: list[str],
                   preprocess: Preprocess, eval_data: str | Path | None = None, device: str = "cpu",
                   weights_sha256: str | None = None) -> Path:
    """Wrap existing weights in a teacher card (weights re-saved as safetensors); return the manifest path.

    Args:
        weights: a ``.safetensors`` file or a tensor state dict loadable with ``torch.load(weights_only=True)``.
        out: the teacher folder.
        arch: architecture name the weights belong to.
        class_names: class id -> name, in head order.
        preprocess: how the teacher sees images (recorded in the card; used by logits).
        eval_data: labeled manifest whose top-1 goes into the card's metrics.
        device: where to run the evaluation.
        weights_sha256: the digest the weights must have (checked before loading them).
    """
    out = Path(out)
    if (out / mf.MANIFEST_NAME).exists():
        raise InputError(f"{out}: already holds a card; write to a new --out folder")
    state = load_state_dict(weights, weights_sha256)
    model = build_model(arch, len(class_names))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f"{weights}: does not fit {arch} with {len(class_names)} classes: "
                         f"{' '.join(str(exc).splitlines()[:3])}") from None
    metrics, inputs = {}, []
    if eval_data is not None:
        manifest = mf.load(eval_data, kind="dataset")
        result = accuracy(model.to(device), manifest, preprocess, device=device)
        metrics = {"top1": result["top1"], "eval_samples": result["samples"],
                   "eval_manifest_id": result["manifest_id"]}
        inputs = [mf.input_ref(manifest, out, "eval")]
    # a pinned digest was checked against the file by load_state_dict: do not hash it twice
    digest = weights_sha256.lower() if weights_sha256 is not None else sha256_file(weights)
    extra = {"imported_from": {"file": Path(weights).name, "sha256": digest}}
    return write_card(out, model.cpu(), arch=arch, class_names=class_names, preprocess=preprocess,
                      stage="teacher-import", inputs=inputs, metrics=metrics, extra=extra, kind="teacher")
