"""Logical axis names carried by every parameter and activation, and the default table mapping them to mesh axes.

Modules only ever name *logical* axes; which mesh axis (if any) shards each one is data, decided here and overridable
from the config (`config.mesh.rules`). Mesh axes are ("data", "fsdp", "tensor").
"""

from __future__ import annotations

from typing import Sequence

# Parameter axes.
EMBED = "embed"  # model width on the input side of a dense kernel / channels of norms
MLP = "mlp"  # the output side of a dense kernel that can be split for tensor parallelism
HEADS = "heads"  # q/k/v projection outputs (heads * head_dim)
CONV_IN = "conv_in"  # conv kernel input channels
CONV_OUT = "conv_out"  # conv kernel output channels
KERNEL = ("kernel_0", "kernel_1", "kernel_2")  # extents of a conv kernel, one name per dim (never sharded)
NORM = "norm"  # scale / bias of a normalisation layer
VOCAB = "vocab"  # token / position embedding tables
LORA_RANK = "lora_rank"  # the inner (rank) side of a LoRA factor pair: a few values, never worth splitting

# Activation axes. The model pins its activations to these at every change of layout (frames folded into the batch
# and back, pixels into tokens and back) with `nn.with_logical_constraint`, so the compiler never has to guess how a
# reshape's output is laid out. The constraints bind only where the rules are in context (`nn.logical_axis_rules`,
# set by the train step, whose batch is split evenly): sampling and eval run the same model unconstrained.
BATCH = "batch"  # examples; also a folded axis whose major part is the examples (B*F frames, B*H*W pixels)
FRAMES = "frames"
LENGTH = "length"  # tokens: pixels of one frame (spatial attention) or text/image tokens
ACT_EMBED = "act_embed"  # channels of an activation

FOLDED_FRAMES = (BATCH, None, None, ACT_EMBED)  # (B*F, H, W, C): what the 2-D layers see
VIDEO = (BATCH, FRAMES, None, None, ACT_EMBED)  # (B, F, H, W, C): what the temporal layers see
PIXEL_TOKENS = (BATCH, LENGTH, ACT_EMBED)  # (B*F, H*W, C): spatial attention
FRAME_TOKENS = (BATCH, FRAMES, ACT_EMBED)  # (B*H*W, F, C): temporal attention

MESH_AXES = ("data", "fsdp", "tensor")

# Default rules: FSDP shards the large dimension of every kernel; tensor parallelism splits heads and MLP widths.
# A logical axis may map to a tuple of mesh axes or to None (replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (BATCH, ("data", "fsdp")),
    (FRAMES, None),
    (LENGTH, None),
    (ACT_EMBED, None),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (CONV_IN, "fsdp"),
    (CONV_OUT, "tensor"),
    *((k, None) for k in KERNEL),
    (NORM, None),
    (VOCAB, None),
    (LORA_RANK, None),
)


def rules_from_config(rules: Sequence[Sequence] | None) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """Normalises a rules table from a config (lists become tuples); `None` gives the defaults."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"config.mesh.rules: each rule must be (logical_axis, mesh_axes), got {rule!r}")
        name, target = rule
        if isinstance(target, list):
            target = tuple(target)
        for axis in (target if isinstance(target, tuple) else (target,)):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"config.mesh.rules: {name!r} maps to unknown mesh axis {axis!r}; "
                                 f"mesh axes are {MESH_AXES}")
        out.append((name, target))
    return tuple(out)
