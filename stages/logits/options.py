"""The logits stage's options: one place for their defaults and help (the CLI and configs are made from it)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.options import option

LOGIT_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class LogitsOptions:
    """How the teacher runs over the shards and what each row stores (besides the required top-K and T)."""

    views: int = option(1, "recorded views per image (view 0 = centre view; V > 1 needs --aug); see docs/views.md")
    aug: str | None = option(None, 'augmentation of views 1..V-1, e.g. "rrc:0.35-1,flip:0.5,mixup:0.2"', type=str)
    aug_seed: int = option(0, "seed of the recorded views (part of the fingerprint)")
    embeddings: bool = option(False, "also store L2-normalised penultimate features (for dedup)")
    reuse: str | None = option(None, "old logits of the base of this grown dataset (ingest --base): unchanged "
                                     "shards reuse their old parts instead of running the teacher", type=str)
    logit_dtype: str = option("float16", "storage type of the top-K logits", choices=LOGIT_DTYPES)
    batch_size: int = option(32, "images per forward pass (fixed; part of the fingerprint: CPU results can "
                                 "depend on it)")
    loader_batch: int = option(32, "images per DataLoader record (no effect on the output)")
    num_workers: int | None = option(None, "decode workers (default: cores/4 on CPU, cores-2 on CUDA; at least 1)",
                                     type=int)
    prefetch: int = option(2, "records prepared ahead per worker (no effect on the output)")
    device: str | None = option(None, "cpu, cuda, cuda:N (default: cuda when available)", type=str)
    threads: int = option(0, "CPU threads of the forward pass (0: torch's default; 1 on a shared, busy CPU)")
    compile: bool = option(False, "torch.compile the teacher (CUDA)")
    gpu_decode: bool = option(False, "decode JPEGs on the GPU (CUDA)")
