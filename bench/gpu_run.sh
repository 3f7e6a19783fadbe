#!/usr/bin/env bash
# One lent-GPU call of the benchmark. Usage (on the device, from the repo root, with .whl carried):
#   bash bench/gpu_run.sh train|sample|all      results -> $OUT/results.jsonl, logs -> $OUT/*.log
set -uo pipefail
phase=${1:-all}
out=${OUT:-/tmp/bench_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
res="$out/results.jsonl"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > "$out/gpu.txt"
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"

run() {  # name, command...
  local name=$1; shift
  echo "=== $name"
  timeout "${STEP_TIMEOUT:-420}" "$@" --out="$res" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 2 "$out/$name.log"
  [ $rc -eq 0 ] || echo "!!! $name failed rc=$rc"
}

if [ "$phase" = train ] || [ "$phase" = all ]; then
  run jax_matmul python3 bench/jax_bench.py matmul
  run jax_b4_256 python3 bench/jax_bench.py train --batch=4 --latent=32 --count_flops ${JAX_ARGS:-}
  run torch_eager_b4_256 python3 bench/torch_peer.py train --batch=4 --latent=32 --count_flops
  run torch_compile_b4_256 python3 bench/torch_peer.py train --batch=4 --latent=32 --compile
fi
if [ "$phase" = train512 ] || [ "$phase" = all ]; then
  run jax_b1_512 python3 bench/jax_bench.py train --batch=1 --latent=64 --count_flops ${JAX_ARGS:-}
  run jax_b4_256_paper python3 bench/jax_bench.py train --batch=4 --latent=32 --trainable=paper ${JAX_ARGS:-}
  run torch_compile_b1_512 python3 bench/torch_peer.py train --batch=1 --latent=64 --compile --count_flops
fi
if [ "$phase" = sample ] || [ "$phase" = all ]; then
  run jax_sample python3 bench/jax_bench.py sample --latent=64 --steps=25 --iters=3
  run torch_sample python3 bench/torch_peer.py sample --latent=64 --steps=25 --iters=3
fi
python3 bench/report.py "$res"
