"""Files beside a manifest that other tools open as they are, each made from the manifest's content alone.

- ``README.md`` of a Parquet artifact (logits, selection, exclusion): a Hugging Face dataset card whose
  ``configs:`` front matter lists exactly the manifest's part files, so ``datasets.load_dataset(folder)``
  loads the parts and nothing else (not ``manifest.json``, receipts, select's map parts or its report). Its
  body says what the artifact is and what the columns mean.
- ``_info.json`` of a WebDataset dataset (reshard's training shards): timm's ``wds/`` dataset info, one split
  ``train`` with the shard names, their sample counts and the class count, so
  ``timm.data.create_dataset("wds/NAME", root=folder, split="train")`` finds the shards.

A stage writes them in its finalize, once every part is committed and before its manifest
(``with_sidecars`` wraps the manifest builder). They are not manifest entries (every reader takes ``files``
as the parts); ``kdpipe verify`` checks them instead (``sidecar_problems``): a sidecar present must be, byte
for byte, what the manifest gives. One that is absent (an artifact made before kdpipe wrote them) is not a
problem: rerunning the stage's ``--finalize`` writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import yaml

from pipeline import manifest as mf
from pipeline.atomic import write_atomic

CARD_NAME = "README.md"
INFO_NAME = "_info.json"
SPLIT = "train"
PARQUET_KINDS = ("logits", "selection", "exclusion")

_COLUMNS = {
    "logits": [("key", "the sample's WebDataset `__key__`"), ("shard", "index of its shard in the dataset manifest"),
               ("topk_index", "the teacher's top-K class ids, by logit descending"),
               ("topk_logit", "their raw logits z"), ("lse", "logsumexp(z / T) over all classes")],
    "selection": [("key", "the source sample's key"), ("shard", "its source shard"),
                  ("label", "the pseudo-label (class id)"), ("score", "p(label \\| x) at T"),
                  ("rank", "rank within its label (0 = best)"), ("dup", "0, or k for the k-th balance copy")],
    "exclusion": [("key", "a pool sample to leave out"), ("reason", "contaminated or near_duplicate"),
                  ("matched_key", "the image it matched"), ("similarity", "their cosine similarity")],
}


def sidecars_for(data: dict) -> dict[str, bytes]:
    """The sidecar files (name -> bytes) that a manifest's content gives; empty for other kinds."""
    if data["kind"] in PARQUET_KINDS:
        return {CARD_NAME: dataset_card(data).encode()}
    if data["kind"] == "dataset" and all(_is_local_tar(f["path"]) for f in data["files"]):
        return {INFO_NAME: timm_info(data)}
    return {}


def _is_local_tar(path: str) -> bool:
    return path.endswith(".tar") and "://" not in path and not path.startswith("/")


def dataset_card(data: dict) -> str:
    """The Hugging Face dataset card: ``configs:`` front matter listing the parts, then a short description."""
    parts = [f["path"] for f in data["files"] if f["path"].endswith(".parquet")]
    front = {"configs": [{"config_name": "default", "data_files": [{"split": SPLIT, "path": parts}]}]}
    rows = data["totals"].get("rows", sum(f.get("rows", 0) for f in data["files"]))
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# kdpipe {data['kind']} artifact",
             "", (f"`manifest.json` is this artifact's identity (id `{data['id']}`, made by the "
                  f"`{data['producer']['stage']}` stage); this card is made from it, `kdpipe verify` checks both."),
             "", f"- parts: {len(parts)}, rows: {rows}", *_param_lines(data["params"]),
             "", "| column | meaning |", "| --- | --- |"]
    lines += [f"| `{name}` | {meaning} |" for name, meaning in _COLUMNS[data["kind"]]]
    if data["kind"] in ("logits", "selection"):
        lines += ["", _PROBABILITIES]
    return "\n".join(lines) + "\n"


_CARD_PARAMS = ("temperature", "topk", "num_classes", "policy", "per_class", "top_p", "teacher_id", "dataset_id",
                "logits_id", "threshold")
_PROBABILITIES = ("The softened probability of a stored class at T is `exp(topk_logit / T - lse)`; the rest of the "
                  "mass, `1 - sum`, belongs to the other classes (kdpipe's `soft_targets` rebuilds full targets, "
                  "docs/api.md). `datasets.load_dataset(\"<this folder>\")` loads the parts.")


def _param_lines(params: dict) -> list[str]:
    shown = lambda v: f"{len(v)} values" if isinstance(v, list) and len(v) > 10 else v
    return [f"- {name}: {shown(params[name])}" for name in _CARD_PARAMS if params.get(name) is not None]


def timm_info(data: dict) -> bytes:
    """timm's ``_info.json`` of a training-shard dataset (one split, ``train``), compact and sorted."""
    files = data["files"]
    split = {"name": SPLIT, "num_samples": sum(int(f["samples"]) for f in files),
             "filenames": [f["path"] for f in files], "shard_lengths": [int(f["samples"]) for f in files]}
    params = data["params"]
    body = {"name": data["producer"]["stage"], "num_classes": params.get("num_classes"),
            "class_names": params.get("class_names"), "splits": {SPLIT: split},
            "kdpipe": {"manifest": mf.MANIFEST_NAME, "id": data["id"]}}
    return json.dumps(body, sort_keys=True, indent=1).encode() + b"\n"


def write_sidecars(out_dir: Path, data: dict) -> None:
    """Write every sidecar of the manifest content ``data`` into ``out_dir`` (atomically), leaving one that
    already holds those bytes untouched (a rerun of a complete stage changes no file)."""
    for name, body in sidecars_for(data).items():
        path = Path(out_dir) / name
        if not path.is_file() or path.read_bytes() != body:
            write_atomic(path, body)


def with_sidecars(out_dir: Path | str, build: Callable[[list[dict]], dict]) -> Callable[[list[dict]], dict]:
    """``build`` (receipts -> manifest content, as ``pipeline.tasks.finalize`` takes it) that also writes the
    sidecars, before the manifest. A folder already holding another artifact's manifest keeps its sidecars
    (finalize refuses that folder)."""
    def wrapped(receipts: list[dict]) -> dict:
        data = build(receipts)
        if _existing_id(Path(out_dir) / mf.MANIFEST_NAME) in (None, data["id"]):
            write_sidecars(Path(out_dir), data)
        return data
    return wrapped


def _existing_id(path: Path) -> str | None:
    """The id of the manifest at ``path``; None when there is none; '' when it is unreadable."""
    if not path.exists():
        return None
    try:
        return str(json.loads(path.read_bytes())["id"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def sidecar_problems(manifest: mf.Manifest) -> list[str]:
    """``kdpipe verify``: every sidecar present that is not, byte for byte, what the manifest gives."""
    problems = []
    for name, body in sidecars_for(manifest.data).items():
        path = manifest.folder / name
        if path.is_file() and path.read_bytes() != body:
            problems.append(f"{path}: differs from what {manifest.path} gives (tools would read other files or "
                            "counts); rerun the stage's --finalize to rewrite it")
    return problems
