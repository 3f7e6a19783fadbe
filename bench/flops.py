"""Model FLOPs counted the way torch's FlopCounterMode counts them: matmuls and convolutions only (forward and
backward, 2 FLOPs per multiply-add), by walking the jaxpr of a function. Elementwise work is not counted."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract = math.prod(lhs[d] for d in lc)
    out = math.prod(eqn.outvars[0].aval.shape)
    return 2.0 * out * contract


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    kernel_spatial = math.prod(rhs[d] for d in dn.rhs_spec[2:])
    in_features = rhs[dn.rhs_spec[1]]
    out = math.prod(eqn.outvars[0].aval.shape)
    return 2.0 * out * kernel_spatial * in_features


def _jaxpr_flops(jaxpr: core.Jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        mult = eqn.params.get("length", 1) if name == "scan" else 1
        for p in eqn.params.values():
            subs = p if isinstance(p, (list, tuple)) else [p]
            for sub in subs:
                if isinstance(sub, core.ClosedJaxpr):
                    total += mult * _jaxpr_flops(sub.jaxpr)
                elif isinstance(sub, core.Jaxpr):
                    total += mult * _jaxpr_flops(sub)
    return total


def count_flops(fn: Callable, *args: Any) -> float:
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
