#!/usr/bin/env bash
# The reliability benchmark: a tiny CPU run killed (SIGKILL) before any checkpoint, after the first, while writing
# one and at a random step, stopped by SIGTERM and by SIGUSR1 under a simulated SLURM job, each run again with
# ckpt_path=auto and compared with a run never stopped; and a sweep worker killed mid-trial. Prints a table.
# Usage: bash benchmarks/faults.sh [workdir] [--seed N]   (about 5 minutes on 2 CPU cores; logic in faults.py)
set -euo pipefail
exec python "$(dirname "$0")/faults.py" "$@"
