"""The RAFT motion backend against torchvision's own RAFT forward, on random weights (no download).

Run by tests/test_eval.py::test_raft_backend_matches_torchvision in a process where torchvision is importable (not
collected by the main suite: its file name does not start with test_).
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from atomo_jax.eval import flow, raft
from atomo_jax.eval.__main__ import main as eval_main
from atomo_jax.pipelines.video_io import read_video, write_video

torchvision = raft._import_torchvision()
optical_flow = torchvision.models.optical_flow
HEIGHT, WIDTH, FRAMES = 128, 144, 4


def moving_texture(seed=0):
    """A smooth random texture shifting (2, 1) px per frame, uint8 (FRAMES, HEIGHT, WIDTH, 3)."""
    rng = np.random.default_rng(seed)
    tex = torch.nn.functional.avg_pool2d(torch.from_numpy(rng.uniform(0, 255, (3, 200, 220))).float()[None], 5, 1)
    tex = tex[0].permute(1, 2, 0).numpy()
    return np.stack([tex[8 + f:8 + f + HEIGHT, 8 + 2 * f:8 + 2 * f + WIDTH] for f in range(FRAMES)]).round().astype(
        np.uint8)


def torchvision_motion(model, video, num_flow_updates=12):
    """torchvision's documented use: the weights' preset transforms, then the last of the model's flow estimates;
    the mean magnitude over pixels, per pair, averaged."""
    transforms = optical_flow.Raft_Small_Weights.C_T_V2.transforms()
    frames = torch.from_numpy(video).permute(0, 3, 1, 2)
    magnitudes = []
    with torch.no_grad():
        for i in range(len(frames) - 1):
            first, second = transforms(frames[i:i + 1], frames[i + 1:i + 2])
            estimate = model(first, second, num_flow_updates=num_flow_updates)[-1]
            magnitudes.append(torch.linalg.vector_norm(estimate, dim=1).mean().item())
    return float(np.mean(magnitudes))


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = optical_flow.raft_small(weights=None).eval()
    root = tmp_path_factory.mktemp("raft")
    torch.save(model.state_dict(), root / "raft_small.pth")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "raft_small.safetensors"))
    return model, root


def test_raft_motion_equals_torchvision_forward(small_weights):
    model, root = small_weights
    video = moving_texture()
    reference = torchvision_motion(model, video)
    assert reference > 0.0
    for name in ("raft_small.pth", "raft_small.safetensors"):
        backend = raft.RaftFlow(root / name)
        assert backend.name == "raft_small"
        assert flow.motion_score(video, backend) == pytest.approx(reference, rel=1e-5)
        assert flow.motion_score(video.astype(np.float32) / 255.0, backend) == pytest.approx(reference, rel=1e-5)
    few = raft.RaftFlow(root / "raft_small.pth", num_flow_updates=3)
    assert flow.motion_score(video, few) == pytest.approx(torchvision_motion(model, video, 3), rel=1e-5)


def test_architecture_from_the_weights_and_clear_errors(small_weights, tmp_path):
    _, root = small_weights
    torch.save(optical_flow.raft_large(weights=None).state_dict(), tmp_path / "large.pth")
    assert raft.RaftFlow(tmp_path / "large.pth").name == "raft_large"
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth: not a torchvision RAFT state dict"):
        raft.RaftFlow(tmp_path / "other.pth")
    with pytest.raises(ValueError, match="at least 128x128 px with sides divisible by 8; these are 64x64"):
        flow.motion_score(np.zeros((2, 64, 64, 3), np.uint8), raft.RaftFlow(root / "raft_small.pth"))


def test_cli_names_the_backend_beside_the_number(small_weights, tmp_path):
    model, root = small_weights
    write_video(str(tmp_path / "clip.mp4"), moving_texture(1))
    out = tmp_path / "metrics"
    eval_main(["--videos", str(tmp_path / "clip.mp4"), "--flow", "raft", "--flow_weights",
               str(root / "raft_small.pth"), "--out", str(out), "--no_progress"])
    results = json.loads((tmp_path / "metrics.json").read_text())
    row, = results["videos"]
    assert row["motion_flow"] == "raft_small" and results["settings"]["motion_flow"] == "raft_small"
    assert row["motion"] == pytest.approx(torchvision_motion(model, read_video(str(tmp_path / "clip.mp4"))), rel=1e-5)
    table = (tmp_path / "metrics.md").read_text()
    assert "motion px/frame (raft_small)" in table and "comparable with RAFT-based scores at the same frame size" in table


def test_transformers_still_imports():
    """The declared torchvision ops leave transformers importable in the same process (it imports torchvision)."""
    from transformers import CLIPVisionModelWithProjection

    assert CLIPVisionModelWithProjection.__name__
