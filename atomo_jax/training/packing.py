"""Small trainable leaves kept as one flat vector while training.

The full-size model has 1,620 trainable leaves; 966 are biases and norm scales of at most 16,384 values. Updated
leaf by leaf, each costs its own gradient-norm reduction and its own AdamW + EMA kernel. Packing them took 10% off
an H200 step but only 2.5 ms of kernel time: the cost was the launch gaps between those tiny kernels (bench/NOTES.md,
call 19). Packed, those leaves are one vector in the parameters, the Adam moments and the EMA, so the norm, the
update and the EMA cover them in a few kernels;
the model reads slices of the vector (free: a slice fuses into its consumer), and their gradients are concatenated
once.

The packed form is the train step's device form only. Checkpoints, sampling and export see the ordinary trees
(`unpack_state`), so a checkpoint does not depend on the threshold. Only fully replicated float32 leaves are packed:
a leaf sharded over the mesh stays as it is (packing it would gather it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections

from atomo_jax.training.state import TrainState


@flax.struct.dataclass
class Packed:
    """A tree of the trainable structure in packed form."""
    large: tuple  # the leaves kept as they are, in tree order
    small: Any  # the packed leaves, flattened and concatenated in tree order (an array; a sharding for shardings)


@dataclasses.dataclass(frozen=True)
class LeafPacker:
    """Packs and unpacks trees with the structure of the trainable parameters (static: shapes only)."""
    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    packed: tuple[bool, ...]

    @classmethod
    def for_trainable(cls, trainable: Any, shardings: Any, max_size: int) -> LeafPacker:
        """Packs the float32 leaves of at most `max_size` values that `shardings` replicates; 0 packs none."""
        leaves, treedef = jax.tree.flatten(trainable)
        sh = treedef.flatten_up_to(shardings)
        packed = tuple(0 < math.prod(x.shape) <= max_size and x.dtype == jnp.float32 and s.is_fully_replicated
                       for x, s in zip(leaves, sh))
        return cls(treedef, tuple(tuple(x.shape) for x in leaves), packed)

    @property
    def num_packed(self) -> int:
        return sum(self.packed)

    def pack(self, tree: Any) -> Packed:
        """Traced (in the step) or on placed arrays: the large leaves are passed on as they are, not copied."""
        leaves = self.treedef.flatten_up_to(tree)
        return Packed(large=tuple(x for x, p in zip(leaves, self.packed) if not p),
                      small=_concat(tuple(x for x, p in zip(leaves, self.packed) if p)))

    def unpack(self, packed: Packed) -> Any:
        large = iter(packed.large)
        small = iter(_split(packed.small, tuple(s for s, p in zip(self.shapes, self.packed) if p)))
        return self.treedef.unflatten([next(small) if p else next(large) for p in self.packed])

    def _map_trees(self, fn: Callable[[Any], Any], tree: Any) -> Any:
        """`fn` on every subtree with the trainable structure (params, EMA, Adam moments); the rest unchanged."""
        matches = lambda x: jax.tree.structure(x) == self.treedef
        return jax.tree.map(lambda x: fn(x) if matches(x) else x, tree, is_leaf=matches)

    def pack_state(self, state: TrainState) -> TrainState:
        return state.replace(trainable=self.pack(state.trainable), ema=self.pack(state.ema),
                             opt_state=self._map_trees(self.pack, state.opt_state))

    def unpack_state(self, state: TrainState) -> TrainState:
        is_packed = lambda x: isinstance(x, Packed)
        unpack = lambda x: self.unpack(x) if is_packed(x) else x
        return state.replace(trainable=self.unpack(state.trainable), ema=self.unpack(state.ema),
                             opt_state=jax.tree.map(unpack, state.opt_state, is_leaf=is_packed))

    def pack_shardings(self, shardings: TrainState, replicated: jax.sharding.Sharding) -> TrainState:
        """The shardings of the packed state: large leaves keep theirs, the vector is `replicated`."""
        def pack(tree):
            leaves = self.treedef.flatten_up_to(tree)
            return Packed(large=tuple(s for s, p in zip(leaves, self.packed) if not p), small=replicated)
        return shardings.replace(trainable=pack(shardings.trainable), ema=pack(shardings.ema),
                                 opt_state=self._map_trees(pack, shardings.opt_state))


@jax.jit
def _concat(leaves: tuple) -> jax.Array:
    # jitted so that packing placed arrays is one dispatch; inside the step it is inlined.
    return jnp.concatenate([x.reshape(-1) for x in leaves]) if leaves else jnp.zeros((0,), jnp.float32)


@functools.partial(jax.jit, static_argnums=1)
def _split(vector: jax.Array, shapes: tuple) -> tuple:
    offsets = [0]
    for shape in shapes:
        offsets.append(offsets[-1] + math.prod(shape))
    return tuple(vector[a:b].reshape(shape) for a, b, shape in zip(offsets, offsets[1:], shapes))


def packer_from_config(config: ml_collections.ConfigDict, abstract: TrainState, shardings: TrainState,
                       replicated: jax.sharding.Sharding) -> tuple[LeafPacker | None, TrainState]:
    """The packer `config.train.pack_small_leaves` asks for (None for 0) and the shardings of the step's state."""
    max_size = int(config.train.pack_small_leaves)
    if max_size <= 0:
        return None, shardings
    packer = LeafPacker.for_trainable(abstract.trainable, shardings.trainable, max_size)
    return packer, packer.pack_shardings(shardings, replicated)
