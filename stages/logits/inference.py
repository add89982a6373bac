"""The teacher's forward pass for the logits stage: device, precision, fixed compute batches, top-K on device.

Results never depend on how the data arrived: the forward always runs on a *compute batch* of exactly
``compute_batch`` images (the good samples among a fixed window of shard positions, zero-padded to the full
size), so a sample's logits depend on the shard's content and the fingerprinted batch size only, not on
DataLoader workers, loader batches, prefetch or the number of array tasks (CPU convolutions may pick
algorithms by batch shape). The full logits vector never leaves the device: only top-K (stable descending
sort, ties by class id), logsumexp(z/T), a finiteness flag and optionally the L2-normalised penultimate
features are copied back (plus logsumexp(z), the T = 1 normaliser).

On CUDA: bf16 autocast, channels_last, non_blocking copies from pinned memory, optional ``torch.compile``,
optional batched JPEG decode on the GPU (``torchvision.io.decode_jpeg``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from stages import imaging
from stages.models.classifiers import features_and_logits

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU; ``cuda`` without a GPU raises ``ValueError``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return device


def compute_mode(device: torch.device, compile_model: bool = False, gpu_decode: bool = False) -> dict:
    """What changes the numbers (part of the stage's fingerprint): device type, precision, compile, decode."""
    precision = "bf16-autocast" if device.type == "cuda" else "fp32"
    return {"device": device.type, "precision": precision, "compile": bool(compile_model),
            "decode": "gpu-jpeg" if gpu_decode and device.type == "cuda" else "cpu-pil"}


class _FeaturesAndLogits(nn.Module):
    """``(features, logits)`` of a classifier in one module, so that it can be compiled as a whole."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return features_and_logits(self.model, x)


@dataclass
class Outputs:
    """What one compute batch gives, for its ``n`` real samples (numpy, on the host)."""

    index: np.ndarray        # (n, K) int64, class ids by logit descending
    logit: np.ndarray        # (n, K) float32, raw logits of those classes
    lse: np.ndarray          # (n,) float32, logsumexp(z / T)
    lse1: np.ndarray         # (n,) float32, logsumexp(z), the normaliser at T = 1
    finite: np.ndarray       # (n,) bool, every logit finite
    embedding: np.ndarray | None  # (n, D) float32, L2-normalised, or None


class Engine:
    """A frozen classifier ready to turn uint8 centre views into top-K logits.

    Args:
        model: the classifier (eval mode is set here).
        preprocess: normalisation constants and input size; a tuple for an ensemble (``stages.models.sources.
            compose.Ensemble``): the model then takes one input per entry, and pixels come as a tuple too.
        topk: classes kept per sample.
        temperature: T of lse = logsumexp(z / T).
        compute_batch: images per forward (fixed; part of the fingerprint).
        device: where the forward runs.
        embeddings: also return L2-normalised penultimate features.
        compile_model: ``torch.compile`` the model (CUDA only; ignored on CPU with a log line).
    """

    def __init__(self, model: nn.Module, preprocess: imaging.Preprocess, *, topk: int, temperature: float,
                 compute_batch: int, device: torch.device, embeddings: bool = False, compile_model: bool = False):
        self.pps = preprocess if isinstance(preprocess, tuple) else (preprocess,)
        self.many = isinstance(preprocess, tuple)
        self.pp, self.topk, self.temperature = self.pps[0], int(topk), float(temperature)
        self.compute_batch, self.device, self.embeddings = int(compute_batch), device, embeddings
        self.cuda = device.type == "cuda"
        model = model.to(device).eval()
        self.channels_last = any(p.dim() == 4 for p in model.parameters())
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.forward_fn = _FeaturesAndLogits(model) if embeddings else model
        if compile_model and self.cuda:
            self.forward_fn = torch.compile(self.forward_fn)
        elif compile_model:
            log.info("--compile is used on CUDA only; running eagerly on %s", device)

    def run(self, pixels: torch.Tensor | tuple[torch.Tensor, ...]) -> Outputs:
        """Top-K, lse, finiteness (and embeddings) for up to ``compute_batch`` NHWC uint8 images (an ensemble:
        a tuple, one tensor per preprocessing)."""
        views = pixels if self.many else (pixels,)
        n = int(views[0].shape[0])
        if not 0 < n <= self.compute_batch:
            raise ValueError(f"a compute batch holds 1..{self.compute_batch} images, got {n}")
        xs = [self._input(view, n, pp) for view, pp in zip(views, self.pps)]
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self.cuda):
            out = self.forward_fn(*xs)
        feats, logits = out if self.embeddings else (None, out)
        return self._reduce(logits.float()[:n], None if feats is None else feats.float()[:n])

    def _input(self, pixels: torch.Tensor, n: int, pp: imaging.Preprocess) -> torch.Tensor:
        if n < self.compute_batch:  # zero-pad: every forward has the same shape
            pad = pixels.new_zeros((self.compute_batch - n, *pixels.shape[1:]))
            pixels = torch.cat([pixels, pad])
        if self.cuda and pixels.device.type == "cpu":
            pixels = pixels.pin_memory()  # page-locked: the copy below runs asynchronously
        x = imaging.normalise(pixels.to(self.device, non_blocking=True), pp)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _reduce(self, logits: torch.Tensor, feats: torch.Tensor | None) -> Outputs:
        with torch.inference_mode():
            finite = torch.isfinite(logits).all(dim=1)
            lse = torch.logsumexp(logits / self.temperature, dim=1)
            lse1 = torch.logsumexp(logits, dim=1)
            values, order = torch.sort(logits, dim=1, descending=True, stable=True)
            emb = None if feats is None else nn.functional.normalize(feats, dim=1)
        return Outputs(index=order[:, : self.topk].cpu().numpy(), logit=values[:, : self.topk].cpu().numpy(),
                       lse=lse.cpu().numpy(), lse1=lse1.cpu().numpy(), finite=finite.cpu().numpy(),
                       embedding=None if emb is None else emb.cpu().numpy())


def views_of(data: bytes, engine: Engine):
    """One image's centre view(s) as a batch of one, the way ``engine`` takes them (raises ``SampleError``)."""
    if engine.many:
        return tuple(torch.from_numpy(np.array(v))[None] for v in imaging.centre_views(data, engine.pps))
    return torch.from_numpy(np.array(imaging.centre_view(data, engine.pp)))[None]


def gpu_centre_views(raw: list[tuple[int, str, torch.Tensor]], pp: imaging.Preprocess,
                     device: torch.device) -> list[tuple[int, str, torch.Tensor | None]]:
    """Decode JPEG bytes on the GPU and render centre views (HWC uint8 on the device).

    The geometry is the policy's centre box; resampling is torchvision's antialiased bilinear, so pixels
    differ slightly from the CPU path (results agree up to float tolerance). A sample the GPU decoder
    refuses comes back as ``None`` (the caller decodes it on the CPU or counts it).
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as tvf

    try:
        images = decode_jpeg([t for _, _, t in raw], mode=ImageReadMode.RGB, device=device,
                             apply_exif_orientation=True)
    except RuntimeError:
        images = [None] * len(raw)
    out = []
    for (position, key, _), img in zip(raw, images):
        if img is None:
            out.append((position, key, None))
            continue
        left, top, right, bottom = imaging.centre_box(img.shape[2], img.shape[1], pp)
        view = tvf.resized_crop(img, int(round(top)), int(round(left)), int(round(bottom - top)),
                                int(round(right - left)), [pp.size, pp.size], antialias=True)
        out.append((position, key, view.permute(1, 2, 0).contiguous()))
    return out
