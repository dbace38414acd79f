"""How one tensor is laid out across the tensor-parallel group.

A :class:`ShardSpec` says which dim is split and what lies along it: one or more *chunks* laid back
to back (one chunk for a plain column/row split, three for a fused q/k/v projection, ``(q, k, v)``
sizes for a grouped-query fused projection). Each chunk is split into ``tp`` equal pieces and rank
``r`` holds piece ``r`` of every chunk, concatenated::

    full  (dim):  [ q_0 q_1 | k_0 k_1 | v_0 v_1 ]          chunks (q, k, v), tp = 2
    rank 0:       [ q_0 | k_0 | v_0 ]    rank 1: [ q_1 | k_1 | v_1 ]

With ``pad=True`` (vocabularies) a chunk whose size is not a multiple of ``tp`` is padded with
zeros at its end to the next multiple; the padding is never part of the full (unsharded) tensor.

The same spec shards a dense tensor (:meth:`ShardSpec.shard`), rebuilds it from all shards
(:meth:`ShardSpec.unshard`) and reorders an all-gathered activation (:meth:`ShardSpec.gather_index`),
so parallel layers, checkpoints and tests share one definition of the layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_tp.errors import ShardingError

SPEC_ATTR = "tp_shard_spec"  # set on sharded Parameters
PARTIAL_GRAD_ATTR = "tp_grad_is_partial"  # set on replicated Parameters whose grads need a TP all-reduce


@dataclass(frozen=True)
class ShardSpec:
    """Layout of one tensor split over ``tp_size`` ranks.

    Args:
        dim: the tensor dim that is split.
        sizes: full (unpadded) sizes of the chunks laid back to back along ``dim``.
        tp_size: number of ranks in the tensor-parallel group.
        pad: pad each chunk to a multiple of ``tp_size`` instead of refusing an uneven size.
        name: what is split, for error messages (e.g. ``"out_features of 'h.0.mlp.fc'"``).
    """

    dim: int
    sizes: tuple[int, ...]
    tp_size: int
    pad: bool = False
    name: str = "tensor"

    def __post_init__(self) -> None:
        if self.pad:
            return
        for size in self.sizes:
            if size % self.tp_size != 0:
                what = self.name if len(self.sizes) == 1 else f"{self.name} (chunk sizes {list(self.sizes)})"
                raise ShardingError(
                    f"cannot split {what} of size {size} over tensor_parallel_size={self.tp_size}: "
                    f"{size} is not divisible by {self.tp_size}. Choose a tensor_parallel_size that "
                    f"divides {size}, or map this module to 'replicate' in the policy."
                )

    @property
    def full_size(self) -> int:
        """Size of ``dim`` in the dense tensor (no padding)."""
        return sum(self.sizes)

    @property
    def padded_sizes(self) -> tuple[int, ...]:
        tp = self.tp_size
        return tuple(-(-s // tp) * tp for s in self.sizes)

    @property
    def local_sizes(self) -> tuple[int, ...]:
        """Per-rank size of each chunk."""
        return tuple(s // self.tp_size for s in self.padded_sizes)

    @property
    def local_size(self) -> int:
        """Size of ``dim`` in each rank's shard."""
        return sum(self.local_sizes)

    def valid_range(self, tp_rank: int, chunk: int = 0) -> tuple[int, int]:
        """``(start, n_valid)``: the full-tensor index of this rank's first element of ``chunk`` and
        how many of its elements are real (the rest are padding)."""
        m = self.local_sizes[chunk]
        start = tp_rank * m
        return start, max(0, min(m, self.sizes[chunk] - start))

    def shard(self, full: Tensor, tp_rank: int) -> Tensor:
        """This rank's shard of the dense tensor ``full`` (padding rows are zeros)."""
        if full.shape[self.dim] != self.full_size:
            raise ShardingError(
                f"{self.name}: expected size {self.full_size} on dim {self.dim}, got {tuple(full.shape)}."
            )
        pieces = []
        for chunk, size, padded, m in zip(
            full.split(list(self.sizes), dim=self.dim), self.sizes, self.padded_sizes, self.local_sizes, strict=True
        ):
            if padded != size:
                pad_shape = list(chunk.shape)
                pad_shape[self.dim] = padded - size
                chunk = torch.cat([chunk, chunk.new_zeros(pad_shape)], dim=self.dim)
            pieces.append(chunk.narrow(self.dim, tp_rank * m, m))
        return torch.cat(pieces, dim=self.dim).contiguous() if len(pieces) > 1 else pieces[0].contiguous()

    def gather_index(self) -> Tensor | None:
        """Index that maps the rank-order concatenation of all shards to the dense layout, or
        ``None`` when the concatenation already is the dense layout (one chunk, no padding)."""
        if len(self.sizes) == 1 and self.padded_sizes == self.sizes:
            return None
        local = self.local_size
        index, offset = [], 0
        for size, m in zip(self.sizes, self.local_sizes, strict=True):
            pos = torch.arange(size)
            index.append((pos // m) * local + offset + pos % m)
            offset += m
        return torch.cat(index)

    def unshard(self, shards: Sequence[Tensor]) -> Tensor:
        """Rebuild the dense tensor from every rank's shard (in TP-rank order)."""
        if len(shards) != self.tp_size:
            raise ShardingError(f"{self.name}: expected {self.tp_size} shards, got {len(shards)}.")
        cat = torch.cat(list(shards), dim=self.dim)
        index = self.gather_index()
        return cat if index is None else cat.index_select(self.dim, index.to(cat.device))


def mark_sharded(param: Tensor, spec: ShardSpec) -> Tensor:
    """Record on a Parameter how it is split over TP (used by clipping and checkpoints)."""
    setattr(param, SPEC_ATTR, spec)
    return param


def shard_spec(param: Tensor) -> ShardSpec | None:
    """The :class:`ShardSpec` of a TP-sharded Parameter, ``None`` for a replicated one."""
    return getattr(param, SPEC_ATTR, None)


def mark_partial_grad(param: Tensor, partial: bool = True) -> Tensor:
    """Record that a replicated Parameter's grad is a partial sum that must be all-reduced over TP
    before the optimizer step (e.g. a per-head norm, the bias of a sequence-parallel row layer), or
    with ``partial=False`` that it is complete (the policy then leaves the mark as it is)."""
    setattr(param, PARTIAL_GRAD_ATTR, bool(partial))
    return param


def has_partial_grad_mark(param: Tensor) -> bool:
    """Whether ``param`` was marked either way by :func:`mark_partial_grad`."""
    return hasattr(param, PARTIAL_GRAD_ATTR)


def has_partial_grad(param: Tensor) -> bool:
    """Whether ``param``'s grad must be all-reduced over TP before the optimizer step."""
    return bool(getattr(param, PARTIAL_GRAD_ATTR, False))
