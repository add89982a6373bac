"""``kdpipe sweep``: the variants of one stage expanded into one config, run (or submitted), then compared.

A sweep starts from a pipeline config and a list of *runs*. A run is a variant (values of stage arguments:
the grid of ``--vary key=v1,v2`` options, or the named variants of the config's ``x-sweep`` block, or both
crossed) and a seed index (``--seeds N`` sets ``seed`` of the swept stage, or of ``seed_stages``, to its
value + 0..N-1). Every run is the whole config with its values applied. A stage whose body (arguments, or
the copies of the stages it reads) differs between runs gets one copy per distinct body, named
``STAGE-<label>`` and written to ``RUN_DIR/<label>/<out>``; a stage equal in every run (the data, the
teacher, ...) stays once, where the plain config puts it. The result is an ordinary config, written to
``RUN_DIR/sweep.yaml``: ``kdpipe run`` runs it here, ``kdpipe submit`` runs it as SLURM (array) jobs chained
by dependencies, ``kdpipe status`` reports on it, and a rerun skips what is complete.

The report (``stages.summary.sweep``) then compares every evaluation stage of every variant (mean and spread
over seeds), beside the evaluations that every variant shares (e.g. the teacher's). Config loading, ``--set``
overrides, ``${stage}`` references and resolution are ``pipeline.config``'s; running is
``pipeline.cli.run.run_pipeline``'s.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipeline.atomic import write_atomic
from pipeline.config import Config, apply_overrides, config_from_dict, references, rename_refs, validate_config
from pipeline.errors import InputError
from pipeline.hashing import sha256_json
from pipeline.safe_yaml import read_yaml_file
from pipeline.storage import RemotePath

SWEEP_KEY = "x-sweep"
PLAN_NAME = "sweep.yaml"
_SLUG = re.compile(r"[^A-Za-z0-9_]+")
_REFERRING = ("args", "argv", "env", "out")


@dataclass(frozen=True)
class Variant:
    """One point of the sweep: a name and the stage argument values it sets."""

    name: str
    values: tuple[tuple[str, str, Any], ...]  # (stage, argument, value)


@dataclass(frozen=True)
class SweepSpec:
    """What to sweep: the stage, its variants, seeds, and what the report shows."""

    stage: str
    variants: tuple[Variant, ...]
    seeds: int = 1
    seed_stages: tuple[str, ...] = ()
    evaluate: tuple[str, ...] = ()
    labels: dict = field(default_factory=dict)
    title: str = ""
    source: str = ""


@dataclass
class Run:
    """One variant at one seed index, and the copy of every stage it uses."""

    variant: Variant
    seed: int | None
    copies: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.variant.name + ("" if self.seed is None else f" seed={self.seed}")


@dataclass
class Plan:
    """A planned sweep: the spec, the combined config (raw and resolved) and its runs."""

    spec: SweepSpec
    raw: dict
    config: Config
    runs: list[Run]
    stages: dict  # the plain config's stage bodies, by their own names

    @property
    def digest(self) -> str:
        """Identity of the sweep's stages and report settings (names report folders): the same sweep gives the
        same digest; another label or title gives another folder rather than a refused rewrite."""
        spec = self.spec
        shown = {"labels": spec.labels, "title": spec.title, "source": spec.source, "evaluate": list(spec.evaluate)}
        return sha256_json({"stages": self.raw["stages"], "report": shown})[:12]


def experiments() -> list[str]:
    """Names of the bundled experiment configs (``pipeline/cli/configs/experiments/*.yaml``)."""
    folder = resources.files("pipeline.cli").joinpath("configs", "experiments")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def experiment_path(name: str) -> Path:
    """The bundled experiment config ``name``; an unknown name is an ``InputError`` listing the known ones."""
    if name not in experiments():
        raise InputError(f"--experiment {name!r}: not a bundled experiment; choose one of {', '.join(experiments())}")
    return Path(str(resources.files("pipeline.cli").joinpath("configs", "experiments", f"{name}.yaml")))


def read_raw(path: Path, overrides: list[str]) -> dict:
    """The config file as a mapping, ``--set`` overrides applied, validated (not yet resolved)."""
    raw = read_yaml_file(path)  # size- and alias-limited
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a config must be a YAML mapping with a 'stages' key")
    raw = apply_overrides(raw, overrides)
    validate_config(raw, str(path))
    raw.setdefault("name", Path(path).stem)
    return raw


def parse_values(text: str) -> list[Any]:
    """``v1,v2,...`` (each a YAML scalar), or a YAML flow list ``[a, "b,c"]`` for values holding commas."""
    try:
        if text.strip().startswith("["):
            values = yaml.safe_load(text)
        else:
            values = [yaml.safe_load(v) if v.strip() else "" for v in text.split(",")]
    except yaml.YAMLError as exc:
        raise InputError(f"--vary value {text!r}: not valid YAML: {exc}") from None
    if not isinstance(values, list) or not values:
        raise InputError(f"--vary value {text!r}: expected v1,v2,... or a YAML list")
    return values


def target(key: str, stage: str, stages: dict) -> tuple[str, str]:
    """``arg`` (of the swept stage) or ``STAGE.arg`` -> (stage, argument), both checked."""
    where, _, arg = key.rpartition(".")
    where = where or stage
    if where not in stages:
        raise InputError(f"sweep key {key!r}: {where!r} is not a stage of the config ({', '.join(stages)})")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", arg):
        raise InputError(f"sweep key {key!r}: {arg!r} is not an argument name (letters, digits, _ and -)")
    return where, arg


def grid(vary: dict[str, list], stage: str, stages: dict) -> list[Variant]:
    """The cartesian product of ``vary`` (key -> values), in key order; one empty variant when empty."""
    keys = list(vary)
    variants = []
    for combo in itertools.product(*(vary[k] for k in keys)):
        values = tuple((*target(k, stage, stages), v) for k, v in zip(keys, combo))
        variants.append(Variant(" ".join(f"{k}={_text(v)}" for k, v in zip(keys, combo)), values))
    return variants


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def named(block: dict, stage: str, stages: dict) -> list[Variant]:
    """The ``variants`` of an ``x-sweep`` block: name -> {key: value}."""
    out = []
    for name, values in (block or {}).items():
        if not isinstance(values, dict):
            raise InputError(f"{SWEEP_KEY}.variants.{name}: expected a mapping of key: value")
        out.append(Variant(str(name), tuple((*target(k, stage, stages), v) for k, v in values.items())))
    return out


def make_spec(raw: dict, *, stage: str | None = None, vary: list[str] = (), seeds: int | None = None,
              seed_stages: list[str] | None = None, evaluate: list[str] | None = None) -> SweepSpec:
    """The sweep of ``raw``: its ``x-sweep`` block, with the command line's values taking precedence.

    ``--vary`` options replace the block's ``vary`` grid; named ``variants`` are crossed with the grid.
    """
    block = raw.get(SWEEP_KEY) or {}
    if not isinstance(block, dict):
        raise InputError(f"{SWEEP_KEY}: expected a mapping (stage, variants, vary, seeds, ...)")
    stages = raw["stages"]
    stage = stage or block.get("stage")
    if stage not in stages:
        raise InputError(f"--stage {stage!r}: give the stage to sweep, one of {', '.join(stages)}"
                         if stage else f"--stage: give the stage to sweep (or {SWEEP_KEY}.stage in the config)")
    axes = _vary_options(vary) if vary else {k: (v if isinstance(v, list) else [v])
                                              for k, v in (block.get("vary") or {}).items()}
    points = grid(axes, stage, stages)
    names = named(block.get("variants"), stage, stages)
    variants = [Variant(" ".join(filter(None, (n.name, p.name))), n.values + p.values)
                for n in names for p in points] if names else points
    if not any(v.values for v in variants):
        raise InputError(f"nothing to sweep: give --vary key=v1,v2 (or {SWEEP_KEY}.variants / vary in the config)")
    count = int(seeds if seeds is not None else block.get("seeds", 1))
    if count < 1:
        raise InputError(f"--seeds {count}: must be >= 1")
    seeded = tuple(seed_stages or block.get("seed_stages") or [stage])
    shown = tuple(evaluate or block.get("evaluate") or ())
    for name in (*seeded, *shown):
        if name not in stages:
            raise InputError(f"sweep: {name!r} (seed_stages / evaluate) is not a stage of the config")
    return SweepSpec(stage, tuple(variants), count, seeded, shown, dict(block.get("labels") or {}),
                     str(block.get("title", "")), str(block.get("source", "")))


def _vary_options(items: list[str]) -> dict[str, list]:
    axes = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise InputError(f"--vary {item!r}: expected key=v1,v2,... (e.g. --vary alpha=0,0.5,1)")
        if key in axes:
            raise InputError(f"--vary {key}: given twice; list every value in one --vary")
        axes[key] = parse_values(text)
    return axes


def runs_of(spec: SweepSpec) -> list[Run]:
    """Every (variant, seed index) pair; seed is None when the sweep has one seed."""
    seeds = [None] if spec.seeds == 1 else list(range(spec.seeds))
    return [Run(v, s) for v in spec.variants for s in seeds]


def _body(base: dict, name: str, run: Run | None, spec: SweepSpec) -> dict:
    """Stage ``name``'s body in ``run`` (None: the plain config): its values set, its seed offset."""
    body = copy.deepcopy(base)
    values = [] if run is None else [(arg, value) for stage, arg, value in run.variant.values if stage == name]
    seeded = run is not None and bool(run.seed) and name in spec.seed_stages
    if not values and not seeded:
        return body
    args = body.setdefault("args", {})
    args.update(values)
    if seeded:
        start = args.get("seed", 0)
        if not isinstance(start, int) or isinstance(start, bool):
            raise InputError(f"stage {name}: seed {start!r} is not an integer; --seeds adds 0..N-1 to it")
        args["seed"] = start + run.seed
    return body


class _Copies:
    """The distinct stage bodies over every run, by id (a hash of the body and the ids it reads)."""

    def __init__(self):
        self.bodies: dict[str, tuple[str, dict, dict[str, str]]] = {}

    def place(self, stages: dict, run: Run | None, spec: SweepSpec) -> dict[str, str]:
        ids: dict[str, str] = {}
        for name, base in stages.items():
            body = _body(base, name, run, spec)
            refs = references([body.get(k) for k in _REFERRING]) | set(body.get("needs", []))
            upstream = {r: ids[r] for r in sorted(refs) if r in ids}
            ident = sha256_json({"stage": name, "body": body, "inputs": upstream})[:16]
            self.bodies.setdefault(ident, (name, body, upstream))
            ids[name] = ident
        return ids


def _label(users: list[Run], spec: SweepSpec) -> str:
    """A copy's folder label, from the runs using it: what their variant names share (unless they are all of
    them), and the seed when they share one."""
    names = list(dict.fromkeys(r.variant.name for r in users))
    seeds = {r.seed for r in users}
    first = users[0]
    common = [t for t in names[0].split() if all(t in n.split() for n in names[1:])]
    text = " ".join(common) if len(names) < len(spec.variants) and common else ""
    if len(seeds) == 1 and first.seed is not None:
        text += f" s{first.seed}"
    text = text.strip() or first.name
    return _SLUG.sub("-", re.sub(r"(?<=\d)\.(?=\d)", "_", text)).strip("-") or "variant"


def _names(copies: _Copies, base_ids: dict[str, str], runs: list[Run], spec: SweepSpec) -> dict[str, tuple]:
    """copy id -> (stage name in the combined config, folder label or None for the plain config's place)."""
    users: dict[str, list[Run]] = {}
    for run in runs:
        for ident in run.copies.values():
            users.setdefault(ident, []).append(run)
    out, taken = {}, set()
    for ident in (i for i in copies.bodies if i in users):
        stage = copies.bodies[ident][0]
        if base_ids.get(stage) == ident:
            out[ident] = (stage, None)
            continue
        label, n = _label(users[ident], spec), 1
        while f"{stage}-{label}" in taken:
            n += 1
            label = f"{_label(users[ident], spec)}-{n}"
        taken.add(f"{stage}-{label}")
        out[ident] = (f"{stage}-{label}", label)
    return out


def _emit(name: str, body: dict, upstream: dict, names: dict, label: str | None) -> dict:
    """A copy's body in the combined config: references renamed, output under its label's folder."""
    rename = {ref: names[ident][0] for ref, ident in upstream.items()}
    out = {k: (rename_refs(v, rename) if k in _REFERRING else v) for k, v in body.items()}
    if "needs" in body:
        out["needs"] = [rename.get(n, n) for n in body["needs"]]
    if label is not None:
        where = body.get("out", name)
        if where is not None:
            if references(where) or Path(str(where)).is_absolute():
                raise InputError(f"stage {name}: out {where!r} differs between the sweep's variants but is absolute "
                                 "or holds a ${...} reference; give it a relative out (or none) to sweep it")
            out["out"] = f"{label}/{where}"
    return out


def expand(raw: dict, spec: SweepSpec, run_dir: Path, workdir: Path) -> tuple[dict, list[Run]]:
    """The combined raw config of every run, and the runs with their stage copies."""
    stages = raw["stages"]
    copies = _Copies()
    base_ids = copies.place(stages, None, spec)
    runs = runs_of(spec)
    for run in runs:
        run.copies = copies.place(stages, run, spec)
    names = _names(copies, base_ids, runs, spec)
    combined = {}
    for stage in stages:
        for ident, (owner, body, upstream) in copies.bodies.items():
            if owner == stage and ident in names:
                combined[names[ident][0]] = _emit(stage, body, upstream, names, names[ident][1])
    for run in runs:
        run.copies = {stage: names[ident][0] for stage, ident in run.copies.items()}
    top = {k: v for k, v in raw.items() if not k.startswith("x-") and k != "stages"}
    return {**top, "run_dir": str(run_dir), "workdir": str(workdir), "stages": combined}, runs


def plan_sweep(path: Path, *, overrides: list[str] = (), out: Path | None = None, stage: str | None = None,
               vary: list[str] = (), seeds: int | None = None, seed_stages: list[str] | None = None,
               evaluate: list[str] | None = None, cwd: Path | None = None) -> Plan:
    """Read ``path``, plan the sweep, and write the combined config to ``RUN_DIR/sweep.yaml``.

    Args:
        path: the pipeline config (with or without an ``x-sweep`` block).
        overrides: ``--set key=value`` overrides of the config, applied before the sweep.
        out: the run folder (default: the config's ``run_dir``).
        stage, vary, seeds, seed_stages, evaluate: the sweep (see ``make_spec``).
        cwd: the folder relative paths are taken from (default: the current folder).
    """
    raw = read_raw(path, list(overrides))
    spec = make_spec(raw, stage=stage, vary=list(vary), seeds=seeds, seed_stages=seed_stages, evaluate=evaluate)
    base = config_from_dict(raw, cwd=cwd, source=path)  # resolves the plain config: refs and names checked
    run_dir = Path(out).resolve() if out is not None else base.run_dir
    if isinstance(run_dir, RemotePath):
        raise InputError(f"run_dir {run_dir}: `kdpipe sweep` writes its plan and report into run_dir, which must be "
                         "a folder; keep run_dir on disk and give the shard stages an s3:// out")
    combined, runs = expand(raw, spec, run_dir, base.workdir)
    config = config_from_dict(combined, cwd=cwd, source=Path(path))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / PLAN_NAME, yaml.safe_dump(combined, sort_keys=False).encode())
    return Plan(spec, combined, config, runs, raw["stages"])


def describe(plan: Plan) -> str:
    """What the sweep runs: its runs and the stage copies each adds to the shared ones (printed)."""
    shared = [n for n in plan.raw["stages"] if all(n in r.copies.values() for r in plan.runs)]
    lines = [(f"sweep of stage {plan.spec.stage}: {len(plan.runs)} run(s), {len(plan.raw['stages'])} stage(s) "
              f"({len(shared)} shared); config: {plan.config.run_dir / PLAN_NAME}")]
    for run in plan.runs:
        own = [c for s, c in run.copies.items() if c != s]
        lines.append(f"  {run.name}: {', '.join(own) or '(the plain config)'}")
    return "\n".join(lines)
