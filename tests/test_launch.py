"""Launchers: dry-run commands for a v5p-64 pod and a 2-node x 8-GPU SLURM job, the preemption loop against a fake
gcloud, the worker / sbatch shell scripts against fake trainers, local multi-process runs, --help, shellcheck.

The fake trainer, AOT check, gcloud, srun, scancel and scontrol used here are small scripts written into tmp_path; no
cloud or cluster is contacted.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from launch import tpu_pod

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TRICKY = "--config.data.caption=a cat's \"toy\" $HOME; rm -rf / `x` & y"
OVERRIDES = ["--config.train.learning_rate=1e-4", "--config.mesh.fsdp=8", TRICKY]

# A trainer stand-in: records argv + environment; behaviour chosen by config overrides.
FAKE_TRAIN = r'''
import json, os, signal, sys, time
pid = os.environ.get("ATOMO_PROCESS_ID", "0")
out = os.environ.get("FAKE_OUT")
if out:
    with open(os.path.join(out, f"process_{pid}.json"), "w") as f:
        json.dump({"argv": sys.argv[1:], "env": dict(os.environ)}, f)
print(f"fake trainer {pid} started", flush=True)
if f"--config.fail_process={pid}" in sys.argv:
    sys.exit(3)
if "--config.hang=1" in sys.argv:
    def stop(*_):
        print(f"fake trainer {pid} saved a checkpoint", flush=True)
        sys.exit(75)  # the real trainer's "stopped and saved" code
    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(0.05)
'''


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, **kw)


def commands(stdout: str) -> list[list[str]]:
    """Dry-run output -> argv of each command line (`#` lines are notes)."""
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


@pytest.fixture
def repo(tmp_path) -> Path:
    """A checkout to ship: git repo with a config, the real requirements.txt, a fake trainer and AOT check."""
    r = tmp_path / "repo"
    (r / "configs").mkdir(parents=True)
    (r / "atomo_jax").mkdir()
    (r / "configs" / "demo.py").write_text("def get_config():\n    return None\n")
    shutil.copy(REPO / "requirements.txt", r / "requirements.txt")
    (r / "atomo_jax" / "__init__.py").write_text("")
    (r / "atomo_jax" / "train.py").write_text(FAKE_TRAIN)
    (r / "atomo_jax" / "aot.py").write_text(textwrap.dedent("""
        import json, os, sys
        open(os.environ["FAKE_AOT_LOG"], "a").write(json.dumps(sys.argv[1:]))
        sys.exit(int(os.environ.get("FAKE_AOT_RC", "0")))
    """))
    (r / ".gitignore").write_text("ignored/\n")
    (r / "ignored").mkdir()
    (r / "ignored" / "big.bin").write_text("x")
    subprocess.run(["git", "init", "-q", str(r)], check=True)
    subprocess.run(["git", "-C", str(r), "add", "configs", "requirements.txt", ".gitignore"], check=True)
    return r


def tpu(*args) -> subprocess.CompletedProcess:
    return run([sys.executable, LAUNCH / "tpu_pod.py", *args])


def pinned_jax() -> str:
    return re.search(r"^jax(?:\[\w+\])?==(\S+)$", (REPO / "requirements.txt").read_text(), re.M).group(1)


# ------------------------------------------------------------------------------------------------------------ TPU


def test_accelerator_shapes():
    shapes = {n: (t.gcloud_name, t.chips, t.hosts) for n in ("v5p-64", "v5p-8", "v4-32", "v5e-16", "v5litepod-8",
                                                             "v6e-8", "v6e-64") for t in [tpu_pod.parse_accelerator(n)]}
    assert shapes == {"v5p-64": ("v5p-64", 32, 8), "v5p-8": ("v5p-8", 4, 1), "v4-32": ("v4-32", 16, 4),
                      "v5e-16": ("v5litepod-16", 16, 4), "v5litepod-8": ("v5litepod-8", 8, 1),
                      "v6e-8": ("v6e-8", 8, 1), "v6e-64": ("v6e-64", 64, 16)}
    for bad in ("v5p-12", "v6e-12", "h100-8", "v5p"):
        with pytest.raises(ValueError, match="accelerator_type"):
            tpu_pod.parse_accelerator(bad)


def test_tpu_run_dry_run_v5p64(repo):
    res = tpu("run", "--name=pod1", "--zone=us-east5-a", "--project=proj", "--accelerator_type=v5p-64", "--spot",
              "--config=configs/demo.py", "--workdir=gs://bucket/runs/x", f"--repo_dir={repo}", "--dry-run",
              *OVERRIDES)
    assert res.returncode == 0, res.stderr
    cmds = commands(res.stdout)
    assert cmds[0] == ["cd", str(repo)]
    # The AOT fit check runs locally, with the same overrides, before the pod is created.
    aot = next(i for i, c in enumerate(cmds) if "atomo_jax.aot" in c)
    create = next(i for i, c in enumerate(cmds) if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"])
    assert aot < create
    words = cmds[aot]
    assert words[:2] == ["env", f"LIBTPU_INIT_ARGS={tpu_pod.DEFAULT_LIBTPU_INIT_ARGS}"]  # compiled as the pod runs
    assert words[words.index("-m") + 1:] == ["atomo_jax.aot", "--config=configs/demo.py", "--topology=v5p-64",
                                             *OVERRIDES]
    assert cmds[create][5:] == ["pod1", "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5",
                                "--zone=us-east5-a", "--project=proj", "--spot"]

    ssh = [c for c in cmds if c[3:5] == ["tpu-vm", "ssh"]]
    assert len(ssh) == 2 and all("--worker=all" in c for c in ssh)
    setup_cmd, train_cmd = (next(a[len("--command="):] for a in c if a.startswith("--command=")) for c in ssh)
    assert f"'jax[tpu]=={pinned_jax()}'" in setup_cmd
    upload = next(c for c in cmds if c[3:5] == ["tpu-vm", "scp"] and "--worker=all" in c)
    assert upload[6] == "pod1:atomo_jax_src.tar.gz"

    # The remote command, as the worker's shell splits it: env, then the identical trainer command everywhere.
    words = shlex.split(train_cmd)
    env = dict(w.split("=", 1) for w in words[words.index("env") + 1:words.index("bash")])
    assert env["JAX_PLATFORMS"] == "tpu,cpu"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert "--xla_tpu_enable_async_collective_fusion=true" in env["LIBTPU_INIT_ARGS"].split()
    assert env["JAX_COMPILATION_CACHE_DIR"] == "gs://bucket/runs/x/jax_cache"
    trainer = words[words.index("-m") - 1:]
    assert trainer == ["$HOME/atomo_venv/bin/python", "-m", "atomo_jax.train", "--config=configs/demo.py",
                       "--workdir=gs://bucket/runs/x", *OVERRIDES]  # overrides verbatim, one word each

    # Per-worker logs: 8 hosts (32 chips, 4 per host) -> 8 copies, one per worker, to distinct local files.
    logs = [c for c in cmds if c[3:5] == ["tpu-vm", "scp"] and c[5] == "pod1:atomo_logs/train.log"]
    assert sorted(c[7] for c in logs) == [f"--worker={w}" for w in range(8)]
    assert len({c[6] for c in logs}) == 8
    assert "8 workers in all" in res.stdout
    # The preemption loop reruns with the same workdir.
    assert "same --workdir=gs://bucket/runs/x" in res.stdout


def test_tpu_skip_aot_check(repo):
    res = tpu("run", "--name=p", "--accelerator_type=v5p-64", "--config=configs/demo.py", "--workdir=gs://b/x",
              f"--repo_dir={repo}", "--dry-run", "--skip_aot_check")
    assert res.returncode == 0, res.stderr
    assert not any("atomo_jax.aot" in c for c in commands(res.stdout) for c in c)
    assert "AOT fit check skipped" in res.stdout


def test_tpu_multislice_dry_run(repo):
    res = tpu("run", "--name=ms", "--accelerator_type=v5p-32", "--num_slices=2", "--config=configs/demo.py",
              "--workdir=gs://b/x", f"--repo_dir={repo}", "--dry-run", "--delete_when_done")
    assert res.returncode == 0, res.stderr
    cmds = commands(res.stdout)
    aot = next(c for c in cmds if "atomo_jax.aot" in c)
    assert "--num_slices=2" in aot and "--config.mesh.dcn_data=2" in aot
    create = next(c for c in cmds if c[3:5] == ["queued-resources", "create"])
    assert {"--node-count=2", "--node-prefix=ms", "--accelerator-type=v5p-32"} <= set(create)
    train = next(c for c in cmds if c[3:5] == ["queued-resources", "ssh"] and "atomo_jax.train" in " ".join(c))
    assert {"--worker=all", "--node=all"} <= set(train)
    remote = next(a[len("--command="):] for a in train if a.startswith("--command="))
    assert "--config.mesh.dcn_data=2" in shlex.split(remote)
    logs = [c for c in cmds if c[3:5] == ["queued-resources", "scp"] and c[5] == "ms:atomo_logs/train.log"]
    assert sorted((c[7], c[8]) for c in logs) == sorted((f"--worker={w}", f"--node={s}")
                                                        for s in range(2) for w in range(4))
    assert cmds[-1][3:] == ["queued-resources", "delete", "ms", "--quiet", "--force"]

    bad = tpu("train", "--name=ms", "--accelerator_type=v5p-32", "--num_slices=2", "--config=configs/demo.py",
              "--workdir=gs://b/x", f"--repo_dir={repo}", "--dry-run", "--config.mesh.dcn_data=4")
    assert bad.returncode == 2 and "dcn_data=4" in bad.stderr


@pytest.mark.parametrize("args, message", [
    (["--workdir=/local/dir"], "GCS workdir"),
    (["--workdir=gs://b/x", "--lr=3"], "--config.KEY=VALUE"),
    (["--workdir=gs://b/x", "--config=configs/missing.py"], "no such file"),
    (["--workdir=gs://b/x", "--accelerator_type=v5p-12"], "multiples of 8"),
])
def test_tpu_refuses_bad_input(repo, args, message):
    res = tpu("train", "--name=p", "--config=configs/demo.py", f"--repo_dir={repo}", "--dry-run", *args)
    assert res.returncode == 2 and message in res.stderr, res.stderr


FAKE_GCLOUD = r'''#!/usr/bin/env python3
"""gcloud stand-in: one TPU whose state lives in a file; the first training run is 'preempted'."""
import json, os, sys
d = os.environ["FAKE_GCLOUD_DIR"]
argv = sys.argv[1:]  # compute tpus tpu-vm VERB ...
open(os.path.join(d, "calls.jsonl"), "a").write(json.dumps(argv) + "\n")
state_file = os.path.join(d, "state")
state = open(state_file).read() if os.path.exists(state_file) else None
verb = argv[3]
if verb == "describe":
    if state is None:
        sys.exit(print("ERROR: (gcloud) NOT_FOUND: node", file=sys.stderr) or 1)
    print(state)
elif verb == "create":
    open(state_file, "w").write("READY")
elif verb == "delete":
    os.remove(state_file)
elif verb == "scp" and ":" in argv[4]:  # copying a worker's log to the client
    open(argv[5], "w").write("log of " + argv[6] + "\n")
elif verb == "ssh":
    command = next(a for a in argv if a.startswith("--command="))
    if "tpu_worker.sh train" in command:
        n = len([l for l in open(os.path.join(d, "calls.jsonl")) if "tpu_worker.sh train" in l])
        if n == 1:
            open(state_file, "w").write("PREEMPTED")
            sys.exit(255)
'''


def test_tpu_run_recreates_after_preemption_and_resumes_same_workdir(repo, tmp_path):
    """The real `run` loop against a fake gcloud: AOT check, create, setup, train -> preempted -> delete, create,
    setup, identical train command (same GCS workdir, so the trainer resumes), logs per attempt."""
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "gcloud").write_text(FAKE_GCLOUD)
    (fake / "gcloud").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "FAKE_GCLOUD_DIR": str(tmp_path),
           "FAKE_AOT_LOG": str(tmp_path / "aot.log"), "TMPDIR": str(tmp_path)}
    logs = tmp_path / "logs"
    res = run([sys.executable, LAUNCH / "tpu_pod.py", "run", "--name=pre", "--accelerator_type=v5p-16",
               "--config=configs/demo.py", "--workdir=gs://b/run", f"--repo_dir={repo}", f"--log_dir={logs}",
               "--poll_seconds=0", *OVERRIDES], env=env)
    assert res.returncode == 0, res.stderr
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    verbs = [c[3] for c in calls if c[3] != "describe"]
    assert verbs == ["create", "scp", "ssh", "ssh", "scp", "scp",  # attempt 1: preempted in training
                     "delete", "create", "scp", "ssh", "ssh", "scp", "scp"]  # attempt 2: finishes
    trains = [c for c in calls if c[3] == "ssh" and "tpu_worker.sh train" in " ".join(c)]
    assert len(trains) == 2 and trains[0] == trains[1]
    assert "--workdir=gs://b/run" in shlex.split(next(a for a in trains[0] if a.startswith("--command=")))
    assert json.loads((tmp_path / "aot.log").read_text()) == ["--config=configs/demo.py", "--topology=v5p-16",
                                                              *OVERRIDES]
    assert sorted(p.relative_to(logs).as_posix() for p in logs.rglob("*.log")) == [
        "attempt-1/slice0-worker0.log", "attempt-1/slice0-worker1.log",
        "attempt-2/slice0-worker0.log", "attempt-2/slice0-worker1.log"]
    # The shipped tarball holds tracked and untracked files, not ignored ones.
    with tarfile.open(tmp_path / "atomo_jax-pre.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"configs/demo.py", "requirements.txt", "atomo_jax/train.py", "atomo_jax/aot.py"} <= names
    assert not any(n.startswith("ignored/") for n in names)


def test_tpu_run_stops_when_config_does_not_fit(repo, tmp_path):
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "gcloud").write_text(FAKE_GCLOUD)
    (fake / "gcloud").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "FAKE_GCLOUD_DIR": str(tmp_path),
           "FAKE_AOT_LOG": str(tmp_path / "aot.log"), "FAKE_AOT_RC": "1"}
    res = run([sys.executable, LAUNCH / "tpu_pod.py", "run", "--name=nofit", "--accelerator_type=v5p-16",
               "--config=configs/demo.py", "--workdir=gs://b/run", f"--repo_dir={repo}"], env=env)
    assert res.returncode == 1 and "atomo_jax.aot" in res.stderr
    assert not (tmp_path / "calls.jsonl").exists()  # nothing was rented


def test_tpu_commands_run_on_a_simulated_worker(repo, tmp_path):
    """Runs the printed setup and train commands as a worker's shell would (HOME = a fake worker home, uv faked):
    the shipped tree unpacks, the venv gets jax[tpu] at the pinned version and the CPU torch, and the trainer gets
    the environment and every override byte for byte."""
    (repo / "launch").mkdir()
    shutil.copy(LAUNCH / "tpu_worker.sh", repo / "launch" / "tpu_worker.sh")
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    (bin_dir / "uv").write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        echo "$*" >>{shlex.quote(str(tmp_path / 'uv.log'))}
        last="${{@: -1}}"
        if [[ "$1" == venv ]]; then mkdir -p "$last/bin" && cp {shlex.quote(str(tmp_path / 'python'))} "$last/bin/"; fi
        for a in "$@"; do [[ -f "$a" ]] && cp "$a" {shlex.quote(str(tmp_path / 'req.txt'))}; done
        exit 0
    """))
    (bin_dir / "uv").chmod(0o755)
    # The venv's python: answers setup's version check as an installed jax[tpu] would; runs everything else.
    (tmp_path / "python").write_text(f"#!/usr/bin/env bash\n[[ \"$2\" == *libtpu* ]] && echo 'jax 0 libtpu 0' && "
                                     f"exit 0\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    (tmp_path / "python").chmod(0o755)
    res = tpu("train", "--name=w", "--accelerator_type=v5p-64", "--config=configs/demo.py", "--workdir=gs://b/x",
              f"--repo_dir={repo}", "--dry-run", "--env=EXTRA_FLAG=on", *OVERRIDES)
    train_cmd = next(a for c in commands(res.stdout) for a in c if a.startswith("--command="))[len("--command="):]
    setup_cmd = tpu_pod.setup_command("3.11", f"jax[tpu]=={pinned_jax()}")
    tpu_pod.pack(repo, home / tpu_pod.REMOTE_TARBALL)  # what `scp --worker=all` puts in the worker's home
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_OUT": str(tmp_path)}

    setup = run(["bash", "-c", f"cd ~ && {setup_cmd}"], env=env)
    assert setup.returncode == 0 and "jax 0 libtpu 0" in setup.stdout, setup.stdout + setup.stderr
    assert (home / "atomo_jax_repo" / "configs" / "demo.py").is_file()
    uv = (tmp_path / "uv.log").read_text().splitlines()
    assert uv[0] == f"venv --allow-existing --python 3.11 {home}/atomo_venv"
    torch_pin = re.search(r"^torch==\S+$", (REPO / "requirements.txt").read_text(), re.M).group(0)
    assert f"--index-url https://download.pytorch.org/whl/cpu {torch_pin}" in uv[1]
    assert uv[2].endswith(f"jax[tpu]=={pinned_jax()}")
    assert not re.search(r"^jax\[", (tmp_path / "req.txt").read_text(), re.M)  # the CPU jax pin is dropped

    train = run(["bash", "-c", f"cd ~ && {train_cmd}"], env=env)
    assert train.returncode == 0, train.stdout + train.stderr
    rec = json.loads((tmp_path / "process_0.json").read_text())
    assert rec["argv"] == ["--config=configs/demo.py", "--workdir=gs://b/x", *OVERRIDES]
    assert rec["env"]["EXTRA_FLAG"] == "on" and rec["env"]["JAX_PLATFORMS"] == "tpu,cpu"
    assert rec["env"]["LIBTPU_INIT_ARGS"] == tpu_pod.DEFAULT_LIBTPU_INIT_ARGS
    assert "fake trainer 0 started" in (home / "atomo_logs" / "train.log").read_text()


# ---------------------------------------------------------------------------------------------- TPU worker script


def worker_train(home: Path, *cmd: str, wait: bool = True):
    argv = ["bash", str(LAUNCH / "tpu_worker.sh"), "train", str(home / "atomo_logs" / "train.log"), *cmd]
    env = {**os.environ, "HOME": str(home)}
    if wait:
        return run(argv, env=env)
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_worker_runs_logs_and_propagates_exit_code(tmp_path):
    (tmp_path / "atomo_jax_src.tar.gz").write_text("code v1")
    res = worker_train(tmp_path, sys.executable, "-c", "print('step 1 loss 0.5'); raise SystemExit(3)")
    assert res.returncode == 3
    assert "step 1 loss 0.5" in res.stdout and "training exited with code 3" in res.stdout
    assert "step 1 loss 0.5" in (tmp_path / "atomo_logs" / "train.log").read_text()


def test_worker_reattaches_to_same_run_and_restarts_a_changed_one(tmp_path):
    (tmp_path / "atomo_jax_src.tar.gz").write_text("code v1")
    started = tmp_path / "started"
    slow = ["-c", textwrap.dedent(f"""
        import pathlib, signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: (print('saved checkpoint', flush=True), sys.exit(0)))
        print('run started', flush=True); pathlib.Path({str(started)!r}).touch()
        time.sleep(3); print('run finished', flush=True)
    """)]
    first = worker_train(tmp_path, sys.executable, *slow, wait=False)
    wait_for(started)
    # gcloud retrying a dropped ssh: the same command follows the running trainer instead of starting another.
    again = worker_train(tmp_path, sys.executable, *slow)
    assert again.returncode == 0 and "attaching to running training process" in again.stdout
    assert first.wait(30) == 0
    log = (tmp_path / "atomo_logs" / "train.log").read_text()
    assert log.count("run started") == 1 and "run finished" in log

    # New code shipped (setup ran again): the earlier run is stopped with SIGTERM (it saves) and the new one starts.
    started.unlink()
    first = worker_train(tmp_path, sys.executable, *slow, wait=False)
    wait_for(started)
    (tmp_path / "atomo_jax_src.tar.gz").write_text("code v2")
    second = worker_train(tmp_path, sys.executable, "-c", "print('second run')")
    assert second.returncode == 0 and "stopping earlier training process" in second.stdout
    assert first.wait(30) == 0
    log = (tmp_path / "atomo_logs" / "train.log").read_text()
    assert "saved checkpoint" in log and "second run" in log


# ---------------------------------------------------------------------------------------------------------- SLURM


def slurm(*args) -> subprocess.CompletedProcess:
    return run([sys.executable, LAUNCH / "slurm.py", *args])


def test_slurm_dry_run_2_nodes_x_8_gpus(repo, tmp_path):
    res = slurm("--nodes=2", "--gpus_per_node=8", "--partition=gpu", "--time=04:00:00", f"--repo_dir={repo}",
                f"--log_dir={tmp_path / 'logs'}", "--python=/venv/bin/python", "--config=configs/demo.py",
                "--workdir=/shared/runs/x", "--dry-run", *OVERRIDES)
    assert res.returncode == 0, res.stderr
    (mkdir, sbatch), = [commands(res.stdout)]
    assert mkdir == ["mkdir", "-p", str(tmp_path / "logs")]
    script = sbatch.index(str(LAUNCH / "slurm.sbatch"))
    flags, train_args = sbatch[1:script], sbatch[script + 1:]
    assert {"--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu", "--time=04:00:00",
            "--signal=B:USR1@300", f"--chdir={repo}",
            "--export=ALL,ATOMO_PYTHON=/venv/bin/python,ATOMO_PLATFORM=cuda"} <= set(flags)
    assert train_args == ["--config=configs/demo.py", "--workdir=/shared/runs/x", *OVERRIDES]
    assert "2 nodes x 8 GPUs = 16 devices, 2 jax processes" in res.stdout
    script_text = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --requeue" in script_text and "#SBATCH --ntasks-per-node=1" in script_text


def fake_slurm_bin(tmp_path: Path) -> Path:
    """srun runs its command locally (recording its flags); scancel SIGTERMs the trainer; scontrol is recorded."""
    b = tmp_path / "slurmbin"
    b.mkdir()
    scripts = {
        "srun": 'echo "$*" >"$FAKE_OUT/srun_args"\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"',
        # Slurm's scancel returns after the trainer has had time to save and exit, so srun often ends while the
        # sbatch script is still in its USR1 trap; the sleep makes that the case every time.
        "scancel": 'echo "$*" >>"$FAKE_OUT/scancel"\nkill -TERM "$(cat "$FAKE_OUT/trainer.pid")"\nsleep 1',
        "scontrol": 'echo "$*" >>"$FAKE_OUT/scontrol"',
        # The python the sbatch script runs: records its pid, then hands over to the fake trainer.
        "fakepython": f'echo $$ >"$FAKE_OUT/trainer.pid"\nexec {shlex.quote(sys.executable)} "$@"',
    }
    for name, body in scripts.items():
        (b / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (b / name).chmod(0o755)
    return b


def sbatch_env(tmp_path: Path, repo: Path, bin_dir: Path) -> dict[str, str]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_OUT": str(out), "PYTHONPATH": str(repo),
            "ATOMO_PYTHON": str(bin_dir / "fakepython"), "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8",
            "SLURM_CPUS_ON_NODE": "96", "SLURM_JOB_NUM_NODES": "2"}


def test_sbatch_script_runs_trainer_with_all_gpus_and_verbatim_args(repo, tmp_path):
    env = sbatch_env(tmp_path, repo, fake_slurm_bin(tmp_path))
    res = run(["bash", LAUNCH / "slurm.sbatch", "--config=configs/demo.py", "--workdir=/w", *OVERRIDES,
               "--config.fail_process=0"], env=env, cwd=repo)
    assert res.returncode == 3, res.stderr  # the trainer's exit code is the job's
    rec = json.loads((tmp_path / "out" / "process_0.json").read_text())
    assert rec["argv"] == ["--config=configs/demo.py", "--workdir=/w", *OVERRIDES, "--config.fail_process=0"]
    assert rec["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
    assert rec["env"]["JAX_PLATFORMS"] == "cuda"  # a libtpu in the venv is never asked to find a TPU
    srun_flags = (tmp_path / "out" / "srun_args").read_text().split()
    assert {"--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=96", "--kill-on-bad-exit=1"} <= set(srun_flags)
    assert not (tmp_path / "out" / "scontrol").exists()


def test_sbatch_script_on_cpu_nodes_runs_one_cpu_process_per_task(repo, tmp_path):
    """`slurm.py --gpus_per_node=0 --tasks_per_node=2`: no GPU flags, the CPUs split between the tasks, CPU only."""
    env = {**sbatch_env(tmp_path, repo, fake_slurm_bin(tmp_path)), "ATOMO_PLATFORM": "cpu",
           "SLURM_NTASKS_PER_NODE": "2"}
    for name in ("SLURM_GPUS_ON_NODE", "JAX_PLATFORMS"):
        env.pop(name, None)
    res = run(["bash", LAUNCH / "slurm.sbatch", "--config=configs/demo.py", "--workdir=/w"], env=env, cwd=repo)
    assert res.returncode == 0, res.stderr
    rec = json.loads((tmp_path / "out" / "process_0.json").read_text())
    assert rec["env"]["JAX_PLATFORMS"] == "cpu" and "JAX_LOCAL_DEVICE_IDS" not in rec["env"]
    srun_flags = (tmp_path / "out" / "srun_args").read_text().split()
    assert {"--ntasks-per-node=2", "--cpus-per-task=48", "--kill-on-bad-exit=1"} <= set(srun_flags)
    assert not any(f.startswith("--gpus") for f in srun_flags)
    assert "2 nodes x 2 tasks, 4 CPU processes" in res.stdout


def test_slurm_dry_run_cpu_nodes(repo, tmp_path):
    res = slurm("--nodes=2", "--gpus_per_node=0", "--tasks_per_node=2", f"--repo_dir={repo}",
                f"--log_dir={tmp_path / 'logs'}", "--python=/venv/bin/python", "--config=configs/demo.py",
                "--workdir=/shared/runs/x", "--dry-run")
    assert res.returncode == 0, res.stderr
    (_, sbatch), = [commands(res.stdout)]
    assert "--ntasks-per-node=2" in sbatch and "--export=ALL,ATOMO_PYTHON=/venv/bin/python,ATOMO_PLATFORM=cpu" in sbatch
    assert not any(f.startswith("--gpus") for f in sbatch)
    assert "2 CPU nodes x 2 tasks = 4 jax processes" in res.stdout
    assert f"job log: {tmp_path / 'logs' / 'atomo_jax-JOBID.out'}" in res.stdout
    refused = slurm("--gpus_per_node=8", "--tasks_per_node=2", f"--repo_dir={repo}", "--config=configs/demo.py",
                    "--workdir=/w", "--dry-run")
    assert refused.returncode == 2 and "--tasks_per_node=2 with GPUs" in refused.stderr


def test_sbatch_time_limit_signal_saves_and_requeues(repo, tmp_path):
    env = sbatch_env(tmp_path, repo, fake_slurm_bin(tmp_path))
    job = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "--config=configs/demo.py", "--workdir=/w",
                            "--config.hang=1"], env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    wait_for(tmp_path / "out" / "process_0.json")
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 delivers before the time limit
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 75, out  # stopped and saved: requeued, not finished
    assert "fake trainer 0 saved a checkpoint" in out
    assert (tmp_path / "out" / "scancel").read_text().split() == ["--signal=TERM", "4242"]
    assert (tmp_path / "out" / "scontrol").read_text().split() == ["requeue", "4242"]


# ---------------------------------------------------------------------------------------------------------- local


def local(*args, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, LAUNCH / "local.py", *args], **kw)


def test_local_dry_run_two_processes(repo):
    res = local("--num_processes=2", "--devices_per_process=4", "--port=4321", "--config=configs/demo.py",
                "--workdir=/tmp/w", f"--repo_dir={repo}", "--python=python", "--dry-run", *OVERRIDES)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    procs = [shlex.split(line.split(" >")[0]) for line in lines if line.startswith("env ")]
    assert len(procs) == 2 and lines[-1] == "wait"
    for words in procs:
        env = dict(w.split("=", 1) for w in words[1:words.index("python")])
        assert env["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=4")
        assert env["ATOMO_COORDINATOR"] == "127.0.0.1:4321" and env["ATOMO_NUM_PROCESSES"] == "2"
        assert words[words.index("python"):] == ["python", "-m", "atomo_jax.train", "--config=configs/demo.py",
                                                 "--workdir=/tmp/w", *OVERRIDES]
    assert sorted(dict(w.split("=", 1) for w in p if "=" in w)["ATOMO_PROCESS_ID"] for p in procs) == ["0", "1"]


def test_local_runs_two_processes(repo, tmp_path):
    env = {**os.environ, "FAKE_OUT": str(tmp_path)}
    res = local("--num_processes=2", "--devices_per_process=4", "--config=configs/demo.py",
                f"--workdir={tmp_path / 'w'}", f"--repo_dir={repo}", TRICKY, env=env)
    assert res.returncode == 0, res.stderr
    recs = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in range(2)]
    assert recs[0]["env"]["ATOMO_COORDINATOR"] == recs[1]["env"]["ATOMO_COORDINATOR"]
    for i, rec in enumerate(recs):
        assert rec["argv"] == ["--config=configs/demo.py", f"--workdir={tmp_path / 'w'}", TRICKY]
        assert rec["env"]["ATOMO_PROCESS_ID"] == str(i) and rec["env"]["ATOMO_NUM_PROCESSES"] == "2"
        assert "--xla_force_host_platform_device_count=4" in rec["env"]["XLA_FLAGS"]
        assert rec["env"]["JAX_PLATFORMS"] == "cpu"
    assert "fake trainer 1 started" in (tmp_path / "w" / "process_logs" / "process_1.log").read_text()


def test_local_failure_stops_the_other_processes(repo, tmp_path):
    res = local("--num_processes=2", "--config=configs/demo.py", f"--workdir={tmp_path / 'w'}", f"--repo_dir={repo}",
                "--config.fail_process=1", "--config.hang=1")
    assert res.returncode == 3, res.stderr
    assert "fake trainer 0 saved a checkpoint" in res.stdout  # process 0 got SIGTERM, not a hang


# ------------------------------------------------------------------------------------------------- help, shellcheck


@pytest.mark.parametrize("argv", [
    ["tpu_pod.py", "--help"], *(["tpu_pod.py", sub, "--help"] for sub in ("create", "setup", "train", "run", "delete")),
    ["slurm.py", "--help"], ["local.py", "--help"]])
def test_help(argv):
    res = run([sys.executable, LAUNCH / argv[0], *argv[1:]])
    assert res.returncode == 0 and res.stdout.startswith("usage:"), res.stderr
    if argv[1:] in (["run", "--help"], ["train", "--help"]):
        assert "--dry-run" in res.stdout and "--config" in res.stdout


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck); CI installs it")
    scripts = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
    assert len(scripts) >= 2
    res = run(["shellcheck", "--shell=bash", *scripts])
    assert res.returncode == 0, res.stdout
