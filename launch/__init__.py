"""Launchers: TPU pods (tpu_pod.py), SLURM GPU clusters (slurm.py + slurm_gpu.sbatch), this machine (local.py)."""
