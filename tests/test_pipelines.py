"""Pipelines on a tiny stand-in of the AtomoVideo interface (cheap on CPU), plus the spatial weight swap on the
real UNet's parameter tree and the video writers."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atomo_jax.diffusion.guidance import GuidanceConfig
from atomo_jax.diffusion.samplers import SamplerConfig
from atomo_jax.models.unet import SpatioTemporalUNet, UNetConfig
from atomo_jax.pipelines import i2v, long_video, personalize, t2v, video_io

SAMPLER = SamplerConfig("ddim", 4)
GUIDE = GuidanceConfig(image_scale=2.0, text_scale=3.0, rescale=0.5)


class StandIn:
    """The AtomoVideo interface with a few weights: 2x pooling 'VAE', mean-colour 'CLIP', embedding 'text
    encoder' and a denoiser that mixes frames only when temporal=True and depends on every conditioning input."""

    def __init__(self):
        self.unet_config = UNetConfig(block_out_channels=(8, 16), down_attention=(True, False), norm_num_groups=8,
                                      num_attention_heads=2, motion_num_heads=2, motion_max_seq_length=16,
                                      cross_attention_dim=8, image_embed_dim=6)
        self.text_encoder = "embedding"
        self.temporal_flags = []

    @staticmethod
    def init(rng):
        k = jax.random.split(rng, 4)
        proj = np.linalg.qr(np.random.RandomState(0).randn(4, 3))[0].T.astype(np.float32)  # (3, 4), orthonormal rows
        return {"vae": {"proj": jnp.asarray(proj)},
                "image_encoder": {"w": jax.random.normal(k[0], (3, 6))},
                "text_encoder": {"emb": jax.random.normal(k[1], (50, 8))},
                "unet": {"a": jax.random.uniform(k[2], (4,), minval=0.3, maxval=0.7),
                         "b": jax.random.normal(k[3], (4,)), "c": jnp.float32(0.3), "d": jnp.float32(0.4)}}

    def encode_video(self, params, video, rng=None):
        b, f, h, w, _ = video.shape
        return video.reshape(b, f, h // 2, 2, w // 2, 2, 3).mean((3, 5)) @ params["vae"]["proj"]

    def decode_latents(self, params, latents, frames_per_chunk=8):
        x = latents @ params["vae"]["proj"].T
        return jnp.clip(jnp.repeat(jnp.repeat(x, 2, 2), 2, 3), -1, 1)

    def encode_image(self, params, image):
        return image.mean((1, 2)) @ params["image_encoder"]["w"]

    def encode_text(self, params, tokens, batch):
        return params["text_encoder"]["emb"][tokens]

    def predict(self, params, x_t, t, mask, given, context, image_embeds, *, temporal=True, ip_scale=1.0):
        self.temporal_flags.append(temporal)
        p = params["unet"]
        bcast = lambda v: v[:, None, None, None, None]
        h = x_t * p["a"] + given * mask[..., None, None, None] * p["b"] + bcast(t / 1000.0) * p["c"]
        if temporal:
            h = h + x_t.mean(1, keepdims=True) * p["d"]
        h = h + bcast(ip_scale * image_embeds.sum(-1) * 0.1 + context.mean((1, 2)))
        return jnp.tanh(h)


@pytest.fixture(scope="module")
def setup():
    model = StandIn()
    params = model.init(jax.random.key(0))
    image = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    tokens = dict(prompt_tokens=jnp.array([[1, 5, 7, 0]] * 2), empty_tokens=jnp.array([[1, 0, 0, 0]] * 2))
    return model, params, image, tokens


def test_i2v_shapes_determinism_and_given_frame(setup):
    model, params, image, tokens = setup
    run = lambda seed, **kw: i2v.image_to_video(model, params, image, jax.random.key(seed), num_frames=5,
                                               sampler=SAMPLER, guidance=GUIDE, progress=False, **{**tokens, **kw})
    a, b, c = run(3), run(3), run(4)
    assert a.video.shape == (2, 5, 16, 16, 3) and a.latents.shape == (2, 5, 8, 8, 4)
    np.testing.assert_array_equal(a.video, b.video)  # same seed -> same video
    assert not np.allclose(a.video[:, 1:], c.video[:, 1:])
    np.testing.assert_array_equal(a.latents[:, 0], model.encode_video(params, image[:, None])[:, 0])
    no_prompt = run(3, prompt_tokens=None)  # the prompt reaches the model
    assert not np.allclose(no_prompt.latents[:, 1:], a.latents[:, 1:])
    chunked = i2v.decode(model, params, a.latents, frames_per_chunk=2, progress=False)  # 5 frames, chunks of 2
    np.testing.assert_allclose(chunked, a.video, atol=1e-6)


def test_i2v_errors(setup):
    model, params, image, tokens = setup
    kw = dict(sampler=SAMPLER, guidance=GUIDE, progress=False, **tokens)
    with pytest.raises(ValueError, match="multiples of 4"):
        i2v.image_to_video(model, params, image[:, :14, :14], jax.random.key(0), num_frames=4, **kw)
    with pytest.raises(ValueError, match="motion_max_seq_length"):
        i2v.image_to_video(model, params, image, jax.random.key(0), num_frames=17, **kw)
    with pytest.raises(ValueError, match="empty_tokens"):
        i2v.image_to_video(model, params, image, jax.random.key(0), num_frames=4, sampler=SAMPLER, guidance=GUIDE,
                           progress=False)


def test_long_video_windows_join(setup):
    model, params, image, tokens = setup
    f, k, given = 6, 3, 2
    rng = jax.random.key(7)
    out = long_video.long_video(model, params, image, rng, num_frames=f, num_windows=k, num_given=given,
                                sampler=SAMPLER, guidance=GUIDE, progress=False, **tokens)
    total = long_video.num_output_frames(f, k, given)
    assert total == f + (k - 1) * (f - given) == 14
    assert out.latents.shape[1] == total and out.video.shape[1] == total
    # Rebuild every window by hand: window j starts at j * (F - L) and its first L frames are the given ones.
    first = i2v.i2v_conditioning(model, params, image, f, **tokens)
    previous = None
    for j in range(k):
        cond = first if j == 0 else long_video.next_window_conditioning(first, previous, given)
        window = i2v.denoise(model, params, jax.random.fold_in(rng, j), cond, SAMPLER, GUIDE)
        start = j * (f - given)
        np.testing.assert_array_equal(out.latents[:, start:start + f], window)
        if j > 0:
            np.testing.assert_array_equal(window[:, :given], previous[:, f - given:])  # given frames exact
            np.testing.assert_array_equal(cond.mask[0], [1.0] * given + [0.0] * (f - given))
        previous = window
    with pytest.raises(ValueError, match="num_given"):
        long_video.long_video(model, params, image, rng, num_frames=f, num_windows=2, num_given=f,
                              sampler=SAMPLER, guidance=GUIDE, progress=False, **tokens)


def test_t2v_first_frame_without_temporal_layers(setup):
    model, params, _, tokens = setup
    model.temporal_flags.clear()
    video, image = t2v.text_to_video(model, params, jax.random.key(5), batch=2, height=16, width=16, num_frames=4,
                                     sampler=SAMPLER, guidance=GUIDE, progress=False, **tokens)
    assert model.temporal_flags[0] is False and True in model.temporal_flags[1:]
    assert image.shape == (2, 16, 16, 3) and video.video.shape == (2, 4, 16, 16, 3)
    np.testing.assert_allclose(video.latents[:, 0], model.encode_video(params, image[:, None])[:, 0], atol=1e-6)
    again, _ = t2v.text_to_video(model, params, jax.random.key(5), batch=2, height=16, width=16, num_frames=4,
                                 sampler=SAMPLER, guidance=GUIDE, progress=False, **tokens)
    np.testing.assert_array_equal(video.video, again.video)


def _random_tree(config, seed):
    levels = len(config.block_out_channels) - 1
    args = (jnp.zeros((1, 2, 2 ** levels, 2 ** levels, config.in_channels)), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, 1, config.cross_attention_dim)))
    embeds = jnp.zeros((1, config.image_embed_dim)) if config.ip_adapter else None
    shapes = jax.eval_shape(lambda: SpatioTemporalUNet(config).init(jax.random.key(0), *args, embeds))
    shapes = personalize._flat(shapes["params"])
    r = np.random.RandomState(seed)
    return {k: jnp.asarray(r.randn(*v.shape), jnp.float32) for k, v in shapes.items()}


SWAP_CONFIG = UNetConfig(block_out_channels=(16, 32), down_attention=(True, False), layers_per_block=1,
                         norm_num_groups=8, num_attention_heads=2, motion_num_heads=2, motion_max_seq_length=8,
                         cross_attention_dim=16, image_embed_dim=8, ip_tokens=2)


def test_spatial_weight_swap_keeps_temporal_and_ip_params():
    config = SWAP_CONFIG
    ours = _random_tree(config, 0)
    base = _random_tree(personalize.spatial_config(config), 1)
    assert any("temp_convs" in k for k in ours) and any("motion_modules" in k for k in ours)
    assert any("to_k_ip" in k for k in ours) and not any(personalize.is_kept(k) for k in base)
    swapped = personalize._flat(personalize.swap_spatial_weights(_unflat(ours), _unflat(base)))
    assert swapped.keys() == ours.keys()
    for k, v in swapped.items():
        if k == personalize.CONV_IN:
            np.testing.assert_array_equal(v[:, :, :4], base[k])
            np.testing.assert_array_equal(v[:, :, 4:], ours[k][:, :, 4:])
        elif personalize.is_kept(k):
            np.testing.assert_array_equal(v, ours[k])
        else:
            np.testing.assert_array_equal(v, base[k])
    broken = dict(base)
    broken.pop("conv_out/kernel")
    broken["mid_block/resnets_0/conv1/bias"] = jnp.zeros((3,))
    with pytest.raises(ValueError, match=r"missing in the base: conv_out/kernel[\s\S]*shape of mid_block"):
        personalize.swap_spatial_weights(_unflat(ours), _unflat(broken))


def test_load_base_from_a_diffusers_unet_folder(tmp_path):
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    sd = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=2,
                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16)
    sd.save_pretrained(str(tmp_path / "finetune" / "unet"))
    base = personalize.load_base_unet(str(tmp_path / "finetune"), SWAP_CONFIG)
    ours = _random_tree(SWAP_CONFIG, 0)
    swapped = personalize._flat(personalize.swap_spatial_weights(_unflat(ours), base))
    weights = sd.state_dict()
    np.testing.assert_array_equal(swapped["conv_in/kernel"][:, :, :4],
                                  weights["conv_in.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(swapped["conv_out/bias"], weights["conv_out.bias"].numpy())
    with pytest.raises(FileNotFoundError, match="--base"):
        personalize.load_base_unet(str(tmp_path / "missing"), SWAP_CONFIG)


def _unflat(flat):
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def test_video_writers(tmp_path):
    frames = (np.random.RandomState(0).rand(6, 16, 20, 3) * 255).astype(np.uint8)
    mp4 = video_io.write_video(str(tmp_path / "v.mp4"), frames, fps=6)
    gif = video_io.write_video(str(tmp_path / "v.gif"), frames, fps=6)
    assert video_io.read_video(mp4).shape == (6, 16, 20, 3)
    np.testing.assert_array_equal(video_io.read_video(gif).shape, (6, 16, 20, 3))
    strip = video_io.write_png_strip(str(tmp_path / "s.png"), frames)
    from PIL import Image
    assert Image.open(strip).size == (6 * 20, 16)
    with pytest.raises(ValueError, match="uint8"):
        video_io.write_video(str(tmp_path / "x.mp4"), frames.astype(np.float32))
    with pytest.raises(ValueError, match=".avi"):
        video_io.write_video(str(tmp_path / "x.avi"), frames)
    np.testing.assert_array_equal(video_io.to_uint8(np.array([-1.0, 0.0, 1.0, 2.0])), [0, 128, 255, 255])
