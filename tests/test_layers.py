"""layers.FrameConv (the temporal convolution as one matmul) against the 3-D convolution it replaces, and
layers.GroupNorm (statistics from per-channel sums) against torch.nn.GroupNorm, and the model init's independence
of its input size."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atomo_jax.models import layers


def conv3d(features: int, dtype) -> nn.Module:
    return nn.Conv(features, (3, 1, 1), padding=((1, 1), (0, 0), (0, 0)), dtype=dtype, param_dtype=jnp.float32)


@pytest.mark.parametrize("frames", [1, 2, 7])
def test_frame_conv_equals_conv3d_values_and_grads(frames):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, frames, 3, 5, 6)), jnp.float32)
    params = nn.unbox(layers.FrameConv(4).init(jax.random.key(1), x))["params"]
    params["bias"] = jnp.arange(4, dtype=jnp.float32) / 10  # zero at init; make the bias count

    def loss(fn, p, x):
        return jnp.sum(jnp.sin(fn(p, x)))

    ours = lambda p, x: layers.FrameConv(4).apply({"params": p}, x)
    ref = lambda p, x: conv3d(4, jnp.float32).apply({"params": p}, x)
    np.testing.assert_allclose(ours(params, x), ref(params, x), rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(loss, argnums=(1, 2))(ours, params, x)
    g_ref = jax.grad(loss, argnums=(1, 2))(ref, params, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_frame_conv_bf16_and_param_layout():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 8, 4, 4, 16)), jnp.float32)
    boxed = layers.FrameConv(8, dtype=jnp.bfloat16).init(jax.random.key(0), x)["params"]
    assert boxed["kernel"].names == ("kernel_0", "kernel_1", "kernel_2", "conv_in", "conv_out")
    params = nn.unbox(boxed)
    assert params["kernel"].shape == (3, 1, 1, 16, 8) and params["kernel"].dtype == jnp.float32
    out = layers.FrameConv(8, dtype=jnp.bfloat16).apply({"params": params}, x)
    ref = conv3d(8, jnp.float32).apply({"params": params}, x)
    assert out.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
    zero = nn.unbox(layers.FrameConv(8, zero_init=True).init(jax.random.key(0), x))["params"]
    assert not np.any(zero["kernel"]) and not np.any(zero["bias"])


SHARDED_FLOPS = """
import jax, jax.numpy as jnp, flax.linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from atomo_jax.models import layers
mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
conv = layers.FrameConv(256)
x = jnp.zeros((8, 8, 16, 16, 256))
params = nn.unbox(conv.init(jax.random.key(0), x[:1, :2, :1, :1]))
def flops(x_sh, k_sh):
    f = jax.jit(lambda p, x: jnp.sum(conv.apply(p, x) ** 2))
    sx = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x_sh)
    sp = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=k_sh if a.ndim == 5 else
                                                     NamedSharding(mesh, P())), params)
    cost = f.lower(sp, sx).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]
whole = flops(NamedSharding(mesh, P()), NamedSharding(mesh, P()))
split = flops(NamedSharding(mesh, P("fsdp", None, None, None, "tensor")),
              NamedSharding(mesh, P(None, None, None, "fsdp", "tensor")))
print(whole / split)
"""


def test_frame_conv_splits_its_matmul_over_fsdp_and_tensor():
    """Under a 4 x 2 fsdp x tensor mesh each device does an eighth of the matmul (not the whole of it)."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-c", SHARDED_FLOPS], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip().splitlines()[-1]) > 7.0, out.stdout


def torch_group_norm(x: np.ndarray, groups: int, eps: float, scale: np.ndarray, bias: np.ndarray,
                     upstream: np.ndarray, silu: bool = False):
    """torch.nn.GroupNorm (then SiLU if `silu`) in float64 on the channels-first view of channels-last `x`: output,
    d(x), d(scale), d(bias) of sum(out * upstream)."""
    import torch
    gn = torch.nn.GroupNorm(groups, x.shape[-1], eps=eps).double()
    with torch.no_grad():
        gn.weight.copy_(torch.from_numpy(scale))
        gn.bias.copy_(torch.from_numpy(bias))
    to_first = lambda a: np.moveaxis(a, -1, 1)
    xt = torch.from_numpy(to_first(x).astype(np.float64)).requires_grad_()
    out = torch.nn.functional.silu(gn(xt)) if silu else gn(xt)
    (out * torch.from_numpy(to_first(upstream).astype(np.float64))).sum().backward()
    back = lambda t: np.moveaxis(t.detach().numpy(), 1, -1)
    return back(out), back(xt.grad), gn.weight.grad.numpy(), gn.bias.grad.numpy()


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape,groups", [((3, 5, 6, 64), 32), ((2, 4, 3, 5, 64), 32), ((4, 64), 4)])
def test_group_norm_matches_torch_values_and_grads(shape, groups, silu):
    """4-D (B*F, H, W, C), 5-D (B, F, H, W, C: statistics across frames, as torch on (B, C, F, H, W)) and 2-D; alone
    and with the SiLU after it (`silu=True`)."""
    rng = np.random.default_rng(3)
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)  # an offset mean: the variance is two-pass
    upstream = rng.standard_normal(shape).astype(np.float32)
    scale = (1 + 0.1 * rng.standard_normal(64)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(64)).astype(np.float32)
    gn = layers.group_norm(groups, 1e-5, silu=silu)
    params = {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}
    f = lambda p, x: jnp.sum(gn.apply({"params": p}, x) * upstream)
    out = gn.apply({"params": params}, jnp.asarray(x))
    (d_p, d_x) = jax.grad(f, argnums=(0, 1))(params, jnp.asarray(x))
    ref_out, ref_dx, ref_dscale, ref_dbias = torch_group_norm(x, groups, 1e-5, scale, bias, upstream, silu)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(d_x, ref_dx, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(d_p["scale"], ref_dscale, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d_p["bias"], ref_dbias, rtol=1e-5, atol=1e-4)


def test_group_norm_params_dtype_and_errors():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 4, 4, 32)), jnp.bfloat16)
    boxed = layers.group_norm(8, 1e-6, dtype=jnp.bfloat16, name="norm").init(jax.random.key(0), x)["params"]
    assert {k: v.names for k, v in boxed.items()} == {"scale": ("norm",), "bias": ("norm",)}
    params = nn.unbox(boxed)
    assert params["scale"].dtype == jnp.float32 and np.all(params["scale"] == 1) and not np.any(params["bias"])
    out = layers.group_norm(8, 1e-6, dtype=jnp.bfloat16).apply({"params": params}, x)
    assert out.dtype == jnp.bfloat16
    ref = nn.GroupNorm(8, epsilon=1e-6, use_fast_variance=False).apply({"params": params}, x.astype(jnp.float32))
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=0.02)
    with pytest.raises(ValueError, match="30 channels do not split into 8 groups"):
        layers.group_norm(8, 1e-6).init(jax.random.key(0), jnp.zeros((1, 2, 2, 30)))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return layers.group_norm(8, 1e-6, name="norm1")(x)

    with pytest.raises(ValueError, match="^norm1: 30 channels"):  # names the layer
        Block().init(jax.random.key(0), jnp.zeros((1, 2, 2, 30)))


def test_model_init_does_not_depend_on_the_init_input_size():
    """`AtomoVideo.init` runs at the smallest input (1 frame, min_resolution) to keep the init program small; the
    trainer relies on that giving exactly the parameters an init at the training size gives."""
    from atomo_jax.models.atomo import build_model
    from configs import demo

    config = demo.get_config()
    model = build_model(config.model)
    small = jax.jit(lambda r: nn.unbox(model.init(r)))(jax.random.key(3))
    full = jax.jit(lambda r: nn.unbox(model.init(r, num_frames=config.data.num_frames,
                                                 resolution=2 * config.data.resolution)))(jax.random.key(3))
    assert model.min_resolution() < 2 * config.data.resolution
    assert jax.tree.structure(small) == jax.tree.structure(full)
    for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(full)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_padded_keys_attention_matches_torch_values_and_grads():
    """Cross-attention over 93 keys (the bench's text length), padded to 128 and masked by length (the form cuDNN's
    flash kernel takes), equals torch's scaled_dot_product_attention over the 93 keys alone, values and gradients.
    On CPU it runs XLA's path; the padding and the length mask are what is tested."""
    import torch
    rng = np.random.default_rng(5)
    q, k, v, up = (rng.standard_normal(s).astype(np.float32)
                   for s in ((2, 64, 4, 40), (2, 93, 4, 40), (2, 93, 4, 40), (2, 64, 4, 40)))
    f = lambda q, k, v: jnp.sum(layers.padded_keys_attention(q, k, v, implementation="xla") * up)
    out = layers.padded_keys_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), implementation="xla")
    grads = jax.grad(f, argnums=(0, 1, 2))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    tq, tk, tv = (torch.from_numpy(a.transpose(0, 2, 1, 3).astype(np.float64)).requires_grad_() for a in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    (ref * torch.from_numpy(up.transpose(0, 2, 1, 3).astype(np.float64))).sum().backward()
    back = lambda t: t.detach().numpy().transpose(0, 2, 1, 3)
    np.testing.assert_allclose(out, back(ref), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, (tq.grad, tk.grad, tv.grad)):
        np.testing.assert_allclose(got, back(want), rtol=1e-4, atol=1e-5)
