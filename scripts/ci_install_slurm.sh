#!/usr/bin/env bash
# Install Debian's slurm-wlm (slurmctld, slurmd, sbatch, squeue, scontrol) so that the `slurm`-marked tests run
# against a real one-node cluster (tests/conftest.py starts and stops it). Needs root on a Debian-like machine.
# Exits 0 at once when the binaries are already there; exits non-zero (and .ci/run goes on) when it cannot install.
set -euo pipefail

if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v sbatch >/dev/null 2>&1; then
  echo "slurm-wlm already installed ($(dpkg-query -W -f='${Version}' slurm-wlm 2>/dev/null || echo unknown version))"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "ci_install_slurm.sh: not root; cannot apt-get install slurm-wlm" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ci_install_slurm.sh: no apt-get on this machine; install slurm-wlm by hand" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm >/dev/null
echo "installed slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm)"
