"""Pipeline configs: YAML naming each stage's command, arguments and output folder, for run / submit / status.

A config is read with ``pipeline.safe_yaml`` (yaml's safe loader, size- and alias-limited), patched by
``--set key=value`` overrides, validated against ``manifests/config.schema.json``, then resolved: defaults filled
in, paths made absolute, and ``${stage}`` references replaced by that stage's output folder. The resolved config is hashed (sha256 of its canonical JSON);
the hash is exported to every stage as ``KDPIPE_CONFIG_HASH`` (manifests record it in ``producer``) and the
resolved config is written beside every output (``OUT/_config/config-<hash12>.json``) and in the run folder.

Each stage becomes one command line ``kdpipe <command> [argv...] [--flag value ...] --out OUT``; see
``stage_argv`` (``entry: module`` runs ``python -m module <command> ...`` instead, for stages outside kdpipe whose
module has ``main(argv) -> int``). This module knows command names only to pick a default ``mode``; it imports no stage.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import jsonschema

from pipeline.atomic import write_atomic
from pipeline.errors import InputError
from pipeline.hashing import sha256_json
from pipeline.manifest import MANIFEST_NAME
from pipeline.safe_yaml import load_yaml, read_yaml_file
from pipeline.signals import STOP_MODE_ENV
from pipeline.storage import RemotePath, classify, put_object, scheme_of

CONFIG_HASH_ENV = "KDPIPE_CONFIG_HASH"
CONFIG_DIR = "_config"
RESOLVED_NAME = "config.resolved.json"
DEFAULT_MODES = {"ingest": "array", "index": "array", "logits": "array", "reshard": "array", "train": "torchrun"}
SLURM_DEFAULTS = {
    "partition": None, "account": None, "qos": None, "constraint": None, "time": "01:00:00",
    "finalize_time": None, "cpus_per_task": 1, "gpus": 0, "nodes": 1, "mem": None, "max_parallel": None,
    "signal_grace_s": 120, "requeue": True, "preamble": None, "extra_directives": [], "master_port": 29500,
}
_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class Stage:
    """One resolved stage: the command line it runs, where it writes, how it is scheduled."""

    name: str
    command: str
    entry: str
    argv: list[str]
    args: dict[str, Any]
    out: Path | None
    outputs: list[Path]
    mode: str
    array: int
    task_args: list[str]
    finalize_args: list[str]
    needs: list[str]
    stop: str
    env: dict[str, str]
    slurm: dict[str, Any]

    @property
    def manifests(self) -> list[Path]:
        """The manifest files that exist when the stage is complete (none for a stage without output)."""
        return [folder / MANIFEST_NAME for folder in self.outputs]


@dataclass(frozen=True)
class Config:
    """A loaded, validated, resolved config and its hash."""

    data: dict
    hash: str
    source: Path | None
    stages: dict[str, Stage] = field(default_factory=dict)

    run_dir = property(lambda self: location(self.data["run_dir"]))
    workdir = property(lambda self: Path(self.data["workdir"]))
    python = property(lambda self: self.data["python"])
    name = property(lambda self: self.data["name"])

    def select(self, names: Iterable[str] | None) -> list[Stage]:
        """The named stages in config order (all when ``names`` is empty); unknown names are an error."""
        wanted = [n for item in (names or []) for n in str(item).split(",") if n]
        unknown = sorted(set(wanted) - set(self.stages))
        if unknown:
            raise InputError(f"--stages: unknown stage(s) {', '.join(unknown)}; "
                             f"the config has {', '.join(self.stages)}")
        return [s for n, s in self.stages.items() if not wanted or n in wanted]


def load_config(path: str | Path, overrides: Iterable[str] = (), cwd: Path | None = None) -> Config:
    """Read, override, validate and resolve a config file.

    Args:
        path: the YAML file.
        overrides: ``key.sub=value`` strings (values parsed as YAML scalars/lists).
        cwd: folder that relative ``run_dir``/``workdir`` are taken from (default: the current folder).
    """
    path = Path(path)
    raw = read_yaml_file(path)  # size- and alias-limited before anything walks the value
    return config_from_dict(raw, overrides, cwd=cwd, source=path)


def config_from_dict(raw: Any, overrides: Iterable[str] = (), *, cwd: Path | None = None,
                     source: Path | None = None) -> Config:
    """Build a ``Config`` from an already parsed mapping (see ``load_config``)."""
    where = str(source) if source else "config"
    if not isinstance(raw, dict):
        raise InputError(f"{where}: a config must be a YAML mapping with a 'stages' key")
    raw = apply_overrides(copy.deepcopy(raw), overrides)
    validate_config(raw, where)
    data = resolve(raw, Path(cwd or os.getcwd()).resolve(), where)
    return Config(data=data, hash=config_hash(data), source=source,
                  stages={name: _stage(name, body) for name, body in data["stages"].items()})


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """Apply ``a.b.c=value`` overrides in order; intermediate mappings are created as needed."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise InputError(f"--set {item!r}: expected key.sub=value (e.g. stages.logits.args.topk=5)")
        value = load_yaml(text, f"--set {item!r}") if text else ""  # names the item when it is not valid YAML
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise InputError(f"--set {item!r}: {part!r} is not a mapping in the config")
            node = child
        node[parts[-1]] = value
    return raw


def _schema() -> dict:
    return json.loads(resources.files("manifests").joinpath("config.schema.json").read_text())


def validate_config(raw: dict, where: str = "config") -> None:
    """Raise ``InputError`` naming the field when ``raw`` fails the config schema."""
    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(raw), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        field_name = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise InputError(f"{where}: field {field_name!r} is invalid: {err.message}")


def resolve(raw: dict, cwd: Path, where: str = "config") -> dict:
    """Fill defaults, make paths absolute, resolve ``${stage}`` references; return the resolved mapping."""
    name = raw.get("name") or (Path(where).stem if where != "config" else "pipeline")
    run_dir = _absolute(raw.get("run_dir", f"runs/{name}"), cwd)
    data = {"name": name, "run_dir": str(run_dir), "workdir": str(_absolute(raw.get("workdir", "."), cwd)),
            "python": raw.get("python") or _default_python(), "env": _env(raw.get("env", {})),
            "slurm": {**SLURM_DEFAULTS, **raw.get("slurm", {})}, "stages": {}}
    outs = {"run_dir": str(run_dir), "workdir": data["workdir"]}
    for stage_name, body in raw["stages"].items():
        data["stages"][stage_name] = _resolve_stage(stage_name, body, data, outs, f"{where}: stage {stage_name!r}")
        outs[stage_name] = data["stages"][stage_name]["out"]
    return data


def _resolve_stage(name: str, body: dict, data: dict, outs: dict, where: str) -> dict:
    refs: set[str] = set()
    sub = lambda value: _substitute(value, outs, refs, where)
    out = body.get("out", name)
    out = None if out is None else _absolute(sub(out), data["run_dir"])
    mode = body.get("mode") or DEFAULT_MODES.get(body["command"]) or ("array" if "array" in body else "single")
    stage = {
        "command": body["command"], "entry": body.get("entry", "pipeline"),
        "argv": [sub(v) for v in body.get("argv", []) if v is not None],
        "args": {k: ([sub(x) for x in v] if isinstance(v, list) else sub(v)) for k, v in body.get("args", {}).items()},
        "out": out, "outputs": [] if out is None else [_absolute(o, out) for o in body.get("outputs", ["."])],
        "mode": mode, "array": int(body.get("array", 1)),
        "task_args": body.get("task_args", ["--no-finalize"] if mode == "array" else []),
        "finalize_args": body.get("finalize_args", ["--finalize"] if mode == "array" else []),
        "stop": body.get("stop", "finish"), "env": {**data["env"], **_env(body.get("env", {}))},
        "slurm": {**data["slurm"], **body.get("slurm", {})},
    }
    stage["env"] = {k: sub(v) for k, v in stage["env"].items()}
    missing = sorted(set(body.get("needs", [])) - set(data["stages"]))
    if missing:
        raise InputError(f"{where}: needs {', '.join(missing)}, which is not a stage before it")
    stage["needs"] = sorted((refs - {"run_dir", "workdir"}) | set(body.get("needs", [])))
    return stage


def _substitute(value: Any, outs: dict, refs: set, where: str) -> Any:
    """Replace ``${name}`` in a string by the output folder of stage ``name`` (``$${`` is a literal ``${``)."""
    if not isinstance(value, str):
        return value

    def repl(match: re.Match) -> str:
        if match.group(0) == "$${":
            return "${"
        ref = match.group(1)
        if ref not in outs or outs[ref] is None:
            known = ", ".join(k for k, v in outs.items() if v is not None)
            raise InputError(f"{where}: ${{{ref}}} is not a stage with an output folder defined before this one "
                             f"(known: {known}); stages run in config order")
        refs.add(ref)
        return outs[ref]

    return _REF.sub(repl, value)


def rename_refs(value: Any, names: dict[str, str]) -> Any:
    """``value`` with every ``${old}`` reference to a stage in ``names`` replaced by ``${names[old]}`` (strings,
    and lists/dicts of them; ``$${`` literals and other references are kept). ``kdpipe sweep`` uses it."""
    if isinstance(value, list):
        return [rename_refs(v, names) for v in value]
    if isinstance(value, dict):
        return {k: rename_refs(v, names) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    repl = lambda m: m.group(0) if m.group(0) == "$${" or m.group(1) not in names else "${" + names[m.group(1)] + "}"
    return _REF.sub(repl, value)


def references(value: Any) -> set[str]:
    """The names that ``${name}`` references in ``value`` point at (strings, lists and dicts of them)."""
    if isinstance(value, (list, dict)):
        items = value.values() if isinstance(value, dict) else value
        return set().union(*(references(v) for v in items)) if items else set()
    return {m.group(1) for m in _REF.finditer(value) if m.group(1)} if isinstance(value, str) else set()


def _absolute(value: str, base: str | Path) -> str:
    """``value`` made absolute against ``base``; an object-storage URL (``s3://b/x``) stays one, and a relative
    path under a URL ``base`` is joined to it (``run_dir: s3://b/run`` puts every stage output in the bucket)."""
    if scheme_of(str(value)):
        return classify(str(value)).target.rstrip("/")
    if scheme_of(str(base)):
        return str(location(str(base)) / str(value))
    path = Path(os.path.expanduser(value))
    return str((path if path.is_absolute() else Path(base) / path).resolve())


def location(text: str) -> Path | RemotePath:
    """A resolved config location: a local ``Path``, or a ``RemotePath`` for an ``s3://``/``gs://`` prefix."""
    return RemotePath(classify(text).target) if scheme_of(text) else Path(text)


def _env(env: dict) -> dict[str, str]:
    return {k: _arg_text(v) for k, v in env.items()}


def _default_python() -> str:
    return sys.executable


def _stage(name: str, body: dict) -> Stage:
    return Stage(name=name, command=body["command"], entry=body.get("entry", "pipeline"),
                 argv=[_arg_text(v) for v in body["argv"]],
                 args=body["args"], out=location(body["out"]) if body["out"] else None,
                 outputs=[location(o) for o in body["outputs"]], mode=body["mode"], array=body["array"],
                 task_args=list(body["task_args"]), finalize_args=list(body["finalize_args"]),
                 needs=list(body["needs"]), stop=body["stop"], env=dict(body["env"]), slurm=dict(body["slurm"]))


def config_hash(data: dict) -> str:
    """sha256 of the resolved config's canonical JSON, stage order included."""
    return sha256_json({**data, "stage_order": list(data["stages"])})


def _arg_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def stage_argv(stage: Stage, extra: Iterable[str] = ()) -> list[str]:
    """The stage's ``kdpipe`` argv: command, positional argv, ``--flag value`` per arg, ``--out``, ``extra``.

    ``key: value`` gives ``--key value`` (underscores become dashes); ``true`` gives a bare ``--key``;
    ``false``/``null`` leave it out; a list gives ``--key v1 v2 ...``.
    """
    argv = [stage.command, *stage.argv]
    for key, value in stage.args.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *(_arg_text(v) for v in value)]
        else:
            argv += [flag, _arg_text(value)]
    if stage.out is not None:
        argv += ["--out", str(stage.out)]
    return argv + list(extra)


def stage_env(config: Config, stage: Stage) -> dict[str, str]:
    """Variables every process of ``stage`` gets: the config's and stage's env, the config hash, stop mode."""
    return {**stage.env, CONFIG_HASH_ENV: config.hash, STOP_MODE_ENV: stage.stop}


def resolved_document(config: Config) -> bytes:
    """The resolved config with its hash, as written beside outputs (pretty JSON)."""
    body = {"config_hash": config.hash, "source": str(config.source) if config.source else None,
            "config": config.data}
    return json.dumps(body, indent=2).encode() + b"\n"  # key order kept: stages run in config order


def write_resolved(config: Config, folder: Path) -> Path:
    """Write the resolved config into ``folder/_config/config-<hash12>.json`` (kept per hash); return it."""
    folder = folder if isinstance(folder, RemotePath) else Path(folder)
    target = folder / CONFIG_DIR / f"config-{config.hash[:12]}.json"
    if isinstance(target, RemotePath):
        if not target.exists():
            put_object(str(target), resolved_document(config))
        return target
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, resolved_document(config))
    return target


def write_run_config(config: Config) -> Path:
    """Write ``RUN_DIR/config.resolved.json`` (the latest resolved config; ``kdpipe status RUN_DIR`` reads it)."""
    write_resolved(config, config.run_dir)
    target = config.run_dir / RESOLVED_NAME
    if isinstance(target, RemotePath):  # run_dir in object storage: one object written whole
        put_object(str(target), resolved_document(config))
        return target
    config.run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(target, resolved_document(config))
    return target


def load_resolved(run_dir: Path) -> Config:
    """The config saved in a run folder by ``run``/``submit`` (no re-resolution: paths are already absolute)."""
    path = (run_dir if isinstance(run_dir, RemotePath) else location(str(run_dir))) / RESOLVED_NAME
    try:
        body = json.loads(path.read_bytes())
        data = body["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a kdpipe run folder (no readable {RESOLVED_NAME}: {exc})") from None
    return Config(data=data, hash=config_hash(data), source=path,
                  stages={name: _stage(name, body) for name, body in data["stages"].items()})
