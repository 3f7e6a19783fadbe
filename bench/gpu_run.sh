#!/usr/bin/env bash
# One lent-GPU call of the benchmark: ours and the PyTorch peer side by side, on the same GPU, in the same run.
# Usage (on the device, from the repo root, with .whl carried):  bash bench/gpu_run.sh GROUP[+GROUP]...
#   groups: train (both sizes: ours and the regionally compiled peer), b4 / b1 (one size; b1's peer defaults to the
#           whole-model compile), paper (the paper's shape, b1 x 24 frames x 512 px, its trainable set and full
#           fine-tune, ours and the peer with the same set; paper_all / paper_set: its full fine-tune / trainable-set
#           pair alone), sample (i2v, 16 frames, 512 px, 25 steps, guidance batch 3, vs diffusers eager and
#           regionally compiled; sample_eager: vs eager alone; sample_hlo: ours alone, its optimized HLO kept),
#           scale2 (1 vs 2 GPUs, data-parallel and fsdp;
#           needs 2 GPUs), ab_layout / ab_pack (b4 A/B against the default of row-major state layouts / of
#           updating every leaf on its own, both profiled, the HLO of the default, beside the peer), ab_flags /
#           ab_flags_sample (the paper-shape trainable-set pair / the sampling pair, plus ours once per XLA flag in
#           AB_FLAGS), lora / lora_full (LoRA r16 at the paper's shape beside the paper's set / beside the full
#           fine-tune, both with remat=dots, and with the paper's set), ab_gn_sample / gn_paper (sampling / the
#           paper's shape with GroupNorm's two-pass statistics and with the one-pass candidate, --gn_one_pass),
#           gn_b4 / gn_b4_1pass (the b4 step with either; one group each, H200 only: b4 does not fit an H100).
#           JAX_ARGS adds flags to every run of ours (e.g. --profile=DIR).
# The processes of a group start together: their compiles overlap, then they time one at a time (bench/gate.py).
# The peer's b4 run uses diffusers' regional compilation (as measured in bench/RESULTS.md); TORCH_B4=--compile=full
# asks for the whole-model torch.compile, which needs more than a 10-minute call to compile (bench/NOTES.md).
# Results -> $OUT/results.jsonl, logs and profiles -> $OUT/logs.tgz (the device returns at most 8 files), the table
# last.
set -uo pipefail
out=${OUT:-/tmp/bench_out}
logs=/tmp/bench_logs
mkdir -p "$out" "$logs"
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
    ( BENCH_NAME=$name timeout "$limit" python3 "bench/$script.py" $args --out="$res" > "$logs/$name.log" 2>&1
      echo "$name rc=$?" >> "$logs/$name.log"; touch "$BENCH_GATE/$name.exit" ) &
  done
  wait
  for spec in "$@"; do tail -n 2 "$logs/${spec%%:*}.log"; done
}

python3 bench/jax_bench.py matmul --out="$res" > "$logs/matmul.log" 2>&1; tail -n 1 "$logs/matmul.log"
ja=${JAX_ARGS:-}
# FLOPs of our steps counted on a CPU host (`jax_bench.py flops`, same program; the b4 count matched the device's to
# the last FLOP; counting on the device beside two compiles once crashed the process, bench/NOTES.md).
b4="--batch=4 --latent=32 --model_flops=57135558688768"
b1="--batch=1 --latent=64 --model_flops=61522056282112"
p24="--batch=1 --latent=64 --frames=24"  # the paper's shape: 24 frames x 512 px
p24_flops_all=92334312620032 p24_flops_paper=76043906646016
peer_b4="torch_b4:torch_peer:train --batch=4 --latent=32 ${TORCH_B4:---compile=regional} --count_flops"

specs() {  # the processes of one group, "name:script:args", in timing order (the peer first: it allocates while
           # compiling)
  case $1 in
    train) printf '%s\n' "$peer_b4" "torch_b1:torch_peer:train --batch=1 --latent=64 ${TORCH_B1:---compile=regional} --count_flops" \
                "jax_b4:jax_bench:train $b4 $ja" "jax_b1:jax_bench:train $b1 $ja" ;;
    b4) printf '%s\n' "$peer_b4" "jax_b4:jax_bench:train $b4 $ja" ;;
    b1) printf '%s\n' "torch_b1:torch_peer:train --batch=1 --latent=64 ${TORCH_B1:---compile=full} --count_flops" \
             "jax_b1:jax_bench:train $b1 $ja" ;;
    # The paper's shape, both trainable sets, ours and the regionally compiled peer with the same set.
    paper) printf '%s\n' "torch_p24_paper:torch_peer:train $p24 --trainable=paper --compile=regional --count_flops" \
                "torch_p24_all:torch_peer:train $p24 --trainable=all --compile=regional --count_flops" \
                "jax_p24_paper:jax_bench:train $p24 --trainable=paper --model_flops=$p24_flops_paper $ja" \
                "jax_p24_all:jax_bench:train $p24 --trainable=all --model_flops=$p24_flops_all $ja" ;;
    # The full fine-tune pair alone: beside three other processes the peer's compile ran out of memory (call 24).
    paper_all) printf '%s\n' "torch_p24_all:torch_peer:train $p24 --trainable=all --compile=regional --count_flops" \
                    "jax_p24_all:jax_bench:train $p24 --trainable=all --model_flops=$p24_flops_all $ja" ;;
    # The paper's trainable set alone (with JAX_ARGS=--profile=DIR: where its step's time goes).
    paper_set) printf '%s\n' "torch_p24_paper:torch_peer:train $p24 --trainable=paper --compile=regional --count_flops" \
                    "jax_p24_paper:jax_bench:train $p24 --trainable=paper --model_flops=$p24_flops_paper $ja" ;;
    sample) printf '%s\n' "torch_sample:torch_peer:sample --latent=64 --steps=25 --iters=3" \
                 "torch_sample_regional:torch_peer:sample --latent=64 --steps=25 --iters=3 --compile=regional" \
                 "jax_sample:jax_bench:sample --latent=64 --steps=25 --iters=3 $ja" ;;
    # Ours alone, its optimized HLO kept (hlo_sample.tgz) to name the fusions of a sampling profile.
    sample_hlo) printf '%s\n' "jax_sample:jax_bench:sample --latent=64 --steps=25 --iters=1 --dump_hlo=/tmp/hlo_sample $ja" ;;
    # Cross-attention through cuDNN with padded keys (--attention=cudnn_padded) vs XLA's path for it: sampling, and
    # a small paper-set training step (b1 x 16 x 32x32) that shows the padded backward runs.
    ab_xattn) printf '%s\n' "jax_sample:jax_bench:sample --latent=64 --steps=25 --iters=3 $ja" \
                   "jax_sample_padded:jax_bench:sample --latent=64 --steps=25 --iters=3 --attention=cudnn_padded $ja" \
                   "jax_b1s:jax_bench:train --batch=1 --latent=32 --trainable=paper --iters=5 $ja" \
                   "jax_b1s_padded:jax_bench:train --batch=1 --latent=32 --trainable=paper --iters=5 --attention=cudnn_padded $ja" ;;
    # The sampling pair without the compiled peer (its warm-up alone is 83 s): ours against diffusers eager.
    sample_eager) printf '%s\n' "torch_sample:torch_peer:sample --latent=64 --steps=25 --iters=3" \
                       "jax_sample:jax_bench:sample --latent=64 --steps=25 --iters=3 $ja" ;;
    # Two GPUs: the same per-GPU batch on 1 GPU, 2 GPUs data-parallel, 2 GPUs fsdp; no peer (its row comes from
    # train). Three compiles and state builds may overrun a 10-minute call (bench/NOTES.md, calls 11-13).
    scale2) printf '%s\n' "jax_b4:jax_bench:train $b4 $ja" "jax_b4_dp2:jax_bench:train $b4 --devices=2 $ja" \
                 "jax_b4_fsdp2:jax_bench:train $b4 --devices=2 --layout=fsdp $ja" ;;
    # b4 A/Bs: our step without and with jax_bench switches, both profiled (the HLO of the default), beside the peer
    ab_layout) ab_specs rowmajor --row_major ;;
    ab_pack) ab_specs unpacked --pack_small=0 ;;
    # LoRA (rank 16 on the spatial attention) at the paper's shape beside the full fine-tune and the paper's set:
    # step time, state and peak memory per GPU (ours only; no PyTorch LoRA peer in this harness).
    lora) printf '%s\n' "jax_p24_paper:jax_bench:train $p24 --trainable=paper --model_flops=$p24_flops_paper $ja" \
               "jax_p24_lora16:jax_bench:train $p24 --trainable=none --lora_rank=16 $ja" ;;
    # The full fine-tune needs 79 GiB without remat (call 26): on an 80 GB H100 both sides remat the dots. Each of
    # these is its own group on an H100: a process keeps the memory its compile's autotuning took until it exits,
    # so three compiling at once left too little for the one timing (calls 29-30).
    lora_full) printf '%s\n' "jax_p24_all_dots:jax_bench:train $p24 --trainable=all --remat=dots $ja" ;;
    lora_dots) printf '%s\n' "jax_p24_lora16_dots:jax_bench:train $p24 --trainable=none --lora_rank=16 --remat=dots $ja" ;;
    lora_paper) printf '%s\n' "jax_p24_paper_lora16:jax_bench:train $p24 --trainable=paper --lora_rank=16 $ja" ;;
    # GroupNorm: the two-pass statistics (the default) vs the one-pass candidate (--gn_one_pass), in sampling, at the
    # paper's shape, and in the b4 step (`gpu_run.sh gn_b4 gn_b4_1pass`, one group each: b4 needs an H200).
    ab_gn_sample) printf '%s\n' "jax_sample:jax_bench:sample --latent=64 --steps=25 --iters=3 $ja" \
                       "jax_sample_gn1pass:jax_bench:sample --latent=64 --steps=25 --iters=3 --gn_one_pass $ja" ;;
    gn_paper) printf '%s\n' "jax_p24_paper:jax_bench:train $p24 --trainable=paper --model_flops=$p24_flops_paper $ja" \
                   "jax_p24_paper_gn1pass:jax_bench:train $p24 --trainable=paper --model_flops=$p24_flops_paper --gn_one_pass $ja" ;;
    gn_b4) printf '%s\n' "jax_b4:jax_bench:train $b4 $ja" ;;
    gn_b4_1pass) printf '%s\n' "jax_b4_gn1pass:jax_bench:train $b4 --gn_one_pass $ja" ;;
    # XLA flag A/Bs (AB_FLAGS="--xla_x=1 --xla_y=2"): the paper-shape trainable-set pair / the sampling pair, plus
    # ours once per flag (jax_bench.py --xla_flag replaces the inherited value for that process alone).
    ab_flags) printf '%s\n' "torch_p24_paper:torch_peer:train $p24 --trainable=paper --compile=regional --count_flops" \
                   "jax_p24_paper:jax_bench:train $p24 --trainable=paper --model_flops=$p24_flops_paper $ja"
              flag_specs "jax_bench:train $p24 --trainable=paper --model_flops=$p24_flops_paper $ja" p24 ;;
    ab_flags_sample) printf '%s\n' "torch_sample:torch_peer:sample --latent=64 --steps=25 --iters=3" \
                          "jax_sample:jax_bench:sample --latent=64 --steps=25 --iters=3"
                     flag_specs "jax_bench:sample --latent=64 --steps=25 --iters=3" sample ;;
    *) printf '%s\n' "unknown group $1" >&2; return 2 ;;
  esac
}

flag_specs() {  # "script:args" TAG: one process of ours per flag in AB_FLAGS
  local i=0 flag
  for flag in ${AB_FLAGS:-}; do
    i=$((i + 1)); printf '%s\n' "jax_$2_flag$i:${1%%:*}:${1#*:} --xla_flag=$flag"
  done
}

ab_specs() {  # NAME FLAGS
  printf '%s\n' "$peer_b4" "jax_b4:jax_bench:train $b4 --profile=/tmp/tr4 --dump_hlo=/tmp/hlo_b4 $ja" \
       "jax_b4_$1:jax_bench:train $b4 $2 --profile=/tmp/tr4_$1 $ja"
}

# Each argument is a group; "a+b" runs a's and b's processes as one group (they compile together, then time one
# after another), which fits more into one call.
for arg in "$@"; do
  all=()
  for g in ${arg//+/ }; do
    list=$(specs "$g") || exit 2
    mapfile -t -O "${#all[@]}" all <<< "$list"
  done
  group "${all[@]}"
done
if [ -d /tmp/hlo_b4 ]; then
  (cd /tmp/hlo_b4 && find . -name '*train_step*after_optimizations.txt' | head -n 4 | tar -czf "$out/hlo_b4.tgz" -T -)
fi
if [ -d /tmp/hlo_sample ]; then  # the sampling program is the largest module dumped
  (cd /tmp/hlo_sample && ls -S ./*after_optimizations.txt | head -n 1 | tar -czf "$out/hlo_sample.tgz" -T -)
fi
cp "$out"/profile_*.txt "$logs"/ 2>/dev/null && rm -f "$out"/profile_*.txt
tar -czf "$out/logs.tgz" -C "$logs" .
# The autotune cache comes back as one file (the device returns at most 8 files); next call: untar into .bench_cache.
tar -czf "$out/autotune.tgz" -C "$autotune" . 2>/dev/null
python3 bench/report.py "$res"
