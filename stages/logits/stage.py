"""The logits stage: a frozen classifier over dataset shards -> top-K logits in Parquet, one part per shard.

``compute_logits`` runs one array task over its block of shards and (when every part is committed)
finalizes the logits manifest. It accepts a teacher card or a model card (``kdpipe evaluate`` reuses it for
a student's logits). Inputs are checked before any work: the card's classes and preprocessing must agree
with the dataset manifest, K and T must make sense, and an output folder made with other parameters is
refused by fingerprint.

Every sample is accounted for: rows + failures (by reason, with keys, in the part's receipt) = the shard's
sample count in the dataset manifest. A damaged shard fails its part only (the task goes on with the others
and then raises ``PartFailed``). Parts are byte-identical across reruns, workers, loader batches and numbers
of tasks (see ``stages.inference`` for the fixed compute batch).

With ``aug`` (``--views V --aug SPEC``) every image gives V rows, one per recorded view (``stages.views``,
docs/views.md): rows in shard order, views 0..V-1 per key, with the view columns of ``stages.artifacts.views``;
an image has V rows or none, and rows / V + failures = the shard's sample count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import manifest as mf
from pipeline.errors import InputError, IntegrityError, PartFailed
from pipeline.objstore import ObjectPartStore, finalize_remote, is_remote_out
from pipeline.parts import PartResult, PartStore, fingerprint, part_name
from pipeline.planning import plan_block
from pipeline.tasks import failure_totals, file_entries, run_parts, task_info
from pipeline.tasks import finalize as finalize_parts
from pipeline.verify import parquet_rows
from stages import imaging
from stages.artifacts.cards import is_ensemble, load_runnable, preprocesses_of
from stages.artifacts.logits_format import SCHEMA_VERSION
from stages.artifacts.sidecars import sidecars_for, with_sidecars
from stages.logits.assemble import assemble_part, recoverable_keys
from stages.logits.data import PartFeed, ShardBlock, ShardRef, make_loader
from stages.logits.inference import Engine, compute_mode, resolve_device
from stages.logits.options import LogitsOptions
from stages.logits.reuse import Base, load_base, reuse_parts
from stages.logits.write import CODE_VERSION, LOGIT_TYPES, part_metadata
from stages.models import sources
from stages.models.classifiers import classifier_head
from stages.views.spec import AugSpec, manifest_views

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setup:
    """Everything a task needs, checked before any work: inputs, parameters, the stage's fingerprint."""

    data: mf.Manifest
    card: mf.Manifest
    out: Path
    params: dict
    preprocess: imaging.Preprocess | tuple[imaging.Preprocess, ...]  # an ensemble: one per distinct member view
    device: torch.device
    spec: AugSpec | None = None

    @property
    def views(self) -> int:
        """Rows per image (V; 1 for single-view logits)."""
        return 1 if self.spec is None else self.spec.views


def compute_logits(data_manifest: str | Path, card: str | Path, out: str | Path, *, topk: int,
                   temperature: float, task_index: int = 0, num_tasks: int = 1,
                   batch_size: int = LogitsOptions.batch_size, loader_batch: int = LogitsOptions.loader_batch,
                   num_workers: int | None = LogitsOptions.num_workers, prefetch: int = LogitsOptions.prefetch,
                   embeddings: bool = LogitsOptions.embeddings, logit_dtype: str = LogitsOptions.logit_dtype,
                   device: str | None = LogitsOptions.device, compile_model: bool = LogitsOptions.compile,
                   gpu_decode: bool = LogitsOptions.gpu_decode, retry_failed: bool = False, max_attempts: int = 3,
                   finalize: bool = True, aug: AugSpec | None = None,
                   reuse: str | Path | None = LogitsOptions.reuse,
                   threads: int = LogitsOptions.threads) -> Path | None:
    """Compute the logits parts of one array task, then finalize the artifact when every part is committed.

    Args:
        data_manifest: the dataset manifest (file or folder).
        card: a teacher card or a model card (kind ``teacher`` or ``model``).
        out: the logits folder.
        topk: classes stored per sample (1..num_classes).
        temperature: T of the stored normaliser lse = logsumexp(z / T).
        task_index: this array task (0-based).
        num_tasks: the array's size; task i owns a contiguous block of shards.
        batch_size: the fixed compute batch (images per forward; fingerprinted: it can change CPU results).
        loader_batch: samples per DataLoader record (no effect on the output).
        num_workers: DataLoader decode workers (default: ``default_workers(device)``; no effect on the output).
        prefetch: records each worker prepares ahead (no effect on the output).
        embeddings: also store L2-normalised penultimate features (float16), e.g. for dedup.
        logit_dtype: ``float16`` (default) or ``float32`` storage of the top-K logits.
        device: ``cpu``, ``cuda``, ``cuda:1``; default CUDA when available.
        compile_model: ``torch.compile`` the model (CUDA).
        gpu_decode: decode JPEGs on the GPU (CUDA).
        retry_failed: retry given-up parts, and committed parts whose receipt names failed samples that now
            decode (such a part is recomputed in full and replaced).
        max_attempts: a part that failed this often is skipped until ``retry_failed``.
        finalize: write the manifest when every part of the dataset is committed.
        aug: multi-view logits (``stages.views.parse_aug``): V recorded views per image, one row per
            (key, view) with the view columns of ``stages.artifacts.views``; None = the centre view only.
        reuse: old logits of a base of this (grown) dataset: unchanged shards get their old parts rewritten,
            byte-identical to computing them, without running the teacher (``stages.logits_reuse``).
        threads: CPU threads of the forward pass (``torch.set_num_threads``; 0 leaves torch's default).

    Returns:
        The logits manifest's path, or None while parts of other tasks are missing.

    Raises:
        InputError / ManifestError: bad inputs, before any work. FingerprintMismatch: ``out`` holds parts made
        with other parameters. PartFailed: after the task's other parts, when some of its parts failed.
    """
    setup = prepare(data_manifest, card, out, topk=topk, temperature=temperature, batch_size=batch_size,
                    embeddings=embeddings, logit_dtype=logit_dtype, device=device, compile_model=compile_model,
                    gpu_decode=gpu_decode, aug=aug)
    if threads:
        torch.set_num_threads(int(threads))
    store = _store(setup)
    block = plan_block(task_index, num_tasks, len(setup.data.files))
    base = None if reuse is None else load_base(reuse, setup.params, setup.data)
    if base is not None:
        reuse_parts(base, store, block, setup.data, setup.params, task_info(task_index, num_tasks))
    report = _run_block(setup, store, block, task=task_info(task_index, num_tasks), num_workers=num_workers,
                        loader_batch=loader_batch, prefetch=prefetch, retry_failed=retry_failed,
                        max_attempts=max_attempts)
    if report.exit_code:
        bad = sorted(report.failed) + report.given_up
        raise PartFailed(f"{setup.out}: {len(bad)} part(s) failed ({', '.join(part_name(i) for i in bad[:10])}); "
                         "the other parts are committed. Fix the input shards, then rerun this task "
                         "(add --retry-failed for parts that were given up)", "parts_failed")
    return finalize_logits(setup, store, base) if finalize else None


def _store(setup: Setup) -> PartStore | ObjectPartStore:
    """The logits folder's part store (an object-store prefix for ``--out s3://...``), fingerprinted by the
    stage's params and code version."""
    kind = ObjectPartStore if is_remote_out(setup.out) else PartStore
    return kind(setup.out, ".parquet", fingerprint("logits", setup.params, CODE_VERSION), parquet_rows)


def prepare(data_manifest: str | Path, card: str | Path, out: str | Path, *, topk: int, temperature: float,
            batch_size: int = LogitsOptions.batch_size, embeddings: bool = LogitsOptions.embeddings,
            logit_dtype: str = LogitsOptions.logit_dtype, device: str | None = LogitsOptions.device,
            compile_model: bool = LogitsOptions.compile, gpu_decode: bool = LogitsOptions.gpu_decode,
            aug: AugSpec | None = None) -> Setup:
    """Load and cross-check the inputs and options; return the task's ``Setup`` (no model loaded yet)."""
    data = mf.load(data_manifest, kind="dataset")
    teacher = mf.load(card)
    if teacher.kind not in ("teacher", "model"):
        raise InputError(f"{teacher.path}: is a {teacher.kind!r} manifest; --teacher needs a teacher or model card")
    pp = check_card_against_data(teacher, data)
    check_options(teacher, topk=topk, temperature=temperature, batch_size=batch_size, logit_dtype=logit_dtype)
    try:
        dev = resolve_device(device)
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"--device {device!r}: {exc}") from None
    if aug is not None and gpu_decode:
        raise InputError("--gpu-decode renders centre views only; drop it (or --aug) for multi-view logits")
    _check_library_views(teacher, pp, aug=aug, gpu_decode=gpu_decode, embeddings=embeddings)
    params = {"teacher_id": teacher.id, "teacher_kind": teacher.kind, "dataset_id": data.id,
              "num_classes": int(teacher.params["num_classes"]), "class_names": list(teacher.params["class_names"]),
              "topk": int(topk), "temperature": float(temperature),
              "preprocess": [p.to_dict() for p in pp] if isinstance(pp, tuple) else pp.to_dict(),
              "views": manifest_views(aug),
              "embedding_dim": None, "logit_dtype": logit_dtype, "parquet_schema_version": SCHEMA_VERSION,
              "compute_batch": int(batch_size), "compute": compute_mode(dev, compile_model, gpu_decode)}
    if embeddings:
        params["embedding_dim"] = _embedding_dim(teacher)
    return Setup(data, teacher, out if is_remote_out(out) else Path(out), params, pp, dev, aug)


def check_card_against_data(card: mf.Manifest, data: mf.Manifest) -> imaging.Preprocess | tuple:
    """Refuse a card whose classes or preprocessing disagree with the dataset manifest; return its preprocess
    (an ensemble: the tuple of its members' distinct preprocessings)."""
    names, classes = card.params["class_names"], int(card.params["num_classes"])
    if len(names) != classes:
        raise InputError(f"{card.path}: num_classes={classes} but {len(names)} class names")
    theirs = data.params.get("class_names") or []
    if data.params.get("num_classes") not in (None, 0, classes) or (theirs and list(theirs) != list(names)):
        raise InputError(f"{card.path}: the {card.kind} has {classes} classes {names[:5]}..., but the dataset "
                         f"{data.path} has {data.params.get('num_classes')} {list(theirs)[:5]}...; "
                         "use a card trained on these classes")
    pps = preprocesses_of(card)
    wanted = data.params.get("preprocess")
    for pp in pps:
        if pp.policy_version != imaging.Preprocess().policy_version:
            raise InputError(f"{card.path}: preprocess policy_version {pp.policy_version}, this kdpipe decodes with "
                             f"{imaging.Preprocess().policy_version}; the logits would not match how it saw images")
        if wanted is not None and imaging.Preprocess.from_dict(wanted) != pp:
            raise InputError(f"{card.path}: preprocess {pp.to_dict()} differs from the dataset's {wanted} "
                             f"({data.path}); use a card that sees images the way this dataset was made for")
    return pps if is_ensemble(card) else pps[0]


def _check_library_views(card: mf.Manifest, pp, *, aug, gpu_decode: bool, embeddings: bool) -> None:
    """Refuse options that only work with one model seen through kdpipe's centre box."""
    many = isinstance(pp, tuple)
    library = any(p.crop_mode != "box" for p in (pp if many else (pp,)))
    if many and embeddings:
        raise InputError(f"--embeddings: {card.path} is an ensemble; store embeddings with one member's card")
    if (many or library) and aug is not None:
        raise InputError(f"--aug: {card.path} is {'an ensemble' if many else 'seen through its library transform'}"
                         f"; recorded views need a card with kdpipe's centre box (crop_mode box)")
    if (many or library) and gpu_decode:
        raise InputError(f"--gpu-decode: renders kdpipe's centre box only; drop it for {card.path}")


def check_options(card: mf.Manifest, *, topk: int, temperature: float, batch_size: int, logit_dtype: str) -> None:
    """Refuse K, T, batch and dtype values that cannot give a valid artifact (``InputError``)."""
    classes = int(card.params["num_classes"])
    if not 1 <= int(topk) <= classes:
        raise InputError(f"--topk {topk}: must be in [1, {classes}] (the classes of {card.path})")
    if not float(temperature) > 0 or float(temperature) == float("inf"):
        raise InputError(f"--temperature {temperature}: must be a finite number > 0")
    if int(batch_size) < 1:
        raise InputError(f"--batch-size {batch_size}: must be >= 1")
    if logit_dtype not in LOGIT_TYPES:
        raise InputError(f"--logit-dtype {logit_dtype!r}: one of {', '.join(LOGIT_TYPES)}")


def _embedding_dim(card: mf.Manifest) -> int:
    return int(classifier_head(sources.runnable(sources.build(card.params), card.params)).in_features)


def default_workers(device: torch.device | None = None) -> int:
    """Decode workers by default: on CPU one per 4 usable cores (the rest run the forward), on CUDA all
    usable cores but two (the GPU waits on decoding); at least 1."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 2 if device is not None and device.type == "cuda" else cores // 4)


def _shard_refs(data: mf.Manifest, indices: list[int]) -> list[ShardRef]:
    refs = []
    for i in indices:
        entry = data.files[i]
        where = data.file_path(entry)  # a local path or a URL: read_shard streams either and re-hashes it
        refs.append(ShardRef(i, str(where), entry["sha256"], int(entry["samples"])))
    return refs


def _pending(store: PartStore, block: range, retry_failed: bool,
             max_attempts: int) -> tuple[list[int], list[int], list[int]]:
    """Parts to compute now, committed parts to re-check for recoverable samples, and parts given up."""
    store.prepare()
    failures = store.failures()
    todo, recheck, given_up = [], [], []
    for index in block:
        receipt = store.committed(index)
        if receipt is None and (retry_failed or failures.get(index, {}).get("attempts", 0) < max_attempts):
            todo.append(index)
        elif receipt is None:
            log.error("%s: gave up after %d failed attempts (%s); rerun with --retry-failed", part_name(index),
                      failures[index]["attempts"], failures[index].get("message"))
            given_up.append(index)
        elif retry_failed and receipt.get("failure_count"):
            recheck.append(index)
    return todo, recheck, given_up


def _run_block(setup: Setup, store: PartStore, block: range, *, task: dict, num_workers: int | None,
               loader_batch: int, prefetch: int, retry_failed: bool, max_attempts: int):
    todo, recheck, given_up = _pending(store, block, retry_failed, max_attempts)
    engine = None
    if recheck:
        engine = _engine(setup)
        todo = sorted(todo + _recoverable_parts(setup, store, recheck, engine))
    workers = default_workers(setup.device) if num_workers is None else int(num_workers)
    if todo and engine is None:
        engine = _engine(setup)
    gpu_decode = setup.params["compute"]["decode"] == "gpu-jpeg"
    loader = make_loader(ShardBlock(_shard_refs(setup.data, todo), setup.preprocess, loader_batch,
                                    raw_jpeg=gpu_decode, spec=setup.spec),
                         workers, prefetch)  # compute batches are pinned by the Engine
    feed = PartFeed(loader, workers, todo)
    produce = lambda index: store.commit(index, _part_writer(setup, engine, feed, index), task)
    report = run_parts(store, todo, produce, max_attempts=max_attempts, retry_failed=True, desc="logits",
                       num_parts=len(setup.data.files), part_samples=lambda i: int(setup.data.files[i]["samples"]),
                       done_before=len(block) - len(todo))
    report.given_up += given_up
    return report


def _engine(setup: Setup) -> Engine:
    model, _, _ = load_runnable(setup.card.path, "cpu")
    return Engine(model, setup.preprocess, topk=setup.params["topk"], temperature=setup.params["temperature"],
                  compute_batch=setup.params["compute_batch"], device=setup.device,
                  embeddings=setup.params["embedding_dim"] is not None,
                  compile_model=setup.params["compute"]["compile"])


def _recoverable_parts(setup: Setup, store: PartStore, indices: list[int], engine: Engine) -> list[int]:
    """Committed parts whose failed samples now decode (and give finite logits); their receipts are withdrawn."""
    redo = []
    for ref in _shard_refs(setup.data, indices):
        receipt = store.committed(ref.index, verify=False)
        keys = recoverable_keys(ref, receipt, setup.preprocess, engine)
        if keys:
            log.info("%s: %d failed sample(s) now succeed (%s...); recomputing the part",
                     part_name(ref.index), len(keys), keys[0])
            store.receipt_path(ref.index).unlink(missing_ok=True)
            redo.append(ref.index)
        else:
            log.info("%s: its %d failed sample(s) still fail; part kept", part_name(ref.index),
                     receipt.get("failure_count", 0))
    return redo


def _part_writer(setup: Setup, engine: Engine, feed: PartFeed, index: int):
    entry = setup.data.files[index]
    meta = part_metadata(setup.params, index)

    def write(tmp: Path) -> PartResult:
        rows, failures = assemble_part(feed.records(index), engine, setup.params, meta, tmp, index)
        images = rows // setup.views  # an image has V rows or none
        accounted = images + sum(len(v) for v in failures.values())
        if accounted != int(entry["samples"]) or images * setup.views != rows:
            raise IntegrityError(f"{entry['path']}: {rows} rows ({setup.views} per image) + "
                                 f"{accounted - images} failures != {entry['samples']} samples in "
                                 f"{setup.data.path}; nothing was published")
        return PartResult(expected_rows=rows, failures=failures, samples=int(entry["samples"]),
                          input={"shard": index, "path": entry["path"], "sha256": entry["sha256"],
                                 "samples": entry["samples"]})
    return write


def finalize_logits(setup: Setup, store: PartStore, base: Base | None = None) -> Path | None:
    """Write the logits manifest if every part of the dataset is committed; None while some are missing.

    ``base``: the old logits whose parts were reused (``--reuse``), recorded as an input with role ``base``.
    """
    total = len(setup.data.files)
    if any(store.committed(i, verify=False) is None for i in range(total)):
        log.info("%s: parts of other tasks are still missing; manifest not written yet", setup.out)
        return None
    inputs = [_input_ref(setup.data, setup.out, "data"), _input_ref(setup.card, setup.out, "teacher")]
    inputs += [base.input_ref(setup.out)] if base is not None else []
    samples = sum(int(f["samples"]) for f in setup.data.files)

    def build(receipts: list[dict]) -> dict:
        totals = {"samples": samples, "rows": sum(r["rows"] for r in receipts),
                  "failures": failure_totals(receipts), "classes": setup.params["num_classes"]}
        return mf.build("logits", stage="logits", params=setup.params, files=file_entries(receipts),
                        totals=totals, inputs=inputs)
    if isinstance(store, ObjectPartStore):
        return finalize_remote(store, total, build, sidecars_for)
    return finalize_parts(store, total, with_sidecars(setup.out, build))


def _input_ref(manifest: mf.Manifest, out: Path | str, role: str) -> dict:
    """Lineage entry; from an object-store output, the input's absolute path (informational)."""
    if not is_remote_out(out):
        return mf.input_ref(manifest, out, role)
    return {"kind": manifest.kind, "id": manifest.id, "path": str(manifest.path.resolve()), "role": role}


def finalize_only(data_manifest: str | Path, card: str | Path, out: str | Path, **options) -> Path | None:
    """``kdpipe logits --finalize``: write the manifest from committed parts (same options as the tasks)."""
    keys = ("topk", "temperature", "batch_size", "embeddings", "logit_dtype", "device", "compile_model",
            "gpu_decode", "aug")
    setup = prepare(data_manifest, card, out, **{k: options[k] for k in keys if k in options})
    store = _store(setup)
    store.check_fingerprint()
    reuse = options.get("reuse")
    return finalize_logits(setup, store, None if reuse is None else load_base(reuse, setup.params, setup.data))
