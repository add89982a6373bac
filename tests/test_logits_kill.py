"""A logits task killed with SIGKILL in the middle of a shard: the rerun gives byte-identical parts."""

import signal
import subprocess
import sys
import textwrap

import numpy as np

from pipeline import manifest as mf
from stages.logits.stage import compute_logits
from tests.test_logits_support import NAMES, jpeg, make_dataset, train_card

# Runs the stage in a child that SIGKILLs itself on its 4th forward: inside part 1 (part 0 has 3 batches of 16).
KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from stages.logits import inference
    from stages.logits.stage import compute_logits
    real, calls = inference.Engine.run, [0]
    def run(self, pixels):
        calls[0] += 1
        if calls[0] == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, pixels)
    inference.Engine.run = run
    compute_logits(sys.argv[1], sys.argv[2], sys.argv[3], topk=5, temperature=3.0, num_workers=1, loader_batch=8,
                   batch_size=16)
""")


def test_sigkill_mid_shard_then_rerun_gives_byte_identical_parts(tmp_path):
    rng = np.random.default_rng(0)
    shards = [[{"__key__": f"s{s}-{i:03d}", "jpg": jpeg(rng)} for i in range(40)] for s in range(3)]
    data = make_dataset(tmp_path / "data", shards, NAMES)
    card = train_card(tmp_path / "teacher", None, steps=0)
    out = tmp_path / "killed"
    child = subprocess.run([sys.executable, "-c", KILLED_RUN, str(data), str(card), str(out)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert sorted(p.name for p in (out / "_parts").glob("part-*.json")) == ["part-000000.json"]
    assert not (out / "part-000001.parquet").exists()
    resumed = compute_logits(data, card, out, topk=5, temperature=3.0, num_workers=0, batch_size=16)
    clean = compute_logits(data, card, tmp_path / "clean", topk=5, temperature=3.0, num_workers=2, loader_batch=50,
                           batch_size=16)
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    for entry in mf.load(clean).files:
        assert (out / entry["path"]).read_bytes() == (tmp_path / "clean" / entry["path"]).read_bytes()
    assert mf.load(resumed).id == mf.load(clean).id
