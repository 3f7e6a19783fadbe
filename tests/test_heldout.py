"""Held-out scoring (atomo_jax/eval/heldout.py) on answers known by construction: the true clips score perfectly,
the frozen first frame scores exactly its own baseline and no direction, the reflected motion the wrong-way one; and
the scores of block-pooled clips (the stand-in autoencoder's output) do not move with sub-unit rounding."""

import numpy as np

from atomo_jax.eval import heldout
from configs import demo


def test_true_frozen_and_reflected_clips_score_as_defined():
    true = heldout.heldout_videos(demo.get_config().data, count=12)
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


def test_scores_of_block_pooled_clips_do_not_depend_on_rounding():
    """Clips through a 4x4 or 2x2 block pool (what the stand-in autoencoder decodes) score the same with and without
    noise below one uint8 unit added before rounding: half-covered blocks do not sit on the object-pixel cut (at a
    cut of 0.5 the colour score moved from 30.3 to 36.0)."""
    true = heldout.heldout_videos(demo.get_config().data, count=12)
    n, f, h, w, c = true.shape
    for factor in (4, 2):
        pooled = true.astype(np.float64).reshape(n, f, h // factor, factor, w // factor, factor, c).mean((3, 5))
        scores = []
        for noise in (0.0, 0.6):
            jittered = pooled + np.random.default_rng(factor).uniform(-noise, noise, pooled.shape)
            video = np.round(jittered).clip(0, 255).repeat(factor, 2).repeat(factor, 3).astype(np.uint8)
            scores.append(heldout.score(video, true))
        exact, noisy = scores
        assert abs(exact["colour_error"] - noisy["colour_error"]) < 0.5, (factor, exact["colour_error"],
                                                                          noisy["colour_error"])
        assert abs(exact["trajectory_error_px"] - noisy["trajectory_error_px"]) < 0.05, factor
        # Through the autoencoder alone, the scores a perfect model can reach clear the demo's bars.
        assert exact["colour_error"] < heldout.COLOUR_THRESHOLD and exact["direction_accuracy"] >= 0.9, factor


def test_heldout_clips_are_none_of_the_training_clips():
    """The held-out set is drawn from the dataset's own seed (data.source_seed + an offset), so it is the same for every
    training seed and shares no clip with the training source."""
    data = demo.get_config().data
    from data_pipelines.loader import synthetic_source
    held = heldout.heldout_videos(data, count=24)
    train = synthetic_source(data)
    first_frames = {train[i]["video"][0].tobytes() for i in range(len(train))}
    assert not any(clip[0].tobytes() in first_frames for clip in held)
    with data.unlocked():
        data.source_seed = 1
    assert not np.array_equal(heldout.heldout_videos(data, count=24), held)  # another dataset, another held-out set
