"""AtomoVideo at the paper's size: SD 1.5 + temporal layers, 512 px, 24 frames, v-prediction under zero-SNR.

Run (after composing pretrained weights into an init checkpoint, see docs/importing.md):
  python -m atomo_jax.train --config=configs/base.py --workdir=/tmp/atomo \
      --config.init.checkpoint=/path/to/composed --config.data.kind=video_folder --config.data.root=/data/videos \
      --config.data.captions=/data/videos/captions.csv
The model is the composed checkpoint's (its tokenizer too when composed from a diffusers SD folder): no size flags.

This file declares every configuration key the code reads, once, with what it means; other configs (demo.py) start
from `get_config()` here and change values, so any key below can be set from the command line on any config.
"""

from __future__ import annotations

import ml_collections


def unet_config() -> ml_collections.ConfigDict:
    """SD 1.5 spatial layers + temporal conv + AnimateDiff v2 motion modules + IP-Adapter SD 1.5 (ViT-H/14)."""
    return ml_collections.ConfigDict(dict(
        in_channels=9,  # noisy latent (4) + frame mask (1) + given-frame latents (4)
        out_channels=4,  # latent channels of the prediction (v)
        block_out_channels=(320, 640, 1280, 1280),  # channels per resolution level (one down-sampling between)
        down_attention=(True, True, True, False),  # which down levels (mirrored up) have spatial transformers
        layers_per_block=2,  # resnets per down level (up levels have one more)
        num_attention_heads=8,  # spatial attention heads (diffusers' SD 1.x "attention_head_dim": 8 means this)
        transformer_layers=1,  # transformer blocks per spatial attention
        cross_attention_dim=768,  # width of the text context (CLIP ViT-L/14 text: 768)
        norm_num_groups=32,  # GroupNorm groups everywhere in the UNet
        norm_eps=1e-5,  # GroupNorm epsilon
        use_temporal_conv=True,  # a 1-D temporal convolution after every resnet (identity at init)
        use_motion_modules=True,  # AnimateDiff temporal attention after every spatial attention level
        motion_num_heads=8,  # temporal attention heads
        motion_max_seq_length=32,  # frames the sinusoidal position table covers (v2: 32, v1: 24)
        motion_mid_block=True,  # a motion module in the mid block (AnimateDiff v2+; v1 has none)
        motion_layers=1,  # transformer blocks per motion module
        ip_adapter=True,  # decoupled cross-attention on CLIP image features (IP-Adapter)
        ip_tokens=4,  # image tokens the IP-Adapter projection makes
        image_embed_dim=1024,  # width of the CLIP image embedding (ViT-H/14 projection: 1024)
        dtype="bfloat16",  # compute dtype of the UNet (parameters stay float32)
        # Attention kernel: None picks per platform (splash on TPU); "splash", "cudnn", "cudnn_padded" (cuDNN for
        # cross-attention too, keys padded: -2.3% per sampled video on an H100, +7% per training step) or "xla".
        attention_impl=ml_collections.FieldReference(None, field_type=str),
        remat="dots"))  # rematerialisation policy of the UNet blocks: none | dots | full


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # one seed for init, data order, noise and dropout: same seed + same data = same run

    c.model = ml_collections.ConfigDict()
    c.model.unet = unet_config()
    # The autoencoder. kind "sd": AutoencoderKL (the fields below are SD 1.5's); kind "pixel": the weightless
    # pixel-space stand-in of the demo, which reads only `factor`, `scaling_factor`, channels.
    c.model.vae = ml_collections.ConfigDict(dict(
        kind="sd",  # sd | pixel
        scaling_factor=0.18215,  # latents are multiplied by this before diffusion (SD 1.5: 0.18215)
        in_channels=3,  # image channels
        latent_channels=4,  # latent channels
        out_channels=3,  # decoded image channels (sd)
        block_out_channels=(128, 256, 512, 512),  # encoder/decoder widths (sd); factor 2^(levels-1)
        layers_per_block=2,  # resnets per encoder level (sd; the decoder has one more)
        norm_num_groups=32,  # GroupNorm groups (sd)
        mid_block_add_attention=True,  # attention in the mid block (sd)
        factor=8))  # spatial down-sampling factor (pixel only)
    # CLIP image encoder of the IP-Adapter (CLIPVisionModelWithProjection; the fields are ViT-H/14's).
    c.model.image_encoder = ml_collections.ConfigDict(dict(
        kind="clip_vision",  # the only kind
        image_size=224,  # input size after CLIP preprocessing (resize + centre crop)
        patch_size=14,  # ViT patch size
        hidden_size=1280,  # transformer width
        intermediate_size=5120,  # MLP width
        num_hidden_layers=32,  # transformer layers
        num_attention_heads=16,  # attention heads
        num_channels=3,  # image channels
        projection_dim=1024,  # image embedding width (= unet.image_embed_dim)
        hidden_act="gelu",  # MLP activation
        layer_norm_eps=1e-5))  # LayerNorm epsilon
    # CLIP text encoder of SD 1.5 (ViT-L/14 text tower), or kind "none" for no text conditioning.
    c.model.text_encoder = ml_collections.ConfigDict(dict(
        kind="clip_text",  # clip_text | none
        # The CLIP tokenizer folder (vocab.json + merges.txt) for training captions, the empty prompt of
        # classifier-free guidance and sampling prompts; required with kind "clip_text".
        tokenizer="",
        vocab_size=49408,  # token vocabulary
        hidden_size=768,  # width (= unet.cross_attention_dim)
        intermediate_size=3072,  # MLP width
        num_hidden_layers=12,  # transformer layers
        num_attention_heads=12,  # attention heads
        max_position_embeddings=77,  # tokens per prompt
        hidden_act="quick_gelu",  # MLP activation
        layer_norm_eps=1e-5,  # LayerNorm epsilon
        eos_token_id=2))  # SD 1.5's legacy value: pool at argmax(ids) (models/clip.py says why)

    c.data = ml_collections.ConfigDict(dict(
        kind="video_folder",  # synthetic | video_folder | tfds | latents
        num_frames=24,  # frames per training clip
        resolution=512,  # square crop size in pixels
        # Shape buckets: (frames, height, width) triples in pixels, e.g. ((24, 320, 512), (24, 512, 320), (24, 384,
        # 384)). Each clip trains in the bucket nearest its aspect ratio (then the most frames it can fill), resized
        # to cover it and cropped; every global batch is one bucket's; one compiled step per bucket. Empty: every clip
        # is num_frames x resolution x resolution. Latent sizes (pixels / VAE factor) must divide by the UNet's
        # down-sampling (8 for SD 1.5: pixel sizes multiples of 64).
        buckets=(),
        frame_prediction_prob=0.2,  # fraction of clips trained as frame prediction (first frames given)
        num_given_frames=8,  # frames given in a frame-prediction clip (paper: L=8 of T=24)
        shuffle=True,  # global shuffle by seed (False: file order, for tests)
        # video_folder
        root="",  # folder the caption file's paths are relative to
        captions="",  # CSV/TSV/JSONL with a path (or path_format fields) and a caption per video
        path_format="{path}",  # how a row names its file, e.g. "{page_dir}/{videoid}.mp4" for WebVid
        caption_column="caption",  # the caption's column ("name" for WebVid)
        # decoding (video_folder, tfds)
        frame_stride=4,  # take every k-th frame (ignored when target_fps is set)
        target_fps=0.0,  # > 0: resample each video to this frame rate instead of frame_stride
        short_side=0,  # resize the short side to this before cropping; 0: resolution
        random_start=True,  # random clip start in training (eval and latent caching start at frame 0)
        random_crop=True,  # random crop in training (eval and latent caching crop the centre)
        decode_threads=1,  # codec threads per decode (parallelism comes from worker_count)
        decode_timeout_s=30.0,  # a decode that takes longer is abandoned and its record skipped; 0: no limit
        # Bad records (unreadable, missing, too short, no caption) are replaced and counted; the run stops only when
        # at least max_bad_fraction of a worker's last bad_window records were bad (the data itself is broken).
        bad_window=1000,
        max_bad_fraction=0.95,
        # tfds
        tfds_name="",  # dataset name (ArrayRecord; data_pipelines/tfds_builder.py builds one)
        tfds_split="train",  # split
        tfds_data_dir="",  # TFDS data dir; "": TFDS's default
        # latents (written by `python -m atomo_jax.cache_latents`)
        latents_dir="",  # folder of latents-*.array_record shards
        # synthetic moving shapes (data_pipelines/synthetic.py)
        num_videos=4096,  # clips in the source
        source_resolution=0,  # pixel size the shapes are drawn at; 0: resolution
        source_seed=0,  # seed of the clips; held-out clips use source_seed + 10,000 (one set for every config.seed)
        shape_radius=(0.1, 0.22),  # half-size range, fraction of the frame
        shape_speed=(0.04, 0.12),  # speed range per frame, fraction of the frame
        shape_motion="random",  # random | by_shape | by_colour (each kind / colour starts in its own direction)
        gradient_prob=0.5,  # fraction of clips on a gradient background
        background="random",  # random | black
        # grain
        worker_count=8,  # decoding worker processes per host (0: in the trainer process)
        worker_buffer_size=2,  # batches each worker prepares ahead
        read_threads=4,  # threads reading records
        prefetch=16))  # records read ahead

    c.diffusion = ml_collections.ConfigDict(dict(
        num_train_timesteps=1000,  # diffusion steps of the training schedule
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",  # SD 1.5's betas
        rescale_zero_snr=True,  # rescale to zero terminal SNR (the paper)
        prediction_type="v_prediction",  # v_prediction | epsilon
        min_snr_gamma=0.0,  # > 0: Min-SNR-gamma loss weights (diffusers' formula); 0: uniform
        # Training timesteps: uniform over the schedule, or logit-normal (SD3's sampling: logit(t/T) ~ N(mean, std));
        # a mean > 0 favours the noisy steps, where the model itself must decide where things are and how they move.
        timestep_sampling="uniform",  # uniform | logit_normal
        timestep_logit_normal=(0.0, 1.0)))  # (mean, std) of logit(t/T) for logit_normal
    # Conditioning dropout for classifier-free guidance: one event per example, mutually exclusive.
    c.cond_drop = ml_collections.ConfigDict(dict(
        text=0.05,  # caption replaced by the empty prompt
        image=0.05,  # CLIP image embedding and given-frame latents zeroed (the frame mask is kept)
        both=0.05))  # both at once

    c.train = ml_collections.ConfigDict(dict(
        num_steps=100_000,  # optimizer steps
        batch_size=64,  # global batch (all hosts, all micro-batches)
        learning_rate=1e-4,  # peak learning rate
        lr_schedule="constant",  # constant | cosine (after warmup)
        warmup_steps=500,  # linear warmup steps
        weight_decay=1e-2, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,  # AdamW
        grad_clip=1.0,  # clip the global gradient norm to this; 0: no clipping
        grad_accum=1,  # micro-batches per step (strided over the batch, so each stays on every device)
        # Regexes over '/'-joined parameter paths of the UNet; the paper trains the temporal layers + input conv.
        trainable=("temp_convs", "motion_modules", "^conv_in/"),
        # LoRA (atomo_jax/models/lora.py): low-rank factors on the dense kernels the targets match, trained beside
        # (and combinable with) the fully trainable set above, which may then be empty (LoRA alone:
        # --config.train.trainable='()' ). The base kernels stay frozen. Sampling, eval and export fold the factors
        # into the kernels.
        lora=ml_collections.ConfigDict(dict(
            rank=0,  # factor rank r; 0: no LoRA
            alpha=0.0,  # the update is scaled by alpha / r (PEFT's lora_alpha); 0: alpha = r
            dropout=0.0,  # dropout on the LoRA branch's input in training (PEFT's lora_dropout)
            # Regexes over '/'-joined dense-kernel paths of the UNet. Default: the spatial attention q/k/v/out
            # projections (diffusers' usual SD LoRA targets); "motion_modules.*/to_(q|k|v|out_0)/kernel$" adds the
            # temporal attention.
            targets=(r"attentions_\d+/transformer_blocks_\d+/attn[12]/to_(q|k|v|out_0)/kernel$",))),
        ema_decay=0.9999,  # EMA of the trainable weights (sampling and export use it)
        nonfinite="skip",  # a step with a non-finite loss or gradient: skip it | stop the run
        log_every=10,  # steps per log line / TensorBoard point
        peak_flops=0.0,  # peak FLOP/s of one device for the MFU figure; 0: a built-in table (TPU v4-v6, A100, H100/H200)
        # Replicated trainable leaves of at most this many values are updated as one vector (training/packing.py:
        # ~1,900 fewer tiny kernels a step on SD 1.5; 10% of an H200 step, bench/NOTES.md); 0: leaf by leaf.
        pack_small_leaves=16384,
        # The compiler picks the train state's memory layouts (no per-step transposes of params, moments and EMA;
        # 3% of an H200 step). The state goes back to row-major for each checkpoint and sample.
        auto_layouts=True,
        # JAX's persistent compilation cache, so that a restart loads every compiled step (one per bucket) instead of
        # compiling it again: "auto": $JAX_COMPILATION_CACHE_DIR when set, else WORKDIR/jax_cache; a folder; "none".
        compile_cache="auto"))

    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=1000,  # save every N steps (and at the end and on SIGTERM); 0: only then
        keep=3,  # checkpoints kept
        async_save=True))  # write in the background while training continues
    c.init = ml_collections.ConfigDict(dict(
        # A composed checkpoint (`python -m atomo_jax.convert compose`) to start from; its model is used (model keys
        # left at this file's defaults take its values, set ones must agree).
        checkpoint=""))
    c.mesh = ml_collections.ConfigDict(dict(
        data=-1, fsdp=1, tensor=1,  # mesh axis sizes; -1 fills with the remaining devices
        dcn_data=1,  # slices over DCN (multi-slice TPU): the data axis spans them
        # Logical axis -> mesh axes table; None: parallel/axes.py's defaults.
        rules=ml_collections.FieldReference(None, field_type=tuple)))
    c.sample = ml_collections.ConfigDict(dict(
        every_steps=5000,  # write an I2V sample every N steps (all processes take part); 0: never
        at_end=True,  # and one at the end of training
        num_steps=25,  # sampler steps
        sampler="ddim",  # ddim | dpmpp2m
        eta=0.0,  # DDIM noise (0: deterministic)
        image_scale=2.0,  # guidance scale of the image condition
        text_scale=7.5,  # guidance scale of the text on top of the image
        rescale=0.7,  # guidance rescale phi
        num_frames=24,  # frames of the sample
        fps=8,  # frame rate of the written MP4/GIF
        # Synthetic data only: at the end of training, animate this many held-out clips' first frames (the sampler
        # above, the clips' own length) and score them against the true clips (atomo_jax/eval/heldout.py):
        # WORKDIR/heldout/metrics.json and PNG strips. 0: never.
        heldout_clips=0))
    # Validation during training (atomo_jax/training/validation.py): your own conditioning images animated with the
    # EMA weights, the sampler of config.sample and the same noise each time, so a run can be watched learning to
    # move them. Writes WORKDIR/validation/STEP.json (first-frame SSIM/MSE/PSNR, motion, CLIP scores), the videos
    # beside it and TensorBoard animations.
    c.validation = ml_collections.ConfigDict(dict(
        images="",  # a folder of images (.png/.jpg/.jpeg/.webp/.bmp) or image paths separated by commas; "": none
        prompts="",  # CSV or JSONL giving each image's prompt (columns image|file|name, prompt|caption|text); "": ""
        every_steps=1000,  # validate every N steps (all processes take part) and at the end; 0: only at the end
        num_frames=0,  # frames per video; 0: config.sample.num_frames
        height=0,  # video height in pixels; 0: the first bucket's, else config.data.resolution
        width=0,  # video width in pixels; 0: the first bucket's, else config.data.resolution
        batch_size=4,  # images per sampling batch (the last batch padded): bounds the sampler's memory
        seed=0,  # noise seed, the same at every validation: frames compare across steps
        clip=""))  # a transformers CLIPModel folder for the CLIP image-video and text-video scores; "": none
    return c
