"""Primitive layers with logical axis names on every parameter.

Thin factories over flax.linen so every model in the project annotates parameters the same way; the mesh mapping
lives in `atomo_jax.parallel.axes`. Parameters are float32 (master weights); `dtype` is the compute dtype.
"""

from __future__ import annotations

import functools
import math
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


def fold_frames(x: jax.Array) -> jax.Array:
    """(B, F, H, W, C) -> (B*F, H, W, C), the layout of the 2-D layers, pinned to `axes.FOLDED_FRAMES`."""
    return nn.with_logical_constraint(x.reshape((-1,) + x.shape[2:]), ax.FOLDED_FRAMES)


def unfold_frames(x: jax.Array, batch: int) -> jax.Array:
    """(B*F, H, W, C) -> (B, F, H, W, C), the layout of the temporal layers, pinned to `axes.VIDEO`."""
    return nn.with_logical_constraint(x.reshape((batch, -1) + x.shape[1:]), ax.VIDEO)


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


class FrameConv(nn.Module):
    """A (3, 1, 1) convolution over (B, F, H, W, C) with one frame of zero padding, computed as one matmul:
    y_k = x @ W_k for k = 0, 1, 2 in one dot, then out[f] = y_0[f-1] + y_1[f] + y_2[f+1] + b. Same parameters (kernel
    (3, 1, 1, in, out), bias) and result as the 3-D convolution, but a channels-last GEMM instead of a 3-D cuDNN
    convolution with its layout conversions (bench/NOTES.md)."""

    features: int
    zero_init: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin, cout = x.shape[-1], self.features
        kernel_init = nn.initializers.zeros_init() if self.zero_init else torch_default_init
        kernel = self.param("kernel", _init(kernel_init, ax.KERNEL + (ax.CONV_IN, ax.CONV_OUT)),
                            (3, 1, 1, cin, cout), jnp.float32)
        bias = self.param("bias", _init(nn.initializers.zeros_init(), (ax.CONV_OUT,)), (cout,), jnp.float32)
        # (..., in) x (3, in, out) -> (..., 3, out): the output channels stay their own axis, so a "tensor"-sharded
        # kernel splits the matmul (merging 3 x out into one axis made XLA compute it whole on every device).
        y = jnp.einsum("...c,kcd->...kd", x.astype(self.dtype), kernel.reshape(3, cin, cout).astype(self.dtype))
        no_pad = ((0, 0),) * (x.ndim - 2)
        prev = jnp.pad(y[:, :-1, ..., 0, :], ((0, 0), (1, 0)) + no_pad)
        nxt = jnp.pad(y[:, 1:, ..., 2, :], ((0, 0), (0, 1)) + no_pad)
        return prev + y[..., 1, :] + nxt + bias.astype(self.dtype)


class GroupNorm(nn.Module):
    """GroupNorm over every axis but the first (so a (B, F, H, W, C) input shares statistics across frames, as
    torch's GroupNorm on a 5-D tensor does), in float32 with the two-pass variance, optionally followed by SiLU
    (`silu=True`, the GN -> SiLU pair of every resnet and temporal convolution); parameters `scale` and `bias` as
    flax's GroupNorm.

    Channels-last, the statistics are per-channel means over the spatial (and frame) axes, then a mean over each
    group's channels: contiguous column reductions instead of flax's reduction of (N, ..., G, C/G) over
    non-contiguous axes (1% faster in the H200 train step, bench/NOTES.md, call 14). XLA fuses the SiLU and the
    backward as well as a closed-form VJP did (call 23: a hand-written one was 1% slower), so autodiff it is. Mean
    and variance from one pass (`bench/jax_bench.py --gn_one_pass`) were 1.4-1.8% faster on an H100 (and nearer
    float64 at a mean far from zero) but compiled ~20% slower on CPU, where every test compiles a UNet (calls
    38-40): not adopted.
    """

    num_groups: int
    epsilon: float
    silu: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            where = "/".join(self.scope.path) or "GroupNorm"
            raise ValueError(f"{where}: {c} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", _init(nn.initializers.ones_init(), (ax.NORM,)), (c,), jnp.float32)
        bias = self.param("bias", _init(nn.initializers.zeros_init(), (ax.NORM,)), (c,), jnp.float32)
        reduced = tuple(range(1, x.ndim - 1))
        per_group = c // self.num_groups

        def group_mean(t: jax.Array) -> jax.Array:
            """(N, ..., C) -> (N, 1.., C): the mean over `reduced` and each channel's group."""
            per_channel = jnp.mean(t, axis=reduced)
            g = jnp.mean(per_channel.reshape(-1, self.num_groups, per_group), axis=-1, keepdims=True)
            g = jnp.broadcast_to(g, g.shape[:-1] + (per_group,)).reshape(-1, c)
            return g.reshape((g.shape[0],) + (1,) * len(reduced) + (c,))

        xf = x.astype(jnp.float32)
        centred = xf - group_mean(xf)
        mul = jax.lax.rsqrt(group_mean(jnp.square(centred)) + self.epsilon) * scale
        out = (centred * mul + bias).astype(self.dtype)
        return nn.silu(out) if self.silu else out


def group_norm(num_groups: int, eps: float, *, silu: bool = False, dtype: Dtype = jnp.float32,
               name: str | None = None) -> GroupNorm:
    return GroupNorm(num_groups=num_groups, epsilon=eps, silu=silu, dtype=dtype, name=name)


def layer_norm(eps: float, *, use_bias: bool = True, dtype: Dtype = jnp.float32,
               name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                        use_fast_variance=False, scale_init=_init(nn.initializers.ones_init(), (ax.NORM,)),
                        bias_init=_init(nn.initializers.zeros_init(), (ax.NORM,)))


# Pallas splash (flash) attention on TPU: tiles of 128 lanes, so sequences are padded to multiples of 128 and the
# largest of these blocks that divides the padded length is used.
_SPLASH_LANES = 128
_SPLASH_BLOCKS = (512, 256, 128)
# Automatic choice: queries must fill at least one 128-row tile and keys at least half of one (at most 2x padding
# work); shorter attentions (temporal over frames, 8x8 mid-block, IP-Adapter's few image tokens) have small score
# matrices that XLA's fused einsums handle well.
_SPLASH_MIN_Q, _SPLASH_MIN_KV = 128, 64


def _target_platform() -> str:
    """Platform the program is compiled for: the mesh in context (AOT for TPU on a CPU host), else the default."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def splash_fallback_reason(q_shape: Sequence[int], k_shape: Sequence[int],
                           mask: jax.Array | None = None) -> str | None:
    """Why `attention(implementation=None)` on TPU does not use splash for these (B, T, N, H) shapes (None: it does)."""
    if mask is not None:
        return "an explicit mask (splash here runs unmasked attention)"
    if q_shape[1] < _SPLASH_MIN_Q:
        return f"{q_shape[1]} queries < {_SPLASH_MIN_Q}: padding to 128-row tiles would cost more than it saves"
    if k_shape[1] < _SPLASH_MIN_KV:
        return f"{k_shape[1]} keys < {_SPLASH_MIN_KV}: padding to 128-lane tiles would cost more than it saves"
    return None


def _splash_block(length: int) -> int:
    return next(b for b in _SPLASH_BLOCKS if length % b == 0)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool) -> jax.Array:
    """Splash attention on one device's (B, T, N, H) shard: heads-major per example, vmapped over the batch."""
    # TPU only (Mosaic kernels): not imported where splash is not used
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    (_, tq, n, d), tk = q.shape, k.shape[1]
    tq_pad, tk_pad = (-(-t // _SPLASH_LANES) * _SPLASH_LANES for t in (tq, tk))
    bq, bkv = _splash_block(tq_pad), _splash_block(tk_pad)
    blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                               block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True)
    mask = splash.MultiHeadMask([splash.FullMask((tq_pad, tk_pad))] * n)
    kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    # The kernel does not scale the logits; fold 1/sqrt(H) into q as jax.nn.dot_product_attention's scale.
    q = q * jnp.asarray(1.0 / d ** 0.5, q.dtype)
    heads_major = lambda t, pad: jnp.pad(t, ((0, 0), (0, pad - t.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    q, k, v = heads_major(q, tq_pad), heads_major(k, tk_pad), heads_major(v, tk_pad)
    segments = None
    if tk_pad != tk:  # padded keys get their own segment, so no query attends to them
        segments = splash.SegmentIds(q=jnp.zeros((tq_pad,), jnp.int32),
                                     kv=(jnp.arange(tk_pad) >= tk).astype(jnp.int32))
    out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, segments)
    return out.transpose(0, 2, 1, 3)[:, :tq]


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool) -> jax.Array:
    """Splash attention; under a mesh, per device through shard_map (XLA cannot partition the Mosaic custom call and
    would gather the global batch onto every device). Batch and heads are split as the logical rules say for
    `batch` and `heads` (flax's rules in context, else `axes.DEFAULT_RULES`), keeping mesh axes that divide them."""
    mesh = jax.sharding.get_abstract_mesh()
    auto = [a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != jax.sharding.AxisType.Manual]
    if mesh.empty or math.prod(mesh.shape[a] for a in auto) == 1:
        return _splash_local(q, k, v, interpret=interpret)
    rules = tuple(nn.get_logical_axis_rules()) or ax.DEFAULT_RULES
    spec = nn.logical_to_mesh_axes((ax.BATCH, None, ax.HEADS, None), rules)

    def fit(dim: int, names: Any) -> tuple[str, ...] | None:
        kept, size = [], 1
        for name in (names if isinstance(names, tuple) else (names,) if names else ()):
            if name in auto and dim % (size * mesh.shape[name]) == 0:
                kept.append(name)
                size *= mesh.shape[name]
        return tuple(kept) or None

    p = jax.sharding.PartitionSpec(fit(q.shape[0], spec[0]), None, fit(q.shape[2], spec[2]), None)
    local = functools.partial(_splash_local, interpret=interpret)
    return jax.shard_map(local, mesh=mesh, in_specs=(p, p, p), out_specs=p, axis_names=set(auto),
                         check_vma=False)(q, k, v)


def padded_keys_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str | None = None,
                          multiple: int = 64) -> jax.Array:
    """Attention with the keys and values zero-padded to a multiple of `multiple` and the padding masked out by
    length: the form cuDNN's flash kernel takes for cross-attention over a few tokens (e.g. 93 text tokens)."""
    pad = (-k.shape[1]) % multiple
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    lengths = jnp.full((q.shape[0],), k.shape[1], jnp.int32)
    return jax.nn.dot_product_attention(q, jnp.pad(k, widths), jnp.pad(v, widths), key_value_seq_lengths=lengths,
                                        implementation=implementation)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str | None = None,
              mask: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention (scale 1/sqrt(head_dim)) on (batch, length, heads, head_dim) inputs.

    `implementation`: None picks splash on TPU where `splash_fallback_reason` allows it, else lets XLA choose;
    "splash" forces the Pallas TPU splash kernel (any lengths and head_dim; off TPU it runs in Pallas interpret mode,
    slowly, for tests); "cudnn" asks for cuDNN flash attention on GPUs (bf16/fp16 only); "cudnn_padded" is
    "cudnn" with cross-attention too, its keys padded (`padded_keys_attention`; faster for sampling, slower for
    training: bench/NOTES.md, call 36); "xla" forces the plain
    einsum path (the numerically exact reference on CPU).
    """
    if implementation is None and _target_platform() == "tpu" and splash_fallback_reason(q.shape, k.shape,
                                                                                         mask) is None:
        implementation = "splash"
    if implementation == "splash":
        if mask is not None:
            raise ValueError("attention(implementation='splash') takes no mask; use implementation='xla'")
        return _splash(q, k, v, interpret=_target_platform() != "tpu")
    if implementation == "cudnn_padded":
        if (q.dtype in (jnp.bfloat16, jnp.float16) and mask is None and q.shape[1] != k.shape[1]
                and q.shape[1] % 64 == 0):
            return padded_keys_attention(q, k, v, implementation="cudnn")
        implementation = "cudnn"
    if implementation == "cudnn" and (q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[1] != k.shape[1]
                                      or q.shape[1] % 64):
        # cuDNN's flash kernel has no fp32 path and its backward rejects unaligned or unequal lengths (e.g. 16384
        # queries over 93 text tokens); those attentions are small, so XLA's fused einsums serve them well.
        implementation = None
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
