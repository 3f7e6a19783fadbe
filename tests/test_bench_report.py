"""bench/report.py: the tables read from results.jsonl, scaling efficiency included."""

import json

from bench import report


def test_report_speed_and_scaling_tables(tmp_path, capsys):
    rows = [
        {"kind": "matmul", "impl": "jax", "tflops": 600.0},
        {"kind": "train", "impl": "jax", "batch": 4, "latent": 32, "trainable": "all", "s_per_step": 0.5,
         "tflops": 100.0, "peak_gib": 60.0, "first_loss": 1.0},
        {"kind": "train", "impl": "jax", "batch": 4, "latent": 32, "trainable": "all", "s_per_step": 0.28,
         "s_per_step_sync": 0.31, "tflops": 204.0, "peak_gib": 65.5, "first_loss": 0.99885},  # a later run of the same row wins
        {"kind": "train", "impl": "jax", "batch": 4, "latent": 32, "trainable": "all", "devices": 2, "layout": "fsdp",
         "s_per_step": 0.295, "tflops": 193.6, "peak_gib": 56.9},
        {"kind": "train", "impl": "torch_eager", "batch": 4, "latent": 32, "s_per_step": 0.543, "tflops": 104.0},
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.main(str(path))
    out = capsys.readouterr().out
    assert "bf16 matmul peak measured: 600 TFLOP/s" in out
    assert "| train | jax | 4 x 32 | 1 data | all | 0.280 | 0.310 | 204.0 | 0.34 | 65.5 | 0.99885 |" in out
    assert "| train | torch_eager | 4 x 32 | 1 data | - | 0.543 | - | 104.0 |" in out
    assert "speedup train 4 x 32: jax vs torch_eager 1.94" in out
    assert "| jax | 4 x 32 per GPU | 2 x fsdp | 0.295 | 0.280 | 0.949 | 56.9 |" in out
    assert "torch_eager" in out and out.count("| train | jax | 4 x 32 | 1 data") == 1
