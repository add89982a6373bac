"""Bounded YAML: configs are size-limited before they are read and alias-limited while they are composed.

A 700-byte "billion laughs" document (anchors whose aliases nest nine deep) composes to a few dozen nodes, but
everything that walks the parsed value (deep copy, schema validation, hashing) walks the expanded tree of ~10^9
nodes: minutes and gigabytes before a ``MemoryError``. ``load_yaml`` refuses such a document while yaml's
``SafeLoader`` composes it: a composer that counts aliases and the EXPANDED size of every node (an alias counts
as the whole subtree it points at, computed once per node, so the count itself is linear) stops at a limit,
before any Python object is built. A file larger than ``MAX_BYTES`` is refused before it is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, SequenceNode

from pipeline.errors import InputError

MAX_BYTES = 1 << 20  # 1 MiB: a pipeline config is a few KiB
MAX_ALIASES = 1000
MAX_NODES = 100_000  # expanded: what a walk of the parsed value visits


class _LimitedLoader(yaml.SafeLoader):
    """``SafeLoader`` whose composer counts aliases and expanded nodes and stops at a limit."""

    def __init__(self, stream, where: str):
        super().__init__(stream)
        self.where, self.aliases, self.sizes = where, 0, {}

    def compose_node(self, parent, index):
        if self.check_event(AliasEvent):
            self._check_alias(self.peek_event())
        node = super().compose_node(parent, index)
        self._count(node)
        return node

    def _check_alias(self, event: AliasEvent) -> None:
        self.aliases += 1
        if self.aliases > MAX_ALIASES:
            raise InputError(f"{self.where}: more than {MAX_ALIASES} YAML aliases (*name); refused before "
                             "parsing further (an alias bomb?): write the values out")
        target = self.anchors.get(event.anchor)
        if target is not None and id(target) not in self.sizes:
            raise InputError(f"{self.where}: the alias *{event.anchor} refers to a value that contains it "
                             "(a recursive YAML structure); a config must be a tree")

    def _count(self, node) -> None:
        if id(node) in self.sizes:
            size = self.sizes[id(node)]
        elif isinstance(node, SequenceNode):
            size = 1 + sum(self.sizes.get(id(child), 1) for child in node.value)
        elif isinstance(node, MappingNode):
            size = 1 + sum(self.sizes.get(id(k), 1) + self.sizes.get(id(v), 1) for k, v in node.value)
        else:
            size = 1
        self.sizes[id(node)] = size
        if size > MAX_NODES:
            raise InputError(f"{self.where}: the YAML expands to more than {MAX_NODES} values through its "
                             f"aliases (*name); refused before parsing further (an alias bomb?): write the "
                             "values out")


def load_yaml(text: str, where: str = "config") -> Any:
    """Parse one YAML document with the safe loader, refusing alias bombs (``InputError`` naming ``where``)."""
    loader = _LimitedLoader(text, where)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise InputError(f"{where}: not a readable YAML config: {exc}") from None
    finally:
        loader.dispose()


def read_yaml_file(path: str | Path) -> Any:
    """A YAML file's value: refused if missing, larger than ``MAX_BYTES`` (before reading) or an alias bomb."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise InputError(f"{path}: {size} bytes, more than the {MAX_BYTES} a config may have; "
                             "is this the config file?")
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable YAML config: {exc}") from None
    return load_yaml(text, str(path))
