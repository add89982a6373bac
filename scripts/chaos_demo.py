"""Seeded SIGKILLs of a whole ``kdpipe demo`` (quick variant), each followed by a plain rerun, compared file by file
(every manifest id, every listed file's sha256) with a clean run; prints ``N of N kills converged``.

    nice .venv/bin/python scripts/chaos_demo.py --kills 30 --work /tmp/chaos [--full]
    nice .venv/bin/python scripts/chaos_demo.py --landed 30 --window 35 --work /tmp/chaos   # until 30 kills landed

``--full`` uses the demo as bundled (about 60 s a run) instead of ``tests/chaos.py``'s ``QUICK_DEMO``. A trial whose
demo finished before its instant is reported and not counted as a kill. Results: ``WORK/trials.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import chaos  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("chaos-work"))
    parser.add_argument("--full", action="store_true", help="the bundled demo, not the quick variant")
    parser.add_argument("--keep", action="store_true", help="keep every trial's run folder")
    parser.add_argument("--clean", type=Path, default=None, help="reuse this finished clean run folder")
    parser.add_argument("--landed", type=int, default=None,
                        help="go on with further seeds until this many kills landed (instead of --kills trials)")
    parser.add_argument("--append", action="store_true",
                        help="add to WORK/trials.json of an earlier invocation; the figure counts both")
    parser.add_argument("--window", type=float, default=None,
                        help="kill instants are uniform in [0.5, WINDOW) s (default: the clean run's duration)")
    args = parser.parse_args(argv)
    overrides = [] if args.full else chaos.QUICK_DEMO
    make = lambda out: chaos.demo_command(out, overrides)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    clean = args.clean or args.work / "clean"
    if args.clean is None and chaos.run(make(clean), args.work / "clean.log") != 0:
        print(f"the clean demo failed; see {args.work / 'clean.log'}")
        return 1
    window = args.window or time.monotonic() - started
    expected = chaos.snapshot(clean)
    print(f"clean run: {clean}, {len(expected)} manifests and files; kill instants in [0.5, {window:.1f}) s",
          flush=True)
    record = args.work / "trials.json"
    trials = [chaos.Trial(**t) for t in json.loads(record.read_text())] if args.append and record.exists() else []
    seed = args.first_seed
    while (seed < args.first_seed + args.kills) if args.landed is None else (
            sum(t.killed for t in trials) < args.landed and seed < args.first_seed + 3 * args.landed):
        out = args.work / f"seed{seed:03d}"
        trial = chaos.kill_and_rerun(seed, make, out, expected, window, args.work / f"seed{seed:03d}.log")
        trials.append(trial)
        state = "not killed (finished first)" if not trial.killed else (
            "converged" if trial.converged else f"DIFFERS (rerun exit {trial.rerun_code}, {len(trial.diffs)} diffs)")
        print(f"seed {seed:3d}: kill at {trial.at_s:6.2f} s: {state}", flush=True)
        if trial.converged and not args.keep:
            shutil.rmtree(out)
        record.write_text(json.dumps([asdict(t) for t in trials], indent=1))
        seed += 1
    print(chaos.summary_line(trials))
    return 0 if all(t.converged for t in trials if t.killed) else 1


if __name__ == "__main__":
    sys.exit(main())
