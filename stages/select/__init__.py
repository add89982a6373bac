"""The select stage: exact per-class top-K (or threshold) pseudo-labels from a logits artifact.

| module | role |
| --- | --- |
| ``stage`` | the hub: preflight, map task per block of logits parts, reduce, manifest, report |
| ``policy`` | topk/threshold policies, ``--per-class`` parsing, exact scores, exclusion, balance plan |
| ``topk`` | ``ClassTopK``: exact streaming per-class top-K (admission thresholds, compaction, key tie-break); ``ScoreTopK``: the same by numbers alone, thresholds from per-class score histograms (``ScoreBins``; the map's first pass); ``exact_rows`` |
| ``fetch`` | the map's parallel part readers (two parts at once) and its second pass (the survivors' payload, read back by row id) |
| ``output`` | the final selection table (ranks, balance copies, soft targets) |
| ``report``, ``gallery`` | selection report (JSON, CSV, PNG); per-class image gallery through the lineage |
| ``options`` | ``SelectOptions``, the stage's defaults |

The selection artifact's contract (columns, verify check, reader) is ``stages.artifacts.selection``.
"""
