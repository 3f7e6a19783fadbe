"""RAFT optical flow (torchvision's `raft_small` / `raft_large`) as the motion score's optional backend.

AIGCBench and AtomoVideo measure motion with RAFT; with the user's RAFT weights (torchvision's released state dict,
`.pth` or `.safetensors`; nothing is downloaded here) this backend gives those numbers: every adjacent frame pair
goes through torchvision's own preprocessing (`OpticalFlow` transforms: [0, 1] floats normalised to [-1, 1]) and
model, and the score is the mean magnitude of the final flow estimate over all pixels, as the Lucas-Kanade backend
reports it. The architecture is read off the weights' keys.

Needs torchvision (the `raft` extra); frames must be at least 128x128 px with sides divisible by 8 (RAFT's
correlation pyramid), which the backend checks rather than resizing or padding, so the number is RAFT's own.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from atomo_jax.convert.torch_io import load_state_dict

ARCHITECTURES = ("raft_small", "raft_large")
MIN_SIDE, SIDE_MULTIPLE = 128, 8  # torchvision RAFT: 1/8-resolution features, 4 correlation levels of >= 2 px
PAIRS_PER_CALL = 4  # frame pairs per forward: bounds CPU memory at 512 px
_DECLARED_OPS = []  # keeps the torch.library declarations below alive for the process


def _import_torchvision() -> Any:
    """torchvision, importable even when its compiled ops do not load (e.g. a CUDA build beside a CPU torch): its
    import registers fake kernels for `nms`/`qnms`, which fails unless their schemas exist, so they are declared
    without kernels. RAFT uses no compiled op."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        raise ValueError("--flow=raft needs torchvision (pip install 'atomo_jax[raft]'); --flow=lk needs nothing")
    import torch  # optional dependency: the [torch] extra

    extension = next(Path(spec.submodule_search_locations[0]).glob("_C*.so"), None)
    try:
        if extension is None:
            raise OSError("torchvision ships no compiled ops")
        torch.ops.load_library(str(extension))
    except OSError:
        if not _DECLARED_OPS:
            library = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _DECLARED_OPS.append(library)
    import torchvision.models.optical_flow  # optional dependency: the [raft] extra

    return torchvision


class RaftFlow:
    """Per-pair mean flow magnitudes of a video with a torchvision RAFT model; `name` is its architecture."""

    def __init__(self, weights: str | Path, *, num_flow_updates: int = 12):
        torchvision = _import_torchvision()
        import torch  # optional dependency: the [torch] extra

        state = load_state_dict(weights)
        flow_models = torchvision.models.optical_flow
        for name in ARCHITECTURES:
            model = getattr(flow_models, name)(weights=None)
            if set(model.state_dict()) == set(state):
                break
        else:
            raise ValueError(f"{weights}: not a torchvision RAFT state dict ({len(state)} keys match neither "
                             f"{' nor '.join(ARCHITECTURES)})")
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
        self.name, self.num_flow_updates = name, num_flow_updates
        self.description = f"torchvision {name} (RAFT), {num_flow_updates} flow updates, weights {weights}"
        self._torch, self._model = torch, model.eval()
        self._transforms = flow_models.Raft_Small_Weights.C_T_V2.transforms()  # the same preset for both models

    def __call__(self, video: np.ndarray) -> np.ndarray:
        """(F, H, W, 3) frames on the 0..255 scale -> (F - 1,) mean flow magnitudes in pixels."""
        height, width = video.shape[1:3]
        if min(height, width) < MIN_SIDE or height % SIDE_MULTIPLE or width % SIDE_MULTIPLE:
            raise ValueError(f"RAFT needs frames of at least {MIN_SIDE}x{MIN_SIDE} px with sides divisible by "
                             f"{SIDE_MULTIPLE}; these are {height}x{width} (use --flow=lk)")
        torch = self._torch
        frames = torch.from_numpy(np.asarray(video, np.float32) / 255.0).permute(0, 3, 1, 2)
        pairs, magnitudes = len(frames) - 1, []
        with torch.no_grad():
            for start in range(0, pairs, PAIRS_PER_CALL):
                stop = min(start + PAIRS_PER_CALL, pairs)
                inputs = self._transforms(frames[start:stop], frames[start + 1:stop + 1])
                flow = self._model(*inputs, num_flow_updates=self.num_flow_updates)[-1]
                magnitudes.append(torch.linalg.vector_norm(flow, dim=1).mean(dim=(1, 2)).numpy())
        return np.concatenate(magnitudes)
