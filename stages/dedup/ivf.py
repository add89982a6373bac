"""Dedup at billion scale (``--method ivf``): sharded inverted-list search as a chain of array-task steps.

Each step is a folder of parts + receipts (``pipeline.parts.PartStore``) finalized into a ``dedup_step``
manifest, so every step is restartable part by part, any task count gives the same bytes, and ``kdpipe run``
/ ``submit`` chain the steps as stages (``--step``; ``--step all`` runs them in order in one task):

1. ``train`` (1 part, ``OUT/_ivf/train``): spherical k-means (faiss) of ``--lists`` centroids on
   ``--train-sample`` embeddings drawn with ``--seed`` from whole logits parts (chosen by the same seed).
2. ``assign`` (one part per ``--assign-block`` logits parts, ``OUT/_ivf/assign``): each image's ``--probe`` nearest lists; one row
   per (image, list): its own (nearest) list is its ``primary`` row, the others are query copies. Rows are
   sorted by (list, row id) in small row groups, so a search part reads only the row groups of its lists.
   With ``--reference``, the part's images are also searched against an exact index of the reference set
   (contamination is linear in the pool; the reference index is N_ref x D float32 per task).
3. ``search`` (one part per ``--list-block`` lists, ``OUT/_ivf/search``): per list, every row (primary or copy)
   against the list's primary rows: each row's ``--neighbors`` nearest, pairs at cosine >= ``--threshold``.
   A pair (x, y) is found when y's list is among x's probe lists or x's among y's.
4. ``group`` (1 part, ``OUT``): union-find over the pairs, streamed part by part; per group the smallest key that
   is not contaminated is kept; the exclusion artifact is the flat method's format (``select --exclude``).

Row ids are ``(logits part << 32) + row``. Memory: train O(train_sample x D), assign O(assign_block logits parts +
reference), search O(the rows of ``list_block`` lists), group O(rows that are in a pair). Search and assign use
faiss on the GPU(s) when ``faiss.get_num_gpus() > 0`` (same results on CPU within the recall figure).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline import manifest as mf
from pipeline.errors import InputError
from pipeline.parts import PartStore, fingerprint
from pipeline.planning import plan_block
from pipeline.tasks import file_entries, finalize, run_parts, task_info
from pipeline.verify import parquet_rows
from stages.artifacts.logits_reader import LogitsSet, open_logits
from stages.artifacts.sidecars import with_sidecars
from stages.dedup import ivf_compute, ivf_group, ivf_pq
from stages.dedup.core import check_embeddings
from stages.dedup.options import DedupOptions

log = logging.getLogger(__name__)
CODE_VERSION = "dedup-ivf-1"
STEP_DIR = "_ivf"
STEP_KIND = "dedup_step"
ORDER = ("train", "assign", "search", "group")


@dataclass(frozen=True)
class Run:
    """One invocation: the inputs, the settings, and which task of how many this is."""

    pool: LogitsSet
    ref: LogitsSet | None
    out: Path
    settings: ivf_compute.Settings
    task_index: int = 0
    num_tasks: int = 1
    finalize_only: bool = False
    do_finalize: bool = True
    retry_failed: bool = False
    max_attempts: int = 3


def dedup_ivf(query: str | Path, out: str | Path, *, reference: str | Path | None = DedupOptions.reference,
              threshold: float = DedupOptions.threshold, neighbors: int = DedupOptions.neighbors,
              batch_rows: int = DedupOptions.batch_rows, step: str = DedupOptions.step,
              lists: int = DedupOptions.lists, probe: int = DedupOptions.probe,
              train_sample: int = DedupOptions.train_sample, seed: int = DedupOptions.seed,
              list_block: int = DedupOptions.list_block, assign_block: int = DedupOptions.assign_block,
              quantizer: str = DedupOptions.quantizer, pq: int = DedupOptions.pq,
              pq_margin: float = DedupOptions.pq_margin, task_index: int = 0, num_tasks: int = 1,
              finalize_only: bool = False, do_finalize: bool = True, retry_failed: bool = False,
              max_attempts: int = 3) -> Path | None:
    """Run ``step`` (or every step, in one task) of the sharded near-duplicate search of ``query``.

    Args:
        query, out, reference, threshold, neighbors, batch_rows: as ``stages.dedup.stage.dedup``.
        step: ``train``, ``assign``, ``search``, ``group`` or ``all`` (all steps in order; one task only).
        lists, probe, train_sample, seed, list_block, assign_block, quantizer, pq, pq_margin: see
            ``DedupOptions`` (``pq`` > 0: PQ codes in the search step, candidates re-checked exactly).
        task_index, num_tasks: this array task; it runs its block (``plan_block``) of the step's parts.
        finalize_only: only write the step's manifest (every part committed).
        do_finalize: write the step's manifest when every part is committed.
        retry_failed, max_attempts: as every array stage.

    Returns:
        The exclusion manifest's path once ``group`` is finalized, else None.
    """
    settings = ivf_compute.Settings(threshold=threshold, neighbors=neighbors, batch_rows=batch_rows, lists=lists,
                                    probe=probe, train_sample=train_sample, seed=seed, list_block=list_block,
                                    assign_block=assign_block, quantizer=quantizer, pq=pq, pq_margin=pq_margin)
    settings.check()
    if step == "all" and num_tasks > 1:
        raise InputError(f"--step all runs every step in one task, not {num_tasks}: give --step "
                         f"{'|'.join(ORDER)} (one array job per step, in that order)")
    pool = open_logits(query)
    ref = open_logits(reference) if reference else None
    check_embeddings(pool, ref)
    run = Run(pool, ref, Path(out), settings, task_index, num_tasks, finalize_only, do_finalize, retry_failed,
              max_attempts)
    result = None
    for name in ORDER if step == "all" else (step,):  # with `all`, the steps before group always finalize
        result = STEPS[name](run if step != "all" or name == "group" else replace(run, do_finalize=True))
    return result if step in ("all", "group") else None


def step_folder(out: Path, name: str) -> Path:
    """Where step ``name`` writes (``group`` writes the exclusion artifact in ``out`` itself)."""
    return Path(out) if name == "group" else Path(out) / STEP_DIR / name


def _store(run: Run, name: str, params: dict) -> PartStore:
    return PartStore(step_folder(run.out, name), ".parquet", fingerprint(f"dedup-ivf-{name}", params, CODE_VERSION),
                     parquet_rows)


def _run_step(run: Run, name: str, store: PartStore, num_parts: int, write, build) -> Path | None:
    """Commit this task's block of the step's parts, then finalize when every part is committed."""
    if not run.finalize_only:
        info = task_info(run.task_index, run.num_tasks)
        produce = lambda index: store.commit(index, lambda tmp: write(index, tmp), info)
        report = run_parts(store, plan_block(run.task_index, run.num_tasks, num_parts), produce,
                           max_attempts=run.max_attempts, retry_failed=run.retry_failed,
                           desc=f"dedup {name}", num_parts=num_parts)
        if report.exit_code:
            raise InputError(f"{store.out_dir}: dedup {name} failed: {report.failed or report.given_up}; the log "
                             "above names the cause; rerun the task (committed parts are kept)")
    if not (run.do_finalize or run.finalize_only):
        return None
    receipts = store.receipts()
    if not run.finalize_only and any(store.matching(i, receipts.get(i), verify=False) is None
                                     for i in range(num_parts)):
        log.info("dedup %s: parts of other tasks are missing; their tasks (or --finalize) finalize", name)
        return None
    return finalize(store, num_parts, build)


def _step_manifest(run: Run, name: str, params: dict, inputs: list):
    def build(receipts: list[dict]) -> dict:
        totals: dict = {"rows": sum(r["rows"] for r in receipts)}
        for receipt in receipts:
            for key, value in receipt["extra"].items():
                totals[key] = totals.get(key, 0) + value
        return mf.build(STEP_KIND, stage="dedup", params={"step": name, **params}, files=file_entries(receipts),
                        inputs=inputs, totals=totals)
    return build


def _done(run: Run, name: str) -> mf.Manifest:
    """The finalized manifest of an earlier step (its settings equal this run's), or a named error."""
    path = step_folder(run.out, name) / mf.MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"{path}: no manifest yet; run `kdpipe dedup --method ivf --step {name}` (all of its "
                         "tasks) before this step, with the same --query/--out and settings")
    done = mf.load(path, kind=STEP_KIND)
    ours = {"query_id": run.pool.id, "reference_id": run.ref.id if run.ref else None, **run.settings.train_params(),
            "probe": run.settings.probe, "threshold": run.settings.threshold, "neighbors": run.settings.neighbors,
            "list_block": run.settings.list_block, "assign_block": run.settings.assign_block,
            "quantizer": run.settings.quantizer, **run.settings.search_params()}
    theirs = {**done.params, "pq": done.params.get("pq", 0)} if name == "train" else done.params  # absent: off
    ours = {**ours, "pq": run.settings.pq} if name == "train" else ours
    for key, value in ours.items():
        if key in theirs and theirs[key] != value:
            raise InputError(f"{path}: made with {key}={theirs[key]!r}, this step was given {value!r}; give "
                             "every step the same --query, --reference and settings")
    return done


def train(run: Run) -> Path | None:
    params = {"query_id": run.pool.id, **run.settings.train_params()}
    store = _store(run, "train", params)
    write = lambda index, tmp: ivf_compute.train_part(run.pool, run.settings, tmp)
    inputs = [mf.input_ref(run.pool.manifest, store.out_dir, "query")]
    return _run_step(run, "train", store, 1, write, _step_manifest(run, "train", params, inputs))


def assign(run: Run) -> Path | None:
    trained = _done(run, "train")
    params = {"train_id": trained.id, "probe": run.settings.probe, "threshold": run.settings.threshold,
              "list_block": run.settings.list_block, "assign_block": run.settings.assign_block,
              "quantizer": run.settings.quantizer, "reference_id": run.ref.id if run.ref else None}
    store = _store(run, "assign", params)
    state = {}

    def write(index: int, tmp: Path):
        if not state:  # built once per task, only when a part is to be made
            state.update(ivf_compute.assign_state(trained, run.ref, run.settings))
        return ivf_compute.assign_part(run.pool, index, state, run.settings, tmp)
    inputs = [mf.input_ref(trained, store.out_dir, "ivf_train")]
    inputs += [mf.input_ref(run.ref.manifest, store.out_dir, "reference")] if run.ref else []
    return _run_step(run, "assign", store, ivf_compute.assign_parts(run.pool, run.settings), write,
                     _step_manifest(run, "assign", params, inputs))


def search(run: Run) -> Path | None:
    trained = _done(run, "train")
    assigned = _done(run, "assign")
    params = {"assign_id": assigned.id, **run.settings.search_params()}
    store = _store(run, "search", params)
    settings = run.settings
    state = {}

    def write(index: int, tmp: Path):
        if not state:  # loaded once per task, only when a part is to be made
            state.update(r=ivf_compute.AssignReader(assigned, pq=settings.pq > 0),
                         pq=ivf_pq.from_train_step(trained, settings.pq))
        return ivf_compute.search_part(state["r"], index, settings, tmp, state["pq"], run.pool)
    inputs = [mf.input_ref(assigned, store.out_dir, "ivf_assign")]
    return _run_step(run, "search", store, settings.search_parts(), write,
                     _step_manifest(run, "search", params, inputs))


def group(run: Run) -> Path | None:
    _done(run, "train")
    searched, assigned = _done(run, "search"), _done(run, "assign")
    params = {"threshold": run.settings.threshold, "neighbors": run.settings.neighbors, "metric": "cosine",
              "index": "ivf", "method": "ivf", **run.settings.train_params(), "probe": run.settings.probe,
              "list_block": run.settings.list_block, "assign_block": run.settings.assign_block,
              "quantizer": run.settings.quantizer, **run.settings.search_params(), "query_id": run.pool.id,
              "reference_id": run.ref.id if run.ref else None, "teacher_id": run.pool.teacher_id}
    store = _store(run, "group", params)
    write = lambda index, tmp: ivf_group.group_part(searched, assigned, run.settings, tmp)
    inputs = [mf.input_ref(run.pool.manifest, store.out_dir, "query")]
    inputs += [mf.input_ref(run.ref.manifest, store.out_dir, "reference")] if run.ref else []
    inputs += [mf.input_ref(searched, store.out_dir, "ivf_search")]
    build = lambda receipts: mf.build(
        "exclusion", stage="dedup", params=params, files=file_entries(receipts), inputs=inputs,
        totals={"rows": receipts[0]["rows"], "samples": int(run.pool.manifest.totals.get("rows", 0)),
                **receipts[0]["extra"]})
    return _run_step(run, "group", store, 1, write, with_sidecars(store.out_dir, build))


STEPS = {"train": train, "assign": assign, "search": search, "group": group}
