"""The report of a ``kdpipe sweep`` (``pipeline.cli.sweep``): which evaluation folders each table row reads.

Per evaluation stage of the plain config, one row shared by every variant when every variant uses the same
copies of it (the teacher's evaluation), else one row per variant with one evaluation per seed; the training
folder of each row's model (its ``--model`` reference) gives the curves. ``stages.summary.sweep`` renders it.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli.sweep import Plan, Run
from pipeline.config import references
from stages.summary.sweep import SweepRow, publish_sweep


def evaluation_stages(plan: Plan, kind: str = "model") -> list[str]:
    """The original evaluate stages the report reads: ``kind`` ``model`` (evaluations) or ``selection``."""
    stages = plan.spec.evaluate if kind == "model" and plan.spec.evaluate else [
        n for n, b in plan.stages.items() if b["command"] == "evaluate"]
    return [n for n in stages if kind in (plan.stages[n].get("args") or {})]


def report_rows(plan: Plan, kind: str = "model") -> list[SweepRow]:
    """The report's rows: per evaluation stage, one row shared by every variant, or one per variant."""
    rows = []
    for stage in evaluation_stages(plan, kind):
        groups = {}
        for run in plan.runs:
            groups.setdefault(run.variant.name, []).append(run)
        per_variant = {v: _distinct(runs, stage) for v, runs in groups.items()}
        shared = len({tuple(c for c, _ in copies) for copies in per_variant.values()}) == 1
        label = plan.spec.labels.get(stage, stage)
        for variant, copies in per_variant.items():
            rows.append(_row(plan, stage, label, None if shared else variant, copies))
            if shared:
                break
    return rows


def _distinct(runs: list[Run], stage: str) -> list[tuple[str, Run]]:
    seen: dict[str, Run] = {}
    for run in runs:
        seen.setdefault(run.copies[stage], run)
    return list(seen.items())


def _row(plan: Plan, stage: str, label: str, variant: str | None, copies: list[tuple[str, Run]]) -> SweepRow:
    folders = [plan.config.stages[c].out for c, _ in copies]
    model = references((plan.stages[stage].get("args") or {}).get("model", ""))
    trainings = []
    for _, run in copies:
        trained = next((run.copies[m] for m in sorted(model) if m in run.copies), None)
        stage_of = plan.config.stages.get(trained) if trained else None
        ok = stage_of is not None and stage_of.command in ("train", "teacher")
        trainings.append(stage_of.out if ok else None)
    return SweepRow(label=label, variant=variant, stage=stage, evaluations=tuple(folders),
                    trainings=tuple(trainings), seeds=tuple(r.seed for _, r in copies))


def write_report(plan: Plan) -> tuple[Path, dict]:
    """Publish the sweep's comparison report in ``RUN_DIR/report-<digest>/``; return its manifest and summary."""
    spec = plan.spec
    meta = {"title": spec.title, "source": spec.source, "stage": spec.stage, "seeds": spec.seeds,
            "seed_stages": list(spec.seed_stages),
            "variants": [{"name": v.name, "values": [{"stage": s, "arg": a, "value": x} for s, a, x in v.values]}
                         for v in spec.variants],
            "runs": [{"name": r.name, "variant": r.variant.name, "seed": r.seed, "copies": r.copies} for r in plan.runs]}
    return publish_sweep(plan.config.run_dir / f"report-{plan.digest}", report_rows(plan, "model"),
                         precision=report_rows(plan, "selection"), meta=meta)
