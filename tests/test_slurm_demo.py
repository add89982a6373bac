"""Issue 6's "done when": the demo chain (``pipeline/cli/configs/demo.yaml``) submitted to the test SLURM cluster
completes with the same manifest ids, stage by stage, as ``kdpipe run`` of the same config. Minutes on CPU.
``KDPIPE_DEMO_CONFIG`` names another config to check the same way."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline import manifest as mf
from pipeline.cli.run import run_pipeline
from pipeline.cli.submit import load_submissions, submit
from pipeline.config import load_config
from tests.slurm_helpers import REPO, wait_jobs

DEMO = Path(os.environ.get("KDPIPE_DEMO_CONFIG", REPO / "pipeline" / "cli" / "configs" / "demo.yaml"))
pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(not DEMO.is_file(), reason=f"{DEMO} does not exist yet")]


def test_demo_chain_under_slurm_equals_the_local_run(slurm_cluster, tmp_path):
    cluster = load_config(DEMO, [f"run_dir={tmp_path / 'slurm'}", "slurm.time=01:00:00"])
    jobs = submit(cluster)
    local = load_config(DEMO, [f"run_dir={tmp_path / 'local'}"])
    assert all(o.status == "done" for o in run_pipeline(local))
    wait_jobs([j.job_id for j in jobs], timeout_s=1800)
    assert len(load_submissions(cluster.run_dir)) == 1
    for name, stage in cluster.stages.items():
        for ours, theirs in zip(stage.manifests, local.stages[name].manifests):
            assert mf.load(ours).id == mf.load(theirs).id, f"stage {name}: {ours} differs from {theirs}"
