"""One module per ``kdpipe`` subcommand: argument parsing and the call of its stage, nothing else."""
