"""Vocab-parallel cross entropy (Megatron) and the public :func:`cross_entropy`.

Each rank holds logits for a contiguous slice of the (padded) vocabulary, ``(..., Vp/p)``. The loss
of the full softmax is computed with two all-reduces of ``(...)``-sized tensors, never gathering the
logits:

    m   = max_r max_j z_rj                                  (all-reduce MAX)
    z_t = sum_r [t in rank r] (z_t - m)                     \
    S   = sum_r sum_j exp(z_rj - m)                          } one all-reduce SUM of stacked (...)
    L   = sum_r sum_j (z_rj - m)     (label smoothing only) /
    loss = (1 - eps) * (log S - z_t) + eps * (log S - L / V)

Padded vocabulary columns are excluded from every term (their probability is exactly 0), ignored
targets give loss 0 and grad 0, and ``reduction="mean"`` averages over non-ignored targets, like
``F.cross_entropy``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import sys
import types
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.distributed import ProcessGroup

from lightning_tp._compat import (
    DisableTorchFunctionSubclass,
    assert_async,
    compile_inputs_opaque,
    has_triton,
    storage_use_count,
    tensor_version,
    tree_leaves,
    tree_map,
    use_count,
)
from lightning_tp.engine.comm import all_reduce, group_rank, group_size
from lightning_tp.engine.compiled import FusedKernel

Reduction = Literal["mean", "sum", "none"]

# Ops through which sharded logits keep their meaning when the last dim is kept (a reshape, a
# cast, a slice of positions): the result is sharded logits again.
_LAYOUT_OPS = frozenset(
    {
        "view", "reshape", "flatten", "contiguous", "float", "double", "half", "bfloat16", "to",
        "type_as", "__getitem__", "clone", "detach", "view_as", "reshape_as", "squeeze", "unsqueeze",
        "requires_grad_", "retain_grad",
    }
)  # fmt: skip
# Elementwise ops with only scalar operands (temperature, logit soft-capping): applied to the shard.
_SCALAR_ELEMENTWISE = frozenset(
    {
        "add", "sub", "mul", "div", "true_divide", "neg", "tanh", "clamp", "clamp_min", "clamp_max",
        "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
        "__neg__", "add_", "sub_", "mul_", "div_", "tanh_", "clamp_", "__iadd__", "__isub__", "__imul__",
        "__itruediv__",
    }
)  # fmt: skip
# Metadata: answered by the local shard, no gather.
_METADATA = frozenset(
    {
        "size", "dim", "ndimension", "numel", "nelement", "is_floating_point", "is_complex", "element_size",
        "is_contiguous", "stride", "storage_offset", "data_ptr", "get_device", "untyped_storage",
        "register_hook", "__len__", "__hash__", "backward", "is_shared", "is_pinned", "_use_count",
        "as_subclass", "__deepcopy__", "_is_view", "is_conj", "is_neg", "_is_zerotensor", "is_inference",
        "is_signed", "has_names", "dim_order",
    }
)  # fmt: skip
_GATHERED_PROPERTIES = frozenset({"T", "mT", "H", "mH", "real", "imag"})
# Splits along a dim other than the vocabulary (LitGPT's chunked cross entropy: logits.split(128)) give sharded
# pieces; value: the position of the dim argument (default 0). Concatenating sharded logits along such a dim too.
_SPLITS = {"split": 2, "chunk": 2, "tensor_split": 2, "split_with_sizes": 2, "unbind": 1}
_CATS = frozenset({"cat", "concat", "concatenate"})
_CROSS_ENTROPY = {F.cross_entropy}
# Reductions over the vocabulary done on the shards (a z-loss's log Z, accuracy's argmax): (...)-sized collectives.
_VOCAB_REDUCTIONS = frozenset({"logsumexp", "special_logsumexp", "argmax"})


_FUSION_DEFAULT: contextvars.ContextVar[bool | None] = contextvars.ContextVar("lightning_tp_loss_fusion", default=None)


@contextlib.contextmanager
def loss_fusion_default(fused: bool | None):
    """Heads built inside this block (their :class:`LossWorkspace`) take ``fused`` as their choice of loss
    (the strategy's ``loss_fusion`` while it rewrites and verifies a model)."""
    token = _FUSION_DEFAULT.set(fused)
    try:
        yield
    finally:
        _FUSION_DEFAULT.reset(token)


class LossWorkspace:
    """The ``(..., Vp/p)`` buffer of the vocab-parallel loss, kept across steps by the LM head.

    The loss writes ``exp(z - M)`` into it and backward turns it into the logits' gradient in place.
    A fresh buffer of that size costs a page fault per 4 KiB page on CPU (the allocator returns
    blocks this large to the OS on free), measured at 10-90 ms per step for a 32 MiB slice; reusing
    one avoids that. The buffer is reused only when nothing else references it (no backward still
    pending, no grad kept by a hook, no view or alias), else a fresh one is made; on CUDA the
    caching allocator already recycles memory, so a fresh buffer is always used there.

    ``fused`` is the head's choice of loss (``MegatronTPStrategy(loss_fusion=)``): ``True`` the fused
    loss (no buffer), ``False`` the unfused one, ``None`` fused where Triton is (CUDA); by default the
    one of :func:`loss_fusion_default` where the head is built.
    """

    def __init__(self, fused: bool | None = None) -> None:
        self._buf: Tensor | None = None
        self.fused = fused if fused is not None else _FUSION_DEFAULT.get()

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A buffer of ``shape``: the kept one if it fits and is unreferenced, else a new one."""
        if self._fits(shape, dtype, device) and self._free():  # checked before any local reference exists
            return self._buf
        buf = torch.empty(shape, dtype=dtype, device=device)
        if device.type == "cpu":
            self._buf = buf
        return buf

    def _fits(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> bool:
        return (
            self._buf is not None
            and self._buf.shape == shape
            and self._buf.dtype == dtype
            and self._buf.device == device
        )

    def _free(self) -> bool:
        try:
            return (
                sys.getrefcount(self._buf) == 2  # self._buf and the argument: no other Python reference
                and use_count(self._buf) == 1  # no C++ holder (saved for backward, a view's base)
                and storage_use_count(self._buf) == 2  # no alias of the memory
            )
        except (AttributeError, RuntimeError):  # counters not available in this torch: never reuse
            return False


class VocabShardedLogits(Tensor):
    """Logits whose last dim is this rank's slice of the (padded) vocabulary, ``(..., Vp/p)``.

    Returned by a vocab-parallel LM head (the default, ``gather_output=False``). They are never
    silently wrong:

    * ``F.cross_entropy`` / ``nn.CrossEntropyLoss`` on them (``(N, Vp/p)`` logits, ``(N,)``
      targets; so also a Hugging Face model's own ``labels=`` loss) computes the vocab-parallel
      cross entropy: same value and gradient as on the dense logits, only ``(N,)``-sized
      reductions. Class weights or the legacy ``size_average``/``reduce`` use the gathered logits.
    * Reshapes, casts, position slices, splits and concatenations along another dim (LitGPT's
      chunked cross entropy: ``logits.split(128)``) keep the type; a reshape that names the full vocabulary
      (``logits.view(-1, config.vocab_size)``, as Hugging Face's loss does) is read as the local
      slice. Elementwise ops with scalar operands (temperature, soft-capping) run on the shard.
    * ``logsumexp`` (a z-loss's ``log Z``) and ``argmax`` (accuracy) over the vocabulary run on the shards
      with ``(...)``-sized collectives, the dense values (``logsumexp``'s gradient too).
    * Every other op (softmax, log_softmax, topk, max, sort, sampling, ...) gets
      the dense ``(..., V)`` logits, all-gathered (differentiably) on first use and kept, and
      returns a plain tensor (``repr`` shows the local shard: printing on one rank runs no collective). An in-place op that cannot run on the shard raises
      :class:`~lightning_tp.errors.ShardingError` instead of computing a wrong value.

    Metadata (``shape``, ``size()``, ``dim()``, ``dtype``) describes the local shard.

    ``torch.compile`` traces all of this (one graph, no gather for the loss; inside a compiled
    region a dense view is gathered each time an op needs it, not kept). Sharded logits that enter a
    compiled region from outside (an argument, or live across a graph break) are used eagerly
    there.
    """

    tp_group: ProcessGroup
    vocab_size: int
    workspace: LossWorkspace | None

    @staticmethod
    def wrap(
        local: Tensor, group: ProcessGroup, vocab_size: int, workspace: LossWorkspace | None = None
    ) -> VocabShardedLogits:
        out = local.as_subclass(VocabShardedLogits)
        out.tp_group, out.vocab_size, out.workspace = group, vocab_size, workspace
        return out

    def gathered(self) -> Tensor:
        """The dense ``(..., V)`` logits (all-gather over TP, padding dropped; differentiable),
        kept and reused until this tensor or the kept copy changes in place, or autograd needs a
        copy that was gathered without it. Collective: every TP rank must call it."""
        from lightning_tp.engine.comm import gather_from_tp

        kept = self.kept_gather()
        if kept is not None:
            return kept
        traced = torch.compiler.is_compiling()  # traced: nothing kept (a tensor's __dict__ is not traceable)
        with DisableTorchFunctionSubclass():
            dense = gather_from_tp(self, self.tp_group)[..., : self.vocab_size]  # (..., V)
        if not traced:
            self.__dict__["_gathered"] = (dense, tensor_version(self), tensor_version(dense))
        return dense

    def kept_gather(self) -> Tensor | None:
        """The dense logits an earlier :meth:`gathered` kept, if still valid (no collective), else ``None``."""
        cached = None if torch.compiler.is_compiling() else self.__dict__.get("_gathered")
        if cached is None:
            return None
        dense, version, dense_version = cached
        tracked = not (torch.is_grad_enabled() and self.requires_grad and dense.grad_fn is None)
        if version == tensor_version(self) and dense_version == tensor_version(dense) and tracked:
            return dense  # unchanged on both sides, and gathered with autograd when it is needed now
        return None

    def __repr__(self, *, tensor_contents=None) -> str:  # no collective: printing on one rank must not hang
        with DisableTorchFunctionSubclass():
            local = Tensor.__repr__(self.as_subclass(Tensor))
        return f"VocabShardedLogits(this rank's {self.shape[-1]} of {self.vocab_size} vocabulary columns:\n{local})"

    def __format__(self, spec: str) -> str:  # f"{logits}": local too
        return self.__repr__() if not spec else format(self.as_subclass(Tensor), spec)

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "VocabShardedLogits hold this rank's vocabulary slice and its process group and cannot be pickled "
            "(torch.save, returning them from a spawned worker): gather them first with "
            "lightning_tp.gather_logits(logits), or save the local shard with logits.as_subclass(torch.Tensor)."
        )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Everything below runs with the subclass's dispatch off: reading the shard's metadata must not come
        # back here (under torch.compile, a frame that re-enters itself on every read never ends).
        with DisableTorchFunctionSubclass():
            return _dispatch(func, args, kwargs or {})


# Sharded logits that enter a compiled region from outside (an argument, or live across a graph break) are used
# eagerly there: a graph input of this type would reach the graph's aten ops through __torch_function__.
compile_inputs_opaque(VocabShardedLogits)


def _dispatch(func, args: tuple, kwargs: dict):
    """``VocabShardedLogits.__torch_function__``'s decision (the subclass's dispatch is off)."""
    name = getattr(func, "__name__", "")
    src = _first_sharded(args, kwargs)
    if src is None:
        return func(*args, **kwargs)
    if name == "__get__":  # a property: metadata of the shard, except transposes / views of values
        owner = getattr(func, "__self__", None)
        if isinstance(owner, types.FunctionType) and torch.compiler.is_compiling():
            # a Python-defined Tensor method looked up on the logits (logits.split): only Dynamo asks, and it
            # cannot trace the function's __get__; the same method, bound
            return functools.partial(owner, args[0])
        prop = getattr(owner, "__name__", "")
        if prop not in _GATHERED_PROPERTIES:
            return func(*args, **kwargs)
    elif name in _METADATA or name == "__set__":  # a property set (logits.requires_grad = True): on the shard
        return func(*args, **kwargs)
    elif func in _CROSS_ENTROPY and (routed := _route_cross_entropy(args, kwargs)) is not None:
        return routed
    elif name in _VOCAB_REDUCTIONS and (reduced := _reduce_vocab(name, args, kwargs, src)) is not None:
        return reduced
    elif name in _SPLITS and args and args[0] is src and not _is_last_dim(_dim_arg(name, args, kwargs), src.dim()):
        pieces = func(*args, **kwargs)
        if all(p.shape[-1] == src.shape[-1] for p in pieces):  # else the vocabulary was split: redone dense below
            return tuple(_like(p, src) for p in pieces)
    elif name in _CATS and (joined := _cat(func, args, kwargs)) is not None:
        return joined
    elif (name in _LAYOUT_OPS and args and args[0] is src and _keeps_vocab_dim(name, args, kwargs, src)) or (
        name in _SCALAR_ELEMENTWISE and _scalar_operands(args, kwargs, src)
    ):
        if name in ("view", "reshape"):
            args = (args[0], *_local_shape(args[1:], src))
        out = func(*args, **kwargs)
        if isinstance(out, Tensor) and out.dim() > 0 and out.shape[-1] == src.shape[-1]:
            if out is src:  # in place
                if not torch.compiler.is_compiling():  # traced: nothing is kept
                    src.__dict__.pop("_gathered", None)
                return src
            return _like(out, src)
        if name[-1:] == "_" or out is src:
            return out
        # the op moved or merged the vocabulary dim: do it again on the dense logits
    in_place = name[-1:] == "_" and name[:2] != "__" or name in ("__setitem__", "__iadd__", "__imul__")
    if in_place and args and args[0] is src:  # writing into a plain tensor from sharded logits gathers them
        from lightning_tp.errors import ShardingError

        raise ShardingError(
            f"in-place {name!r} on vocab-sharded logits (this rank holds {src.shape[-1]} of {src.vocab_size} "
            "vocabulary columns) cannot give the dense result. Gather first: "
            "`logits = lightning_tp.gather_logits(logits)`, or build the LM head with gather_output=True "
            "(policy entry {'style': 'vocab', 'gather_output': True})."
        )
    args, kwargs = _replace_sharded((args, kwargs))
    return func(*args, **kwargs)


def _reduce_vocab(name: str, args: tuple, kwargs: dict, src: VocabShardedLogits) -> Tensor | None:
    """``logsumexp`` / ``argmax`` over the vocabulary dim of ``src`` without gathering it (``(...)``-sized
    collectives only; at TP 1 torch's own op on the valid columns, so its double backward and forward-mode
    AD too); ``None`` where the gathered logits answer instead: another dim or form (``out=``), non-float
    logits, or dense logits already kept (no collective then, as before)."""
    if not args or args[0] is not src or "out" in kwargs or not src.is_floating_point():
        return None
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", kwargs.get("keepdims", False))
    if name != "argmax" and isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    if not isinstance(dim, int) or isinstance(dim, bool) or not _is_last_dim(dim, src.dim()):
        return None
    if src.kept_gather() is not None:
        return None
    local = _plain(src)
    if group_size(src.tp_group) == 1:
        valid = local[..., : src.vocab_size]
        return valid.argmax(-1, keepdim=keepdim) if name == "argmax" else torch.logsumexp(valid, -1, keepdim=keepdim)
    if name == "argmax":
        out = _vocab_parallel_argmax(local, src.tp_group, src.vocab_size)
    else:
        fused = _fused(None, src.workspace, local.device)
        out = _VocabParallelLogSumExp.apply(local, src.tp_group, src.vocab_size, fused)
        if local.is_cuda and torch.is_autocast_enabled("cuda") and local.dtype in (torch.float16, torch.bfloat16):
            out = out.float()  # logsumexp is on CUDA autocast's float32 list
    return out.unsqueeze(-1) if keepdim else out


def _global_shift(zmax: Tensor) -> Tensor:
    """What every rank's ``exp`` is taken against: the global max, or 0 where it is infinite (torch's
    ``logsumexp``: a row with ``+inf`` has ``logsumexp`` ``+inf``, one of all ``-inf`` has ``-inf``)."""
    return torch.where(zmax.isinf(), torch.zeros_like(zmax), zmax)


def _rank_sum(local_max: Tensor, local_sum: Tensor, shift: Tensor) -> Tensor:
    """This rank's ``sum_j exp(z_j - shift)`` from its sum against its own max (against 0 where that is
    infinite): 0 where all its columns are ``-inf``; a NaN max, even one the MAX all-reduce dropped, makes it
    NaN."""
    own = torch.where(local_max.isinf(), torch.zeros_like(local_max), local_max)
    return torch.where(local_max == float("-inf"), torch.zeros_like(local_sum), local_sum * (own - shift).exp())


class _VocabParallelLogSumExp(torch.autograd.Function):
    """``logsumexp`` over the vocabulary of sharded logits (a z-loss's ``log Z``): the cross entropy's
    forward without the target (the fused kernels, compiled where the head's loss is fused; two
    all-reduces of ``(...)``); gradient ``softmax(z)`` on each rank's columns, 0 on padding. Computed in
    float32 or wider, returned in the logits' dtype."""

    @staticmethod
    def forward(ctx, logits, group, vocab_size, fused):
        _, n_valid = _columns(logits, group, vocab_size)
        stats_fn = _local_stats if fused else _local_stats.fn
        rows = _rows(logits)
        anywhere = torch.zeros(rows.shape[:-1], dtype=torch.long, device=logits.device)  # (no target)
        stats = stats_fn(rows, anywhere, n_valid, False, _compute_dtype(logits))
        local_max, local_sum = (t.reshape(logits.shape[:-1]) for t in stats[:2])
        shift = _global_shift(all_reduce(local_max, group, dist.ReduceOp.MAX))
        sum_exp = all_reduce(_rank_sum(local_max, local_sum, shift), group)
        ctx.save_for_backward(logits, shift, sum_exp)
        ctx.n_valid, ctx.fused = n_valid, fused
        return (sum_exp.log() + shift).to(logits.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, shift, sum_exp = ctx.saved_tensors
        rows = _rows(logits)
        per_row = (shift, grad_out.to(shift.dtype) / sum_exp)
        shift, scale = (t.reshape(rows.shape[:-1]) for t in per_row)
        nothing = torch.zeros_like(scale)
        anywhere = torch.zeros(rows.shape[:-1], dtype=torch.long, device=logits.device)
        grad_fn = _softmax_grad if ctx.fused else _softmax_grad.fn
        grad = grad_fn(rows, shift, scale, nothing, anywhere, ctx.n_valid, None)
        return grad.view(logits.shape), None, None, None


def _vocab_parallel_argmax(logits: Tensor, group: ProcessGroup, vocab_size: int) -> Tensor:
    """``argmax`` over the vocabulary of sharded float logits, as on the dense ones (the first maximum; a
    NaN counts as the maximum, the first NaN wins): each rank's first maximum, then one all-gather of
    ``(...)``-sized values and indices (float64: exact for both)."""
    from lightning_tp.engine.comm import all_gather_dim

    start, n_valid = _columns(logits, group, vocab_size)
    lead = logits.shape[:-1]
    if n_valid > 0:
        index = logits[..., :n_valid].argmax(dim=-1)  # (...)
        value = logits.detach().gather(-1, index.unsqueeze(-1)).squeeze(-1)
    else:  # padding only: never chosen (the ranks before hold every column)
        index = torch.zeros(lead, dtype=torch.long, device=logits.device)
        value = logits.detach().new_full(lead, float("-inf"))
    packed = torch.stack([value.double(), (index + start).double()])  # (2, ...)
    both = all_gather_dim(packed.unsqueeze(0), group, 0)  # (p, 2, ...) in rank order: column order
    values, indices = both[:, 0], both[:, 1]
    nan = values.isnan()
    first_nan = nan.int().argmax(dim=0)
    first_max = (values == values.amax(dim=0, keepdim=True)).int().argmax(dim=0)
    rank = torch.where(nan.any(dim=0), first_nan, first_max)
    return indices.gather(0, rank.unsqueeze(0)).squeeze(0).long()


def _like(local: Tensor, src: VocabShardedLogits) -> VocabShardedLogits:
    """``local`` (a result of an op on ``src``'s shard that kept the vocabulary dim) as sharded logits like ``src``."""
    return VocabShardedLogits.wrap(local, src.tp_group, src.vocab_size, src.workspace)


def _dim_arg(name: str, args: tuple, kwargs: dict) -> int:
    pos = _SPLITS[name]
    return args[pos] if len(args) > pos else kwargs.get("dim", kwargs.get("axis", 0))  # numpy's name too


def _is_last_dim(dim: int, ndim: int) -> bool:
    return (dim + ndim if dim < 0 else dim) == ndim - 1


def _cat(func, args: tuple, kwargs: dict) -> Tensor | None:
    """``torch.cat`` of sharded logits of one vocabulary along another dim (sharded), else ``None``."""
    parts = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
    if "out" in kwargs or not isinstance(parts, (list, tuple)) or not parts:  # out=: a dense buffer, filled densely
        return None
    if not all(isinstance(p, VocabShardedLogits) for p in parts):
        return None
    first = parts[0]
    same = all(p.tp_group is first.tp_group and p.vocab_size == first.vocab_size for p in parts)
    if not same or not isinstance(dim, int) or _is_last_dim(dim, first.dim()):
        return None
    return _like(func(*args, **kwargs), first)


def _keeps_vocab_dim(name: str, args: tuple, kwargs: dict, src: VocabShardedLogits) -> bool:
    """Whether a layout op on ``src`` leaves its last (vocabulary) dim whole and last."""
    last = src.dim() - 1
    if name in ("squeeze", "unsqueeze"):
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if dim is None:
            return name == "unsqueeze" or src.shape[-1] != 1
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        return all(d % (src.dim() + (name == "unsqueeze")) < last + (name == "unsqueeze") for d in dims)
    if name == "flatten":
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        return end % src.dim() != last
    if name in ("view", "reshape"):
        sizes = _local_shape(args[1:], src)
        if not sizes or any(isinstance(x, torch.dtype) for x in sizes):
            return name == "view" and bool(sizes)  # view(dtype): same layout
        lead = math.prod([x for x in sizes[:-1] if x != -1])
        return sizes[-1] == src.shape[-1] or (
            sizes[-1] == -1 and -1 not in sizes[:-1] and lead * src.shape[-1] == src.numel()
        )
    if name == "__getitem__":
        return _index_keeps_last(args[1], src.dim())
    return True


def _index_keeps_last(index, ndim: int) -> bool:
    """Whether ``x[index]`` leaves the last dim of ``x`` whole (a full slice there, or not reached)."""
    items = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in items):
        after = items[[i is Ellipsis for i in items].index(True) + 1 :]
        after = [i for i in after if i is not None]
        return not after or (isinstance(after[-1], slice) and after[-1] == slice(None))
    used = sum(i.dim() if isinstance(i, Tensor) and i.dtype == torch.bool else 1 for i in items if i is not None)
    if used < ndim:
        return True
    last = [i for i in items if i is not None][-1]
    return used == ndim and isinstance(last, slice) and last == slice(None)


def _plain(t: VocabShardedLogits) -> Tensor:
    """The local shard as a plain tensor (the same values and autograd history)."""
    if torch.compiler.is_compiling():  # traced: as_subclass(Tensor) is not, a view under the disabled subclass is
        with DisableTorchFunctionSubclass():
            return t.view(t.shape)
    return t.as_subclass(Tensor)


def _first_sharded(args, kwargs) -> VocabShardedLogits | None:
    return next((a for a in tree_leaves((args, kwargs)) if isinstance(a, VocabShardedLogits)), None)


def _replace_sharded(tree):
    return tree_map(lambda a: a.gathered() if isinstance(a, VocabShardedLogits) else a, tree)


def _scalar_operands(args, kwargs, src: VocabShardedLogits) -> bool:
    # a 0-dim tensor that needs a gradient (a learned logit scale) would get only this shard's share
    return all(
        a is src or not isinstance(a, Tensor) or (a.dim() == 0 and not a.requires_grad)
        for a in tree_leaves((args, kwargs))
    )


def _local_shape(shape: tuple, src: VocabShardedLogits) -> tuple:
    """A reshape's sizes with a last size naming the full vocabulary read as the local slice."""
    sizes = list(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else list(shape)
    if sizes and sizes[-1] == src.vocab_size and src.shape[-1] != src.vocab_size:
        sizes[-1] = src.shape[-1]
    return tuple(sizes)


def _route_cross_entropy(args, kwargs) -> Tensor | None:
    """``F.cross_entropy(sharded (N, Vp/p) or (Vp/p,), target, ...)`` as the vocab-parallel loss,
    or ``None`` when it needs the dense logits (class weights, legacy options, class dim not last)."""
    names = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
    bound = dict(zip(names, args, strict=False)) | kwargs
    logits, target = bound.get("input"), bound.get("target")
    if not isinstance(logits, VocabShardedLogits) or isinstance(target, VocabShardedLogits):
        return None
    if any(bound.get(k) is not None for k in ("weight", "size_average", "reduce")):
        return None
    if logits.dim() not in (1, 2) or target.is_floating_point() or target.shape != logits.shape[:-1]:
        return None  # probabilities as targets or a class dim that is not the last
    return cross_entropy(
        logits,
        target,
        ignore_index=bound.get("ignore_index", -100),
        label_smoothing=bound.get("label_smoothing", 0.0),
        reduction=bound.get("reduction", "mean"),
    )


def _check_targets(target: Tensor, vocab_size: int, ignore_index: int) -> None:
    if target.device.type == "meta" or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab_size))
    # On a GPU a device-side assert: no synchronisation on every step (an error, not a target no rank holds,
    # whose loss would silently miss its logit). Traced by torch.compile: the same check, kept in the graph.
    if target.device.type != "cpu" or torch.compiler.is_compiling():
        assert_async(~bad.any(), f"a target is out of bounds for a vocabulary of {vocab_size} classes "
                                 f"(and is not ignore_index={ignore_index}).")  # fmt: skip
        return
    if bool(bad.any()):
        value = int(target[bad][0])
        raise IndexError(f"target {value} is out of bounds for a vocabulary of {vocab_size} classes.")


@FusedKernel
def _local_stats(logits: Tensor, local_t: Tensor, n_valid: int, smoothing: bool, cdtype: torch.dtype):
    """One pass over this rank's ``(..., m)`` logits, per row: the local max ``m_r`` over the valid
    columns, ``sum_j exp(z_j - m_r)`` (against 0 where ``m_r`` is infinite), the logit at ``local_t`` and
    (``smoothing``) ``sum_j z_j``, in ``cdtype``. A row with no valid column (``n_valid`` 0) has max
    ``-inf`` and sum 0."""
    z = logits.to(cdtype)
    m = z.shape[-1]
    masked = z if n_valid == m else z.masked_fill(torch.arange(m, device=z.device) >= n_valid, float("-inf"))
    local_max = masked.amax(dim=-1)
    # against 0 where the max is infinite (as torch's logsumexp): all -inf, sum 0; a +inf, sum +inf; NaN stays NaN
    shift = torch.where(local_max.isinf(), torch.zeros_like(local_max), local_max)
    out = [local_max, (masked - shift.unsqueeze(-1)).exp().sum(dim=-1), z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1)]
    if smoothing:
        out.append(z[..., :n_valid].sum(dim=-1))
    return tuple(out)


@FusedKernel
def _softmax_grad(logits: Tensor, zmax: Tensor, scale: Tensor, target_grad: Tensor, local_t: Tensor, n_valid: int,
                  smooth: Tensor | None) -> Tensor:  # fmt: skip
    """``d loss / d z`` in one pass over the logits, in their dtype: ``scale * exp(z - M)``, plus
    ``target_grad`` at ``local_t``, minus ``smooth`` on the valid columns, 0 on the padding ones."""
    z = logits.to(zmax.dtype)
    cols = torch.arange(z.shape[-1], device=z.device)
    grad = (z - zmax.unsqueeze(-1)).exp() * scale.unsqueeze(-1)
    grad = torch.where(cols == local_t.unsqueeze(-1), grad + target_grad.unsqueeze(-1), grad)
    if smooth is not None:
        grad = grad - smooth.unsqueeze(-1)
    if n_valid < z.shape[-1]:
        grad = grad.masked_fill(cols >= n_valid, 0.0)
    return grad.to(logits.dtype)


def _columns(logits: Tensor, group: ProcessGroup, vocab_size: int) -> tuple[int, int]:
    """``(start, n_valid)``: the first vocabulary column this rank's ``(..., m)`` logits hold and how many of
    its columns are real (the rest, at or past ``vocab_size``, are padding)."""
    m = logits.shape[-1]
    start = group_rank(group) * m
    return start, max(0, min(m, vocab_size - start))


def _rows(logits: Tensor) -> Tensor:
    """The logits as the kernels take them: detached (one compiled variant whatever the grad mode) and,
    where a view allows (no copy), ``(N, m)`` (one variant for any batch shape)."""
    z = logits.detach()
    if z.dim() == 2:
        return z
    try:
        return z.view(-1, z.shape[-1])
    except RuntimeError:  # not viewable as rows (a slice of positions, transposed logits): as it is
        return z


def fused_kernels_failed() -> bool:
    """Whether the fused loss's kernels stopped compiling in this process (a warning said why; they run
    eagerly since)."""
    return _local_stats._failed or _softmax_grad._failed


def _targets_here(target: Tensor, start: int, n_valid: int) -> tuple[Tensor, Tensor]:
    """``(in_range, local_t)``: whether this rank holds each row's target, and its local column (0 if not)."""
    in_range = (target >= start) & (target < start + n_valid)  # (...)
    return in_range, (target - start).masked_fill(~in_range, 0)


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype


def _loss_from_sums(sums: Tensor, target: Tensor, ignore_index: int, eps: float, vocab_size: int):
    """``(loss, sum_exp)`` per row from the all-reduced ``[z_t - M, (sum_z - V M), sum_exp]``."""
    z_t, sum_exp = sums[0], sums[-1]
    log_z = sum_exp.log()
    loss = log_z - z_t
    if eps > 0:
        loss = (1.0 - eps) * loss + eps * (log_z - sums[1] / vocab_size)
    return loss.masked_fill(target == ignore_index, 0.0), sum_exp


class _FusedVocabParallelCrossEntropy(torch.autograd.Function):
    """The vocab-parallel loss in two passes over the logits and no logits-sized buffer (Megatron's
    ``cross_entropy_loss_fusion``): forward reads them once (:func:`_local_stats`: the local max and
    the sum of ``exp`` against it, rescaled to the global max after its all-reduce), backward once more
    and writes the gradient (:func:`_softmax_grad`, recomputing ``exp(z - M)``); both are compiled
    kernels (:class:`~lightning_tp.engine.compiled.FusedKernel`). Saves the logits themselves, so a
    second backward (``retain_graph=True``) is correct. Where ``torch.compile`` traces the loss, this
    is the form it traces (the compiler fuses it with what is around)."""

    @staticmethod
    def forward(ctx, logits, target, group, vocab_size, ignore_index, label_smoothing):
        start, n_valid = _columns(logits, group, vocab_size)
        in_range, local_t = _targets_here(target, start, n_valid)
        rows = _rows(logits)
        stats = _local_stats(
            rows, local_t.reshape(rows.shape[:-1]), n_valid, label_smoothing > 0, _compute_dtype(logits)
        )
        local_max, local_sum, z_t = (t.reshape(target.shape) for t in stats[:3])
        # the global max itself, as log_softmax shifts: a row with a +inf logit has a NaN loss, as F.cross_entropy's
        zmax = all_reduce(local_max, group, dist.ReduceOp.MAX)  # (...)
        here = _rank_sum(local_max, local_sum, zmax)  # this rank's sum_j exp(z_j - M)
        terms = [(z_t - zmax).masked_fill(~in_range, 0.0)]
        if label_smoothing > 0:
            terms.append(stats[3].reshape(target.shape) - n_valid * zmax)
        terms.append(here)
        sums = all_reduce(torch.stack(terms), group)  # (2 or 3, ...)
        loss, sum_exp = _loss_from_sums(sums, target, ignore_index, label_smoothing, vocab_size)
        ctx.save_for_backward(logits, zmax, sum_exp, local_t, in_range, target == ignore_index)
        ctx.n_valid, ctx.eps, ctx.vocab_size = n_valid, label_smoothing, vocab_size
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        logits, zmax, sum_exp, local_t, in_range, ignored = ctx.saved_tensors
        g = grad_loss.masked_fill(ignored, 0.0)  # (...)
        # d loss / d z_j = g * (softmax_j - (1 - eps) [j = t] - eps / V)
        target_grad = g * in_range * -(1.0 - ctx.eps)
        smooth = g * (ctx.eps / ctx.vocab_size) if ctx.eps > 0 else None
        rows = _rows(logits)
        flat = (zmax, g / sum_exp, target_grad, local_t) + (() if smooth is None else (smooth,))
        zmax, scale, target_grad, local_t, *smooth = (t.reshape(rows.shape[:-1]) for t in flat)
        grad = _softmax_grad(rows, zmax, scale, target_grad, local_t, ctx.n_valid, smooth[0] if smooth else None)
        return grad.view(logits.shape), None, None, None, None, None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """The unfused loss, for eager CPU work: one ``(..., m)`` buffer in all, ``exp(z - M)``, made in
    forward and turned into the gradient in place in backward (large fresh CPU buffers cost page
    faults on every step; the workspace keeps one; the logits themselves are only read, never copied
    or modified). Because backward consumes that buffer, a second backward through the same loss
    (``retain_graph=True``) raises autograd's "modified by an inplace operation" error instead of
    returning a wrong gradient."""

    @staticmethod
    def forward(ctx, logits, target, group, vocab_size, ignore_index, label_smoothing, workspace):
        m = logits.shape[-1]  # local (padded) vocab slice
        start, n_valid = _columns(logits, group, vocab_size)
        cdtype = _compute_dtype(logits)
        valid = logits[..., :n_valid]  # (..., n_valid) view: padded vocab columns excluded

        if n_valid > 0:
            local_max = valid.amax(dim=-1).to(cdtype)  # (...)
        else:
            local_max = logits.new_full(logits.shape[:-1], float("-inf"), dtype=cdtype)
        zmax = all_reduce(local_max, group, dist.ReduceOp.MAX)  # (...)

        in_range, local_t = _targets_here(target, start, n_valid)
        z_t = logits.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).to(cdtype) - zmax  # (...)
        terms = [z_t.masked_fill(~in_range, 0.0)]
        if label_smoothing > 0:
            terms.append(valid.sum(dim=-1, dtype=cdtype) - n_valid * zmax)  # (...) sum_j (z_j - M)
        exp = None if workspace is None else workspace.take(logits.shape, cdtype, logits.device)
        exp = torch.sub(logits, zmax.unsqueeze(-1), out=exp)  # (..., m) in cdtype: the one large buffer
        exp.exp_()
        if n_valid < m:
            exp[..., n_valid:] = 0.0  # padded vocab columns: probability 0
        terms.append(exp.sum(dim=-1))
        sums = all_reduce(torch.stack(terms), group)  # (2 or 3, ...)
        loss, sum_exp = _loss_from_sums(sums, target, ignore_index, label_smoothing, vocab_size)

        ctx.save_for_backward(exp, sum_exp, local_t, in_range, target == ignore_index)
        ctx.n_valid, ctx.eps, ctx.vocab_size, ctx.in_dtype = n_valid, label_smoothing, vocab_size, logits.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        exp, sum_exp, local_t, in_range, ignored = ctx.saved_tensors
        g = grad_loss.masked_fill(ignored, 0.0)  # (...)
        # d loss / d z_j = g * (softmax_j - (1 - eps) [j = t] - eps / V)
        target_grad = (g * in_range * -(1.0 - ctx.eps)).unsqueeze(-1)
        grad = exp.mul_((g / sum_exp).unsqueeze(-1))  # (..., m) in place: g * softmax
        grad.scatter_add_(-1, local_t.unsqueeze(-1), target_grad)
        if ctx.eps > 0:
            grad[..., : ctx.n_valid] -= (g * (ctx.eps / ctx.vocab_size)).unsqueeze(-1)
        return grad.to(ctx.in_dtype), None, None, None, None, None, None


def _reduce(loss: Tensor, target: Tensor, ignore_index: int, reduction: Reduction) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (target != ignore_index).sum()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")


def vocab_parallel_cross_entropy(
    logits: Tensor,
    target: Tensor,
    group: ProcessGroup,
    vocab_size: int,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    workspace: LossWorkspace | None = None,
    fused: bool | None = None,
) -> Tensor:
    """Cross entropy of vocab-sharded logits, equal in value and gradient to the unsharded loss.

    Args:
        logits: ``(..., Vp/p)``, this rank's slice of the padded vocabulary (TP rank ``r`` holds
            columns ``[r*Vp/p, (r+1)*Vp/p)``).
        target: ``(...)`` class indices in ``[0, vocab_size)`` or ``ignore_index``.
        group: the tensor-parallel group the vocabulary is split over.
        vocab_size: the real vocabulary size ``V`` (columns at or past it are padding).
        ignore_index: target value that contributes neither loss nor gradient.
        label_smoothing: ``eps`` in ``[0, 1]``, as in ``F.cross_entropy``.
        reduction: ``"mean"`` (over non-ignored targets), ``"sum"`` or ``"none"``.
        workspace: a :class:`LossWorkspace` whose buffer is reused across calls when free (the
            vocab-parallel LM head passes its own); ``None``: a fresh buffer each call.
        fused: ``True``: the fused loss, two passes over the logits in compiled kernels and no
            logits-sized buffer (Megatron's ``cross_entropy_loss_fusion``; the first call compiles,
            seconds); ``False``: the unfused eager one (a float32 buffer as large as the logits, several
            passes); ``None``: the workspace's choice, else fused where ``torch.compile`` makes GPU
            kernels (CUDA with Triton). Traced by ``torch.compile``, the fused form is always the one
            traced. Same values either way (the sums in another order).
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"vocab-sharded logits {tuple(logits.shape)} need a target of shape {tuple(logits.shape[:-1])} "
            f"(class dim last), got {tuple(target.shape)}."
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}.")
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be True, False or None (fused on CUDA), got {fused!r}.")
    _check_targets(target, vocab_size, ignore_index)
    if _fused(fused, workspace, logits.device):
        loss = _FusedVocabParallelCrossEntropy.apply(logits, target, group, vocab_size, ignore_index, label_smoothing)
    else:
        loss = _VocabParallelCrossEntropy.apply(
            logits, target, group, vocab_size, ignore_index, label_smoothing, workspace
        )
    return _reduce(loss, target, ignore_index, reduction)


def set_loss_fusion(module: torch.nn.Module, fused: bool | None) -> int:
    """Choose the loss of every vocab-parallel LM head in ``module`` (their :class:`LossWorkspace`'s
    ``fused``: see :func:`vocab_parallel_cross_entropy`); returns how many heads there are."""
    workspaces = [ws for m in module.modules() if isinstance(ws := getattr(m, "_loss_workspace", None), LossWorkspace)]
    for ws in workspaces:
        ws.fused = fused
        if fused:
            ws._buf = None  # the unfused loss's buffer, no longer used
    return len(workspaces)


def _fused(fused: bool | None, workspace: LossWorkspace | None, device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True  # what a compiler fuses best; nothing to keep between steps
    if fused is None and workspace is not None:
        fused = workspace.fused
    if fused is None:
        return device.type == "cuda" and has_triton()
    return fused


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    fused: bool | None = None,
) -> Tensor:
    """Cross entropy that is vocab-parallel on sharded logits and ``F.cross_entropy`` otherwise.

    Logits from a vocab-parallel head that keeps them sharded (:class:`VocabShardedLogits`, class dim
    last) take Megatron's vocab-parallel path: only ``(...)``-sized all-reduces, same value and
    gradient as the unsharded loss (``fused``: see :func:`vocab_parallel_cross_entropy`; ``None``:
    the head's choice, ``MegatronTPStrategy(loss_fusion=)``). Any other tensor goes to
    ``F.cross_entropy`` unchanged.
    """
    if isinstance(logits, VocabShardedLogits):
        return vocab_parallel_cross_entropy(
            _plain(logits),
            target,
            logits.tp_group,
            logits.vocab_size,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction=reduction,
            workspace=logits.workspace,
            fused=fused,
        )
    return F.cross_entropy(
        logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction
    )


def gather_logits(logits: Tensor) -> Tensor:
    """Dense ``(..., V)`` logits from :class:`VocabShardedLogits` (all-gather, padding dropped;
    differentiable); other tensors are returned unchanged. Collective for sharded logits."""
    if not isinstance(logits, VocabShardedLogits):
        return logits
    return logits.gathered()
