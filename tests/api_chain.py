"""Helper of the API tests (no tests here): a small real chain in the demo's layout, and docs/api.md's blocks.

``make_chain(root)`` writes ``root/demo-out/`` as ``kdpipe demo`` lays it out (``data/unlabeled``, ``teacher``,
``logits``, ``select``, ``reshard``) with the real stages: 240 bundled digits in 6 shards, a seeded untrained
smallcnn card, logits at T = 2 with top-5 of 10 classes, a top-P selection with soft targets, reshard.
"""

from __future__ import annotations

import re
from pathlib import Path

from stages.ingest.stage import ingest
from stages.logits.stage import compute_logits
from stages.reshard.stage import reshard
from stages.select.stage import select
from tests.test_logits_support import train_card

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"
TEMPERATURE, TOPK = 2.0, 5


def make_chain(root: Path) -> dict[str, Path]:
    """The chain's manifests by name (``data``, ``teacher``, ``logits``, ``select``, ``reshard``)."""
    out = root / "demo-out"
    made = ingest("digits", out / "data", shard_size=40, split="unlabeled=240,rest=rest", seed=0)
    card = train_card(out / "teacher", None, steps=0)
    logits = compute_logits(made["unlabeled"], card, out / "logits", topk=TOPK, temperature=TEMPERATURE,
                            num_workers=0, device="cpu")
    selection = select(logits, out / "select", per_class=10, top_p=5, soft_targets=True)
    result = reshard(selection, out / "reshard", shard_size=40)
    return {"data": made["unlabeled"], "teacher": card, "logits": logits, "select": selection,
            "reshard": result.manifest}


def blocks(language: str, text: str | None = None) -> list[str]:
    """The fenced code blocks of ``language`` in docs/api.md, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text or DOCS.read_text(), flags=re.DOTALL | re.MULTILINE)
