"""Tiny from-scratch demo on CPU: moving shapes, 8 frames at 32x32 px, the real code paths at toy widths.

Run:  python -m atomo_jax.train --config=configs/demo.py --workdir=/tmp/atomo_demo
The "autoencoder" is a weightless pixel-space stand-in (4x average pool + a fixed 3->4 channel map) and the CLIP image
encoder is tiny and randomly initialised: no pretrained weights exist on a fresh machine. Every key is declared (with
its meaning) in configs/base.py; this file only changes values.
"""

from __future__ import annotations

from configs import base


def get_config():
    c = base.get_config()
    c.model.unet.update(dict(
        block_out_channels=(32, 64), down_attention=(True, False), layers_per_block=1, num_attention_heads=4,
        cross_attention_dim=32, norm_num_groups=8, motion_num_heads=4, motion_max_seq_length=16,
        image_embed_dim=32, ip_tokens=2, dtype="float32", remat="none"))
    # scaling_factor: pooled pixels of random-background clips have std ~0.45 -> 1, as 0.18215 does for SD's VAE
    # latents; the demo's black-background clips reach ~1.5 (their mean is far from 0).
    c.model.vae.update(dict(kind="pixel", factor=4, scaling_factor=2.2))
    c.model.image_encoder.update(dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, projection_dim=32))
    c.model.text_encoder.kind = "none"

    # Large shapes on black whose colour sets the direction they start in, at slow speeds (few bounces): one frame
    # determines the clip and every latent pixel of the shape carries the cue, so a model this small learns to move
    # the shape within the 5-minute budget (random directions and backgrounds did not; bench/NOTES.md sweeps 28-32).
    c.data.update(dict(
        kind="synthetic", num_videos=4096, num_frames=8, resolution=32, frame_prediction_prob=0.0,
        num_given_frames=1, worker_count=0, prefetch=4, shuffle=True,
        shape_radius=(0.2, 0.3), shape_speed=(0.03, 0.05), shape_motion="by_colour", gradient_prob=0.0,
        background="black"))
    c.cond_drop.update(dict(text=0.0, image=0.1, both=0.0))
    # Timesteps favouring the noisy end (logit(t/T) ~ N(1, 1)): there the model itself must place the shape, so that
    # is where motion is learned (360 steps: direction 0.62 -> 0.79 over uniform; a mean of 1.5 or more starves the
    # low-noise steps that keep the colour; bench/NOTES.md call 41).
    c.diffusion.update(dict(timestep_sampling="logit_normal", timestep_logit_normal=(1.0, 1.0)))

    c.train.update(dict(num_steps=720, batch_size=8, learning_rate=2e-3, lr_schedule="constant", warmup_steps=20,
                        weight_decay=0.0, grad_clip=1.0, trainable=(".*",), log_every=10,
                        ema_decay=0.9))  # an EMA short enough to follow a short run (0.99: worse samples)
    c.checkpoint.update(dict(every_steps=360, keep=2))
    # Image guidance 3.0: on the same weights, direction accuracy 0.50 -> 0.75 over 1.5 (sweep 32); 5 adds nothing.
    c.sample.update(dict(every_steps=0, num_steps=20, image_scale=3.0, text_scale=1.0, rescale=0.0, num_frames=8,
                         fps=6, heldout_clips=24))
    return c
