"""The house plan as code: which kdpipe module may import which (ARCHITECTURE.md), checked on the AST.

Layers, bottom to top:

- ``core``: ``pipeline.*`` except the entry subpackage — manifests, parts, tasks, verify, config, errors...
- ``common``: ``stages.shardio``, ``stages.imaging``, ``stages.models``, ``stages.views`` — what every stage uses.
- ``artifacts``: ``stages.artifacts.*`` — the formats and readers that more than one stage reads or writes.
- ``stage``: ``stages.<name>.*`` — one package per stage; it may import its own package and the layers above.
- ``entry``: ``pipeline.cli.*``, ``pipeline.__main__`` and the public Python API ``kdpipe.*`` — the only
  code that imports stage packages.

``violations(root)`` returns one line ``file:line: what`` per broken rule: a forbidden import, a function-local
import of a kdpipe module outside the entry layer (imports are never moved into functions to dodge the
plan), an ``except ImportError`` that does not raise (a silent fallback), and import loops between modules.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("pipeline", "stages", "kdpipe")
COMMON = ("shardio", "imaging", "models", "views")
DECLARED = {("evaluate", "logits")}  # evaluate computes a model's logits with the logits stage's own code
ALLOWED = {
    "core": {"core"},
    "common": {"core", "common"},
    "artifacts": {"core", "common", "artifacts"},
    "stage": {"core", "common", "artifacts", "stage"},
    "entry": {"core", "common", "artifacts", "stage", "entry"},
}


@dataclass(frozen=True)
class Import:
    """One import statement's target as seen from ``module`` (``local``: inside a function or class body)."""

    module: str
    target: str
    path: Path
    line: int
    local: bool


def layer(module: str) -> tuple[str, str | None]:
    """(layer, stage package name or None) of a dotted kdpipe module name."""
    parts = module.split(".")
    if parts[0] == "kdpipe" or module == "pipeline.__main__" or parts[:2] == ["pipeline", "cli"]:
        return "entry", None
    if parts[0] == "pipeline" or parts[0] == "manifests":
        return "core", None
    if len(parts) == 1 or parts[1] in COMMON:
        return "common", None
    if parts[1] == "artifacts":
        return "artifacts", None
    return "stage", parts[1]


def module_name(root: Path, path: Path) -> str:
    """Dotted module name of ``path`` under ``root`` (``pkg/__init__.py`` is ``pkg``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    """Every kdpipe module under ``root``, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")) if (root / package).is_dir() else []:
            found[module_name(root, path)] = path
    return found


def imports(root: Path, known: dict[str, Path]) -> tuple[list[Import], list[str]]:
    """Every kdpipe import of every module (targets resolved to known modules), and ImportError fallbacks."""
    found, fallbacks = [], []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        local_lines = _local_import_lines(tree)
        for node in ast.walk(tree):
            for target in _targets(node, name, known, path):
                found.append(Import(name, target, path, node.lineno, node.lineno in local_lines))
            if isinstance(node, ast.ExceptHandler) and _catches_import_error(node.type) and not _raises(node):
                fallbacks.append(f"{path.relative_to(root)}:{node.lineno}: `except ImportError` without a raise hides "
                                 "a broken install (raise a named error saying what to install)")
    return found, fallbacks


def _local_import_lines(tree: ast.Module) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            lines |= {n.lineno for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def _targets(node: ast.AST, module: str, known: dict[str, Path], path: Path) -> list[str]:
    if isinstance(node, ast.Import):
        return [_resolve(a.name, known) for a in node.names if a.name.split(".")[0] in PACKAGES]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}".strip(".")
    if base.split(".")[0] not in PACKAGES:
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else _resolve(base, known) for a in node.names]


def _resolve(name: str, known: dict[str, Path]) -> str:
    while name not in known and "." in name:
        name = name.rpartition(".")[0]
    return name


def _catches_import_error(node: ast.AST | None) -> bool:
    names = [n.id for n in ast.walk(node) if isinstance(n, ast.Name)] if node is not None else []
    return any(n in ("ImportError", "ModuleNotFoundError") for n in names)


def _raises(handler: ast.ExceptHandler) -> bool:
    return any(isinstance(n, ast.Raise) for n in ast.walk(handler))


def forbidden(item: Import) -> str | None:
    """Why ``item`` breaks the plan, or None."""
    (src, src_stage), (dst, dst_stage) = layer(item.module), layer(item.target)
    if dst not in ALLOWED[src]:
        return f"{src} module {item.module} imports {dst} module {item.target}"
    if src == dst == "stage" and src_stage != dst_stage and (src_stage, dst_stage) not in DECLARED:
        return f"stage package {src_stage} imports another stage package ({item.target})"
    if item.local and src != "entry":
        return f"function-local import of {item.target} (imports stay at the top of the module)"
    return None


def cycles(found: list[Import]) -> list[list[str]]:
    """Import loops between distinct modules (strongly connected components of more than one module)."""
    graph: dict[str, set[str]] = {}
    for item in found:
        if item.target != item.module and not item.module.startswith(item.target + "."):
            graph.setdefault(item.module, set()).add(item.target)
    return [sorted(c) for c in _components(graph) if len(c) > 1]


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    out.append(component)
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on:
                low[node] = min(low[node], index[child])
    return out


def violations(root: Path) -> list[str]:
    """Every broken rule of the plan under ``root``, as ``file:line: what``."""
    known = modules(root)
    found, problems = imports(root, known)
    for item in found:
        why = forbidden(item)
        if why:
            problems.append(f"{item.path.relative_to(root)}:{item.line}: {why}")
    problems += [f"import loop: {' <-> '.join(c)}" for c in cycles(found)]
    return problems
