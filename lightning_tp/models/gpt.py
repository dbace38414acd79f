"""A clean GPT in plain torch (nanoGPT naming), used by the recipes and benchmarks.

Nothing here knows about tensor parallelism: the ``auto`` policy recognises the names
(``transformer.wte`` / ``wpe`` / ``h.N.attn.c_attn`` / ``c_proj`` / ``mlp.c_fc`` / ``c_proj`` /
``lm_head``) and divides ``n_head`` / ``n_embd`` of the attention blocks. The forward reads local
sizes only (``view(B, T, n_head, -1)``), so the same code runs dense and sharded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}.")
        self.n_embd, self.n_head, self.dropout = n_embd, n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # (B, T, n_embd) each (local sizes under TP)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        if self.training and self.dropout > 0:
            # explicit probabilities so the dropout module (per-TP-rank stream under TP) draws the mask
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = self.attn_dropout(att.masked_fill(~mask, float("-inf")).softmax(dim=-1))
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_embd)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer.

    Args:
        vocab_size: tokens in the vocabulary.
        block_size: maximum sequence length.
        n_layer: transformer blocks.
        n_head: attention heads.
        n_embd: model width.
        dropout: dropout probability (embeddings, attention, residuals).
        bias: biases in linear layers and LayerNorms.
        tie_weights: share the token embedding with the LM head.
    """

    def __init__(
        self,
        vocab_size: int = 8192,
        block_size: int = 256,
        n_layer: int = 4,
        n_head: int = 8,
        n_embd: int = 512,
        dropout: float = 0.0,
        bias: bool = True,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                drop=nn.Dropout(dropout),
                h=nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer)),
                ln_f=nn.LayerNorm(n_embd, bias=bias),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.residual_std = 0.02 / math.sqrt(2 * n_layer)  # GPT-2's scaled init of residual projections
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """One module's initialization (``apply`` runs it children first, as deferred init does)."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, (CausalSelfAttention, MLP)):  # after its c_proj's own: the residual projection
            nn.init.normal_(module.c_proj.weight, mean=0.0, std=self.residual_std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor) -> Tensor:
        """``idx`` (B, T) token ids -> logits (B, T, vocab_size)."""
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.block_size}.")
        t = self.transformer
        x = t.drop(t.wte(idx) + t.wpe(torch.arange(T, device=idx.device)))
        for block in t.h:
            x = block(x)
        return self.lm_head(t.ln_f(x))
