"""``python -m pipeline`` runs the kdpipe command line (used by tests and sbatch scripts)."""

from pipeline.cli import main

raise SystemExit(main())
