"""bench/report.py: the tables read from results.jsonl, scaling efficiency included."""

import json

from bench import report


def test_report_speed_and_scaling_tables(tmp_path, capsys):
    rows = [
        {"kind": "matmul", "impl": "jax", "tflops": 600.0},
        {"kind": "train", "impl": "jax", "batch": 4, "latent": 32, "trainable": "all", "s_per_step": 0.5,
         "tflops": 100.0, "peak_gib": 60.0, "first_loss": 1.0},
        {"kind": "train", "impl": "jax", "batch": 4, "latent": 32, "trainable": "all", "s_per_step": 0.28,
         "s_per_step_sync": 0.31, "tflops": 204.0, "peak_gib": 65.5, "state_gib": 21.04, "first_loss": 0.99885},  # a later run of the same row wins
        {"kind": "train", "impl": "jax", "batch": 4, "latent": 32, "trainable": "all", "devices": 2, "layout": "fsdp",
         "s_per_step": 0.295, "tflops": 193.6, "peak_gib": 56.9},
        {"kind": "train", "impl": "torch_eager", "batch": 4, "latent": 32, "s_per_step": 0.543, "tflops": 104.0},
        # the paper's shape (24 frames) with the paper's trainable set, ours and the peer; a 16-frame row of the
        # same batch x latent must not pair with it
        {"kind": "train", "impl": "jax", "batch": 1, "latent": 64, "frames": 24, "trainable": "paper",
         "s_per_step": 0.2, "tflops": 300.0},
        {"kind": "train", "impl": "torch_regional", "batch": 1, "latent": 64, "frames": 24, "trainable": "paper",
         "s_per_step": 0.55},
        {"kind": "train", "impl": "torch_regional", "batch": 1, "latent": 64, "trainable": "paper", "s_per_step": 9.0},
        {"kind": "sample", "impl": "jax", "latent": 64, "s_per_video": 4.0},
        {"kind": "sample", "impl": "torch_eager", "latent": 64, "s_per_video": 12.0},
        {"kind": "flops", "impl": "jax", "batch": 1, "latent": 64, "model_flops": 1e14},  # not a timing row
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.main(str(path))
    out = capsys.readouterr().out
    assert "bf16 matmul peak measured: 600 TFLOP/s" in out
    assert "| train | jax | 4 x 32 | 1 data | all | 0.280 | 0.310 | 204.0 | 0.34 | 65.5 | 21.0 | 0.99885 |" in out
    assert "| train | torch_eager | 4 x 32 | 1 data | all | 0.543 | - | 104.0 |" in out
    assert "speedup train 4 x 32 all: jax vs torch_eager 1.94" in out
    assert "| jax | 4 x 32 per GPU | 2 x fsdp | 0.295 | 0.280 | 0.949 | 56.9 |" in out
    assert "torch_eager" in out and out.count("| train | jax | 4 x 32 | 1 data") == 1
    assert "| train | jax | 1 x 64 x 24f | 1 data | paper | 0.200 |" in out
    assert "speedup train 1 x 64 x 24f paper: jax vs torch_regional 2.75" in out
    assert "train_speedup_paper_shape: 2.75" in out and "train_speedup_paper_shape_full" not in out
    assert "train_tflops_per_gpu_b4_256: 204" in out and "train_mfu_b4_256: 0.34" in out
    assert "sample_speedup_vs_diffusers: 3.00" in out and "vs_diffusers_compiled" not in out
    assert "| flops |" not in out
