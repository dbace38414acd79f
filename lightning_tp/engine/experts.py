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
the output gives only a part of it (Megatron's ``f`` and ``g`` around the experts). Under sequence
parallelism it all-gathers the tokens' inputs on dim 0 instead and reduce-scatters the output there.

That sum is the whole contract: every parameter that acts in the forward must be split this way,
or act on one rank only. A bias added after the down projection (GPT-OSS's ``down_proj_bias``) would
be added once per rank; :func:`act_once` keeps it whole on every rank and lets the module read it as
itself on the TP group's first rank and as zeros on the others (so the sum over TP adds it once; its
gradient, complete on the first rank and zero elsewhere, is marked partial and summed over TP).
Planning refuses a module with a parameter given neither (:class:`~lightning_tp.policy.styles.Experts`);
anything the module adds without parameters (identity or zero-compute experts) would be summed once
per rank too, which the parity self-check catches.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lightning_tp._compat import own_parameters, tree_leaves, tree_map
from lightning_tp.engine.comm import (
    all_gather_dim,
    copy_to_tp,
    gather_from_sp,
    group_rank,
    group_size,
    reduce_from_tp,
    reduce_scatter_to_sp,
    sequence_whole,
)
from lightning_tp.engine.features import ModuleHooks
from lightning_tp.engine.sharding import mark_partial_grad
from lightning_tp.errors import ShardingError


class ExpertsReduce(ModuleHooks):
    """Hooks that make a module whose parameters hold this rank's part of every expert compute the
    whole layer: floating inputs get a gradient summed over TP, floating outputs are summed over TP
    (:meth:`attach` registers them).

    Under sequence parallelism (``sequence_parallel=True``) each rank's inputs are its chunk of the
    tokens: every tensor input that holds them on dim 0 (hidden states, routing weights, expert
    indices: as many rows as the first floating input of two or more dims) is all-gathered there
    (backward: the floating ones' gradients reduce-scattered, each rank's being partial), so each
    rank runs its part of every expert on every token, and the floating outputs with those rows are
    reduce-scattered on dim 0 (summed over TP, each rank keeping its own tokens; other floating
    outputs are all-reduced). Experts act on each token alone, so the order the gather puts the
    tokens in does not matter as long as the inputs are token-major; a tensor input of another length
    on dim 0 (per-expert counts of tokens sorted by expert) is a ``ShardingError``. A sequence that
    runs whole (no gradients, a length that does not divide by TP:
    :func:`~lightning_tp.engine.comm.sequence_whole`) holds every token already: nothing is gathered,
    the outputs are all-reduced as without sequence parallelism."""

    def __init__(self, group: ProcessGroup, sequence_parallel: bool = False, name: str = "") -> None:
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.name = name
        self._rows = -1

    def _copy(self, x: Any) -> Any:
        if isinstance(x, Tensor) and x.is_floating_point():
            return copy_to_tp(x, self.group)  # forward: x; backward: all-reduce (each rank's grad is partial)
        return x

    def _gather(self, x: Any, rows: int) -> Any:
        if not isinstance(x, Tensor) or x.dim() == 0:
            return x
        if x.shape[0] != rows:
            raise ShardingError(
                f"module {self.name!r} (style 'experts') under sequence parallelism: a tensor input of shape "
                f"{tuple(x.shape)} does not hold the tokens on dim 0 (the hidden states have {rows} rows there); "
                "the experts gather every rank's tokens on dim 0. Pass token-major inputs (one row per token), or "
                "use sequence_parallel=False."
            )
        if x.is_floating_point():
            return gather_from_sp(x, self.group, dim=0)  # backward: reduce-scatter of the partial grads
        return all_gather_dim(x, self.group, 0)

    def _sum(self, y: Any) -> Any:
        if isinstance(y, Tensor) and y.is_floating_point():
            if self.sequence_parallel and y.dim() > 0 and y.shape[0] == self._rows:
                return reduce_scatter_to_sp(y, self.group, dim=0)  # this rank's tokens, summed over TP
            return reduce_from_tp(y, self.group)  # forward: all-reduce of the partial outputs; backward: identity
        return y

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not self.sequence_parallel:
            return tree_map(self._copy, args), tree_map(self._copy, kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        hidden = next((t for t in tensors if t.is_floating_point() and t.dim() >= 2), None)
        if hidden is not None and (
            sequence_whole(hidden.shape[-2]) if hidden.dim() >= 3 else sequence_whole(tokens=True)
        ):  # a sequence that runs whole: every token is here already
            self._rows = -1
            return tree_map(self._copy, args), tree_map(self._copy, kwargs)
        if hidden is None:
            raise ShardingError(
                f"module {self.name!r} (style 'experts') under sequence parallelism: none of its inputs is a floating "
                "tensor of two or more dims (the tokens' hidden states, one row per token) to gather. Use "
                "sequence_parallel=False."
            )
        rows = hidden.shape[0]
        self._rows = rows * group_size(self.group)  # the gathered tokens: outputs with as many rows go back
        return tree_map(lambda x: self._gather(x, rows), args), tree_map(lambda x: self._gather(x, rows), kwargs)

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return tree_map(self._sum, output)

    def __repr__(self) -> str:
        return f"ExpertsReduce(sequence_parallel={self.sequence_parallel})"


_ONCE_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}
_ONCE_DEPTH = "_tp_once_depth"  # how many calls of the module's forward are running (act_once)
_ONCE_SCALE = "_tp_once_scale"  # 1.0 on the TP group's first rank, 0.0 on the others


def _read_once(name: str) -> property:
    def read(self: nn.Module) -> Tensor | None:
        params = own_parameters(self)
        if name not in params:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        param = params[name]
        if param is None or not self.__dict__.get(_ONCE_DEPTH):
            return param
        return param * self.__dict__[_ONCE_SCALE]

    return property(read, doc=f"{name!r}; inside forward, as this rank adds it to a sum over TP (act_once)")


def _once_class(cls: type, names: tuple[str, ...]) -> type:
    """``cls`` with a read through the scale for each of ``names`` and a ``forward`` that counts the
    calls running (a class further derived from it, FSDP2's, still reaches ``cls.forward``)."""
    once = type(cls.__name__, (cls,), {n: _read_once(n) for n in names})

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        self.__dict__[_ONCE_DEPTH] = self.__dict__.get(_ONCE_DEPTH, 0) + 1
        try:
            return super(once, self).forward(*args, **kwargs)
        finally:
            self.__dict__[_ONCE_DEPTH] -= 1

    once.forward = forward
    return once


def act_once(module: nn.Module, names: tuple[str, ...], group: ProcessGroup) -> nn.Module:
    """Make ``module``'s own parameters ``names`` (kept whole on every rank) act on the TP group's
    first rank only: inside the module's forward its code reads each as itself there and as zeros on
    the other ranks, so an output summed over TP (:class:`ExpertsReduce`) adds it once. The parameter
    itself, its name, its ``state_dict`` entry and its value on every rank are unchanged, and outside
    the forward the attribute is the Parameter (what FSDP2, ``get_parameter`` and loaders read); its
    gradient (complete on the first rank, zero elsewhere) is marked partial, so it is summed over TP
    before clipping and the step.

    ``module``'s class becomes a subclass of it (``isinstance`` still holds) whose ``forward`` counts
    the calls running (an activation-checkpointing recompute of that forward included) and whose read
    of each name goes through that scale while one runs. Returns ``module``."""
    names = tuple(names)
    if not names:
        return module
    params = own_parameters(module)
    own = [n for n, p in params.items() if p is not None]
    for name in names:
        if name not in own:
            raise ValueError(
                f"act_once: {type(module).__name__} has no parameter {name!r} of its own (its parameters: {own})."
            )
        mark_partial_grad(params[name])
    cls = type(module)
    key = (cls, names)
    if key not in _ONCE_CLASSES:
        _ONCE_CLASSES[key] = _once_class(cls, names)
    module.__dict__[_ONCE_SCALE] = 1.0 if group_rank(group) == 0 else 0.0
    module.__class__ = _ONCE_CLASSES[key]
    return module
