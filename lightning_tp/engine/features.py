"""A module that must read a whole feature dimension that tensor parallelism splits.

Inside a block whose projections are split by heads, the activations between the column and row
layers hold this rank's heads, ``(..., W/p)``. Most modules there act per head and run on the local
part as they are. A module that mixes the whole width does not: OLMo-2's ``q_norm`` / ``k_norm``
are RMSNorms over all query (key) heads together, ``(n_head * head_dim,)``. :class:`FeatureGather`
runs such a module on the gathered width and keeps this rank's part of its output::

    y_r = slice_r(M(all_gather(x_1 .. x_p)))

forward: all-gather the input's last dim, then keep this rank's chunk of the output's last dim;
backward: all-gather the output grads (each rank's downstream is the only user of its chunk, so the
gathered grad is complete), run ``M``'s backward on the whole width (identical on every rank), keep
this rank's chunk of the input grad. ``M``'s parameters stay whole and their gradients are complete
on every rank (no sum over TP). Any module class works (the module itself runs; its math is not
re-implemented); vLLM treats OLMo-2's q/k norms the same way.

With ``partial_grads`` (sequence parallelism, where the same module's gradients are partial when it
runs on the block's input) the backward stays local instead: this rank's output grad, zero
elsewhere, through ``M``'s backward, then a reduce-scatter of the input grad. Every rank's parameter
gradient then covers its own chunk of the output, and their sum over TP is the whole gradient.

A call whose input is not of this rank's width (the module used on replicated, full-width
activations, e.g. a pre-norm of width ``n_head * head_dim`` inside the block) runs unchanged.

Also here: :class:`TailGradSum`, for a whole layer whose output is split in features by its users
(multi-head latent attention), :class:`HeadSlice`, for a tensor of all heads that the model hands
to a block holding only this rank's (BLOOM's ALiBi biases), and :class:`ModuleHooks`, the
input/output hook pair these and :class:`~lightning_tp.engine.experts.ExpertsReduce` attach.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.utils.hooks import RemovableHandle

from lightning_tp._compat import tree_map
from lightning_tp.engine.comm import copy_to_tp, gather_from_sp, gather_from_tp, group_rank, group_size, scatter_to_tp


class ModuleHooks:
    """A forward pre-hook (``_pre``, which sees keyword arguments too) and a forward hook (``_post``)
    that rewrite a module's inputs and outputs, registered together by :meth:`attach`."""

    def attach(self, module: nn.Module) -> tuple[RemovableHandle, RemovableHandle]:
        """Register both hooks on ``module``."""
        return (
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post),
        )

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        raise NotImplementedError

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        raise NotImplementedError


class FeatureGather(ModuleHooks):
    """Hooks that run a module on the whole width ``width`` of a feature dim split over TP.

    Inputs whose last dim is this rank's width (``width / p``, floating point) are all-gathered on
    it; when any was, outputs whose last dim is ``width`` keep this rank's chunk. Inputs of any other
    width (the module called on replicated, full-width activations) pass through, and so does the
    output of such a call.

    Args:
        group: the tensor-parallel process group.
        width: the full (unsplit) width of the feature dim, ``n_head * head_dim`` for a q norm.
        partial_grads: leave each rank the part of the module's parameter gradients that its output
            chunk gives (summed over TP before the step); ``False``: complete gradients on every rank.
    """

    def __init__(self, group: ProcessGroup, width: int, partial_grads: bool = False) -> None:
        self.group, self.width, self.partial_grads = group, int(width), partial_grads
        self.local = self.width // group_size(group)
        self.offset = group_rank(group) * self.local
        self._gathered = False

    def _gather(self, x: Any) -> Any:
        if isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 1 and x.shape[-1] == self.local:
            self._gathered = True
            if self.partial_grads:  # backward: reduce-scatter (each rank's grad covers its output chunk)
                return gather_from_sp(x, self.group, -1, grad_reduce=True)  # (..., W)
            return gather_from_tp(x, self.group)  # (..., W); backward: this rank's chunk of a complete grad
        return x

    def _split(self, y: Any) -> Any:
        if isinstance(y, Tensor) and y.is_floating_point() and y.dim() >= 1 and y.shape[-1] == self.width:
            if self.partial_grads:
                return y.narrow(-1, self.offset, self.local).contiguous()  # (..., W/p); backward: zeros elsewhere
            return scatter_to_tp(y, self.group)  # (..., W/p); backward: all-gather (complete)
        return y

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self._gathered = False
        return tree_map(self._gather, args), tree_map(self._gather, kwargs)

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not self._gathered:
            return output
        self._gathered = False
        return tree_map(self._split, output)

    def __repr__(self) -> str:
        return f"FeatureGather(width={self.width}, local={self.local}, partial_grads={self.partial_grads})"


def gathered_width(module: nn.Module) -> int | None:
    """The width a module normalizes over, read from its own parameters: the size they share when
    all are 1-D vectors of one size (a norm's weight and bias), else ``None``."""
    sizes = {tuple(p.shape) for p in module.parameters(recurse=False)}
    if len(sizes) == 1 and len(shape := next(iter(sizes))) == 1:
        return shape[0]
    return None


class TailGradSum:
    """A forward hook on a whole (replicated) layer whose last ``n`` output features reach only this
    rank's heads: their gradient is summed over TP in backward (Megatron's ``f`` on that part alone).

    Multi-head latent attention (DeepSeek-V2) projects the hidden states to ``[c_kv | k_rope]``:
    ``c_kv`` feeds a column layer (whose backward already sums its input gradient over TP), while the
    shared rotary key ``k_rope`` goes straight to this rank's heads, so its gradient covers them
    only. Summing the whole output's gradient would count ``c_kv``'s once per rank.
    """

    def __init__(self, group: ProcessGroup, n: int) -> None:
        self.group, self.n = group, int(n)

    def attach(self, module: nn.Module) -> RemovableHandle:
        return module.register_forward_hook(self._post)

    def _post(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        head, tail = output.split([output.shape[-1] - self.n, self.n], dim=-1)
        return torch.cat([head, copy_to_tp(tail, self.group)], dim=-1)

    def __repr__(self) -> str:
        return f"TailGradSum(n={self.n})"


def forward_parameters(module: nn.Module) -> list[str]:
    """The names of ``module.forward``'s parameters, in order. A forward replaced on the instance by a
    pass-through wrapper (``*args, **kwargs``: activation checkpointing's) is read from its class."""
    params = inspect.signature(module.forward).parameters
    if all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()) and "forward" in vars(module):
        return list(inspect.signature(type(module).forward).parameters)[1:]  # without self
    return list(params)


class HeadSlice:
    """A forward pre-hook on a block whose projections are split by heads: tensor arguments that
    hold one entry per head of the whole model, made outside the block (BLOOM's ALiBi biases,
    ``(batch * n_head, 1, kv_len)``, built once from all heads by the model and handed to every
    layer), are cut to this rank's heads. ``inputs`` maps the argument's name in the block's
    ``forward`` to the model's head count; the tensor must be 3-D, dim 0 read as ``(-1, n_head)``,
    batch-major (a tensor without a batch, ``(n_head, q, kv)``, is the case ``-1 = 1``; a 4-D
    ``(batch, n_head, ...)`` tensor is refused, as its batch could pass for heads), and rank ``r``
    keeps heads ``[r * n_head / p, (r + 1) * n_head / p)``, the query heads its split projections compute. A
    ``None`` argument (Falcon without ALiBi) passes. A tensor that requires grad gets its gradient
    summed over TP in backward (each rank's covers its heads only)."""

    def __init__(self, group: ProcessGroup, inputs: dict[str, int]) -> None:
        self.group, self.inputs = group, dict(inputs)

    def attach(self, module: nn.Module) -> RemovableHandle:
        names = forward_parameters(module)
        self.positions = {name: names.index(name) for name in self.inputs if name in names}
        return module.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _slice(self, name: str, x: Any) -> Any:
        if not isinstance(x, Tensor):
            return x
        heads, tp = self.inputs[name], group_size(self.group)
        if x.dim() != 3 or x.shape[0] % heads:
            raise ValueError(
                f"{name!r} of shape {tuple(x.shape)} does not hold {heads} heads on dim 0 as (batch * heads, q, kv), "
                "the layout cut to this rank's heads (BLOOM's ALiBi). Map this block's projections to 'replicate' in "
                "the policy (it then gets all heads), or give its forward this rank's heads yourself."
            )
        local = heads // tp
        if x.requires_grad:
            x = copy_to_tp(x, self.group)
        start = group_rank(self.group) * local
        return x.unflatten(0, (-1, heads))[:, start : start + local].flatten(0, 1)

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, kwargs = list(args), dict(kwargs)
        for name, position in self.positions.items():
            if name in kwargs:
                kwargs[name] = self._slice(name, kwargs[name])
            elif position < len(args):
                args[position] = self._slice(name, args[position])
        return tuple(args), kwargs

    def __repr__(self) -> str:
        return f"HeadSlice(inputs={self.inputs})"
