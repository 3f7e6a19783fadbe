#!/usr/bin/env bash
# Runs on every TPU worker, started by launch/tpu_pod.py over `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   tpu_worker.sh setup PYTHON_VERSION JAX_SPEC      venv at ~/atomo_venv with requirements.txt + JAX_SPEC
#   tpu_worker.sh train LOG_FILE COMMAND [ARGS...]    run COMMAND (stopping a different earlier run, or attaching
#                                                     to the same one still running), stream its log
#
# Both run from the repository root that tpu_pod.py unpacked on the worker.
set -euo pipefail

venv="$HOME/atomo_venv"
pidfile="$HOME/atomo_train.pid"
cmdfile="$HOME/atomo_train.cmd"
rcfile="$HOME/atomo_train.rc"

setup() {
  local python_version=$1 jax_spec=$2
  export PATH="$HOME/.local/bin:$PATH"
  # TPU VM images ship an older system Python than the project needs; uv brings its own.
  if ! command -v uv >/dev/null; then
    curl -LsSf https://astral.sh/uv/install.sh | sh
  fi
  uv venv --allow-existing --python "$python_version" "$venv"
  local torch_spec
  torch_spec=$(grep -E '^torch==' requirements.txt || true)
  if [[ -n "$torch_spec" ]]; then
    # The default torch wheel on PyPI is the multi-GB CUDA build; workers only need the CPU one.
    uv pip install --python "$venv/bin/python" --index-url https://download.pytorch.org/whl/cpu "$torch_spec"
  fi
  # requirements.txt pins the CPU jax; JAX_SPEC (jax[tpu]==same version) replaces that line.
  grep -vE '^jax(\[[a-z,]*\])?==' requirements.txt > "$HOME/atomo_requirements.txt"
  uv pip install --python "$venv/bin/python" -r "$HOME/atomo_requirements.txt" "$jax_spec"
  # Versions only: touching the TPU here would start a single-host runtime on a multi-host slice.
  "$venv/bin/python" -c 'from importlib.metadata import version as v; print("jax", v("jax"), "libtpu", v("libtpu"))'
}

running_pid() {
  # Prints the pid of the training this script started, if it still runs.
  [[ -f "$pidfile" ]] || return 1
  local pid
  pid=$(cat "$pidfile")
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

stop_previous() {
  # A different run still holds the TPU; SIGTERM makes the trainer save a checkpoint and exit.
  local pid
  pid=$(running_pid) || return 0
  echo "[$(hostname)] stopping earlier training process $pid (it saves a checkpoint first)"
  kill -TERM "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 2; done
}

train() {
  local log=$1
  shift
  local wanted pid rc=0 terminated=0
  # Identity of a run: its command and the shipped code (tpu_pod.py's tarball), so a fresh `setup` restarts it.
  wanted="$(printf '%q ' "$@")$(md5sum <"$HOME/atomo_jax_src.tar.gz")"
  # The VM shutting down (preemption) signals us too: then report 143, whatever the trainer's own exit code.
  trap 'terminated=1' TERM
  if pid=$(running_pid) && [[ "$(cat "$cmdfile" 2>/dev/null)" == "$wanted" ]]; then
    # Same command already running (gcloud retried a dropped ssh, or the launcher was restarted): follow it.
    echo "[$(hostname)] attaching to running training process $pid"
    tail -n 50 -f --pid="$pid" "$log" &
    while kill -0 "$pid" 2>/dev/null; do sleep 5; done
    sleep 2  # the shell that started it writes the exit code right after reaping it
    rc=$(cat "$rcfile" 2>/dev/null || echo 1)
  else
    stop_previous
    mkdir -p "$(dirname "$log")"
    touch "$log"
    local start
    start=$(stat -c %s "$log")
    rm -f "$rcfile"
    printf '%s' "$wanted" >"$cmdfile"
    # The trainer writes to the log file, not to the ssh pipe, so it outlives a dropped ssh connection.
    "$@" >>"$log" 2>&1 &
    pid=$!
    echo "$pid" >"$pidfile"
    tail -c "+$((start + 1))" -f --pid="$pid" "$log" &
    while true; do
      rc=0
      wait "$pid" || rc=$?
      # A trapped signal interrupts `wait` (rc > 128) while the trainer still runs: keep waiting.
      if ((rc > 128)) && kill -0 "$pid" 2>/dev/null; then continue; fi
      break
    done
    echo "$rc" >"$rcfile"
  fi
  wait || true  # the log tail
  if ((terminated)); then
    echo "[$(hostname)] worker received SIGTERM (preemption or shutdown); trainer exited with $rc"
    return 143
  fi
  echo "[$(hostname)] training exited with code $rc"
  return "$rc"
}

mode=${1:?usage: tpu_worker.sh setup PYTHON_VERSION JAX_SPEC | train LOG_FILE COMMAND...}
shift
case "$mode" in
  setup) setup "$@" ;;
  train) train "$@" ;;
  *) echo "tpu_worker.sh: unknown mode '$mode' (expected setup or train)" >&2; exit 2 ;;
esac
