"""AtomoVideo at the paper's size: SD 1.5 + temporal layers, 512 px, 24 frames, v-prediction under zero-SNR.

Run (after composing pretrained weights into an init checkpoint, see README "Importing weights"):
  python -m atomo_jax.train --config=configs/base.py --workdir=/tmp/atomo \
      --config.init.checkpoint=/path/to/composed --config.data.kind=video_folder --config.data.root=/data/videos
"""

from __future__ import annotations

import ml_collections


def unet_config() -> ml_collections.ConfigDict:
    """SD 1.5 spatial layers + temporal conv + AnimateDiff v2 motion modules + IP-Adapter SD 1.5 (ViT-H/14)."""
    return ml_collections.ConfigDict(dict(
        in_channels=9, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
        down_attention=(True, True, True, False), layers_per_block=2, num_attention_heads=8, transformer_layers=1,
        cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, use_temporal_conv=True,
        use_motion_modules=True, motion_num_heads=8, motion_max_seq_length=32, motion_mid_block=True,
        motion_layers=1, ip_adapter=True, ip_tokens=4, image_embed_dim=1024, dtype="bfloat16",
        attention_impl=ml_collections.FieldReference(None, field_type=str), remat="dots"))


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.unet = unet_config()
    c.model.vae = ml_collections.ConfigDict(dict(kind="sd", scaling_factor=0.18215))
    c.model.image_encoder = ml_collections.ConfigDict(dict(kind="clip_vision", image_size=224))
    c.model.text_encoder = ml_collections.ConfigDict(dict(kind="clip_text", max_position_embeddings=77))

    c.data = ml_collections.ConfigDict(dict(
        kind="video_folder", root="", captions="", path_format="{path}", caption_column="caption",
        tokenizer_dir="", num_frames=24, resolution=512, frame_stride=4,
        frame_prediction_prob=0.2, num_given_frames=8, worker_count=8, prefetch=16, shuffle=True))

    c.diffusion = ml_collections.ConfigDict(dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        rescale_zero_snr=True, prediction_type="v_prediction", min_snr_gamma=0.0))
    # Conditioning dropout for classifier-free guidance (mutually exclusive events per example).
    c.cond_drop = ml_collections.ConfigDict(dict(text=0.05, image=0.05, both=0.05))

    c.train = ml_collections.ConfigDict(dict(
        num_steps=100_000, batch_size=64, learning_rate=1e-4, lr_schedule="constant", warmup_steps=500,
        weight_decay=1e-2, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, grad_clip=1.0, grad_accum=1,
        # Regexes over '/'-joined parameter paths of the UNet; the paper trains the temporal layers + input conv.
        trainable=("temp_convs", "motion_modules", "^conv_in/"),
        ema_decay=0.9999, nonfinite="skip", log_every=10,
        # Replicated trainable leaves of at most this many values are updated as one vector (training/packing.py:
        # ~1,900 fewer tiny kernels a step on SD 1.5; 10% of an H200 step, bench/NOTES.md); 0: leaf by leaf.
        pack_small_leaves=16384,
        # The compiler picks the train state's memory layouts (no per-step transposes of params, moments and EMA;
        # 3% of an H200 step). The state goes back to row-major for each checkpoint and sample.
        auto_layouts=True))

    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True))
    c.init = ml_collections.ConfigDict(dict(checkpoint=""))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1,
                                            rules=ml_collections.FieldReference(None, field_type=tuple)))
    c.sample = ml_collections.ConfigDict(dict(every_steps=5000, num_steps=25, sampler="ddim", image_scale=2.0,
                                              text_scale=7.5, rescale=0.7, num_frames=24, fps=8))
    return c
