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

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from lightning_tp.comm import all_reduce, group_rank

Reduction = Literal["mean", "sum", "none"]

# Ops through which sharded logits keep their meaning (layout of the last dim unchanged).
_LAYOUT_OPS = frozenset(
    {
        "view", "reshape", "flatten", "contiguous", "float", "double", "half", "bfloat16", "to",
        "type_as", "__getitem__", "clone", "detach", "view_as", "reshape_as", "squeeze", "unsqueeze",
    }
)  # fmt: skip


class VocabShardedLogits(Tensor):
    """Logits whose last dim is this rank's slice of the (padded) vocabulary.

    Returned by a vocab-parallel LM head with ``gather_output=False``. Reshapes and dtype casts keep
    the type (so ``logits.view(-1, logits.size(-1))`` still works); any other op returns a plain
    tensor of the local slice. :func:`cross_entropy` recognises the type and computes the
    vocab-parallel loss.
    """

    tp_group: ProcessGroup
    vocab_size: int

    @staticmethod
    def wrap(local: Tensor, group: ProcessGroup, vocab_size: int) -> VocabShardedLogits:
        out = local.as_subclass(VocabShardedLogits)
        out.tp_group, out.vocab_size = group, vocab_size
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        src = args[0] if args and isinstance(args[0], VocabShardedLogits) else None
        name = getattr(func, "__name__", "")
        if (
            src is not None
            and name in _LAYOUT_OPS
            and isinstance(out, Tensor)
            and out.dim() > 0
            and out.shape[-1] == src.shape[-1]
        ):
            return VocabShardedLogits.wrap(out, src.tp_group, src.vocab_size)
        return out


def _check_targets(target: Tensor, vocab_size: int, ignore_index: int) -> None:
    # Only on CPU: a device-side check would force a synchronisation on every step.
    if target.device.type != "cpu" or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab_size))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise IndexError(f"target {value} is out of bounds for a vocabulary of {vocab_size} classes.")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_size, ignore_index, label_smoothing):
        m = logits.shape[-1]  # local (padded) vocab slice
        start = group_rank(group) * m
        n_valid = max(0, min(m, vocab_size - start))
        cdtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        z = logits.to(cdtype, copy=True)  # (..., m)
        if n_valid < m:
            z[..., n_valid:] = float("-inf")  # padded vocab columns get probability 0

        zmax = all_reduce(z.max(dim=-1).values, group, dist.ReduceOp.MAX)  # (...)
        z.sub_(zmax.unsqueeze(-1))  # (..., m)

        in_range = (target >= start) & (target < start + n_valid)  # (...)
        local_t = (target - start).masked_fill(~in_range, 0)  # (...)
        z_t = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~in_range, 0.0)  # (...)
        terms = [z_t]
        if label_smoothing > 0:
            terms.append(z[..., :n_valid].sum(dim=-1))  # (...)
        probs = z.exp_()  # (..., m), padded columns are exp(-inf) = 0
        terms.append(probs.sum(dim=-1))
        sums = all_reduce(torch.stack(terms), group)  # (2 or 3, ...)
        z_t, sum_exp = sums[0], sums[-1]

        log_z = sum_exp.log()
        loss = log_z - z_t
        if label_smoothing > 0:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (log_z - sums[1] / vocab_size)
        ignored = target == ignore_index
        loss = loss.masked_fill(ignored, 0.0)

        probs.div_(sum_exp.unsqueeze(-1))  # softmax slice, (..., m)
        ctx.save_for_backward(probs, local_t, in_range, ignored)
        ctx.vocab_size, ctx.n_valid, ctx.eps, ctx.in_dtype = (
            vocab_size,
            n_valid,
            label_smoothing,
            logits.dtype,
        )
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        probs, local_t, in_range, ignored = ctx.saved_tensors
        grad = probs.clone()  # (..., m): d loss / d z = softmax - (1-eps) onehot - eps/V
        onehot = in_range.to(grad.dtype) * (1.0 - ctx.eps)
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -onehot.unsqueeze(-1))
        if ctx.eps > 0:
            grad[..., : ctx.n_valid] -= ctx.eps / ctx.vocab_size
        grad.mul_((grad_loss * (~ignored).to(grad_loss.dtype)).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None, None


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
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"vocab-sharded logits {tuple(logits.shape)} need a target of shape {tuple(logits.shape[:-1])} "
            f"(class dim last), got {tuple(target.shape)}."
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}.")
    _check_targets(target, vocab_size, ignore_index)
    loss = _VocabParallelCrossEntropy.apply(logits, target, group, vocab_size, ignore_index, label_smoothing)
    return _reduce(loss, target, ignore_index, reduction)


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Cross entropy that is vocab-parallel on sharded logits and ``F.cross_entropy`` otherwise.

    Logits from a vocab-parallel head that keeps them sharded (:class:`VocabShardedLogits`, class dim
    last) take Megatron's vocab-parallel path: only ``(...)``-sized all-reduces, same value and
    gradient as the unsharded loss. Any other tensor goes to ``F.cross_entropy`` unchanged.
    """
    if isinstance(logits, VocabShardedLogits):
        return vocab_parallel_cross_entropy(
            logits.as_subclass(Tensor),
            target,
            logits.tp_group,
            logits.vocab_size,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction=reduction,
        )
    return F.cross_entropy(
        logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction
    )


def gather_logits(logits: Tensor) -> Tensor:
    """Dense ``(..., V)`` logits from :class:`VocabShardedLogits` (all-gather, padding dropped);
    other tensors are returned unchanged. Collective for sharded logits."""
    if not isinstance(logits, VocabShardedLogits):
        return logits
    from lightning_tp.comm import all_gather_dim

    group, vocab = logits.tp_group, logits.vocab_size
    return all_gather_dim(logits.as_subclass(Tensor).contiguous(), group, -1)[..., :vocab]
