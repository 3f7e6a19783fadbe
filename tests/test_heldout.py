"""Held-out scoring (atomo_jax/eval/heldout.py) on answers known by construction: the true clips score perfectly,
the frozen first frame scores exactly its own baseline and no direction, the reflected motion the wrong-way one."""

import numpy as np

from atomo_jax.eval import heldout
from configs import demo


def test_true_frozen_and_reflected_clips_score_as_defined():
    true = heldout.heldout_videos(demo.get_config().data, seed=0, count=12)
    perfect = heldout.score(true, true)
    assert perfect["trajectory_error_px"] == 0 and perfect["direction_accuracy"] == 1.0
    assert perfect["colour_error"] == 0 and perfect["first_frame_psnr"] == 100.0
    assert perfect["frozen_baseline_px"] > 1.0  # the clips move
    assert np.isclose(perfect["wrong_direction_baseline_px"], 2 * perfect["frozen_baseline_px"])
    frozen = heldout.score(np.repeat(true[:, :1], true.shape[1], axis=1), true)
    assert np.isclose(frozen["trajectory_error_px"], frozen["frozen_baseline_px"])
    assert frozen["direction_accuracy"] == 0.0
    backwards = heldout.score(true[:, ::-1].copy(), true)  # the clip played backwards mostly moves the wrong way
    assert backwards["direction_accuracy"] < 0.5 and backwards["first_frame_psnr"] < 100.0
