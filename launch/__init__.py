"""Launchers: TPU pods (tpu_pod.py), SLURM clusters (slurm.py + slurm.sbatch), this machine (local.py)."""
