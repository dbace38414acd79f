"""Tensor-parallel ``nn.MultiheadAttention``: torch's attention module split by heads.

``Y = concat_h(softmax(Q_h K_h^T / sqrt(d) + M) V_h) W_o^T + b_o``. Heads are independent, so rank
``r`` of ``p`` holds heads ``[r H/p, (r+1) H/p)``: their rows of ``in_proj_weight`` ``(3E/p, E)`` (the
q, k and v chunks each split, as a fused q/k/v column layer) or of ``q/k/v_proj_weight`` (``kdim``,
``vdim``), of ``in_proj_bias`` and of ``bias_k``/``bias_v`` ``(1, 1, E/p)``. The in-projection sums
the query's (key's, value's) gradient over TP in backward, like a column layer; ``out_proj`` is a row
layer (:class:`~lightning_tp.engine.layers.RowParallelLinear`, its own plan row) whose all-reduce sums
the heads. The module keeps its object, attributes and state-dict keys (its class becomes a subclass
with this forward): ``num_heads``, ``embed_dim`` and ``head_dim`` keep describing the whole module (the
per-head masks it takes and the per-head weights it returns have every head), ``local_heads`` is this
rank's count.

Forward signature and results as ``nn.MultiheadAttention``'s: ``batch_first`` or not, unbatched
inputs, ``attn_mask`` (2-D; 3-D per head: this rank's heads are kept), ``key_padding_mask``,
``is_causal``, ``bias_k``/``bias_v``, ``add_zero_attn``, dropout on the attention weights (this rank's
heads: the strategy's split regions draw it from the model-parallel stream) and ``need_weights``: the
weights averaged over every head (this rank's heads summed, then all-reduced) or, with
``average_attn_weights=False``, per head (all-gathered on the head dim).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lightning_tp.engine.comm import gather_from_tp, group_rank, group_size, reduce_from_tp
from lightning_tp.engine.layers import column_linear
from lightning_tp.engine.sharding import ShardSpec
from lightning_tp.errors import ShardingError


def multihead_attention_specs(module: nn.MultiheadAttention, tp: int, name: str = "") -> dict[str, ShardSpec]:
    """How each of ``module``'s own parameters is split by heads over ``tp`` ranks (``out_proj`` not
    included: it is a row layer of its own). A head count that does not divide by ``tp`` is a
    ``ShardingError``."""
    heads, width = module.num_heads, module.embed_dim
    label = f"module {name!r}" if name else type(module).__name__
    if heads % tp:
        raise ShardingError(
            f"{label}: num_heads={heads} cannot be split over tensor_parallel_size={tp}: {heads} is not divisible "
            f"by {tp}. Use a tensor_parallel_size that divides {heads}, or map the module to 'replicate' (and its "
            "out_proj too)."
        )
    specs = {}
    for p_name, _ in module.named_parameters(recurse=False):
        if p_name in ("bias_k", "bias_v"):  # (1, 1, E)
            dim, sizes = 2, (width,)
        elif p_name in ("in_proj_weight", "in_proj_bias"):  # (3E, E) / (3E,): [q | k | v]
            dim, sizes = 0, (width,) * 3
        else:  # q_proj_weight (E, E), k_proj_weight (E, kdim), v_proj_weight (E, vdim)
            dim, sizes = 0, (width,)
        specs[p_name] = ShardSpec(dim=dim, sizes=sizes, tp_size=tp, name=f"dim {dim} of {name}.{p_name}".lstrip("."))
    return specs


class TensorParallelMultiheadAttention(nn.MultiheadAttention):
    """The forward of an ``nn.MultiheadAttention`` holding this rank's heads (see the module doc).
    Not built directly: :func:`split_multihead_attention` makes a module this (a subclass of its class)."""

    group: ProcessGroup
    local_heads: int  # this rank's heads (num_heads: every rank's)
    first_head: int  # the first of this rank's heads
    tp_name: str = ""  # its name in the model (in warnings)
    weights_warned = False  # whether it said that returning the attention weights costs a collective
    sequence_parallel = False  # (the in-projection's input layout, as a column layer's: replicated)
    sequence_gather = None

    def forward(  # noqa: D102 (nn.MultiheadAttention's)
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "query, key and value should all be unbatched 2D or batched 3D tensors, but received "
                f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D ones"
            )
        fused = self.in_proj_weight is not None  # [q | k | v] in one weight: key and value as wide as the query
        same = key.shape == value.shape if fused else key.shape[:-1] == value.shape[:-1]
        if not same:
            raise ValueError(f"key of shape {tuple(key.shape)} and value of shape {tuple(value.shape)} do not match")
        batched = query.dim() == 3
        packed, kv_packed = query is key and key is value, key is value  # one in-projection call for what is one tensor
        if self.batch_first and batched:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))  # (L, B, E)
        if not batched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))  # (L, 1, E)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, _ = query.shape
        kpm = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        causal = is_causal and kpm is None and not need_weights  # (then the mask is SDPA's is_causal)
        mask = _float_mask(attn_mask, "attn_mask", query.dtype)
        mask = None if causal else mask
        q, k, v = self._in_projection(query, key, value, packed, kv_packed)  # (L, B, E/p), (S, B, E/p) x 2
        mask = self._local_mask(mask, tgt_len, key.shape[0], bsz)  # (1 or B h, L, S)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])  # (S + 1, B, E/p)
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            mask, kpm = _pad_last(mask), _pad_last(kpm)
        h, hd = self.local_heads, self.head_dim
        q = q.reshape(tgt_len, bsz * h, hd).transpose(0, 1)  # (B h, L, hd)
        k = k.reshape(k.shape[0], bsz * h, hd).transpose(0, 1)  # (B h, S, hd)
        v = v.reshape(v.shape[0], bsz * h, hd).transpose(0, 1)
        if self.add_zero_attn:
            zeros = k.new_zeros(bsz * h, 1, hd)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)  # (B h, S + 1, hd)
            mask, kpm = _pad_last(mask), _pad_last(kpm)
        src_len = k.shape[1]
        if kpm is not None:
            if tuple(kpm.shape) != (bsz, src_len):
                raise ValueError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but got {tuple(kpm.shape)}")
            kpm = kpm.view(bsz, 1, 1, src_len).expand(-1, h, -1, -1).reshape(bsz * h, 1, src_len)
            mask = kpm if mask is None else mask + kpm  # (B h, L, S)
        dropout_p = self.dropout if self.training else 0.0
        if need_weights and not torch.compiler.is_compiling() and not self.weights_warned:
            self.weights_warned = True  # (once per module)
            warnings.warn(
                f"{self.tp_name or type(self).__name__}: split by heads, the attention weights it returns "
                "(need_weights=True, nn.MultiheadAttention's default) cost an all-reduce (averaged over the heads) "
                "or an all-gather (per head) of (batch, target, source) per call besides the output's all-reduce. "
                "Pass need_weights=False where they are not used.",
                stacklevel=2,
            )
        if need_weights:
            out, weights = self._attend_with_weights(q, k, v, mask, dropout_p, average_attn_weights)
        else:
            out, weights = self._attend(q, k, v, mask, dropout_p, causal), None
        out = self.out_proj(out)  # (L B, E): the row layer sums the heads over TP
        out = out.view(tgt_len, bsz, out.shape[-1])
        if not batched:
            return out.squeeze(1), (weights.squeeze(0) if weights is not None else None)
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def _in_projection(
        self, query: Tensor, key: Tensor, value: Tensor, packed: bool, kv_packed: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's heads of q, k and v: ``(L, B, E/p)``, ``(S, B, E/p)`` x 2. Each distinct input's
        gradient is summed over TP in backward (one call per distinct input tensor)."""
        local = self.local_heads * self.head_dim
        if self.in_proj_weight is None:  # q/k/v_proj_weight: key and value of widths of their own
            b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
            return (
                column_linear(self, query, self.q_proj_weight, b_q),
                column_linear(self, key, self.k_proj_weight, b_k),
                column_linear(self, value, self.v_proj_weight, b_v),
            )
        w, b = self.in_proj_weight, self.in_proj_bias  # (3E/p, E): [q | k | v] of this rank's heads
        if packed:
            return column_linear(self, query, w, b).chunk(3, dim=-1)  # type: ignore[return-value]
        w_q, w_kv = w.split([local, 2 * local])
        b_q, b_kv = b.split([local, 2 * local]) if b is not None else (None, None)
        q = column_linear(self, query, w_q, b_q)
        if kv_packed:
            k, v = column_linear(self, key, w_kv, b_kv).chunk(2, dim=-1)
            return q, k, v
        w_k, w_v = w_kv.chunk(2)
        b_k, b_v = b_kv.chunk(2) if b_kv is not None else (None, None)
        return q, column_linear(self, key, w_k, b_k), column_linear(self, value, w_v, b_v)

    def _local_mask(self, mask: Tensor | None, tgt_len: int, src_len: int, bsz: int) -> Tensor | None:
        """``attn_mask`` as ``(1, L, S)``, or a per-head ``(B H, L, S)`` one cut to this rank's heads."""
        if mask is None:
            return None
        if mask.dim() == 2:
            if tuple(mask.shape) != (tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {mask.shape}, but should be {(tgt_len, src_len)}."
                )
            return mask.unsqueeze(0)  # (1, L, S)
        if mask.dim() == 3:
            full = (bsz * self.num_heads, tgt_len, src_len)
            if tuple(mask.shape) != full:
                raise RuntimeError(f"The shape of the 3D attn_mask is {mask.shape}, but should be {full}.")
            heads = mask.view(bsz, self.num_heads, tgt_len, src_len)[
                :, self.first_head : self.first_head + self.local_heads
            ]
            return heads.reshape(bsz * self.local_heads, tgt_len, src_len)  # (B h, L, S)
        raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, causal: bool) -> Tensor:
        """Scaled dot-product attention of this rank's heads: ``(L B, E/p)``."""
        bh, tgt_len, hd = q.shape
        bsz, h, src_len = bh // self.local_heads, self.local_heads, k.shape[1]
        if mask is not None:
            mask = mask.unsqueeze(0) if mask.shape[0] == 1 else mask.view(bsz, h, -1, src_len)  # (1|B, 1|h, L, S)
        out = F.scaled_dot_product_attention(
            q.view(bsz, h, tgt_len, hd), k.view(bsz, h, src_len, hd), v.view(bsz, h, src_len, hd), mask, dropout_p,
            causal,
        )  # (B, h, L, hd)  # fmt: skip
        return out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, h * hd)  # (L B, E/p)

    def _attend_with_weights(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, average: bool
    ) -> tuple[Tensor, Tensor]:
        """Attention of this rank's heads with its weights: ``(L B, E/p)``, and the weights of every
        head, averaged ``(B, L, S)`` or per head ``(B, H, L, S)`` (after dropout, as torch's)."""
        bh, tgt_len, hd = q.shape
        bsz, src_len = bh // self.local_heads, k.shape[1]
        scores = q * math.sqrt(1.0 / float(hd))
        if mask is not None:
            weights = torch.baddbmm(mask, scores, k.transpose(-2, -1))  # (B h, L, S)
        else:
            weights = torch.bmm(scores, k.transpose(-2, -1))
        weights = torch.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, self.local_heads * hd)  # (L B, E/p)
        weights = weights.view(bsz, self.local_heads, tgt_len, src_len)
        if average:
            return out, reduce_from_tp(weights.sum(dim=1), self.group) / self.num_heads  # (B, L, S)
        return out, gather_from_tp(weights.movedim(1, -1), self.group).movedim(-1, 1)  # (B, H, L, S)

    def extra_repr(self) -> str:
        return f"heads {self.first_head}..{self.first_head + self.local_heads - 1} of {self.num_heads}, tp={group_size(self.group)}"


def _float_mask(mask: Tensor | None, what: str, dtype: torch.dtype) -> Tensor | None:
    """A mask as torch's attention adds it: a boolean one as 0 / -inf (True: not attended), a float one as is."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"only bool and floating types of {what} are supported, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _pad_last(mask: Tensor | None) -> Tensor | None:
    """One more key position (``bias_k``/``bias_v``, ``add_zero_attn``), attended: a 0 column."""
    return None if mask is None else F.pad(mask, (0, 1))


# the class a split module of each class becomes (a user's subclass: one made with it)
_SUBCLASSES: dict[type, type] = {nn.MultiheadAttention: TensorParallelMultiheadAttention}


def own_forward(module: nn.Module) -> str | None:
    """Why ``module`` cannot be split by heads: a subclass of ``nn.MultiheadAttention`` with a forward of
    its own, which would run on this rank's heads as if they were all (``None``: it can)."""
    cls = type(module)
    if cls.forward is nn.MultiheadAttention.forward or issubclass(cls, TensorParallelMultiheadAttention):
        return None
    return (
        f"{cls.__name__} overrides nn.MultiheadAttention.forward, which would run on this rank's heads as if they "
        "were every head. Map it (and its out_proj) to 'replicate'."
    )


def split_multihead_attention(module: nn.MultiheadAttention, group: ProcessGroup, name: str = "") -> nn.Module:
    """Make ``module`` (its own parameters already split by :func:`multihead_attention_specs`, its
    ``out_proj`` a row layer) run as :class:`TensorParallelMultiheadAttention` in place: its class
    becomes ``(TensorParallelMultiheadAttention, its class)``, ``local_heads`` this rank's head count. A
    subclass with a forward of its own is refused (it would run on the split weights as if they were
    whole). Returns ``module``."""
    if (why := own_forward(module)) is not None:
        raise ShardingError(f"module {name!r}: {why}")
    cls = type(module)
    tp = group_size(group)
    if cls not in _SUBCLASSES and not issubclass(cls, TensorParallelMultiheadAttention):
        _SUBCLASSES[cls] = type(f"TensorParallel{cls.__name__}", (TensorParallelMultiheadAttention, cls), {})
    module.__class__ = _SUBCLASSES.get(cls, cls)
    module.group, module.local_heads, module.tp_name = group, module.num_heads // tp, name
    module.first_head = group_rank(group) * module.local_heads
    module.weights_warned = tp == 1  # one rank holds every head: no collective to say
    return module
