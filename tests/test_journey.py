"""The user's whole journey, through the project's own CLIs as a user types them, on 2 local processes x 2 CPU devices.

Random PyTorch parts in their real on-disk formats (a diffusers SD 1.5-layout pipeline folder, a transformers CLIP
vision folder, an IP-Adapter file in the original layout, a diffusers MotionAdapter folder) at a small SD-shaped size
that is not the demo's -> `convert compose` -> a folder of real MP4 files with captions, some broken ->
`cache_latents` on 2 processes -> `train` from configs/base.py with only command-line overrides, on 2 processes
x 2 devices with an fsdp axis over both, async checkpoints, grad_accum=2 and sampling every 3 steps -> SIGKILL of
both processes mid-run, the same command again, finished -> the redone steps' losses bitwise equal to the killed
run's own (uninterrupted up to the kill) ->
`export` -> diffusers and torch_ref reproduce the Flax forward -> `sample` and `eval` on the final checkpoint.
"""

from __future__ import annotations

import csv
import json
import time
from fractions import Fraction
from pathlib import Path

import av
import jax
import numpy as np
import torch
from PIL import Image
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from atomo_jax.models.tokenizer import build_clip_tokenizer_files
from atomo_jax.torch_ref.model import AtomoUNet
from atomo_jax.training.checkpoint import load_inference
from tests.conftest import kill_all, losses, run, start_processes, wait_all, wait_for

WIDTHS, HEADS, CROSS, EMBED = (16, 32), 2, 32, 16  # not the demo's sizes: nothing may assume them
NUM_STEPS, FRAMES, PIXELS = 6, 4, 32
GOOD_VIDEOS = 20

# How to run, not what the model is: no command below is told a size; compose reads them from the parts and
# training, latent caching, export and sampling from the composed checkpoint.
RUNTIME = ["--config=configs/base.py", "--config.model.unet.dtype=float32", "--config.model.unet.remat=none"]


def write_parts(root: Path) -> dict[str, Path]:
    """Random pretrained parts as they come from the hub, at sizes that are neither base.py's nor the demo's."""
    torch.manual_seed(0)
    sd = root / "sd15"
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=WIDTHS,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                         attention_head_dim=HEADS, cross_attention_dim=CROSS, norm_num_groups=8
                         ).save_pretrained(sd / "unet")
    AutoencoderKL(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3
                  ).save_pretrained(sd / "vae")
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=CROSS, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, eos_token_id=2)
                  ).save_pretrained(sd / "text_encoder")
    build_clip_tokenizer_files(sd / "tokenizer")
    (sd / "scheduler").mkdir()
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "PNDMScheduler"}))
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    adapter = MotionAdapter(block_out_channels=WIDTHS, motion_layers_per_block=1, motion_num_attention_heads=HEADS,
                            motion_norm_num_groups=8, motion_max_seq_length=16)
    with torch.no_grad():  # the zero-initialised output projections would hide a mis-mapped module
        for p in adapter.parameters():
            p.normal_(0.0, 0.05)
    adapter.save_pretrained(root / "motion")
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=EMBED, hidden_act="gelu")).save_pretrained(root / "image_encoder")
    g = torch.Generator().manual_seed(1)
    ip = {"image_proj": {"proj.weight": 0.1 * torch.randn(4 * CROSS, EMBED, generator=g),
                         "proj.bias": 0.1 * torch.randn(4 * CROSS, generator=g),
                         "norm.weight": 1 + 0.1 * torch.randn(CROSS, generator=g),
                         "norm.bias": 0.1 * torch.randn(CROSS, generator=g)},
          "ip_adapter": {}}
    for n, hidden in ((1, WIDTHS[0]), (3, WIDTHS[0]), (5, WIDTHS[0]), (7, WIDTHS[1])):  # attn2: down 0, up 1 x2, mid
        for w in ("to_k_ip", "to_v_ip"):
            ip["ip_adapter"][f"{n}.{w}.weight"] = 0.1 * torch.randn(hidden, CROSS, generator=g)
    torch.save(ip, root / "ip-adapter_sd15.bin")
    return {"sd": sd, "motion": root / "motion", "image_encoder": root / "image_encoder",
            "ip": root / "ip-adapter_sd15.bin", "tokenizer": sd / "tokenizer"}


def write_mp4(path: Path, seed: int, frames: int = 8, height: int = 40, width: int = 48) -> None:
    """A moving square on a coloured background, H.264 in MP4 (not square: short-side resize + centre crop)."""
    rng = np.random.default_rng(seed)
    colour, background = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    x, y, dx = int(rng.integers(0, 20)), int(rng.integers(0, 20)), int(rng.integers(1, 4))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(8))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = np.broadcast_to(background.astype(np.uint8), (height, width, 3)).copy()
            frame[y:y + 12, x + i * dx:x + i * dx + 12] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_videos(root: Path) -> Path:
    """GOOD_VIDEOS clips + a truncated file, a missing file and a clip with no caption, listed in a CSV."""
    root.mkdir()
    rows = [("path", "caption")]
    for i in range(GOOD_VIDEOS):
        write_mp4(root / f"clip{i:02d}.mp4", i)
        rows.append((f"clip{i:02d}.mp4", f"a square moving right, number {i}"))
    data = (root / "clip00.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 3])
    write_mp4(root / "uncaptioned.mp4", 99)
    rows += [("truncated.mp4", "a broken file"), ("missing.mp4", "a file that is not there"),
             ("uncaptioned.mp4", "")]
    with open(root / "captions.csv", "w", newline="") as f:  # quoted: the captions contain commas
        csv.writer(f).writerows(rows)
    return root / "captions.csv"


def flax_forward(checkpoint: str, x, t, ctx, img) -> np.ndarray:
    _, model, params = load_inference(checkpoint)
    return np.asarray(jax.jit(model.unet.apply)({"params": params["unet"]}, x, t, ctx, img))


def test_user_journey_two_processes(tmp_path):
    t0 = time.time()

    def phase(name: str) -> None:  # wall time per phase, for the log (-s shows it)
        print(f"[journey] {name}: {time.time() - t0:.0f} s", flush=True)

    parts = write_parts(tmp_path / "hub")
    # 1. Import the pretrained parts into one initial checkpoint.
    init = tmp_path / "init"
    out = run("atomo_jax.convert", "compose", "--sd", str(parts["sd"]), "--motion", str(parts["motion"]),
              "--ip_adapter", str(parts["ip"]), "--image_encoder", str(parts["image_encoder"]), "--out", str(init),
              *RUNTIME)
    assert "[unet]" in out and "[image_encoder]" in out and f"--config.init.checkpoint={init}" in out
    phase("compose")

    # 2. Cache latents of a video folder, split over 2 processes; bad records are skipped and counted.
    captions = write_videos(tmp_path / "videos")
    latents = tmp_path / "latents"
    data = [f"--config.data.root={captions.parent}", f"--config.data.captions={captions}",
            f"--config.data.num_frames={FRAMES}", f"--config.data.resolution={PIXELS}", "--config.data.frame_stride=1"]
    procs = start_processes("atomo_jax.cache_latents", f"--checkpoint={init}", f"--output_dir={latents}",
                            "--records_per_shard=6", "--batch_size=4", *RUNTIME, *data, num_processes=2,
                            devices_per_process=1)
    stats = [json.loads(o.strip().splitlines()[-1]) for o in wait_all(procs)]
    assert sum(s["written"] for s in stats) == GOOD_VIDEOS and sum(s["skipped"] for s in stats) == 3, stats
    assert {s["shards_done"] for s in stats} == {2}  # 4 shards of 6 records, 2 per process
    phase("cache_latents")

    # 3. Train from configs/base.py with command-line overrides only (the model is the composed checkpoint's, its
    # tokenizer the SD folder's): 2 processes x 2 devices, fsdp over all 4. Checkpoints and samples every 3 steps.
    # Two devices per process, not more: every fsdp collective is a gloo ring over all devices of the job (a step
    # over 2 x 4 devices took 6.6 s, over 2 x 2 3.0 s, with the same losses; the whole trainer run 161 s -> 118 s),
    # and 4 devices already split every kernel across the two processes.
    train = [*RUNTIME, *data, "--config.data.kind=latents", f"--config.data.latents_dir={latents}",
             "--config.data.num_given_frames=2", "--config.data.worker_count=0",
             f"--config.init.checkpoint={init}", f"--config.train.num_steps={NUM_STEPS}",
             "--config.train.batch_size=16", "--config.train.grad_accum=2", "--config.train.log_every=1",
             "--config.train.warmup_steps=0", "--config.train.learning_rate=1e-3",
             "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.checkpoint.every_steps=3",
             "--config.sample.every_steps=3", "--config.sample.num_steps=2", f"--config.sample.num_frames={FRAMES}"]

    def trainer():
        return start_processes("atomo_jax.train", f"--workdir={workdir}", *train, num_processes=2,
                               devices_per_process=2)

    # SIGKILL both processes once step 5's loss is logged (checkpoint 3 final, step 6 and its save still to come),
    # then the same command again. Steps 1-5 of the killed run are the uninterrupted reference: the resumed run
    # redoes steps 4 and 5 from checkpoint 3, and step 5's loss depends on the restored optimizer moments too.
    workdir = tmp_path / "run"
    procs = trainer()
    wait_for(lambda: max(losses(workdir), default=0) >= 5 and (workdir / "checkpoints" / "3").is_dir(), procs,
             "step 5 and checkpoint 3")
    kill_all(procs)
    want = losses(workdir)
    assert sorted(want)[:5] == [1, 2, 3, 4, 5] and NUM_STEPS not in want, want
    assert (workdir / "samples" / "sample_0000003.mp4").exists()  # the first sample, on both processes
    phase("killed run")
    outs = wait_all(trainer())
    assert "mesh={'data': 1, 'fsdp': 4, 'tensor': 1}" in outs[0], outs[0][-3000:]
    assert "resumed from checkpoint at step 3" in outs[0], outs[0][-3000:]
    assert outs[0].count("sample written") == 1, outs[0][-3000:]  # at the end, once
    # One program for the one batch shape: the compile that fixes the state layouts is of the loader's own batch.
    assert outs[0].count("compiled the train step") == 1, outs[0][-3000:]
    assert (workdir / "samples" / f"sample_{NUM_STEPS:07d}.png").exists()
    logged = [json.loads(line)["step"] for line in open(workdir / "losses.jsonl")]
    assert logged == list(range(1, NUM_STEPS + 1)), logged  # every step once: the killed run's 4 and 5 dropped
    got = losses(workdir)
    assert [got[s] for s in (4, 5)] == [want[s] for s in (4, 5)], (got, want)  # bitwise: the same floats
    phase("resumed run")

    # 4. Export, and load the export in diffusers and our PyTorch reference.
    exported = tmp_path / "torch"
    run("atomo_jax.export", "--checkpoint", str(workdir), "--out", str(exported))
    _, info = UNet2DConditionModel.from_pretrained(exported / "unet", output_loading_info=True)
    assert not any(info.values()), info
    _, info = MotionAdapter.from_pretrained(exported / "motion_adapter", output_loading_info=True)
    assert not any(info.values()), info
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, FRAMES, 8, 8, 9)).astype(np.float32)
    t = np.array([999, 250], np.int32)
    ctx = rng.standard_normal((2, 77, CROSS)).astype(np.float32)
    img = rng.standard_normal((2, EMBED)).astype(np.float32)
    ours = flax_forward(str(workdir), x, t, ctx, img)
    with torch.no_grad():
        ref = AtomoUNet.from_export(exported)(torch.from_numpy(x).permute(0, 4, 1, 2, 3),
                                              torch.from_numpy(t.astype(np.float32)), torch.from_numpy(ctx),
                                              torch.from_numpy(img)).permute(0, 2, 3, 4, 1).numpy()
    err = np.linalg.norm(ref - ours) / np.linalg.norm(ref)
    print(f"export forward relative error: {err:.2e}")
    assert err < 1e-4, err
    phase("export")

    # 5. Sample from the final checkpoint and score the video against its conditioning image.
    image = first_frame_png(captions.parent / "clip03.mp4", tmp_path / "clip03.png")
    clip = tmp_path / "out" / "clip03.mp4"
    run("atomo_jax.sample", f"--workdir={workdir}", "--mode=i2v", f"--image={image}", f"--out={clip}", "--steps=2",
        f"--num_frames={FRAMES}", "--prompt=a square moving right")
    assert clip.exists() and clip.with_suffix(".gif").exists()
    run("atomo_jax.eval", f"--videos={clip}", f"--images={image}", f"--out={tmp_path / 'eval'}", "--no_progress")
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["videos"][0]["frames"] == FRAMES and metrics["mean"]["motion"] is not None
    phase("sample + eval")


def first_frame_png(video: Path, out: Path) -> Path:
    """The centre 32x32 of a video's first frame, as a user's conditioning image."""
    with av.open(str(video)) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    Image.fromarray(frame[4:36, 8:40]).save(out)
    return out
