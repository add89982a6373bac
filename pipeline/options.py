"""Options: every stage option's default and help stated once, in a frozen dataclass, and the CLI made from it.

A stage package declares its options as a dataclass whose fields are made with ``option(default, help)``;
``add_options`` turns the fields into argparse flags whose own default is ``None`` (so the parser states no
default), and ``from_args`` fills every flag left out from the dataclass. Configs reach stages through the same
flags, so a value given nowhere is the dataclass's everywhere. ``TaskOptions`` holds the options every array
stage shares (task index and count, retries, finalize).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline.planning import task_from_env

T = TypeVar("T")
_ARGPARSE = ("type", "choices", "nargs", "metavar")


def option(default: Any, help: str, *, flag: str | None = None, **argparse_kwargs) -> Any:
    """A dataclass field carrying its CLI flag: ``help``, an optional ``flag`` name (default ``--field-name``;
    a bool that defaults to True takes a ``--no-...`` flag that sets it False) and argparse's
    type/choices/nargs/metavar."""
    unknown = set(argparse_kwargs) - set(_ARGPARSE)
    if unknown:
        raise TypeError(f"option(): unknown argparse settings {sorted(unknown)}")
    metadata = {"help": help, "flag": flag, "argparse": argparse_kwargs}
    if isinstance(default, (list, dict, set)):
        raise TypeError("option(): use a tuple (immutable) as a default, not a list/dict/set")
    return dataclasses.field(default=default, metadata=metadata)


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                skip: tuple[str, ...] = (), title: str | None = None) -> None:
    """Add one flag per field of ``cls`` (those made with ``option``) to ``parser``; argparse defaults are None."""
    target = parser.add_argument_group(title) if title else parser
    for field in dataclasses.fields(cls):
        if field.name in skip or "help" not in field.metadata:
            continue
        flag, default = _flag(field), field.default
        if default is True and not flag.startswith("--no-"):
            raise TypeError(f"{cls.__name__}.{field.name}: a bool defaulting to True needs a --no-... flag")
        shown = f"{field.metadata['help']} (default: {_shown(default)})"
        if isinstance(default, bool):
            store = "store_false" if default else "store_true"  # a True default needs a --no-... flag
            target.add_argument(flag, dest=field.name, action=store, default=None, help=shown)
        else:
            kwargs = {"type": type(default) if isinstance(default, (int, float, str)) else None,
                      **field.metadata["argparse"]}
            target.add_argument(flag, dest=field.name, default=None, help=shown,
                                **{k: v for k, v in kwargs.items() if v is not None})


def _shown(default: Any) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return " ".join(str(v) for v in default) or "none"
    return "none" if default is None else str(default)


def from_args(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """An instance of ``cls``: each field from ``given``, else from ``args`` when not None, else its default."""
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in given:
            values[field.name] = given[field.name]
            continue
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = tuple(value) if isinstance(field.default, tuple) and value is not None else value
    return cls(**values)


def as_kwargs(options: Any) -> dict[str, Any]:
    """The fields of an options instance as keyword arguments (shallow: nested values stay objects)."""
    return {field.name: getattr(options, field.name) for field in dataclasses.fields(options)}


@dataclass(frozen=True)
class TaskOptions:
    """What every array stage takes besides its own options: which task this is, retries, finalize."""

    task_index: int | None = option(None, "this task's index (default: SLURM_ARRAY_TASK_ID, else 0)", type=int)
    num_tasks: int | None = option(None, "number of tasks (default: the SLURM array's size, else 1)", type=int)
    retry_failed: bool = option(False, "retry parts (and samples) that failed before")
    max_attempts: int = option(3, "give up on a part after this many failures")
    no_finalize: bool = option(False, "do not write the manifest even if every part is committed")
    finalize: bool = option(False, "only write the manifest (no parts)")

    def resolved(self) -> tuple[int, int]:
        """(index, count) from the flags, else the SLURM array variables, else (0, 1)."""
        return task_from_env(self.task_index, self.num_tasks)
