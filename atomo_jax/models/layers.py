"""Primitive layers with logical axis names on every parameter.

Thin factories over flax.linen so every model in the project annotates parameters the same way; the mesh mapping
lives in `atomo_jax.parallel.axes`. Parameters are float32 (master weights); `dtype` is the compute dtype.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from atomo_jax.parallel import axes as ax

Dtype = Any

# PyTorch's default Linear/Conv init (kaiming_uniform with a=sqrt(5)) is U(+-1/sqrt(fan_in)): variance 1/(3 fan_in).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _init(init: nn.initializers.Initializer, names: Sequence[str]) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(init, tuple(names))


def dense(features: int, *, axes: Sequence[str] = (ax.EMBED, ax.MLP), use_bias: bool = True, zero_init: bool = False,
          dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Dense:
    """Linear layer; kernel is (in, out) = torch weight transposed."""
    kernel_init = nn.initializers.zeros_init() if zero_init else torch_default_init
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=_init(kernel_init, axes), bias_init=_init(nn.initializers.zeros_init(), axes[-1:]))


def conv(features: int, kernel_size: Sequence[int], *, strides: Sequence[int] | None = None,
         padding: str | Sequence[tuple[int, int]] = "SAME", use_bias: bool = True, zero_init: bool = False,
         dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Conv:
    """Channels-last convolution; kernel is (*spatial, in, out)."""
    kernel_init = nn.initializers.zeros_init() if zero_init else torch_default_init
    names = ax.KERNEL[:len(kernel_size)] + (ax.CONV_IN, ax.CONV_OUT)
    return nn.Conv(features, tuple(kernel_size), strides=strides, padding=padding, use_bias=use_bias, dtype=dtype,
                   param_dtype=jnp.float32, name=name, kernel_init=_init(kernel_init, names),
                   bias_init=_init(nn.initializers.zeros_init(), (ax.CONV_OUT,)))


def group_norm(num_groups: int, eps: float, *, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.GroupNorm:
    """GroupNorm over every axis but the first (so a (B, F, H, W, C) input shares statistics across frames, as
    torch's GroupNorm on a 5-D tensor does). Statistics are computed in float32 with the two-pass variance."""
    return nn.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
                        use_fast_variance=False, scale_init=_init(nn.initializers.ones_init(), (ax.NORM,)),
                        bias_init=_init(nn.initializers.zeros_init(), (ax.NORM,)))


def layer_norm(eps: float, *, use_bias: bool = True, dtype: Dtype = jnp.float32,
               name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                        use_fast_variance=False, scale_init=_init(nn.initializers.ones_init(), (ax.NORM,)),
                        bias_init=_init(nn.initializers.zeros_init(), (ax.NORM,)))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str | None = None,
              mask: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention on (batch, length, heads, head_dim) inputs.

    `implementation`: None lets XLA choose; "cudnn" asks for cuDNN flash attention on GPUs (bf16/fp16 only);
    "xla" forces the plain einsum path (the numerically exact reference on CPU).
    """
    if implementation == "cudnn" and (q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[1] != k.shape[1]
                                      or q.shape[1] % 64):
        # cuDNN's flash kernel has no fp32 path and its backward rejects unaligned or unequal lengths (e.g. 16384
        # queries over 93 text tokens); those attentions are small, so XLA's fused einsums serve them well.
        implementation = None
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
