#!/usr/bin/env bash
# Sets up a fresh venv from requirements.txt and runs the whole test suite. Usage: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt
# This checkout as an editable package (the atomo-* commands), and open-clip-torch, which only ships the CLIP BPE
# vocabulary we build tokenizers from (its dependencies would pull a CUDA torch).
.venv/bin/pip install -q --no-deps open-clip-torch==3.3.0 -e .
# torchvision for the RAFT motion backend's parity test (tests/raft_checks.py), in a folder of its own that only that
# test's process puts on PYTHONPATH: the torchvision wheel these machines have is a CUDA build beside our CPU torch,
# and with it importable, transformers fails to import in every other test.
.venv/bin/pip install -q --no-deps --upgrade --target .venv/torchvision "torchvision==0.28.0"
# libtpu compiles for TPU topologies on this CPU host (the AOT fit check and its test); the version jax[tpu] pins.
.venv/bin/pip install -q "libtpu==0.0.42.1"
# Debian packages some tests drive for real: shellcheck (the launch scripts), SLURM + munge (tests/test_slurm_real.py
# stands up a one-node cluster).
need=()
command -v shellcheck >/dev/null || need+=(shellcheck)
[[ -x /usr/sbin/slurmd && -x /usr/sbin/munged ]] || need+=(slurm-wlm munge)
if ((${#need[@]})); then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null 2>&1 \
    || echo "warning: could not install ${need[*]}"
fi
# Two workers (pytest-xdist), one test file each at a time: most of the time goes to single-threaded XLA compiles.
.venv/bin/python -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" --dist loadfile "${@:-tests}"
