"""Pallas splash attention (`layers.attention(implementation="splash")`): parity with the XLA path in Pallas interpret
mode on CPU (forward and gradients, under jit + vmap + remat), the automatic choice and its fallbacks, and an AOT
compile for a TPU topology (needs libtpu) that checks the Mosaic kernel is in the compiled program, per device under a
batch-sharded mesh (no gather of the global batch).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from atomo_jax.models import layers


def _rel(a: jax.Array, b: jax.Array) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _qkv(tq: int, tk: int, head_dim: int, batch: int = 2, heads: int = 2, dtype=jnp.float32):
    kq, kk, kv, kc = jax.random.split(jax.random.key(tq * 1000 + tk + head_dim), 4)
    shape = lambda t: (batch, t, heads, head_dim)
    return (jax.random.normal(kq, shape(tq), dtype), jax.random.normal(kk, shape(tk), dtype),
            jax.random.normal(kv, shape(tk), dtype), jax.random.normal(kc, shape(tq), jnp.float32))


def _value_and_grads(impl: str, q, k, v, cotangent):
    """Output and d<out, cotangent>/d(q, k, v), jitted, with the attention under remat."""
    attn = jax.checkpoint(lambda q, k, v: layers.attention(q, k, v, implementation=impl))
    loss = lambda q, k, v: jnp.vdot(attn(q, k, v).astype(jnp.float32), cotangent)
    out = jax.jit(attn)(q, k, v)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("tq,tk,head_dim", [
    (256, 256, 40),  # spatial self-attention (16x16 latents), SD 1.5's first-level head_dim
    (256, 77, 40),  # cross-attention over 77 text tokens: keys padded to 128 and masked off
    (16, 16, 40),  # temporal attention over 16 frames: both lengths padded to one 128 tile
], ids=["self", "cross77", "temporal16"])
def test_splash_matches_xla_fp32(tq, tk, head_dim):
    q, k, v, ct = _qkv(tq, tk, head_dim)
    out, grads = _value_and_grads("splash", q, k, v, ct)
    ref_out, ref_grads = _value_and_grads("xla", q, k, v, ct)
    assert out.shape == ref_out.shape == q.shape
    assert _rel(out, ref_out) < 1e-4
    for name, g, r in zip("qkv", grads, ref_grads):
        assert _rel(g, r) < 1e-4, name


def test_splash_under_vmap_and_bf16_bound():
    """vmap over an extra leading axis; with bf16 inputs the error against the fp32 XLA result is about 4e-3, as
    for the XLA path in bf16 (both round the scaled q, the probabilities and the output to bf16)."""
    q, k, v, _ = _qkv(128, 128, 80, batch=1, heads=2)
    stack = lambda t: jnp.stack([t, t[:, ::-1]])  # (2, 1, T, N, H)
    q, k, v = stack(q), stack(k), stack(v)
    ref = jax.vmap(lambda q, k, v: layers.attention(q, k, v, implementation="xla"))(q, k, v)
    bf = lambda t: t.astype(jnp.bfloat16)
    got = jax.jit(jax.vmap(lambda q, k, v: layers.attention(q, k, v, implementation="splash")))(bf(q), bf(k), bf(v))
    assert got.dtype == jnp.bfloat16 and got.shape == ref.shape
    err = _rel(got, ref)
    xla_bf16 = _rel(jax.vmap(lambda q, k, v: layers.attention(q, k, v, implementation="xla"))(bf(q), bf(k), bf(v)),
                    ref)
    assert err < 1e-2 and err < 1.5 * xla_bf16, (err, xla_bf16)


def test_automatic_choice_and_fallback_reasons():
    assert layers.splash_fallback_reason((2, 4096, 8, 40), (2, 4096, 8, 40)) is None
    assert layers.splash_fallback_reason((2, 98304, 8, 40), (2, 77, 8, 40)) is None
    assert "24 queries" in layers.splash_fallback_reason((4096, 24, 8, 40), (4096, 24, 8, 40))
    assert "4 keys" in layers.splash_fallback_reason((2, 98304, 8, 40), (2, 4, 8, 40))
    assert "mask" in layers.splash_fallback_reason((2, 256, 8, 64), (2, 256, 8, 64), mask=jnp.ones((256, 256), bool))
    with pytest.raises(ValueError, match="no mask"):
        layers.attention(*_qkv(128, 128, 64)[:3], implementation="splash", mask=jnp.ones((128, 128), bool))
    # Off TPU the default stays on XLA's path: no Pallas call in the program.
    q, k, v, _ = _qkv(256, 256, 40)
    assert "pallas_call" not in str(jax.make_jaxpr(lambda q, k, v: layers.attention(q, k, v))(q, k, v))


def _libtpu_missing() -> str | None:
    try:
        import libtpu  # noqa: F401
        return None
    except ImportError:
        return "libtpu is not installed: cannot compile for TPU on this host (pip install 'libtpu==0.0.42.*')"


@pytest.mark.skipif(_libtpu_missing() is not None, reason=str(_libtpu_missing()))
def test_aot_compile_for_tpu_uses_splash_kernel():
    """The default implementation, traced under a mesh of abstract v5e chips on this CPU host, picks splash for
    long sequences (per device via shard_map: no all-gather) and XLA for a temporal one."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from atomo_jax.aot import parse_target
    from atomo_jax.fit_check import target_devices
    devices = target_devices(parse_target("v5e:2x2"))
    mesh = Mesh(np.asarray(devices).reshape(4, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    sharding = NamedSharding(mesh, P("data"))

    def compiled_text(tq: int, tk: int, head_dim: int) -> str:
        arg = lambda t: jax.ShapeDtypeStruct((8, t, 8, head_dim), jnp.bfloat16, sharding=sharding)
        loss = lambda q, k, v: jnp.sum(jnp.square(layers.attention(q, k, v).astype(jnp.float32)))
        with jax.set_mesh(mesh):
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(arg(tq), arg(tk), arg(tk)).compile() \
                .as_text()

    for tq, tk, head_dim in ((512, 512, 40), (512, 77, 160)):
        text = compiled_text(tq, tk, head_dim)
        assert text.count("tpu_custom_call") >= 2, (tq, tk, head_dim)  # forward and fused backward kernels
        assert "all-gather" not in text
    assert "tpu_custom_call" not in compiled_text(24, 24, 40)
