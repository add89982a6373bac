"""``--class-map FILE``: a teacher's classes mapped onto the target label space, recorded in the card.

The file lists target classes in order, each with the teacher classes (names, or 0-based ids) it takes:
JSON ``{"cat": ["tabby", "siamese"], "dog": "beagle"}``, or text, one target a line: ``cat: tabby, siamese``
(a line with a bare name maps the teacher class of that name). A subset leaves the other teacher classes out;
several teacher classes mapped to one target combine by logsumexp of their logits (their probabilities add up).
A teacher class may go to one target at most.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from pipeline.errors import InputError


def read_class_map(path: str | Path, source_classes: list[str]) -> tuple[list[str], dict]:
    """(target class names, the card's ``class_map`` param) from ``path`` against the teacher's own classes."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--class-map {path}: no such file")
    pairs = _pairs(path)
    if not pairs:
        raise InputError(f"{path}: no target classes in the class map")
    ids = {name: i for i, name in enumerate(source_classes)}
    groups, owner = [], {}
    for target, sources in pairs:
        group = [_source_id(path, target, s, ids, len(source_classes)) for s in sources]
        for i in group:
            if i in owner and owner[i] != target:
                raise InputError(f"{path}: teacher class {source_classes[i]!r} is mapped to both {owner[i]!r} and "
                                 f"{target!r}; a teacher class goes to one target at most")
            owner[i] = target
        groups.append(sorted(set(group)))
    targets = [t for t, _ in pairs]
    if len(set(targets)) != len(targets):
        raise InputError(f"{path}: a target class is listed twice")
    return targets, {"file": path.name, "source_classes": list(source_classes), "groups": groups,
                     "many_to_one": "logsumexp"}


def _pairs(path: Path) -> list[tuple[str, list[str]]]:
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: a JSON class map is an object target -> source class(es)")
        return [(str(t), [str(v) for v in (s if isinstance(s, list) else [s])]) for t, s in data.items()]
    pairs = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        target, sep, rest = line.partition(":")
        sources = [s.strip() for s in rest.split(",") if s.strip()] if sep else [target.strip()]
        pairs.append((target.strip(), sources))
    return pairs


def _source_id(path: Path, target: str, source: str, ids: dict[str, int], count: int) -> int:
    if source in ids:
        return ids[source]
    if source.isdigit() and int(source) < count:
        return int(source)
    close = difflib.get_close_matches(source, list(ids), n=1)
    raise InputError(f"{path}: target {target!r} takes {source!r}, which is not a teacher class (name or id < "
                     f"{count})" + (f"; did you mean {close[0]!r}?" if close else ""))
