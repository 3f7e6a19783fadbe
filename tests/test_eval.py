"""Evaluation metrics on synthetic videos with known answers, CLIP scoring against transformers, and the CLI.

Every flow test uses (4, 64, 64, 3) videos so that one compiled flow serves them all.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from atomo_jax.eval import clip_score, evaluate, flow, metrics
from atomo_jax.eval.__main__ import main as eval_main
from atomo_jax.models.clip import clip_preprocess
from atomo_jax.models.tokenizer import build_clip_tokenizer_files
from atomo_jax.pipelines.video_io import write_video

SIZE, FRAMES = 64, 4
FLOW_TOLERANCE = 0.02  # relative error of the motion score on smooth textured translations


def smooth_texture(seed=0, shape=(160, 200)):
    """Random texture blurred to a few-pixel correlation length (what Lucas-Kanade can track), 0..255 floats."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, shape + (3,))
    k = np.exp(-0.5 * (np.arange(-4, 5) / 1.5) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        x = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), axis, x)
    return (x - x.min()) / (x.max() - x.min()) * 255


def translating_video(dx, dy, seed=0):
    """Frame f is a window of the texture shifted by (f*dx, f*dy): every visible point moves by (-dx, -dy)."""
    tex = smooth_texture(seed)
    y0, x0 = 40, 40
    return np.stack([tex[y0 + f * dy:y0 + f * dy + SIZE, x0 + f * dx:x0 + f * dx + SIZE]
                     for f in range(FRAMES)]).round().astype(np.uint8)


# ------------------------------------------------------------------------------------------------ SSIM / MSE

def reference_ssim(a, b, window):
    """Straight from the definition: per window position and channel, weighted means, centred (co)variances."""
    w1 = metrics.ssim_window(window)
    w = np.outer(w1, w1)
    k = len(w1)
    cov_norm = k * k / (k * k - 1) if window == "uniform" else 1.0
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a, b = a.astype(np.float64), b.astype(np.float64)
    values = []
    for c in range(3):
        for i in range(a.shape[0] - k + 1):
            for j in range(a.shape[1] - k + 1):
                pa, pb = a[i:i + k, j:j + k, c], b[i:i + k, j:j + k, c]
                ma, mb = np.sum(w * pa), np.sum(w * pb)
                va = cov_norm * np.sum(w * (pa - ma) ** 2)
                vb = cov_norm * np.sum(w * (pb - mb) ** 2)
                cab = cov_norm * np.sum(w * (pa - ma) * (pb - mb))
                values.append((2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return np.mean(values)


def noisy_pair(seed=0, shape=(24, 29, 3)):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, shape), 0, 255).astype(np.uint8)
    return a, b


@pytest.mark.parametrize("window", metrics.SSIM_WINDOWS)
def test_ssim_matches_reference(window):
    a, b = noisy_pair()
    got, want = metrics.ssim(a, b, window=window), reference_ssim(a, b, window)
    assert abs(got - want) < 1e-10 * abs(want)
    assert 0.0 < got < 0.99
    assert metrics.ssim(a, a, window=window) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_skimage():
    """AIGCBench computes SSIM with scikit-image (requirements.txt installs it, so this never skips)."""
    from skimage.metrics import structural_similarity

    a, b = noisy_pair(1)
    wang = structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=255)
    aigcbench = structural_similarity(a, b, win_size=7, channel_axis=-1)  # the call in AIGCBench's eval.py
    assert metrics.ssim(a, b, window="gaussian") == pytest.approx(wang, rel=1e-10)
    assert metrics.ssim(a, b, window="uniform") == pytest.approx(aigcbench, rel=1e-10)
    from skimage.metrics import mean_squared_error

    assert metrics.mse(a, b) == pytest.approx(mean_squared_error(a, b), rel=1e-12)  # AIGCBench's MSE call, on uint8


def test_mse_and_errors():
    a, b = noisy_pair()
    assert metrics.mse(a, b) == pytest.approx(np.mean((a.astype(float) - b) ** 2))
    assert metrics.mse(a, a) == 0.0
    with pytest.raises(ValueError, match="differ in size"):
        metrics.ssim(a, b[:-1])
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(a[:8], b[:8])
    with pytest.raises(ValueError, match="unknown SSIM window"):
        metrics.ssim(a, b, window="box")


# ------------------------------------------------------------------------------------------------ motion

def test_still_video_scores():
    video = np.repeat(translating_video(0, 0)[:1], FRAMES, axis=0)
    result = evaluate.score_video(video, video[0])
    assert result["motion"] == 0.0
    assert result["ssim_first"] == 1.0 and result["mse_first"] == 0.0
    assert result["clip_adjacent"] is None  # no CLIP weights given
    assert evaluate.score_video(video[:1])["motion"] is None  # no frame pairs


@pytest.mark.parametrize("dx, dy", [(1, 0), (4, 0), (2, -3)])
def test_translation_motion(dx, dy):
    score = flow.motion_score(translating_video(dx, dy))
    assert score == pytest.approx(np.hypot(dx, dy), rel=FLOW_TOLERANCE)


def disc_video(speed=2, radius=10):
    """A flat red disc on black moving right `speed` px/frame, and the true mean flow over all pixels."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    inside = [(xs - 20 - f * speed) ** 2 + (ys - 32) ** 2 <= radius ** 2 for f in range(FRAMES)]
    video = np.stack([np.where(m[..., None], np.array([220, 40, 40]), 0) for m in inside]).astype(np.uint8)
    return video, speed * np.mean([m.mean() for m in inside[:-1]])


def patch_video(speed=2, side=16):
    """A textured square moving right over a still textured background, and the true mean flow over all pixels."""
    background, patch = smooth_texture(1)[:SIZE, :SIZE], smooth_texture(2)[:side, :side]
    frames = []
    for f in range(FRAMES):
        frame = background.copy()
        frame[24:24 + side, 16 + f * speed:16 + f * speed + side] = patch
        frames.append(frame)
    return np.stack(frames).round().astype(np.uint8), speed * side * side / SIZE ** 2


def test_still_background_beside_a_moving_object_stays_still():
    """The coarse levels spread an object's motion into the background; the still test takes it back. Measured:
    disc 1.24x and patch 1.01x their true pixel means (15x and 1.83x without the still test)."""
    video, truth = disc_video()
    assert truth == pytest.approx(0.154, abs=0.001)
    assert 0.5 * truth <= flow.motion_score(video) <= 1.5 * truth
    video, truth = patch_video()
    assert 0.8 * truth <= flow.motion_score(video) <= 1.2 * truth
    far = lambda f: np.concatenate([f[:, 40:].ravel(), f[:20].ravel()])  # background well away from the patch
    norm = lambda **kw: np.linalg.norm(np.asarray(flow.dense_flow(*video[:2], **kw)), axis=-1)
    assert far(norm()).max() == 0.0
    assert far(norm(still_test=False)).max() > 0.05  # what the still test removes: the coarse levels' spread


def test_motion_score_reads_float_videos_in_0_1_and_refuses_other_scales():
    video = translating_video(2, 1)
    assert flow.motion_score(video.astype(np.float32) / 255.0) == pytest.approx(flow.motion_score(video), rel=1e-5)
    with pytest.raises(ValueError, match=r"float video must hold values in \[0, 1\], got \d+\.\.\d+ \(pass uint8"):
        flow.motion_score(video.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\], got -0\.\d+\.\.0\.\d+"):
        flow.motion_score(video.astype(np.float32) / 127.5 - 1.0)
    with pytest.raises(ValueError, match="uint8 or float frames, got dtype int64"):
        flow.motion_score(video.astype(np.int64))
    with pytest.raises(ValueError, match=r"expected a \(F, H, W, 3\) video, got shape \(4, 64, 64\)"):
        flow.motion_score(video[..., 0])


def test_flow_direction():
    f = np.asarray(flow.dense_flow(*translating_video(3, -2)[:2]))
    np.testing.assert_allclose(np.median(f.reshape(-1, 2), axis=0), [-3.0, 2.0], atol=0.05)


# ------------------------------------------------------------------------------------------------ CLIP

TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    """A tiny random transformers CLIPModel saved as a CLIPModel folder (with tokenizer files) and as separate
    CLIPVisionModelWithProjection / CLIPTextModelWithProjection folders holding the same weights."""
    torch.manual_seed(0)
    # projection_dim 24 at the top, 16 in the sub-configs: the top-level value is the real one.
    config = transformers.CLIPConfig(text_config=dict(TEXT, projection_dim=16),
                                     vision_config=dict(VISION, projection_dim=16), projection_dim=24)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("clip")
    model.save_pretrained(root / "full")
    build_clip_tokenizer_files(root / "full")
    state = model.state_dict()
    text = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT, projection_dim=24))
    text.load_state_dict({k: v for k, v in state.items() if k.startswith(("text_model.", "text_projection"))})
    text.save_pretrained(root / "text")
    build_clip_tokenizer_files(root / "text")
    vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION, projection_dim=24))
    vision.load_state_dict({k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_projection"))})
    vision.save_pretrained(root / "vision")
    return model, root


@pytest.fixture(scope="module")
def scorer(clip_folders):
    return clip_score.load_clip(clip_folders[1] / "full")


def rel(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


def test_clip_embeddings_match_transformers(clip_folders, scorer):
    model, root = clip_folders
    frames = translating_video(2, 1)
    prompts = ["a red fox running in snow", "a cat"]
    pixels = np.asarray(clip_preprocess(jnp.asarray(frames, jnp.float32) / 127.5 - 1.0, VISION["image_size"]))
    ids = scorer.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=ids["input_ids"], pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
    normed = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    assert rel(normed(scorer.image_embeds(frames)), out.image_embeds.numpy()) < 1e-4
    assert rel(normed(scorer.text_embeds(prompts)), out.text_embeds.numpy()) < 1e-4
    separate = clip_score.load_clip(vision=root / "vision", text=root / "text")
    assert rel(separate.image_embeds(frames), scorer.image_embeds(frames)) < 1e-6
    assert rel(separate.text_embeds(prompts), scorer.text_embeds(prompts)) < 1e-6


def test_clip_scores(scorer):
    still = np.repeat(translating_video(0, 0)[:1], FRAMES, axis=0)
    result = evaluate.score_video(still, still[0], clip=scorer, prompt="a photo of a cat")
    assert result["clip_adjacent"] == pytest.approx(1.0, abs=1e-6)
    assert result["clip_image_video"] == pytest.approx(1.0, abs=1e-6)
    moving = translating_video(4, 0, seed=1)
    other = smooth_texture(seed=2)[:SIZE, :SIZE].round().astype(np.uint8)
    result = evaluate.score_video(moving, other, clip=scorer, prompt="a photo of a cat")
    for key in ("clip_adjacent", "clip_image_video", "clip_text_video"):
        assert -1.0 <= result[key] <= 1.0
    assert result["clip_image_video"] < 1.0 - 1e-4


def test_clip_refuses_wrong_checkpoints(clip_folders, tmp_path):
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)).save_pretrained(tmp_path)  # as SD 1.5 ships it
    build_clip_tokenizer_files(tmp_path)
    with pytest.raises(ValueError, match="no 'text_projection.weight'"):
        clip_score.load_clip(vision=clip_folders[1] / "vision", text=tmp_path)
    with pytest.raises(ValueError, match="no CLIP vision tower"):
        clip_score.load_clip(vision=tmp_path, with_text=False)
    with pytest.raises(ValueError, match="needs CLIP text weights"):
        clip_score.load_clip(vision=clip_folders[1] / "vision")


# ------------------------------------------------------------------------------------------------ inputs / CLI

@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_inputs")
    (root / "videos").mkdir()
    (root / "images").mkdir()
    moving = translating_video(2, 0)
    write_video(str(root / "videos" / "moving.mp4"), moving)
    write_video(str(root / "videos" / "moving.gif"), moving)  # sample.py writes both: the MP4 is scored
    write_video(str(root / "videos" / "pan.mp4"), translating_video(0, 3, seed=3))
    from PIL import Image
    Image.fromarray(moving[0]).save(root / "images" / "moving.png")
    Image.fromarray(translating_video(0, 3, seed=3)[0]).resize((80, 72)).save(root / "images" / "pan.jpg")
    (root / "prompts.csv").write_text('video,prompt\nmoving.mp4,"a moving texture, left"\npan,a panning shot\n')
    return root


def test_collect_inputs_and_errors(video_folder, tmp_path):
    inputs = evaluate.collect_inputs(str(video_folder / "videos"), images=str(video_folder / "images"),
                                     prompts=str(video_folder / "prompts.csv"))
    assert [(i.video.rsplit("/", 1)[1], i.image.rsplit("/", 1)[1], i.prompt) for i in inputs] == [
        ("moving.mp4", "moving.png", "a moving texture, left"), ("pan.mp4", "pan.jpg", "a panning shot")]
    (tmp_path / "p.jsonl").write_text('{"video": "moving", "prompt": "x"}\n')
    with pytest.raises(ValueError, match="no prompt for pan.mp4"):
        evaluate.collect_inputs(str(video_folder / "videos"), prompts=str(tmp_path / "p.jsonl"))
    with pytest.raises(FileNotFoundError, match="no input image for video .*moving.mp4.*moving.png, moving.jpg"):
        evaluate.collect_inputs(str(video_folder / "videos"), images=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such file or folder: .*missing.mp4"):
        evaluate.collect_inputs(str(tmp_path / "missing.mp4"))
    with pytest.raises(FileNotFoundError, match="holds no .mp4 or .gif files"):
        evaluate.collect_inputs(str(tmp_path))
    (tmp_path / "bad.csv").write_text("file,words\na.mp4,hello\n")
    with pytest.raises(ValueError, match="needs a video column"):
        evaluate.read_prompts(str(tmp_path / "bad.csv"))


def test_cli_writes_json_and_markdown(video_folder, clip_folders, tmp_path, capsys):
    out = tmp_path / "report" / "metrics"
    eval_main(["--videos", str(video_folder / "videos"), "--images", str(video_folder / "images"),
               "--prompts", str(video_folder / "prompts.csv"), "--clip", str(clip_folders[1] / "full"),
               "--out", str(out), "--no_progress"])
    results = json.loads((tmp_path / "report" / "metrics.json").read_text())
    rows = {r["video"].rsplit("/", 1)[1]: r for r in results["videos"]}
    assert sorted(rows) == ["moving.mp4", "pan.mp4"]
    assert rows["pan.mp4"]["image_resized_from"] == [72, 80] and "image_resized_from" not in rows["moving.mp4"]
    assert rows["moving.mp4"]["motion"] == pytest.approx(2.0, rel=0.15)  # H.264 (crf 17) adds coding noise
    assert rows["pan.mp4"]["motion"] == pytest.approx(3.0, rel=0.15)
    assert rows["moving.mp4"]["ssim_first"] > 0.9  # the input image is frame 0 before encoding
    for row in rows.values():
        assert all(-1 <= row[k] <= 1 for k in ("clip_image_video", "clip_adjacent", "clip_text_video"))
    assert results["mean"]["motion"] == pytest.approx((rows["moving.mp4"]["motion"] + rows["pan.mp4"]["motion"]) / 2)
    table = (tmp_path / "report" / "metrics.md").read_text()
    assert "| moving.mp4 | 4 |" in table and "| **mean (2 videos)** |" in table
    assert "CLIP text-video" in table and "not directly comparable to RAFT" in table and "resized" in table
    assert all(row["motion_flow"] == "lk" for row in rows.values()) and results["settings"]["motion_flow"] == "lk"
    assert "motion px/frame (lk)" in table
    assert "wrote" in capsys.readouterr().out


def test_cli_errors(video_folder, clip_folders, tmp_path):
    with pytest.raises(SystemExit, match="error: no input image for video"):
        eval_main(["--videos", str(video_folder / "videos"), "--images", str(tmp_path), "--no_progress"])
    with pytest.raises(SystemExit, match="error: CLIP text-to-video similarity needs CLIP text weights"):
        eval_main(["--videos", str(video_folder / "videos" / "pan.mp4"), "--prompt", "x", "--clip_vision",
                   str(clip_folders[1] / "vision"), "--no_progress"])
    with pytest.raises(SystemExit, match="error: no such weight file or folder"):
        eval_main(["--videos", str(video_folder / "videos" / "pan.mp4"), "--clip", str(tmp_path / "none"),
                   "--no_progress"])
    with pytest.raises(SystemExit, match="error: --flow=raft needs --flow_weights=PATH"):
        eval_main(["--videos", str(video_folder / "videos" / "pan.mp4"), "--flow", "raft", "--no_progress"])
    with pytest.raises(SystemExit, match="error: --flow_weights is for --flow=raft"):
        eval_main(["--videos", str(video_folder / "videos" / "pan.mp4"), "--flow_weights", "x.pth", "--no_progress"])
    help_text = subprocess.run([sys.executable, "-m", "atomo_jax.eval", "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "--videos" in help_text and "--clip" in help_text and "--flow_weights" in help_text


def test_raft_backend_matches_torchvision():
    """tests/raft_checks.py in a process of its own, with torchvision importable: tests/run.sh installs it into
    .venv/torchvision rather than the venv, because the only torchvision wheel on these machines is a CUDA build
    whose presence breaks transformers' imports in every other test (see atomo_jax/eval/raft.py)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    site = os.path.join(root, ".venv", "torchvision")
    env = dict(os.environ)
    if os.path.isdir(site):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join(root, "tests", "raft_checks.py")], env=env, cwd=root, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "4 passed in" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]  # none skipped
