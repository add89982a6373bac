"""``kdpipe teacher``'s import options (training flags are ``stages.train.config.TrainConfig``'s)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.options import option

COMBINE = ("mean-logits", "mean-probs")  # stages.models.sources.compose.COMBINES (kept light: no torch here)
CROP_MODES = ("box", "center", "squash")  # stages.imaging.CROP_MODES


@dataclass(frozen=True)
class ImportOptions:
    """Where an imported teacher's classes, prompts and view come from; ensembles of cards."""

    crop_mode: str | None = option(None, "with --import: centre view as kdpipe's box, or the library's resize + "
                                         "centre crop (center) / squash; default: the model's own config",
                                   type=str, choices=CROP_MODES)
    prompts: str | None = option(None, "openclip: prompt templates, one a line with {} for the class name",
                                 type=str)
    class_map: str | None = option(None, "map the teacher's classes onto target classes (JSON or text: target: "
                                         "source, source); many-to-one combines by logsumexp", type=str)
    ensemble: tuple = option((), "an ensemble card of these teacher cards (with --combine)", nargs="+",
                             metavar="CARD")
    combine: str = option("mean-logits", "how an ensemble combines its members: mean-logits, or mean-probs (log "
                                         "of the mean probabilities as logits)", choices=COMBINE)
