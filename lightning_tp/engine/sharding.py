"""How one tensor is laid out across the tensor-parallel group.

A :class:`ShardSpec` says which dim is split and what lies along it: one or more *chunks* laid back
to back (one chunk for a plain column/row split, three for a fused q/k/v projection, ``(q, k, v)``
sizes for a grouped-query fused projection). Each chunk is split into ``tp`` equal pieces and rank
``r`` holds piece ``r`` of every chunk, concatenated::

    full  (dim):  [ q_0 q_1 | k_0 k_1 | v_0 v_1 ]          chunks (q, k, v), tp = 2
    rank 0:       [ q_0 | k_0 | v_0 ]    rank 1: [ q_1 | k_1 | v_1 ]

With ``pad=True`` (vocabularies) a chunk whose size is not a multiple of ``tp`` is padded with
zeros at its end to the next multiple; the padding is never part of the full (unsharded) tensor.

A chunk may be *shared* (``shared[c] = s > 1``): it is split into ``tp / s`` pieces only, and the
``s`` ranks ``[i s, (i+1) s)`` all hold piece ``i`` (key/value heads fewer than the TP ranks: each
rank holds the one head its query heads read)::

    full  (dim):  [ q_0 q_1 q_2 q_3 | k_0 k_1 | v_0 v_1 ]    chunks (q, k, v), shared (1, 2, 2), tp = 4
    rank 0: [ q_0 | k_0 | v_0 ]   rank 1: [ q_1 | k_0 | v_0 ]   rank 2: [ q_2 | k_1 | v_1 ]   ...

Each holder of a shared piece computes only its own part of the piece's gradient: the gradients of
a shared chunk are summed over its holders before the optimizer step
(:func:`lightning_tp.engine.comm.sum_shared_pieces_`), and a gradient norm counts each piece once.

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
        shared: per chunk, how many consecutive ranks hold each of its pieces (``tp_size`` divisible
            by it; the chunk is split into ``tp_size / shared`` pieces); empty: 1 for every chunk.
    """

    dim: int
    sizes: tuple[int, ...]
    tp_size: int
    pad: bool = False
    name: str = "tensor"
    shared: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        shared = tuple(self.shared) or (1,) * len(self.sizes)
        object.__setattr__(self, "shared", shared)
        bad = len(shared) != len(self.sizes) or any(not isinstance(s, int) or s < 1 or self.tp_size % s for s in shared)
        if bad:
            raise ShardingError(
                f"{self.name}: shared={list(shared)} must give, for each of the {len(self.sizes)} chunks, a "
                f"number of ranks that divides tensor_parallel_size={self.tp_size}."
            )
        for size, s in zip(self.sizes, shared, strict=True):
            if s > 1 and (self.pad or size % (self.tp_size // s)):
                raise ShardingError(
                    f"cannot split {self.name} (chunk sizes {list(self.sizes)}): a chunk of size {size} shared by "
                    f"{s} ranks must divide into {self.tp_size // s} equal pieces (no padding)."
                )
        if self.pad:
            return
        for size, s in zip(self.sizes, shared, strict=True):
            if size % self.tp_size != 0 and s == 1:
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
    def pieces(self) -> tuple[int, ...]:
        """How many distinct pieces each chunk is split into (``tp_size`` unless shared)."""
        return tuple(self.tp_size // s for s in self.shared)

    @property
    def is_shared(self) -> bool:
        """Whether some chunk's pieces are held by several ranks each."""
        return any(s > 1 for s in self.shared)

    def piece(self, tp_rank: int, chunk: int = 0) -> int:
        """Which piece of ``chunk`` rank ``tp_rank`` holds."""
        return tp_rank // self.shared[chunk]

    @property
    def padded_sizes(self) -> tuple[int, ...]:
        return tuple(-(-s // n) * n for s, n in zip(self.sizes, self.pieces, strict=True))

    @property
    def local_sizes(self) -> tuple[int, ...]:
        """Per-rank size of each chunk."""
        return tuple(s // n for s, n in zip(self.padded_sizes, self.pieces, strict=True))

    @property
    def local_size(self) -> int:
        """Size of ``dim`` in each rank's shard."""
        return sum(self.local_sizes)

    def valid_range(self, tp_rank: int, chunk: int = 0) -> tuple[int, int]:
        """``(start, n_valid)``: the full-tensor index of this rank's first element of ``chunk`` and
        how many of its elements are real (the rest are padding)."""
        m = self.local_sizes[chunk]
        start = self.piece(tp_rank, chunk) * m
        return start, max(0, min(m, self.sizes[chunk] - start))

    def shard(self, full: Tensor, tp_rank: int) -> Tensor:
        """This rank's shard of the dense tensor ``full`` (padding rows are zeros)."""
        if full.shape[self.dim] != self.full_size:
            raise ShardingError(
                f"{self.name}: expected size {self.full_size} on dim {self.dim}, got {tuple(full.shape)}."
            )
        pieces = []
        for c, (chunk, size, padded, m) in enumerate(
            zip(
                full.split(list(self.sizes), dim=self.dim), self.sizes, self.padded_sizes, self.local_sizes, strict=True
            )
        ):
            if padded != size:
                pad_shape = list(chunk.shape)
                pad_shape[self.dim] = padded - size
                chunk = torch.cat([chunk, chunk.new_zeros(pad_shape)], dim=self.dim)
            pieces.append(chunk.narrow(self.dim, self.piece(tp_rank, c) * m, m))
        return torch.cat(pieces, dim=self.dim).contiguous() if len(pieces) > 1 else pieces[0].contiguous()

    def gather_index(self) -> Tensor | None:
        """Index that maps the rank-order concatenation of all shards to the dense layout, or
        ``None`` when the concatenation already is the dense layout (one chunk, no padding). A shared
        piece is read from the first of the ranks that hold it."""
        if len(self.sizes) == 1 and self.padded_sizes == self.sizes and not self.is_shared:
            return None
        local = self.local_size
        index, offset = [], 0
        for size, m, s in zip(self.sizes, self.local_sizes, self.shared, strict=True):
            pos = torch.arange(size)
            index.append((pos // m) * s * local + offset + pos % m)
            offset += m
        return torch.cat(index)

    def chunk_ranges(self, rows: tuple[int, int] | None = None) -> list[tuple[int, int, int]]:
        """``(chunk, start, size)`` of each chunk's span along ``dim`` in a rank's shard; with ``rows``
        (``(lo, hi)``: a part of the shard, ZeRO's rows of dim 0), only what lies inside it, ``start``
        relative to ``lo``."""
        lo, hi = rows if rows is not None else (0, self.local_size)
        out, offset = [], 0
        for c, m in enumerate(self.local_sizes):
            a, b = max(offset, lo), min(offset + m, hi)
            if a < b:
                out.append((c, a - lo, b - a))
            offset += m
        return out

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
