"""Collectives of tensor (and sequence) parallelism as autograd Functions.

Megatron's conjugate pairs: every operator is named by what it does forward, and its backward is
the adjoint collective. The group is always passed explicitly.

=====================  ==========================  ==========================
operator               forward                     backward
=====================  ==========================  ==========================
``copy_to_tp``  (f)    identity                    all-reduce
``copy_to_tp_linear``  f, then ``X W^T + b``       dW, db; all-reduce of dX overlapped with dW
``reduce_from_tp`` (g) all-reduce                  identity
``scatter_to_tp``      keep own chunk of last dim  all-gather last dim
``gather_from_tp``     all-gather last dim         keep own chunk of last dim
``scatter_to_sp``      keep own chunk of seq dim   all-gather seq dim
``gather_from_sp``     all-gather seq dim          reduce-scatter seq dim (or keep own chunk)
``reduce_scatter_to_sp`` reduce-scatter seq dim    all-gather seq dim
=====================  ==========================  ==========================

With a group of size 1 every operator is the identity. Collectives are called through the
``torch.distributed`` module at call time, so they can be wrapped (counted, timed) from outside.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.distributed import ProcessGroup

from lightning_tp.engine.sharding import ShardSpec
from lightning_tp.errors import ShardingError

# ----------------------------------------------------------------------------------------------
# Plain (non-autograd) collectives on a tensor dim.
# ----------------------------------------------------------------------------------------------


def group_size(group: ProcessGroup) -> int:
    """Number of ranks in ``group``."""
    return dist.get_world_size(group)


def collective_device(group: ProcessGroup | None = None) -> torch.device:
    """Where a tensor made only for a collective over ``group`` must live: this process's GPU under
    NCCL (which reduces CUDA tensors only), the CPU otherwise (gloo)."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_rank(group: ProcessGroup) -> int:
    """This process's rank inside ``group``."""
    return dist.get_rank(group)


def all_reduce(x: Tensor, group: ProcessGroup, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """Return the all-reduction of ``x`` over ``group`` (a new tensor; ``x`` is left unchanged)."""
    out = x.contiguous().clone()
    if group_size(group) > 1:
        dist.all_reduce(out, op=op, group=group)
    return out


def all_reduce_coalesced(tensors: list[Tensor], group: ProcessGroup) -> list[Tensor]:
    """The sums over ``group`` of ``tensors`` (new tensors, inputs unchanged), in one flat all-reduce
    per dtype and device instead of one per tensor."""
    out: list[Tensor | None] = [None] * len(tensors)
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    for index in buckets.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in index])  # (sum of numels,)
        if group_size(group) > 1:
            dist.all_reduce(flat, group=group)
        offset = 0
        for i in index:
            out[i] = flat[offset : offset + tensors[i].numel()].view_as(tensors[i])
            offset += tensors[i].numel()
    return out


def sum_shared_pieces_(items: list[tuple[Tensor, ShardSpec, int]], group: ProcessGroup) -> None:
    """Sum the gradients of shared chunks (:class:`~lightning_tp.engine.sharding.ShardSpec`
    ``shared``) over the ranks that hold each piece, in place: ``items`` are ``(grad, spec, start)``,
    ``grad`` this rank's tensor laid out by ``spec`` or, under ZeRO, its rows ``[start, start + len)``
    of dim 0. One flat all-reduce over TP: each rank puts its rows in its piece's slot of a zero
    buffer with a slot per piece, so the sum over all ranks fills each slot with its holders' sum
    alone. Collective (every TP rank holds the same rows of every tensor, so the buffers line up)."""
    views, buffers, slots = [], [], []
    rank = dist.get_rank(group)
    for grad, spec, start in items:
        dim = spec.dim % grad.dim()
        rows = (start, start + grad.shape[0]) if dim == 0 else None
        for c, first, size in spec.chunk_ranges(rows):
            if spec.shared[c] == 1:
                continue
            view = grad.narrow(dim, first, size)
            buffer = view.new_zeros((spec.pieces[c], *view.shape))
            buffer[spec.piece(rank, c)] = view
            views.append(view)
            buffers.append(buffer)
            slots.append(spec.piece(rank, c))
    totals = all_reduce_coalesced(buffers, group) if buffers else []
    for view, total, piece in zip(views, totals, slots, strict=True):
        view.copy_(total[piece])


def broadcast_coalesced(tensors: list[Tensor], src: int = 0, group: ProcessGroup | None = None,
                        bucket_bytes: int = 256 * 2**20) -> None:  # fmt: skip
    """Overwrite ``tensors`` in place with global rank ``src``'s values: one flat broadcast per
    dtype, device and ``bucket_bytes`` instead of one per tensor (module weights before sharding)."""
    buckets: dict[tuple[torch.dtype, torch.device], list[list[int]]] = {}
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        nbytes = t.numel() * t.element_size()
        if key not in buckets or sizes[key] + nbytes > bucket_bytes:
            buckets.setdefault(key, []).append([])
            sizes[key] = 0
        buckets[key][-1].append(i)
        sizes[key] += nbytes
    for index in (idx for groups in buckets.values() for idx in groups):
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in index])  # (sum of numels,)
        dist.broadcast(flat.view(torch.uint8) if flat.dtype == torch.bool else flat, src=src, group=group)
        offset = 0
        for i in index:
            tensors[i].detach().copy_(flat[offset : offset + tensors[i].numel()].view_as(tensors[i]))
            offset += tensors[i].numel()


def _gather_single(out: Tensor, x: Tensor, group: ProcessGroup) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)


def _reduce_scatter_single(out: Tensor, x: Tensor, group: ProcessGroup) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x, group=group)


def all_gather_dim(x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in group-rank order: (.., n, ..) -> (.., p*n, ..)."""
    p = group_size(group)
    if p == 1:
        return x
    dim = dim % x.dim()
    x0 = x.movedim(dim, 0).contiguous()  # (n, ...rest)
    out = torch.empty((p * x0.shape[0], *x0.shape[1:]), dtype=x.dtype, device=x.device)  # (p*n, ...)
    _gather_single(out, x0, group)
    return out.movedim(0, dim) if dim else out


def split_dim(x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
    """Keep this rank's contiguous chunk of ``dim``: (.., p*n, ..) -> (.., n, ..)."""
    p = group_size(group)
    if p == 1:
        return x
    return _chunk(x, p, dim, group).contiguous()


def _chunk(x: Tensor, p: int, dim: int, group: ProcessGroup) -> Tensor:
    _check_split(x, p, dim)
    return x.chunk(p, dim=dim)[group_rank(group)]


def _check_split(x: Tensor, p: int, dim: int) -> None:
    if x.shape[dim] % p != 0:
        raise ShardingError(
            f"cannot split dim {dim} of size {x.shape[dim]} over a tensor-parallel group of {p}: "
            f"the size must be divisible by {p}. Pad it or choose a tensor_parallel_size that divides it."
        )


def _check_reduce_scatter(x: Tensor, p: int, dim: int) -> None:
    if x.shape[dim] % p != 0:
        raise ShardingError(
            f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over a group of {p}: the size "
            f"must be divisible by {p} (for sequence parallelism, make the sequence length a multiple "
            "of tensor_parallel_size)."
        )


def reduce_scatter_dim(x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
    """Sum ``x`` over the group and keep this rank's chunk of ``dim``: (.., p*n, ..) -> (.., n, ..)."""
    p = group_size(group)
    if p == 1:
        return x
    _check_reduce_scatter(x, p, dim)
    dim = dim % x.dim()
    x0 = x.movedim(dim, 0).contiguous()  # (p*n, ...rest)
    out = torch.empty((x0.shape[0] // p, *x0.shape[1:]), dtype=x.dtype, device=x.device)  # (n, ...)
    _reduce_scatter_single(out, x0, group)
    return out.movedim(0, dim) if dim else out


# ----------------------------------------------------------------------------------------------
# Sequence parallelism's forwards on the whole sequence.
# ----------------------------------------------------------------------------------------------


class _SequenceRegion:
    """What the sequence-sharded region's entries decided since the last reset (by the outermost module in
    progress of those that hold them: each forward of the model starts afresh): the lengths of the
    sequences that run on the whole sequence, the lengths of the chunks of those that run
    sequence-sharded, the same as counts of tokens flattened with the batch (``(B*T, H)`` tensors),
    and the last entry's decision. Set by :func:`enter_sequence_region`, read by
    :func:`sequence_whole`."""

    def __init__(self) -> None:
        self.whole: set[int] = set()
        self.chunks: set[int] = set()
        self.whole_tokens: set[int] = set()  # B*T of the sequences that run whole
        self.chunk_tokens: set[int] = set()  # B*T/p of the sequence-sharded ones
        self.last = False
        self.entered = False  # an entry ran since the reset
        self.traced = False  # one ran while compiled (recording no length)
        self.mixed = False  # entries decided differently (two sequences: one whole, one split)
        self.depth = 0  # forwards of the entries' holders in progress (the outermost one resets)


_REGION = _SequenceRegion()


def reset_sequence_region(*_: Any) -> None:
    """A forward pre-hook on every module that holds an entry of the region: the outermost one in
    progress forgets the decisions of earlier forwards (an encoder and a decoder holding entries of
    their own, called by one model, keep each other's). :func:`leave_sequence_region` after it."""
    _REGION.depth += 1
    if _REGION.depth > 1:
        return
    if not torch.compiler.is_compiling():
        for lengths in (_REGION.whole, _REGION.chunks, _REGION.whole_tokens, _REGION.chunk_tokens):
            lengths.clear()
    _REGION.last = _REGION.entered = _REGION.traced = _REGION.mixed = False


def leave_sequence_region(*_: Any) -> None:
    """A forward hook (``always_call``) on every module that holds an entry of the region: the pair of
    :func:`reset_sequence_region`."""
    _REGION.depth = max(_REGION.depth - 1, 0)


def enter_sequence_region(x: Tensor, group: ProcessGroup, where: str, training: bool = False, dim: int = -2) -> bool:
    """At an entry of the sequence-sharded region (the token embedding that reduce-scatters, an
    embedding giving this rank's chunk, a layer stack's first layer), given the whole activation
    ``x`` about to be split on ``dim``: whether this sequence runs on the whole sequence, replicated
    over TP, as without sequence parallelism. It does when its length does not divide by the group's
    size and no gradient is recorded (evaluation, a ``torch.no_grad()`` forward, generation, whose
    cached decode steps feed one token): the layers' weights are the same either way; only where their
    activations are split and how they are summed differ. With gradients, or ``x`` requiring grad in a
    module in training mode (the forward of a reentrant activation checkpoint runs without them), that
    is a ``ShardingError``, raised before any collective: the gradients of the parameters sequence
    parallelism sums over TP (norms, biases of row layers) would be counted once per rank. A model that
    feeds two sequences (an encoder's and a decoder's) may run one whole and the other sharded; what
    runs inside tells them apart by length (:func:`sequence_whole`)."""
    p, length = group_size(group), x.shape[dim]
    whole = True if p > 1 and length % p != 0 else False  # noqa: SIM210 (traced, dynamic shapes: a constant, guarded)
    if whole and (torch.is_grad_enabled() or (x.requires_grad and training)):
        raise ShardingError(
            f"sequence parallelism splits the sequence at {where or 'the model'!r} over {p} tensor-parallel ranks, "
            f"and this forward's length {length} does not divide by {p}. With gradients, make the sequence length a "
            f"multiple of tensor_parallel_size (pad the batch to a multiple of {p}), or use sequence_parallel=False; "
            "a forward without gradients (evaluation, torch.no_grad(), generation) runs at any length, on the whole "
            "sequence."
        )
    compiling = torch.compiler.is_compiling()
    # its tokens flattened with the dims before the sequence (a layer may take (B*T, H): OPT's MLP)
    tokens = math.prod(x.shape[:-1]) if dim in (-2, x.dim() - 2) else length
    if not compiling and whole:
        _REGION.whole.add(length)
        _REGION.whole_tokens.add(tokens)
    elif not compiling:
        _REGION.chunks.add(length // p)  # this rank's chunk
        _REGION.chunk_tokens.add(tokens // p)
    differs = _REGION.entered and whole != _REGION.last  # another sequence of this forward decided otherwise
    if differs and (compiling or _REGION.traced):
        # traced, no lengths are recorded: one decision per forward (also where the compiler left this call to eager)
        raise ShardingError(
            f"sequence parallelism, compiled: a forward without gradients feeds {where or 'the model'!r} a sequence of "
            f"{length} tokens, which {'runs whole (its length does not divide' if whole else 'is split (its length divides'} "
            f"by {p}), after a sequence that {'is split' if whole else 'runs whole'}. Compiled, the sequences of one "
            f"forward run all whole or all split: pad them alike (to a multiple of {p}), or run this forward eagerly."
        )
    _REGION.mixed = _REGION.mixed or differs
    _REGION.last, _REGION.entered = whole, True
    if compiling:
        _REGION.traced = True
    return whole


def sequence_whole(length: int | None = None, full: bool = False, tokens: bool = False, flat: bool = False) -> bool:
    """Inside the sequence-sharded region: whether a tensor whose sequence dim has ``length`` belongs to
    a sequence that runs on the whole sequence (:func:`enter_sequence_region`), never while gradients
    are recorded (an activation-checkpointing recompute in backward runs its region sequence-sharded,
    as its forward did). ``full``: a tensor as long as its whole sequence (a row layer's output), whole
    exactly when that length is one entered whole; otherwise it is this rank's chunk of a sharded
    sequence or a whole sequence, told apart by the lengths the entries recorded; a length both are
    is a ``ShardingError``. Without a length, the last entry's decision; ``tokens`` (a mixture of experts'
    flattened tokens, whose sequence cannot be read) in a forward whose entries decided differently is
    a ``ShardingError``. ``flat``: ``length`` is the first dim of a 2-D tensor, tokens flattened with the
    batch (``(B*T, H)``, OPT's MLP), told apart by the entries' token counts. So while compiled (traced code reads no lengths), where a forward whose entries decided
    differently raises, which leaves the call to eager (a block compiled alone), or is a
    ``ShardingError`` (an entry traced too: :func:`enter_sequence_region`). Eager code after an entry
    that ran compiled (recording no length: the compiler left what follows to eager) reads its decision."""
    if torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling():
        if _REGION.mixed:  # traced code reads no lengths: left to eager, which tells the sequences apart
            raise ShardingError(
                "sequence parallelism, compiled: this forward runs one sequence whole and another split, and traced "
                "code cannot tell their tensors apart."
            )
        return _REGION.last
    if _REGION.traced:  # an entry ran compiled, recording no length (the compiler left this call to eager)
        return _REGION.last  # (and one decision per forward: a compiled entry refuses a mixed one)
    if length is None:
        if tokens and _REGION.mixed:
            raise ShardingError(
                "sequence parallelism: a forward without gradients runs one sequence whole and another split (their "
                "lengths do not both divide by the tensor-parallel size), and a mixture of experts takes flattened "
                "tokens, which cannot be told to belong to one or the other. Pad the sequences alike (to a multiple "
                "of tensor_parallel_size), or use sequence_parallel=False."
            )
        return _REGION.last
    whole_lengths, chunk_lengths = (
        (_REGION.whole_tokens, _REGION.chunk_tokens) if flat else (_REGION.whole, _REGION.chunks)
    )
    if not whole_lengths:
        return False  # (the common case: no sequence entered whole since the reset)
    if full:
        return length in whole_lengths
    whole, sharded = length in whole_lengths, length in chunk_lengths
    if whole and sharded:
        raise ShardingError(
            f"sequence parallelism: a forward without gradients holds a sequence of {length} tokens, which runs on "
            f"the whole sequence (its length does not divide by the tensor-parallel size), and another split into "
            f"chunks of {length} tokens: a tensor of that length cannot be told apart. Pad one of them (to a multiple "
            "of tensor_parallel_size), or use sequence_parallel=False."
        )
    return whole or (not sharded and _REGION.last)


def sharded_length(n: int, flat: bool = False) -> bool | None:
    """Whether a sequence dim of ``n`` is this rank's chunk of a sequence-sharded sequence in the
    current forward (:func:`enter_sequence_region`); ``flat``: whether ``n`` rows are its tokens
    flattened with the batch (``B*T/p``). ``None`` where no length is recorded (compiled)."""
    if torch.compiler.is_compiling() or _REGION.traced:
        return None
    return n in (_REGION.chunk_tokens if flat else _REGION.chunks)


def sharded_tokens(n: int) -> bool:
    """Whether ``n`` rows are this rank's chunk of a sequence-sharded sequence's tokens flattened with
    the batch (:func:`sharded_length`); never while compiled (traced code records no length)."""
    return bool(sharded_length(n, flat=True))


# ----------------------------------------------------------------------------------------------
# Autograd Functions (private) and their public wrappers.
# ----------------------------------------------------------------------------------------------


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        return all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup, inplace: bool) -> Tensor:
        if not (inplace and x.is_contiguous()):
            return all_reduce(x, group)
        if group_size(group) > 1:
            dist.all_reduce(x, group=group)
        ctx.mark_dirty(x)  # autograd then refuses a backward that needed the pre-reduction x
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        return grad, None, None


def _autocast_args(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast like autocast does for ``F.linear`` (floating tensors other than float64 go to the
    autocast dtype) when autocast is on for the device, so backward sees the forward's dtypes."""
    device = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors
    )


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` on tensors already cast as autocast would (see :func:`_autocast_args`)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x, weight, bias)  # (..., out)


def _param_grads(grad: Tensor, x, need_w: bool, need_b: bool) -> tuple[Tensor | None, Tensor | None]:
    """``dW = grad^T x`` and ``db`` (grad summed over all leading dims) of ``F.linear``; ``x`` is the
    input or a callable that makes it (only called when ``dW`` is needed)."""
    grad_w = grad_b = None
    if need_w or need_b:
        grad_2d = grad.reshape(-1, grad.shape[-1])  # (N, out)
        if need_w:
            x = x() if callable(x) else x
            grad_w = grad_2d.t().mm(x.reshape(-1, x.shape[-1]))  # (out, in)
        if need_b:
            grad_b = grad_2d.sum(dim=0)  # (out,)
    return grad_w, grad_b


class _CopyToTPLinear(torch.autograd.Function):
    """Megatron's linear with asynchronous input-grad all-reduce: in backward the all-reduce of
    ``dX`` is started as soon as ``dX`` exists and runs while ``dW`` is computed."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, group: ProcessGroup) -> Tensor:
        x, weight, bias = _autocast_args(x, weight, bias)
        ctx.group = group
        ctx.save_for_backward(x, weight)
        return _linear(x, weight, bias)  # (..., out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = work = None
        if need_x:
            grad_x = grad.matmul(weight)  # (..., in), partial over the group
            if group_size(ctx.group) > 1:
                if torch.compiler.is_compiling():  # traced: a functional all-reduce, which the compiler schedules
                    dist.all_reduce(grad_x, group=ctx.group)
                else:
                    work = dist.all_reduce(grad_x, group=ctx.group, async_op=True)
        grad_w, grad_b = _param_grads(grad, x, need_w, need_b)  # while the all-reduce runs
        if work is not None:
            work.wait()
        return grad_x, grad_w, grad_b, None


class _LinearRegather(torch.autograd.Function):
    """``F.linear(X, W, b)`` where ``X = all_gather(shard)`` along ``dim`` (sequence parallelism):
    saves the shard, not ``X``, and gathers it again in backward for ``dW`` (Megatron's choice:
    one more all-gather in backward for ``(p-1)/p`` less activation memory). The grad of ``X`` is
    returned to ``X``'s own producer (the gather, whose backward reduce-scatters it)."""

    @staticmethod
    def forward(ctx, x: Tensor, shard: Tensor, weight: Tensor, bias: Tensor | None, group: ProcessGroup, dim: int):
        x, weight, bias = _autocast_args(x, weight, bias)
        shard = _autocast_args(shard)[0]
        ctx.group, ctx.dim = group, dim
        ctx.save_for_backward(shard, weight)
        return _linear(x, weight, bias)  # (..., out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        shard, weight = ctx.saved_tensors
        need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
        grad_x = grad.matmul(weight) if need_x else None  # (..., in), partial over the group
        gather = lambda: all_gather_dim(shard, ctx.group, ctx.dim)  # noqa: E731  (..., in) again
        grad_w, grad_b = _param_grads(grad, gather, need_w, need_b)
        return grad_x, None, grad_w, grad_b, None, None


# The split, gather and reduce-scatter Functions below return a tensor of their own, never a view of
# their input or of a buffer, so that it may be modified in place (a residual ``+=`` after a row layer),
# which autograd refuses for a view made inside a custom Function: a split copies this rank's chunk (a
# contiguous tensor); a gather or reduce-scatter works on dim 0, its wrapper moving the dim there and
# back outside it. A group of one runs none of them (each is the identity).


def _apply_collective(
    function: type[torch.autograd.Function],
    x: Tensor,
    group: ProcessGroup,
    dim: int,
    *args: Any,
    check: Any = None,
    on_dim0: bool = True,
) -> Tensor:
    p = group_size(group)
    if p == 1:
        return x
    if check is not None:
        check(x, p, dim)  # named by the caller's dim
    dim = dim % x.dim()
    if not on_dim0:  # a split: its Function copies the chunk of ``dim`` itself
        return function.apply(x, group, dim, *args)
    if dim == 0:
        return function.apply(x, group, 0, *args)
    # contiguous in the input's layout, as the dense model's tensor is: a module that view()s it (a mixture of
    # experts' `hidden_states.view(-1, hidden)`) runs, and a consumer that needs it contiguous (a linear layer
    # on 3-D input, a norm) finds it so rather than copying it itself
    return function.apply(x.movedim(dim, 0), group, 0, *args).movedim(0, dim).contiguous()


def _own_chunk(x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
    """This rank's chunk of ``dim`` as a contiguous tensor of its own (a copy)."""
    return _chunk(x, group_size(group), dim, group).clone(memory_format=torch.contiguous_format)


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        return _own_chunk(x, group, dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        return all_gather_dim(grad, ctx.group, ctx.dim), None, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
        ctx.group = group
        return all_gather_dim(x, group, 0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        return split_dim(grad, ctx.group, 0), None, None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        return _own_chunk(x, group, dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        return all_gather_dim(grad, ctx.group, ctx.dim), None, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup, dim: int, grad_reduce: bool) -> Tensor:
        ctx.group, ctx.dim, ctx.grad_reduce = group, dim, grad_reduce
        return all_gather_dim(x, group, dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        if ctx.grad_reduce:
            return reduce_scatter_dim(grad, ctx.group, ctx.dim), None, None, None
        return split_dim(grad, ctx.group, ctx.dim), None, None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        return reduce_scatter_dim(x, group, dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        return all_gather_dim(grad, ctx.group, ctx.dim), None, None


def copy_to_tp(x: Tensor, group: ProcessGroup) -> Tensor:
    """forward: identity; backward: all-reduce (sum) over ``group``. Megatron's ``f``."""
    return _CopyToTP.apply(x, group)


def copy_to_tp_linear(x: Tensor, weight: Tensor, bias: Tensor | None, group: ProcessGroup) -> Tensor:
    """forward: ``F.linear(copy_to_tp(x), weight, bias)``; backward: dW, db and the all-reduce of dX,
    which runs while dW is computed (Megatron's async grad all-reduce). A group of one: ``F.linear``."""
    if group_size(group) == 1:  # nothing to reduce: no Python autograd node (its host time shows on a GPU)
        return F.linear(x, weight, bias)
    return _CopyToTPLinear.apply(x, weight, bias, group)


def linear_regather(
    x: Tensor, shard: Tensor, weight: Tensor, bias: Tensor | None, group: ProcessGroup, dim: int
) -> Tensor:
    """``F.linear(x, weight, bias)`` for ``x = gather_from_sp(shard, group, dim)``, keeping only
    ``shard`` for backward and gathering it again there (sequence parallelism's activation saving)."""
    return _LinearRegather.apply(x, shard, weight, bias, group, dim)


def reduce_from_tp(x: Tensor, group: ProcessGroup, inplace: bool = False) -> Tensor:
    """forward: all-reduce (sum) over ``group``; backward: identity. Megatron's ``g``.

    ``inplace=True`` reduces ``x`` itself (no copy): only for a fresh non-leaf tensor that nothing
    else holds, such as the output of the layer's own matmul. Traced, it is out of place: Dynamo
    follows the in-place form's ``mark_dirty`` only while gradients are recorded (a compiled forward
    under ``torch.no_grad()`` would break the graph at every row layer), and the compiler plans the
    memory itself.
    """
    return _ReduceFromTP.apply(x, group, inplace and not torch.compiler.is_compiling())


def scatter_to_tp(x: Tensor, group: ProcessGroup) -> Tensor:
    """forward: keep this rank's chunk of the last dim; backward: all-gather the last dim."""
    return _apply_collective(_ScatterToTP, x, group, -1, check=_check_split, on_dim0=False)


def gather_from_tp(x: Tensor, group: ProcessGroup) -> Tensor:
    """forward: all-gather the last dim; backward: keep this rank's chunk of the last dim."""
    return _apply_collective(_GatherFromTP, x, group, -1)


def scatter_to_sp(x: Tensor, group: ProcessGroup, dim: int = 1) -> Tensor:
    """forward: keep this rank's chunk of the sequence dim; backward: all-gather the sequence dim."""
    return _apply_collective(_ScatterToSP, x, group, dim, check=_check_split, on_dim0=False)


def gather_from_sp(x: Tensor, group: ProcessGroup, dim: int = 1, grad_reduce: bool = True) -> Tensor:
    """forward: all-gather the sequence dim; backward: reduce-scatter it (``grad_reduce``) or split it.

    Use ``grad_reduce=True`` where the gathered tensor enters a tensor-parallel region (each rank's
    grad is a partial sum), ``False`` where every rank's grad is already complete.
    """
    return _apply_collective(_GatherFromSP, x, group, dim, grad_reduce)


def reduce_scatter_to_sp(x: Tensor, group: ProcessGroup, dim: int = 1) -> Tensor:
    """forward: reduce-scatter (sum) along the sequence dim; backward: all-gather the sequence dim."""
    return _apply_collective(_ReduceScatterToSP, x, group, dim, check=_check_reduce_scatter)
