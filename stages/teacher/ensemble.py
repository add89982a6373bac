"""``kdpipe teacher --ensemble CARD CARD ... --combine mean-logits|mean-probs``: an ensemble card.

The card holds no weights: it names its member cards (path relative to the ensemble folder, and id, checked
when it is loaded) with each member's preprocessing, and the combination rule (``stages.models.sources.compose``).
Members may differ in architecture and preprocessing but must share the class list (map one with --class-map
first). The logits stage runs every member on its own view of each image in one pass over the pool.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline import manifest as mf
from pipeline.errors import InputError
from stages.artifacts.cards import ENSEMBLE, is_ensemble
from stages.models.sources.compose import COMBINES


def write_ensemble(cards: list[str | Path], out: str | Path, combine: str) -> Path:
    """Write the ensemble card of ``cards`` into ``out``; return its manifest path."""
    out = Path(out)
    if (out / mf.MANIFEST_NAME).exists():
        raise InputError(f"{out}: already holds a card; write to a new --out folder")
    if combine not in COMBINES:
        raise InputError(f"--combine {combine!r}: one of {', '.join(COMBINES)}")
    if len(cards) < 2:
        raise InputError("--ensemble needs two or more teacher cards")
    members = [mf.load(card, kind="teacher") for card in cards]
    _check(members)
    out.mkdir(parents=True, exist_ok=True)
    names = list(members[0].params["class_names"])
    entries = [{"card": os.path.relpath(Path(m.path).parent.resolve(), out.resolve()), "id": m.id,
                "arch": m.params["arch"], "preprocess": m.params["preprocess"]} for m in members]
    params = {"arch": ENSEMBLE, "combine": combine, "num_classes": len(names), "class_names": names,
              "members": entries, "metrics": {}}
    data = mf.build("teacher", stage="teacher-ensemble", params=params, files=[],
                    inputs=[mf.input_ref(m, out, "member") for m in members], totals={"classes": len(names)})
    return mf.write(data, out)


def _check(members: list[mf.Manifest]) -> None:
    first = members[0]
    for member in members:
        if is_ensemble(member):
            raise InputError(f"{member.path}: is itself an ensemble; list its members instead")
        if list(member.params["class_names"]) != list(first.params["class_names"]):
            raise InputError(f"{member.path}: its classes {member.params['class_names'][:5]}... differ from "
                             f"{first.path}'s {first.params['class_names'][:5]}...; map them onto one class list "
                             "with kdpipe teacher --import ... --class-map FILE")
