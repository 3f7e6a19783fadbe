#!/usr/bin/env bash
# One lent-GPU call of the benchmark: ours and the PyTorch peer side by side, on the same GPU, in the same run.
# Usage (on the device, from the repo root, with .whl carried):  bash bench/gpu_run.sh GROUP...
#   groups: b4 (train, batch 4 x 32x32 latents), paper (ours, b4, the paper's trainable set), b1 (batch 1 x 64x64),
#           sample (i2v, 16 frames, 512 px, 25 steps, guidance batch 3), b1sample (both),
#           scale2 (1 vs 2 GPUs, data-parallel and fsdp; needs 2 GPUs), ab_b1 (temporal conv A/B + profiles + HLO),
#           ab_gn (b4: GroupNorm A/B + profiles + HLO, beside the regionally compiled peer),
#           train (both sizes, ours and the regionally compiled peer), ab_layout (b4: compiler-chosen state layouts
#           A/B, both profiled, beside the peer)
# The processes of a group start together: their compiles overlap, then they time one at a time (bench/gate.py).
# The peer's b4 run uses diffusers' regional compilation (as measured in bench/RESULTS.md); TORCH_B4=--compile=full
# asks for the whole-model torch.compile, which needs more than a 10-minute call to compile (bench/NOTES.md).
# Results -> $OUT/results.jsonl, logs -> $OUT/*.log, the table last.
set -uo pipefail
out=${OUT:-/tmp/bench_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
# Several processes share the card: allocate on demand, never more than the card has.
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
# cuBLAS for matmuls (fast to autotune) instead of autotuning a Triton kernel per fusion; autotune results are
# kept per fusion so later compiles (and later calls given bench/.cache back) reuse them.
autotune=${AUTOTUNE_DIR:-$PWD/.bench_cache/xla_autotune}
mkdir -p "$autotune"
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false} --xla_gpu_per_fusion_autotune_cache_dir=$autotune"
res="$out/results.jsonl"
limit=${GROUP_TIMEOUT:-540}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"

group() {  # "name:script:args" ..., in timing order (the peer first: it allocates while compiling)
  local spec name script args
  BENCH_GATE=$(mktemp -d); export BENCH_GATE
  BENCH_ORDER=""
  for spec in "$@"; do BENCH_ORDER="$BENCH_ORDER ${spec%%:*}"; done
  export BENCH_ORDER
  echo "=== $BENCH_ORDER  (start $(date +%T))"
  for spec in "$@"; do
    name=${spec%%:*}; script=${spec#*:}; args=${script#*:}; script=${script%%:*}
    # shellcheck disable=SC2086
    ( BENCH_NAME=$name timeout "$limit" python3 "bench/$script.py" $args --out="$res" > "$out/$name.log" 2>&1
      echo "$name rc=$?" >> "$out/$name.log"; touch "$BENCH_GATE/$name.exit" ) &
  done
  wait
  for spec in "$@"; do tail -n 2 "$out/${spec%%:*}.log"; done
}

python3 bench/jax_bench.py matmul --out="$res" > "$out/matmul.log" 2>&1; tail -n 1 "$out/matmul.log"
ja=${JAX_ARGS:-}
for g in "$@"; do
  case $g in
    b4) group "torch_b4:torch_peer:train --batch=4 --latent=32 ${TORCH_B4:---compile=regional} --count_flops" \
              "jax_b4:jax_bench:train --batch=4 --latent=32 --count_flops $ja" ;;
    train) group "torch_b4:torch_peer:train --batch=4 --latent=32 ${TORCH_B4:---compile=regional} --count_flops" \
                 "torch_b1:torch_peer:train --batch=1 --latent=64 ${TORCH_B1:---compile=regional} --count_flops" \
                 "jax_b4:jax_bench:train --batch=4 --latent=32 --model_flops=57135558688768 $ja" \
                 "jax_b1:jax_bench:train --batch=1 --latent=64 --model_flops=61522056282112 $ja" ;;
    ab_layout) group "torch_b4:torch_peer:train --batch=4 --latent=32 ${TORCH_B4:---compile=regional} --count_flops" \
                     "jax_b4:jax_bench:train --batch=4 --latent=32 --model_flops=57135558688768 --profile=/tmp/tr4 $ja" \
                     "jax_b4_auto:jax_bench:train --batch=4 --latent=32 --model_flops=57135558688768 --auto_layouts \
--profile=/tmp/tr4a $ja" ;;
    paper) group "jax_b4_paper:jax_bench:train --batch=4 --latent=32 --trainable=paper $ja" ;;
    b1) group "torch_b1:torch_peer:train --batch=1 --latent=64 ${TORCH_B1:---compile=full} --count_flops" \
              "jax_b1:jax_bench:train --batch=1 --latent=64 --count_flops $ja" ;;
    sample) group "torch_sample:torch_peer:sample --latent=64 --steps=25 --iters=3" \
                  "jax_sample:jax_bench:sample --latent=64 --steps=25 --iters=3" ;;
    b1sample) group "torch_b1:torch_peer:train --batch=1 --latent=64 ${TORCH_B1:---compile=full} --count_flops" \
                    "torch_sample:torch_peer:sample --latent=64 --steps=25 --iters=3" \
                    "jax_b1:jax_bench:train --batch=1 --latent=64 --count_flops $ja" \
                    "jax_sample:jax_bench:sample --latent=64 --steps=25 --iters=3" ;;
    # Profiles of both sizes beside a same-run peer. FLOPs counted on a CPU host by bench/flops.py for the same
    # program (the b4 count matched the device's to the last FLOP); counting on the device beside two compiles
    # once crashed the process (bench/NOTES.md).
    profile) group "torch_b1:torch_peer:train --batch=1 --latent=64 --count_flops" \
                   "jax_b1:jax_bench:train --batch=1 --latent=64 --model_flops=61522056282112 --profile=/tmp/tr1 $ja" \
                   "jax_b4:jax_bench:train --batch=4 --latent=32 --model_flops=57135558688768 --profile=/tmp/tr4 $ja" ;;
    profile_b1) group "torch_b1:torch_peer:train --batch=1 --latent=64 --count_flops" \
                      "jax_b1:jax_bench:train --batch=1 --latent=64 --model_flops=61522056282112 --profile=/tmp/tr1 $ja" ;;
    # Two GPUs (kind nvidia-h100-x2): the same per-GPU batch on 1 GPU, 2 GPUs data-parallel, 2 GPUs fsdp.
    # No peer in this group (its b4 row comes from the b4 group). Three compiles (~5 min) and three host-side state
    # builds (~1.5 min each) overrun a 10-minute call: the last run may need a call of its own on the same warm
    # machine (bench/NOTES.md, calls 12-13).
    scale2) group "jax_b4:jax_bench:train --batch=4 --latent=32 --model_flops=57135558688768 $ja" \
                  "jax_b4_dp2:jax_bench:train --batch=4 --latent=32 --model_flops=57135558688768 --devices=2 $ja" \
                  "jax_b4_fsdp2:jax_bench:train --batch=4 --latent=32 --model_flops=57135558688768 --devices=2 \
--layout=fsdp $ja" ;;
    # A/B of the temporal convolution (matmul form vs the 3-D convolution), profiles of both, the HLO of the first.
    ab_b1) group "torch_b1:torch_peer:train --batch=1 --latent=64 --count_flops" \
                 "jax_b1:jax_bench:train --batch=1 --latent=64 --model_flops=61522056282112 --profile=/tmp/tr1 \
--dump_hlo=/tmp/hlo_b1 $ja" \
                 "jax_b1_conv3d:jax_bench:train --batch=1 --latent=64 --model_flops=61522056282112 --conv3d \
--profile=/tmp/tr1c $ja"
           (cd /tmp/hlo_b1 && find . -name '*train_step*after_optimizations.txt' | head -n 4 \
              | tar -czf "$out/hlo_b1.tgz" -T -) ;;
    # A/B of GroupNorm (layers.GroupNorm vs flax's), both profiled, the HLO of the first, the peer beside them.
    ab_gn) group "torch_b4:torch_peer:train --batch=4 --latent=32 ${TORCH_B4:---compile=regional} --count_flops" \
                 "jax_b4:jax_bench:train --batch=4 --latent=32 --model_flops=57135558688768 --profile=/tmp/tr4 \
--dump_hlo=/tmp/hlo_b4 $ja" \
                 "jax_b4_flaxgn:jax_bench:train --batch=4 --latent=32 --model_flops=57135558688768 --flax_groupnorm \
--profile=/tmp/tr4f $ja"
           (cd /tmp/hlo_b4 && find . -name '*train_step*after_optimizations.txt' | head -n 4 \
              | tar -czf "$out/hlo_b4.tgz" -T -) ;;
    *) echo "unknown group $g"; exit 2 ;;
  esac
done
# The autotune cache comes back as one file (the device returns at most 8 files); next call: untar into .bench_cache.
tar -czf "$out/autotune.tgz" -C "$autotune" . 2>/dev/null
python3 bench/report.py "$res"
