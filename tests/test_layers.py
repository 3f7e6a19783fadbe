"""layers.FrameConv (the temporal convolution as one matmul) against the 3-D convolution it replaces."""

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
