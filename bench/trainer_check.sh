#!/usr/bin/env bash
# The trainer's default step form (small leaves packed, compiler-chosen state layouts) on a GPU, end to end: the demo
# run uninterrupted vs stopped at a checkpoint and resumed (the checkpoint goes through the row-major form and back),
# with deterministic GPU ops so the two loss sequences must be equal; then tests/test_packing.py on the GPU.
# Usage (on the device, from the repo root, with .whl carried; the trainer also needs the tensorboardX wheel:
# `../shared/device/wheels.sh tensorboardX==2.6.5` here first):  bash bench/trainer_check.sh
set -uo pipefail
out=${OUT:-/tmp/trainer_check}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 XLA_FLAGS=--xla_gpu_deterministic_ops=true
args=(--config=configs/demo.py --config.data.num_frames=4 --config.train.batch_size=2 --config.train.log_every=1
      --config.checkpoint.every_steps=6 --config.checkpoint.async_save=False --config.sample.num_steps=2)
train() { python3 -m atomo_jax.train "${args[@]}" "$@"; }
rm -rf /tmp/tc_full /tmp/tc_resumed
train --workdir=/tmp/tc_full --config.train.num_steps=12 > "$out/full.log" 2>&1 || { tail -n 30 "$out/full.log"; exit 1; }
train --workdir=/tmp/tc_resumed --config.train.num_steps=6 > "$out/first.log" 2>&1 || { tail -n 30 "$out/first.log"; exit 1; }
train --workdir=/tmp/tc_resumed --config.train.num_steps=12 > "$out/resumed.log" 2>&1 || { tail -n 30 "$out/resumed.log"; exit 1; }
grep -h "resumed from\|devices=" "$out"/*.log
python3 - <<'EOF'
import json
load = lambda d: {r["step"]: r["loss"] for r in map(json.loads, open(f"{d}/losses.jsonl"))}
full, resumed = load("/tmp/tc_full"), load("/tmp/tc_resumed")
print("losses  full:", [round(full[k], 6) for k in sorted(full)])
print("losses  resumed:", [round(resumed[k], 6) for k in sorted(resumed)])
print("resume on GPU equal:", full == resumed and sorted(full) == list(range(1, 13)))
EOF
python3 -m pytest -q -p no:cacheprovider tests/test_packing.py 2>&1 | tail -n 5
