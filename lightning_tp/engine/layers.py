"""Tensor-parallel drop-ins for ``nn.Linear`` and ``nn.Embedding``.

Each layer has the forward signature and return type of the module it replaces, and a
``from_dense(module, group, ...)`` that slices an existing module's weights, so results do not
depend on the tensor-parallel size. ``p`` below is the TP group size, ``r`` this rank.

* :class:`ColumnParallelLinear` ``Y = X A^T + b``, ``A`` split by output features (fused q/k/v:
  each chunk split separately, so every rank holds whole heads of q, k and v).
* :class:`RowParallelLinear` ``Y = sum_r X_r A_r^T + b``, ``A`` split by input features; bias added
  once after the all-reduce.
* :class:`KVReplicatedLinear`: a key/value projection with fewer heads than ranks: each rank holds
  and computes the one head its query heads read (a fused ``[Q | K | V]`` one: its query rows too).
* :class:`VocabParallelEmbedding`: embedding rows split by vocabulary, masked lookup + all-reduce.
* :class:`VocabParallelLMHead`: an LM-head ``nn.Linear`` split by vocabulary (output features).

Vocabularies not divisible by ``p`` are padded with zero rows to the next multiple; padded rows are
never looked up and padded logits never reach the user (gathered output drops them, the sharded
loss masks them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lightning_tp._compat import assert_async
from lightning_tp.engine.comm import (
    all_gather_dim,
    copy_to_tp_linear,
    enter_sequence_region,
    gather_from_sp,
    gather_from_tp,
    group_rank,
    group_size,
    linear_regather,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_tp,
    sequence_whole,
)
from lightning_tp.engine.loss import LossWorkspace, VocabShardedLogits
from lightning_tp.engine.sharding import ShardSpec, mark_partial_grad, mark_sharded, shard_spec
from lightning_tp.errors import ShardingError

if TYPE_CHECKING:
    from lightning_tp.engine.sequence import SequenceGather


def shard_parameter(full: Tensor, spec: ShardSpec | None, tp_rank: int, requires_grad: bool) -> nn.Parameter:
    """A new Parameter holding this rank's shard of ``full`` (a copy of it for ``spec=None``), marked
    with ``spec``; it keeps no reference to ``full``'s memory."""
    data = full.detach() if spec is None else spec.shard(full.detach(), tp_rank)
    if spec is None or data.untyped_storage().nbytes() > data.numel() * data.element_size():
        data = data.clone()  # a slice would keep the whole dense tensor's memory alive
    param = nn.Parameter(data, requires_grad=requires_grad)
    return param if spec is None else mark_sharded(param, spec)


def split_parameters(module: nn.Module, specs: Mapping[str, ShardSpec], group: ProcessGroup) -> nn.Module:
    """Replace each parameter of ``module`` named in ``specs`` (its own, by attribute name) with this
    rank's shard, marked with its spec; the module's own code then runs on the shards (experts split
    on their hidden units, a block's per-head parameters). Returns ``module``."""
    rank = group_rank(group)
    for name, spec in specs.items():
        full = getattr(module, name)
        setattr(module, name, shard_parameter(full, spec, rank, full.requires_grad))
    return module


class _ParallelLinear(nn.Module):
    """Shared construction of the parallel linears: validate, shard the dense weights, keep specs."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        device,
        dtype,
        group: ProcessGroup,
        weight_spec: ShardSpec,
        bias_spec: ShardSpec | None,
        dense: nn.Linear | None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group = group
        self.tp_size, self.tp_rank = group_size(group), group_rank(group)
        self.weight_spec = weight_spec
        if dense is None:
            # Initialise exactly like nn.Linear on the full matrix, then keep this rank's slice: the
            # same seed gives the same model at every TP size.
            dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight = shard_parameter(dense.weight, weight_spec, self.tp_rank, dense.weight.requires_grad)
        if dense.bias is not None:
            self.bias = shard_parameter(dense.bias, bias_spec, self.tp_rank, dense.bias.requires_grad)
        else:
            self.register_parameter("bias", None)

    @staticmethod
    def _check_dense(module: nn.Module) -> nn.Linear:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(module).__name__}.")
        return module


class ColumnParallelLinear(_ParallelLinear):
    """``Y = X A^T + b`` with ``A`` (out, in) split by output features: ``A = [A_1; ...; A_p]``.

    Local weight ``(out/p, in)``, local bias ``(out/p,)``. Input ``(..., in)`` replicated over TP
    (or ``(B, T/p, in)`` with ``sequence_parallel``); output ``(..., out/p)`` sharded on the last dim,
    or ``(..., out)`` in the dense layout with ``gather_output=True``.

    Args:
        in_features: as ``nn.Linear``.
        out_features: as ``nn.Linear`` (the full size).
        bias: as ``nn.Linear``.
        group: the tensor-parallel process group.
        gather_output: all-gather the output into the dense layout.
        chunks: the output is a fusion of projections: an int ``n`` for ``n`` equal chunks (fused
            q/k/v: 3), or the chunk sizes (grouped-query q/k/v: ``(q, k, v)``). Each chunk is split
            separately, so a rank holds the same heads of every chunk.
        head_dim: with ``chunks``, the size of one attention head: checks that every chunk's head
            count divides by ``p`` (each rank must hold whole heads).
        sequence_parallel: input is sharded on ``seq_dim``; all-gather it forward, reduce-scatter
            its grad backward.
        seq_dim: the sequence dim of the input (batch-first: 1; the policy builds -2, which also
            takes the tokens flattened with the batch, ``(B*T/p, in)``).
        sequence_gather: the enclosing block's :class:`~lightning_tp.engine.sequence.SequenceGather`
            (sequence parallelism through the policy): the input arrives gathered, and its backward
            reduce-scatter sums the input grad over TP, so this layer's forward runs no collective;
            its backward all-gathers the saved input shard again for the weight gradient.
        name: module name used in error messages.
    """

    _pad = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        group: ProcessGroup,
        gather_output: bool = False,
        chunks: int | Sequence[int] = 1,
        head_dim: int | None = None,
        sequence_parallel: bool = False,
        seq_dim: int = 1,
        sequence_gather: SequenceGather | None = None,
        name: str = "",
        _dense: nn.Linear | None = None,
    ) -> None:
        tp = group_size(group)
        sizes = chunk_sizes(out_features, chunks, name)
        if head_dim is not None:
            check_heads(sizes, head_dim, tp, name)
        label = f"out_features of {name!r}" if name else "out_features"
        weight_spec = ShardSpec(dim=0, sizes=sizes, tp_size=tp, pad=self._pad, name=label)
        bias_spec = ShardSpec(dim=0, sizes=sizes, tp_size=tp, pad=self._pad, name=label)
        super().__init__(in_features, out_features, bias, device, dtype, group, weight_spec, bias_spec, _dense)
        self.gather_output = gather_output
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim
        self.sequence_gather = sequence_gather
        index = weight_spec.gather_index()
        self.register_buffer("_gather_index", index, persistent=False)

    @classmethod
    def from_dense(cls, module: nn.Linear, group: ProcessGroup, **kwargs) -> ColumnParallelLinear:
        """Build from an existing ``nn.Linear`` by slicing its weight and bias (keyword options as
        in the constructor)."""
        m = cls._check_dense(module)
        return cls(m.in_features, m.out_features, m.bias is not None, group=group, _dense=m, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        y = self._local_linear(x)  # (..., out/p)
        if self.gather_output:
            y = self._gather(y)  # (..., out)
        return y

    def _local_linear(self, x: Tensor) -> Tensor:
        """``x A_r^T + b_r`` with the collectives of the input's layout: (..., in) -> (..., out/p)."""
        return column_linear(self, x, self.weight, self.bias)

    def _gather(self, y: Tensor) -> Tensor:
        y = gather_from_tp(y, self.group)  # (..., p * out/p) in rank order
        if self._gather_index is not None:
            if self._gather_index.device != y.device:  # made on the CPU; verify runs before the model's last move
                self._gather_index = self._gather_index.to(y.device)
            y = y.index_select(-1, self._gather_index)  # (..., out) dense layout
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} "
            f"(local {self.weight.shape[0]}), bias={self.bias is not None}, tp={self.tp_size}, "
            f"chunks={list(self.weight_spec.sizes)}, gather_output={self.gather_output}"
            + (", sequence_parallel=True" if self.sequence_parallel else "")
        )


def column_linear(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` for a layer whose input is replicated over TP and whose output
    reaches only this rank's heads, with the collectives of the input's layout (``layer``'s ``group``,
    ``sequence_parallel``, ``seq_dim``, ``sequence_gather``): the grad of ``x`` is summed over TP."""
    if layer.sequence_parallel and not sequence_whole(x.shape[layer.seq_dim], flat=x.dim() == 2):
        full = gather_from_sp(x, layer.group, layer.seq_dim)  # (B, T, in)
        return linear_regather(full, x, weight, bias, layer.group, layer.seq_dim)  # (B, T, out)
    if layer.sequence_gather is not None:
        shard = layer.sequence_gather.shard_of(x)  # (..., T/p, in) if x is the block's unchanged gathered input
        if shard is not None:
            return linear_regather(x, shard, weight, bias, layer.group, -2)  # (..., out)
        return F.linear(x, weight, bias)  # (..., out); the block's gather reduces dX
    return copy_to_tp_linear(x, weight, bias, layer.group)  # (..., out)


class KVReplicatedLinear(nn.Module):
    """A key or value projection of grouped-query attention with fewer key/value heads ``n`` than TP
    ranks (multi-query attention: ``n = 1``), ``p`` a multiple of ``n``: rank ``r`` holds and
    computes key/value head ``r // (p / n)`` alone, the one that its query heads ``[r H/p, (r+1) H/p)``
    read; the ``p / n`` ranks of a head hold the same copy (vLLM's replication of key/value heads). A
    fused ``[Q | K | V]`` projection (``chunks=(q, k, v)``): rank ``r`` holds its query heads' rows
    (split as :class:`ColumnParallelLinear`'s) and that key/value head's rows of ``K`` and ``V``.

    Weight ``(head_dim, in)`` (fused: ``(q/p + 2 head_dim, in)``) and bias laid out by a
    :class:`~lightning_tp.engine.sharding.ShardSpec` whose key/value chunks are *shared* by ``p / n``
    ranks: their gradients (each rank's covers only its query heads) are summed over a head's ranks
    before the step (:func:`lightning_tp.lightning.precision.all_reduce_partial_grads`), and a
    gradient norm counts each head once. Input ``(..., in)`` replicated over TP (or as
    :class:`ColumnParallelLinear` under sequence parallelism); output ``(..., head_dim)``, one head
    (fused: ``(..., q/p + 2 head_dim)``, ``[Q_r | K_h | V_h]``).

    Args:
        in_features: as ``nn.Linear``.
        out_features: as ``nn.Linear`` (all ``kv_heads`` heads; fused: ``q + k + v``).
        bias: as ``nn.Linear``.
        group: the tensor-parallel process group.
        kv_heads: the number of key/value heads ``n``: ``p`` must be a multiple of it.
        chunks: ``(q, k, v)`` sizes of a fused projection (``k == v``, ``n`` heads each; ``q`` whole
            heads of the same size, divisible over the ranks); ``None``: a key or value projection.
        sequence_parallel, seq_dim, sequence_gather: as :class:`ColumnParallelLinear`.
        name: module name used in error messages.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        group: ProcessGroup,
        kv_heads: int,
        chunks: Sequence[int] | None = None,
        sequence_parallel: bool = False,
        seq_dim: int = 1,
        sequence_gather: SequenceGather | None = None,
        name: str = "",
        _dense: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        tp, rank = group_size(group), group_rank(group)
        q, kv = kv_replica_layout(out_features, kv_heads, chunks, tp, name)
        self.in_features, self.out_features, self.kv_heads = in_features, out_features, kv_heads
        self.group, self.tp_size, self.tp_rank = group, tp, rank
        self.head_dim = kv // kv_heads
        self.head = rank // (tp // kv_heads)  # the key/value head this rank's query heads read
        self.chunks = None if chunks is None else tuple(chunks)
        self.sequence_parallel, self.seq_dim, self.sequence_gather = sequence_parallel, seq_dim, sequence_gather
        share = tp // kv_heads
        sizes, shared = ((kv,), (share,)) if chunks is None else ((q, kv, kv), (1, share, share))
        label = f"out_features of {name!r}" if name else "out_features"
        self.weight_spec = ShardSpec(dim=0, sizes=sizes, tp_size=tp, shared=shared, name=label)
        if _dense is None:
            _dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight = shard_parameter(_dense.weight, self.weight_spec, rank, _dense.weight.requires_grad)
        if _dense.bias is not None:
            self.bias = shard_parameter(_dense.bias, self.weight_spec, rank, _dense.bias.requires_grad)
        else:
            self.register_parameter("bias", None)
        head = torch.arange(self.head * self.head_dim, (self.head + 1) * self.head_dim)
        local_q = torch.arange(rank * q // tp, (rank + 1) * q // tp)
        rows = head if chunks is None else torch.cat([local_q, q + head, q + kv + head])
        self.register_buffer("_rows", rows, persistent=False)  # the output features this rank computes

    @classmethod
    def from_dense(cls, module: nn.Linear, group: ProcessGroup, **kwargs) -> KVReplicatedLinear:
        """Build from an existing ``nn.Linear`` by slicing this rank's rows (keyword options as in the
        constructor)."""
        m = _ParallelLinear._check_dense(module)
        return cls(m.in_features, m.out_features, m.bias is not None, group=group, _dense=m, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return column_linear(self, x, self.weight, self.bias)  # (..., head_dim) or (..., q/p + 2 head_dim)

    def dense_output_rows(self) -> tuple[Tensor, Tensor]:
        """``(rows, share)``: the dense output features this rank's output holds, in order, and each
        one's share of it over TP (``1 / (p / n)`` for a key/value head, which ``p / n`` ranks compute;
        1 for a query head's, which one rank computes): ``sum`` over ranks of ``share * out`` covers
        every dense feature once (verify's block-by-block probe)."""
        if self._rows.device != self.weight.device:  # made on the CPU; verify runs before the model's last move
            self._rows = self._rows.to(self.weight.device)
        share = torch.full((self._rows.numel(),), self.kv_heads / self.tp_size, dtype=torch.float64)
        if self.chunks is not None:
            share[: self._rows.numel() - 2 * self.head_dim] = 1.0  # the query heads: this rank's alone
        return self._rows, share.to(self._rows.device)

    def extra_repr(self) -> str:
        fused = "" if self.chunks is None else f", chunks={list(self.chunks)}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features} (local {self._rows.numel()}: "
            f"key/value head {self.head} of {self.kv_heads}){fused}, bias={self.bias is not None}, tp={self.tp_size}"
            + (", sequence_parallel=True" if self.sequence_parallel else "")
        )


def kv_replica_layout(
    out_features: int, kv_heads: int, chunks: Sequence[int] | None, tp: int, name: str = ""
) -> tuple[int, int]:
    """``(query features, key/value features)`` of a projection whose ``kv_heads`` key/value heads are
    replicated over ``tp`` ranks (:class:`KVReplicatedLinear`; ``chunks``: a fused ``(q, k, v)``).

    Raises:
        ShardingError: not fewer heads than ranks, ``tp`` not a multiple of them, heads not whole, a
            fused layout that is not ``(q, k, v)`` with ``k == v`` and whole query heads split evenly.
    """
    label = repr(name) if name else "a key/value projection"
    ok = isinstance(kv_heads, int) and not isinstance(kv_heads, bool) and kv_heads >= 1
    q, kv = 0, out_features
    if chunks is not None:
        fits = len(chunks) == 3 and chunks[1] == chunks[2] and sum(chunks) == out_features
        q, kv, ok = (chunks[0], chunks[1], ok) if fits else (0, 0, False)
    ok = ok and kv > 0 and kv % kv_heads == 0 and tp % kv_heads == 0 and kv_heads % tp != 0
    if ok and chunks is not None:
        head_dim = kv // kv_heads
        ok = q % head_dim == 0 and (q // head_dim) % tp == 0 and q > kv
    if not ok:
        fused = "" if chunks is None else f", chunks={list(chunks)}"
        raise ShardingError(
            f"{label}: kv_heads={kv_heads!r} key/value heads of out_features={out_features}{fused} cannot be "
            f"replicated over tensor_parallel_size={tp}: replication needs fewer key/value heads than ranks, a TP "
            "size that is a multiple of their count and whole heads (fused: (q, k, v) chunk sizes, k == v, the "
            "query heads divisible by the TP size). Use a tensor_parallel_size that is a multiple or a divisor of "
            "the key/value head count, or 'column'/'qkv' when it divides by the TP size."
        )
    return q, kv


class RowParallelLinear(_ParallelLinear):
    """``Y = sum_r X_r A_r^T + b`` with ``A`` (out, in) split by input features: ``A = [A_1 .. A_p]``.

    Local weight ``(out, in/p)``; bias ``(out,)`` replicated and added once after the reduction.
    Input ``(..., in/p)`` sharded on the last dim (``input_is_parallel=True``, the output of a
    :class:`ColumnParallelLinear`) or ``(..., in)`` replicated, then scattered. Output ``(..., out)``
    all-reduced, or ``(B, T/p, out)`` reduce-scattered on ``seq_dim`` with ``sequence_parallel``.

    Args:
        in_features: as ``nn.Linear`` (the full size).
        out_features: as ``nn.Linear``.
        bias: as ``nn.Linear``.
        group: the tensor-parallel process group.
        input_is_parallel: the input is already split on its last dim.
        sequence_parallel: reduce-scatter the output on ``seq_dim`` instead of all-reducing it.
        seq_dim: the sequence dim of the output (batch-first: 1).
        name: module name used in error messages.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        group: ProcessGroup,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        seq_dim: int = 1,
        name: str = "",
        _dense: nn.Linear | None = None,
    ) -> None:
        label = f"in_features of {name!r}" if name else "in_features"
        weight_spec = ShardSpec(dim=1, sizes=(in_features,), tp_size=group_size(group), name=label)
        super().__init__(in_features, out_features, bias, device, dtype, group, weight_spec, None, _dense)
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim
        if self.bias is not None and sequence_parallel:
            mark_partial_grad(self.bias)  # each rank adds it to its own sequence chunk

    @classmethod
    def from_dense(cls, module: nn.Linear, group: ProcessGroup, **kwargs) -> RowParallelLinear:
        """Build from an existing ``nn.Linear`` by slicing its weight (keyword options as in the
        constructor)."""
        m = cls._check_dense(module)
        return cls(m.in_features, m.out_features, m.bias is not None, group=group, _dense=m, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if self.tp_size == 1:  # nothing to scatter or reduce: nn.Linear's own (fused bias) call
            return F.linear(x, self.weight, self.bias)
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)  # (..., in/p)
        y = F.linear(x, self.weight)  # (..., out), partial sum
        if self.sequence_parallel and not sequence_whole(y.shape[self.seq_dim], full=True, flat=y.dim() == 2):
            y = reduce_scatter_to_sp(y, self.group, self.seq_dim)  # (B, T/p, out)
        else:
            y = reduce_from_tp(y, self.group, inplace=True)  # (..., out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)  # under autocast: bf16, like nn.Linear's output
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} (local {self.weight.shape[1]}), out_features={self.out_features}, "
            f"bias={self.bias is not None}, tp={self.tp_size}, input_is_parallel={self.input_is_parallel}"
            + (", sequence_parallel=True" if self.sequence_parallel else "")
        )


class VocabParallelLMHead(ColumnParallelLinear):
    """LM head ``logits = X E^T (+ b)``, ``E`` (V, H) split by vocabulary rows, V padded to ``Vp``.

    Local weight ``(Vp/p, H)``: exactly the local weight of a :class:`VocabParallelEmbedding` of the
    same vocabulary, so a tied ``lm_head.weight is wte.weight`` stays one parameter. With
    ``gather_output=True`` (default) returns dense ``(..., V)`` logits (padding dropped), a drop-in
    for ``nn.Linear``; with ``gather_output=False`` returns :class:`VocabShardedLogits`
    ``(..., Vp/p)`` for :func:`lightning_tp.cross_entropy`, which keeps its ``(..., Vp/p)``
    buffer in this head's :class:`~lightning_tp.engine.loss.LossWorkspace` between steps (CPU).
    ``torch.compile`` traces the sharded logits too (no graph break; the loss then uses no workspace).
    """

    _pad = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 group: ProcessGroup, gather_output: bool = True, sequence_parallel: bool = False,
                 seq_dim: int = 1, name: str = "", _dense: nn.Linear | None = None) -> None:  # fmt: skip
        super().__init__(in_features, out_features, bias, device, dtype, group=group, gather_output=gather_output,
                         sequence_parallel=sequence_parallel, seq_dim=seq_dim, name=name, _dense=_dense)  # fmt: skip
        self._loss_workspace = LossWorkspace()  # the sharded loss's buffer, reused across steps when free

    @property
    def vocab_size(self) -> int:
        return self.out_features

    def forward(self, x: Tensor) -> Tensor:
        y = self._local_linear(x)  # (..., Vp/p)
        if self.gather_output:
            return self._gather(y)  # (..., V)
        return VocabShardedLogits.wrap(y, self.group, self.out_features, self._loss_workspace)


EMBEDDING_OPTIONS_REASON = (
    "cannot be vocab-parallel (they depend on which rows a batch touches across all ranks). Map this embedding "
    "to 'replicate' in the policy or drop them."
)


def unsupported_embedding_options(module: nn.Embedding) -> list[str]:
    """The options of ``module`` a vocab-parallel embedding cannot honour."""
    options = {"max_norm": module.max_norm is not None, "scale_grad_by_freq": module.scale_grad_by_freq,
               "sparse": module.sparse}  # fmt: skip
    return [k for k, v in options.items() if v]


class VocabParallelEmbedding(nn.Module):
    """Embedding ``E`` (V, H) split by vocabulary rows, ``V`` padded to ``Vp``, a multiple of ``p``.

    Rank ``r`` holds rows ``[r*Vp/p, (r+1)*Vp/p)``, local weight ``(Vp/p, H)``. Forward: look up the
    ids in range (others give zero rows), then all-reduce: ``y = sum_r lookup_r(ids)``. Input
    ``(...)`` replicated over TP, output ``(..., H)`` replicated; with ``sequence_parallel`` the
    all-reduce is a reduce-scatter over the ids' last dim (the sequence): output ``(..., T/p, H)``.

    Args:
        num_embeddings: as ``nn.Embedding`` (the real vocabulary size).
        embedding_dim: as ``nn.Embedding``.
        padding_idx: as ``nn.Embedding`` (its row gets no gradient).
        group: the tensor-parallel process group.
        sequence_parallel: reduce-scatter the output over the sequence (the ids' last dim).
        name: module name used in error messages.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        device=None,
        dtype=None,
        *,
        group: ProcessGroup,
        sequence_parallel: bool = False,
        name: str = "",
        _dense: nn.Embedding | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        if _dense is None:
            _dense = nn.Embedding(num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype)
        self.padding_idx = _dense.padding_idx
        _shard_vocab_rows(self, _dense.weight, group, sequence_parallel, name)

    @classmethod
    def from_dense(cls, module: nn.Embedding, group: ProcessGroup, **kwargs) -> VocabParallelEmbedding:
        """Build from an existing ``nn.Embedding`` by slicing (and padding) its weight."""
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"VocabParallelEmbedding.from_dense expects an nn.Embedding, got {type(module).__name__}.")
        bad = unsupported_embedding_options(module)
        if bad:
            where = f" of {kwargs['name']!r}" if kwargs.get("name") else ""
            raise ShardingError(f"nn.Embedding options {bad}{where} {EMBEDDING_OPTIONS_REASON}")
        if type(module) is not nn.Embedding:
            return _vocab_parallel_subclass(module, group, **kwargs)
        return cls(module.num_embeddings, module.embedding_dim, group=group, _dense=module, **kwargs)

    def forward(self, ids: Tensor) -> Tensor:
        return _vocab_parallel_lookup(self, ids)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, local rows [{self.vocab_start}, {self.vocab_end}) "
            f"of {self.weight.shape[0]}, tp={self.tp_size}"
            + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
            + (", sequence_parallel=True" if self.sequence_parallel else "")
        )


def _shard_vocab_rows(emb: nn.Module, weight: Tensor, group: ProcessGroup, sequence_parallel: bool, name: str) -> None:
    """Give ``emb`` (with ``num_embeddings`` and ``padding_idx`` set) this rank's padded rows of the
    dense ``weight`` and what :func:`_vocab_parallel_lookup` reads: its row range and local padding index."""
    emb.group, emb.sequence_parallel, emb.tp_name = group, sequence_parallel, name
    emb.tp_size, emb.tp_rank = group_size(group), group_rank(group)
    label = f"num_embeddings of {name!r}" if name else "num_embeddings"
    emb.weight_spec = ShardSpec(dim=0, sizes=(emb.num_embeddings,), tp_size=emb.tp_size, pad=True, name=label)
    emb.weight = shard_parameter(weight, emb.weight_spec, emb.tp_rank, weight.requires_grad)
    emb.vocab_start, n_valid = emb.weight_spec.valid_range(emb.tp_rank)
    emb.vocab_end = emb.vocab_start + n_valid
    pad = emb.padding_idx
    emb._local_padding_idx = (
        pad - emb.vocab_start if pad is not None and emb.vocab_start <= pad < emb.vocab_end else None
    )


def _vocab_parallel_lookup(emb: nn.Module, ids: Tensor) -> Tensor:
    """``y = sum_r lookup_r(ids)``: this rank's rows for the ids in its vocabulary range, zeros for
    the others, summed over TP (reduce-scattered over the sequence with ``sequence_parallel``)."""
    if torch.compiler.is_compiling():  # the same check inside the graph (no .item(): no graph break)
        if ids.device.type == "cpu" and ids.numel():
            inside = (ids.min() >= 0) & (ids.max() < emb.num_embeddings)
            assert_async(inside, f"a token id is out of range for an embedding of {emb.num_embeddings} rows.")
    elif ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= emb.num_embeddings):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise IndexError(f"index {bad} is out of range for an embedding of {emb.num_embeddings} rows.")
    elif ids.device.type not in ("cpu", "meta") and emb.tp_size > 1 and ids.numel():
        # on a GPU no rank would hold the row (zeros, silently): a device-side assert, no synchronisation
        inside = (ids.min() >= 0) & (ids.max() < emb.num_embeddings)
        assert_async(inside, f"a token id is out of range for an embedding of {emb.num_embeddings} rows.")
    if emb.tp_size == 1:  # F.embedding checks the ids itself, on every device
        return F.embedding(ids, emb.weight, emb._local_padding_idx)
    outside = (ids < emb.vocab_start) | (ids >= emb.vocab_end)  # (...)
    local_ids = (ids - emb.vocab_start).masked_fill(outside, 0)  # (...)
    y = F.embedding(local_ids, emb.weight, emb._local_padding_idx)  # (..., H) partial
    y = y.masked_fill_(outside.unsqueeze(-1), 0.0)  # (..., H), in place: y is this layer's own
    if emb.sequence_parallel and not enter_sequence_region(y, emb.group, emb.tp_name, emb.training):
        return reduce_scatter_to_sp(y, emb.group, -2)  # (..., T/p, H)
    return reduce_from_tp(y, emb.group, inplace=True)  # (..., H)


class _VocabParallelLookup(nn.Embedding):
    """The lookup of :class:`VocabParallelEmbedding` as ``nn.Embedding.forward``: mixed in after a
    user's ``nn.Embedding`` subclass, so the subclass's own forward (e.g. ``super().forward(ids) *
    scale``) keeps its extra math around the parallel lookup."""

    def forward(self, ids: Tensor) -> Tensor:
        return _vocab_parallel_lookup(self, ids)


_SUBCLASSES: dict[type, type] = {}


def _vocab_parallel_subclass(module: nn.Embedding, group: ProcessGroup, *, sequence_parallel: bool = False,
                             name: str = "") -> nn.Embedding:  # fmt: skip
    """Turn an ``nn.Embedding`` subclass into its vocab-parallel form in place: its class becomes
    ``(its class, _VocabParallelLookup)`` (``super().forward`` inside its forward now runs the
    parallel lookup; ``isinstance`` checks still hold) and its weight this rank's padded rows.
    Every other attribute (buffers such as a scale, options) stays as it was."""
    cls = type(module)
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"VocabParallel{cls.__name__}", (cls, _VocabParallelLookup), {})
    _shard_vocab_rows(module, module.weight, group, sequence_parallel, name)
    module.__class__ = _SUBCLASSES[cls]
    return module


class HeadParallelEmbedding(nn.Module):
    """Embedding ``E`` (N, D) split by columns, ``D`` = attention heads: rank ``r`` holds columns
    ``[r*D/p, (r+1)*D/p)``, local weight ``(N, D/p)``; output ``(..., D/p)``, this rank's heads
    (a per-head table such as T5's relative-position bias). No collective: like a column layer's
    output it stays sharded inside the attention block.

    Args:
        module: the dense ``nn.Embedding`` to slice.
        group: the tensor-parallel process group.
        name: module name used in error messages.
    """

    def __init__(self, module: nn.Embedding, group: ProcessGroup, name: str = "") -> None:
        super().__init__()
        if not isinstance(module, nn.Embedding) or module.max_norm is not None or module.sparse:
            raise TypeError(
                f"{name or 'module'}: a head-parallel embedding needs a plain nn.Embedding (no max_norm, not "
                f"sparse), got {module!r}. Map it to 'replicate' in the policy."
            )
        self.num_embeddings, self.embedding_dim = module.num_embeddings, module.embedding_dim
        self.padding_idx = module.padding_idx
        self.group, self.tp_size = group, group_size(group)
        label = f"embedding_dim of {name!r}" if name else "embedding_dim"
        self.weight_spec = ShardSpec(dim=1, sizes=(module.embedding_dim,), tp_size=self.tp_size, name=label)
        self.weight = shard_parameter(module.weight, self.weight_spec, group_rank(group), module.weight.requires_grad)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)  # (..., D/p)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim} (local {self.weight.shape[1]}), tp={self.tp_size}"


def chunk_sizes(total: int, chunks: int | Sequence[int], name: str) -> tuple[int, ...]:
    if isinstance(chunks, int):
        if chunks < 1 or total % chunks != 0:
            raise ShardingError(
                f"{name or 'module'}: out_features={total} cannot be divided into {chunks} equal fused "
                "chunks; pass the chunk sizes explicitly, e.g. chunks=(q, k, v)."
            )
        return (total // chunks,) * chunks
    sizes = tuple(int(s) for s in chunks)
    if sum(sizes) != total or any(s < 1 for s in sizes):
        raise ShardingError(
            f"{name or 'module'}: chunk sizes {list(sizes)} must be positive and sum to out_features={total}."
        )
    return sizes


def check_heads(sizes: tuple[int, ...], head_dim: int, tp: int, name: str) -> None:
    label = repr(name) if name else "a fused projection"
    for size in sizes:
        if size % head_dim != 0:
            raise ShardingError(f"{label}: chunk size {size} is not a whole number of heads of size {head_dim}.")
        heads = size // head_dim
        if heads % tp != 0:
            raise ShardingError(
                f"{label}: {heads} heads (chunk sizes {list(sizes)}, head_dim {head_dim}) cannot be split "
                f"over tensor_parallel_size={tp}: every rank must hold whole heads. Use a "
                f"tensor_parallel_size that divides {heads}, or replicate this attention block."
            )


@torch.no_grad()
def gather_weight(param: Tensor, group: ProcessGroup) -> Tensor:
    """Rebuild the dense tensor of a TP-sharded parameter (all-gather + unshard). Collective."""
    spec = shard_spec(param)
    if spec is None:
        return param.detach().clone()
    return gather_sharded(param.detach(), spec, group)


@torch.no_grad()
def gather_sharded_into(dst: Tensor, local: Tensor, spec: ShardSpec, group: ProcessGroup) -> None:
    """:func:`gather_sharded` written into ``dst`` (the dense tensor, or a view of it) piece by
    piece: no second dense-sized copy beside the gather buffer. Collective."""
    gathered = all_gather_dim(local.contiguous(), group, spec.dim)  # (.., p * local, ..), rank order
    shards = gathered.chunk(spec.tp_size, dim=spec.dim)
    full_offset = local_offset = 0
    for c, (size, m) in enumerate(zip(spec.sizes, spec.local_sizes, strict=True)):
        for r, shard in enumerate(shards):
            start, n_valid = spec.valid_range(r, c)
            if n_valid > 0:
                dst.narrow(spec.dim, full_offset + start, n_valid).copy_(shard.narrow(spec.dim, local_offset, n_valid))
        full_offset, local_offset = full_offset + size, local_offset + m


def gather_sharded(local: Tensor, spec: ShardSpec, group: ProcessGroup) -> Tensor:
    """The dense tensor laid out by ``spec`` from every rank's ``local`` shard (a weight or its
    gradient): all-gather on ``spec.dim``, then unshard (reorder fused chunks, drop padding). Collective."""
    gathered = all_gather_dim(local, group, spec.dim)  # (.., p * local, ..)
    return spec.unshard(list(gathered.chunk(spec.tp_size, dim=spec.dim)))
