"""Small models written in different styles, for policy and parity tests (plain torch, no TP)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PlainAttention(nn.Module):
    """Separate q/k/v projections, head count and head size as attributes."""

    def __init__(self, d, n_heads, n_kv_heads=None):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads or n_heads
        self.head_dim = d // n_heads
        self.q_proj = nn.Linear(d, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PlainBlock(nn.Module):
    def __init__(self, d, n_heads, n_kv_heads=None):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn = PlainAttention(d, n_heads, n_kv_heads)
        self.mlp = SwiGLU(d, 4 * d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PlainGPT(nn.Module):
    """Llama-like: separate q/k/v (optionally grouped-query), SwiGLU, untied or tied head."""

    def __init__(self, vocab=30, d=16, n_layers=2, n_heads=4, n_kv_heads=None, tied=False, ctx=32):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.layers = nn.ModuleList(PlainBlock(d, n_heads, n_kv_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, idx):
        x = self.embed_tokens(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


class Router(nn.Module):
    """A router weight without an initializer of its own: the model's ``_init_weights`` sets it when it
    initializes the block that holds it, as Hugging Face's mixture-of-experts blocks do."""

    def __init__(self, d, n_experts):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_experts, d))


class RoutedMLP(nn.Module):
    def __init__(self, d, n_experts=4):
        super().__init__()
        self.router = Router(d, n_experts)
        self.up_proj = nn.Linear(d, 4 * d)
        self.down_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        gate = torch.softmax(x @ self.router.weight.t(), dim=-1).amax(-1, keepdim=True)
        return gate * self.down_proj(F.gelu(self.up_proj(x)))


class RoutedGPT(PlainGPT):
    """PlainGPT with gated MLPs whose router only the enclosing block's initializer sets."""

    def __init__(self, **kw):
        super().__init__(**kw)
        for layer in self.layers:
            layer.mlp = RoutedMLP(self.embed_tokens.embedding_dim)

    def _init_weights(self, module):
        if isinstance(module, RoutedMLP):
            nn.init.normal_(module.router.weight, std=0.5)


class NanoAttention(nn.Module):
    """nanoGPT-style: fused c_attn split with ``self.n_embd``, ``n_head`` attribute."""

    def __init__(self, n_embd, n_head, local_sizes=True):
        super().__init__()
        self.n_head, self.n_embd = n_head, n_embd
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.0), nn.Dropout(0.0)
        self.local_sizes = local_sizes

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        if self.local_sizes:
            shape = (B, T, self.n_head, -1)
        else:  # original nanoGPT: head size from the input's full width
            shape = (B, T, self.n_head, C // self.n_head)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = self.attn_dropout(att.masked_fill(~mask, float("-inf")).softmax(-1))
        y = (att @ v).transpose(1, 2).contiguous()
        y = y.view(B, T, -1) if self.local_sizes else y.view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class NanoMLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class NanoBlock(nn.Module):
    def __init__(self, n_embd, n_head, local_sizes):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn, self.mlp = NanoAttention(n_embd, n_head, local_sizes), NanoMLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT naming (transformer.wte/wpe/h.N, lm_head tied to wte)."""

    def __init__(self, vocab=30, n_embd=16, n_layer=2, n_head=4, block_size=32, local_sizes=True):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                h=nn.ModuleList(NanoBlock(n_embd, n_head, local_sizes) for _ in range(n_layer)),
                ln_f=nn.LayerNorm(n_embd),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx):
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in t.h:
            x = block(x)
        return self.lm_head(t.ln_f(x))


def hf_llama(vocab=30, n_kv_heads=4, tied=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=n_kv_heads, max_position_embeddings=64, tie_word_embeddings=tied,
        attn_implementation="eager", bos_token_id=0, eos_token_id=1, pad_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


class TorchEncoderLM(nn.Module):
    """A causal LM built from torch's own nn.TransformerEncoder (its nn.MultiheadAttention, linear1/linear2)."""

    def __init__(self, vocab=30, d=32, n_layers=2, n_heads=4, dropout=0.0):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, n_heads, 2 * d, dropout=dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1], dtype=self.embed_tokens.weight.dtype)
        return self.lm_head(self.encoder(self.embed_tokens(idx), mask=mask, is_causal=True))


def hf_gpt2(vocab=30, dropout=0.0):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=dropout, embd_pdrop=dropout,
        attn_pdrop=dropout, attn_implementation="eager", bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


class RopeAttention(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos=None, sin=None, alibi=None):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if alibi is not None:  # (B * heads, 1, T), BLOOM's layout, built by the model for all heads
            causal = torch.full((T, T), float("-inf"), dtype=x.dtype).triu(1)
            bias = alibi.view(B, self.n_heads, 1, T) + causal
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

        def rotate(t):
            half = t.shape[-1] // 2
            return t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin

        y = F.scaled_dot_product_attention(rotate(q), rotate(k), v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class RopeBlock(nn.Module):
    """A pre-norm layer that takes the rotary tables (cos, sin) as arguments, as Hugging Face layers do;
    a residual dropout after the attention."""

    def __init__(self, d, n_heads, dropout):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn = RopeAttention(d, n_heads)
        self.mlp = SwiGLU(d, 2 * d)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x, cos=None, sin=None, alibi=None):
        x = x + self.resid_drop(self.attn(self.norm1(x), cos, sin, alibi=alibi))
        return x + self.mlp(self.norm2(x))


class RopeGPT(nn.Module):
    """A user's model written in Hugging Face's manner, not one of theirs: the rotary tables (or, with
    ``alibi``, BLOOM-style ALiBi biases for all heads) are built for the sequence length of the
    embeddings' output and handed to every layer; an embedding dropout before the layers; an untied head."""

    def __init__(self, vocab=30, d=32, n_heads=4, n_layers=3, dropout=0.0, alibi=False):
        super().__init__()
        self.n_heads, self.alibi = n_heads, alibi
        self.embed = nn.Embedding(vocab, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(RopeBlock(d, n_heads, dropout) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.head_dim = d // n_heads

    def forward(self, ids):
        x = self.drop(self.embed(ids))
        pos = torch.arange(x.size(1), dtype=x.dtype)  # from the embeddings' output
        if self.alibi:
            slopes = 2.0 ** -torch.arange(1, self.n_heads + 1, dtype=x.dtype)
            alibi = (slopes[:, None] * pos[None, :]).repeat(x.size(0), 1)[:, None, :]  # (B * heads, 1, T)
            for block in self.blocks:
                x = block(x, alibi=alibi)
            return self.lm_head(self.norm(x))
        inv = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2, dtype=x.dtype) / self.head_dim)
        angles = torch.cat([torch.outer(pos, inv)] * 2, -1)
        cos, sin = angles.cos(), angles.sin()
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))


class ConvMixer(nn.Module):
    """Mamba's shape without its scan: a gated depthwise causal ``nn.Conv1d`` and a decaying running sum
    over the sequence, masked by a per-position input the model builds for the whole sequence."""

    def __init__(self, d, inner=24):
        super().__init__()
        self.in_proj = nn.Linear(d, 2 * inner, bias=False)
        self.conv = nn.Conv1d(inner, inner, 3, groups=inner, padding=2)
        self.decay = nn.Parameter(torch.rand(inner))
        self.out_proj = nn.Linear(inner, d, bias=False)

    def forward(self, x, cos, sin, keep):
        u, z = self.in_proj(x).chunk(2, -1)
        u = u * keep[..., None]
        u = self.conv(u.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        h = torch.cumsum(u, 1) * torch.sigmoid(self.decay)
        return self.out_proj(h * F.silu(z))


class HeadsMixer(nn.Module):
    """Causal attention under names no rule knows (a fused ``mix_in``, ``mix_out``), told by its
    ``num_heads``; no rotary tables."""

    def __init__(self, d, heads):
        super().__init__()
        self.num_heads = heads
        self.mix_in, self.mix_out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x, cos, sin, keep):
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, self.num_heads, -1).transpose(1, 2) for t in self.mix_in(x).chunk(3, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.mix_out(y.transpose(1, 2).reshape(B, T, -1))


class _HybridAttention(RopeAttention):
    def forward(self, x, cos, sin, keep):
        return super().forward(x, cos, sin)


class HybridLayer(nn.Module):
    def __init__(self, mixer, d):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.mixer, self.mlp = mixer, SwiGLU(d, 2 * d)

    def forward(self, x, cos, sin, keep):
        x = x + self.mixer(self.norm1(x), cos, sin, keep)
        return x + self.mlp(self.norm2(x))


class HybridLM(nn.Module):
    """A user's hybrid model, written in Hugging Face's manner (rotary tables and a padding mask built for
    the sequence and handed to every layer): attention, a convolution mixer and an attention under other
    names (``kinds``), each beside an MLP. Under ``policy="auto"`` the attention and the MLPs are split,
    the convolution mixer and the attention under other names stay whole."""

    MIXERS = {"attn": lambda d, h: _HybridAttention(d, h), "conv": lambda d, h: ConvMixer(d), "heads": HeadsMixer}

    def __init__(self, kinds=("attn", "conv", "heads"), vocab=30, d=32, heads=4):
        super().__init__()
        self.head_dim = d // heads
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(HybridLayer(self.MIXERS[k](d, heads), d) for k in kinds)
        self.norm, self.lm_head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        keep = (ids != 0).to(x.dtype)
        pos = torch.arange(x.size(1), dtype=x.dtype)
        inv = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2, dtype=x.dtype) / self.head_dim)
        angles = torch.cat([torch.outer(pos, inv)] * 2, -1)
        for block in self.blocks:
            x = block(x, angles.cos(), angles.sin(), keep)
        return self.lm_head(self.norm(x))


class FairseqLayer(nn.Module):
    """A decoder layer laid out as OPT's, BART's and Whisper's, written anew: its attention a block of
    its own, its MLP's linears its own (so the layer holds column layers and another block), post-norm
    residuals, the MLP on the tokens flattened to ``(B*T, d)`` as OPT's is."""

    def __init__(self, d, n_heads, rope):
        super().__init__()
        self.rope = rope
        self.self_attn = RopeAttention(d, n_heads) if rope else PlainAttention(d, n_heads)
        self.attn_norm, self.final_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 3 * d), nn.Linear(3 * d, d)

    def forward(self, x, cos=None, sin=None):
        x = self.attn_norm(x + (self.self_attn(x, cos, sin) if self.rope else self.self_attn(x)))
        tokens = x.reshape(-1, x.shape[-1])
        tokens = self.final_norm(tokens + self.fc2(F.gelu(self.fc1(tokens))))
        return tokens.view(x.shape)


class FairseqGPT(nn.Module):
    """Learned positions added at the embeddings (the layers take the hidden states alone: the sequence
    is split at the embeddings), or with ``rope`` rotary tables built from the embeddings' output and
    handed to every layer (the layer stack is the sequence-sharded region)."""

    def __init__(self, rope, vocab=30, d=32, n_heads=4, n_layers=2):
        super().__init__()
        self.rope, self.head_dim = rope, d // n_heads
        self.embed = nn.Embedding(vocab, d)
        self.pos = None if rope else nn.Embedding(16, d)
        self.layers = nn.ModuleList(FairseqLayer(d, n_heads, rope) for _ in range(n_layers))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        if self.rope:
            pos = torch.arange(x.size(1), dtype=x.dtype)
            inv = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2, dtype=x.dtype) / self.head_dim)
            angles = torch.cat([torch.outer(pos, inv)] * 2, -1)
            tables = (angles.cos(), angles.sin())
        else:
            x, tables = x + self.pos(torch.arange(ids.shape[1])), ()
        for layer in self.layers:
            x = layer(x, *tables)
        return self.lm_head(x)


class HFLogits(nn.Module):
    """Wrap a Hugging Face causal LM so that forward(ids) returns logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(input_ids=idx, use_cache=False).logits


def _sequential(model: PlainGPT) -> PlainGPT:
    """``model`` with its layers in an ``nn.Sequential``: deferred init then makes each of its modules a
    unit of its own (no ``nn.ModuleList`` element holds them)."""
    model.layers = nn.Sequential(*model.layers)
    return model


BUILDERS = {
    "plain": lambda: PlainGPT(),
    "plain_gqa": lambda: PlainGPT(d=32, n_heads=8, n_kv_heads=4),
    "plain_mqa": lambda: PlainGPT(d=32, n_heads=8, n_kv_heads=1),  # one k/v head: replicated at any TP size
    "plain_mqa_seq": lambda: _sequential(PlainGPT(d=32, n_heads=8, n_kv_heads=1)),  # layers not in a ModuleList
    "plain_tied": lambda: PlainGPT(tied=True),
    "nano": lambda: NanoGPT(),
    "nano_full_width": lambda: NanoGPT(local_sizes=False),
    "hf_llama": lambda: hf_llama(),
    "hf_llama_tied": lambda: hf_llama(n_kv_heads=8, tied=True),
    "hf_llama_kv2": lambda: hf_llama(n_kv_heads=2),  # k/v heads split at TP 2, replicated at TP 4
    "hf_gpt2": lambda: hf_gpt2(),
    "plain_routed": lambda: RoutedGPT(),
}


def build(name: str, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[name]().to(dtype)


def loss_parity_backward(dense_logits, tp_logits, target, vocab, tol):
    """Cross entropy of the dense and the parallel logits (``lightning_tp.cross_entropy``: sharded or
    not) must agree; backpropagates both."""
    from lightning_tp import cross_entropy

    ld = F.cross_entropy(dense_logits.reshape(-1, vocab), target.view(-1))
    lt = cross_entropy(tp_logits.reshape(-1, tp_logits.size(-1)), target.view(-1))
    torch.testing.assert_close(lt, ld, **tol)
    ld.backward()
    lt.backward()
