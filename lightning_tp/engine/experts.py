"""Experts kept as parameters, each expert split over TP like an MLP.

Hugging Face's mixture-of-experts layers (Mixtral, Qwen-MoE, DeepSeek, OLMoE, Llama 4, ...) hold all
their experts in a few parameters with the experts on dim 0, e.g. ``gate_up_proj (E, 2I, H)`` and
``down_proj (E, H, I)``, and run them with a loop, a batched or a grouped matmul. Megatron's expert
tensor parallelism splits every expert as it splits a dense MLP: rank ``r`` holds the gate/up rows and
the down columns of its ``I/p`` hidden units of every expert. Each expert's output is then a sum over
ranks, and so is the layer's (the routing weights scale each expert's output, a linear step)::

    y = sum_r M(x, routing; theta_r)

:func:`~lightning_tp.engine.layers.split_parameters` replaces the module's parameters with this rank's shards (the module's own code
runs unchanged on them: it reads the widths from the tensors); :class:`ExpertsReduce` sums its
floating outputs over TP (all-reduce; backward: identity) and gives its floating inputs (the hidden
states and the routing weights) the all-reduce of their gradient in backward, as each rank's part of
the output gives only a part of it (Megatron's ``f`` and ``g`` around the experts).

That sum is the whole contract: every parameter that acts in the forward must be split this way.
A bias added after the down projection would be added once per rank, so planning refuses a module
with a parameter that is not split (:class:`~lightning_tp.policy.styles.Experts`); so would anything
the module adds without parameters (identity or zero-compute experts), which the parity self-check
catches.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lightning_tp._compat import tree_map
from lightning_tp.engine.comm import copy_to_tp, reduce_from_tp
from lightning_tp.engine.features import ModuleHooks


class ExpertsReduce(ModuleHooks):
    """Hooks that make a module whose parameters hold this rank's part of every expert compute the
    whole layer: floating inputs get a gradient summed over TP, floating outputs are summed over TP
    (:meth:`attach` registers them)."""

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group

    def _copy(self, x: Any) -> Any:
        if isinstance(x, Tensor) and x.is_floating_point():
            return copy_to_tp(x, self.group)  # forward: x; backward: all-reduce (each rank's grad is partial)
        return x

    def _sum(self, y: Any) -> Any:
        if isinstance(y, Tensor) and y.is_floating_point():
            return reduce_from_tp(y, self.group)  # forward: all-reduce of the partial outputs; backward: identity
        return y

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tree_map(self._copy, args), tree_map(self._copy, kwargs)

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return tree_map(self._sum, output)

    def __repr__(self) -> str:
        return "ExpertsReduce()"
