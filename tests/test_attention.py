"""torch's own attention and transformer layers under the auto policy (style ``mha``, engine/attention.py).

``nn.MultiheadAttention`` keeps its q/k/v projections as its own parameters and runs them through
``F.multi_head_attention_forward``, so no ``nn.Linear`` rule can split it: the ``mha`` style keeps
this rank's heads of them, runs its own forward on the local heads, and its ``out_proj`` is a row
layer. ``nn.TransformerEncoderLayer``/``DecoderLayer`` hold their MLP's ``linear1``/``linear2``
themselves (a column/row pair by type). Checked in float64 against the dense model at TP 2 and 4
(outputs, every gradient, weights after AdamW steps, and the evaluation path, where torch's fused
kernel would read split weights): encoders batch-first or not, pre- and post-norm, causal and
padding masks; an encoder-decoder ``nn.Transformer`` (cross-attention, memory padding); and a user's
module calling ``nn.MultiheadAttention`` directly with ``kdim``/``vdim``, ``bias_k``/``bias_v``,
``add_zero_attn``, a per-head 3-D mask, unbatched inputs and the attention weights it returns.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import _dist
from lightning_tp import apply_policy, plan_policy
from lightning_tp.engine.attention import TensorParallelMultiheadAttention
from lightning_tp.errors import ShardingError
from lightning_tp.policy import PolicyError, PolicyWarning

V, D, HEADS, T = 40, 32, 4, 6
PAD = 0


class EncoderLM(nn.Module):
    """Token ids -> nn.TransformerEncoder (causal, padding masked) -> logits."""

    def __init__(self, batch_first: bool = True, norm_first: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(V, D)
        layer = nn.TransformerEncoderLayer(
            D, HEADS, 2 * D, dropout=dropout, activation="gelu", batch_first=batch_first, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (B, T, D)
        causal = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], dtype=h.dtype)
        padding = ids == PAD  # (B, T)
        h = h if self.batch_first else h.transpose(0, 1)
        h = self.encoder(h, mask=causal, src_key_padding_mask=padding, is_causal=True)
        return self.head(h if self.batch_first else h.transpose(0, 1))


class ViTBlock(nn.Module):
    """torchvision's ViT encoder block: its attention called with need_weights=False, its MLP an
    nn.Sequential(Linear, GELU, Dropout, Linear, Dropout) (children named 0..4)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.self_attention = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(D, 3 * D), nn.GELU(), nn.Dropout(0.0), nn.Linear(3 * D, D), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.self_attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """Patches -> ViT blocks -> a classifier head that is an nn.Sequential MLP too."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Linear(D // 2, D)
        self.blocks = nn.Sequential(ViTBlock(), ViTBlock())
        self.head = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.patch(x)).mean(dim=-2))


class Seq2Seq(nn.Module):
    """nn.Transformer: an encoder, a decoder with self- and cross-attention, memory padding masked."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.transformer = nn.Transformer(D, HEADS, 1, 1, 2 * D, dropout=0.0, batch_first=True)
        self.head = nn.Linear(D, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tgt = ids.roll(1, dims=1)
        mask = self.transformer.generate_square_subsequent_mask(ids.shape[1], dtype=self.emb.weight.dtype)
        out = self.transformer(
            self.emb(ids), self.emb(tgt), tgt_mask=mask, src_key_padding_mask=ids == PAD,
            memory_key_padding_mask=ids == PAD,
        )  # fmt: skip
        return self.head(out)


class ScaledAttention(nn.MultiheadAttention):
    """A user's subclass that keeps torch's forward (a buffer of its own): split as its class."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("scale", torch.tensor(0.5))


class DirectAttention(nn.Module):
    """A user's module calling nn.MultiheadAttention itself: queries from one input, keys and values from
    a memory of its own length (and widths, ``kdim``/``vdim``), returning the attention weights too."""

    def __init__(self, per_head_mask: bool = True, average: bool = True, subclass: bool = False, **options) -> None:
        super().__init__()
        self.per_head_mask, self.average = per_head_mask, average
        self.kdim, self.vdim = options.get("kdim", D), options.get("vdim", D)
        self.query = nn.Linear(D // 2, D)
        self.memory = nn.Parameter(torch.randn(9, max(self.kdim, self.vdim)))
        self.attn = (ScaledAttention if subclass else nn.MultiheadAttention)(D, 8, batch_first=True, **options)
        self.out = nn.Linear(D, D // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = x.dim() == 3
        q = self.query(x)  # (B, L, D) or (L, D)
        mem = self.memory.expand(x.shape[0], -1, -1) if batched else self.memory
        key, value = mem[..., : self.kdim], mem[..., : self.vdim]
        if self.kdim == self.vdim:
            value = key  # one tensor: its projection runs once
        s, mask = mem.shape[-2], None
        heads = self.attn.num_heads  # what a user's code reads: every head's count
        if self.per_head_mask and batched:  # (B * heads, L, S): each head its own
            mask = torch.linspace(-1, 1, x.shape[0] * heads * x.shape[1] * s, dtype=x.dtype).view(-1, x.shape[1], s)
        padding = torch.arange(s) >= s - 2 if batched else None  # the last two memory slots
        padding = padding.expand(x.shape[0], -1) if batched else None
        out, weights = self.attn(
            q, key, value, key_padding_mask=padding, attn_mask=mask, average_attn_weights=self.average
        )  # fmt: skip
        if not self.average and batched:  # (B, heads, L, S): weighted per head
            weights = weights.reshape(x.shape[0], heads, -1) * torch.arange(1, heads + 1, dtype=x.dtype)[:, None]
        return torch.cat([self.out(out).flatten(), weights.flatten()])


def _ids(seed: int) -> torch.Tensor:
    ids = torch.randint(1, V, (2, T), generator=torch.Generator().manual_seed(seed))
    ids[1, -2:] = PAD  # padding at the end of the second sequence
    return ids


MODELS = {
    "encoder": (EncoderLM, {}, "ids"),
    "encoder seq-first prenorm": (EncoderLM, {"batch_first": False, "norm_first": True}, "ids"),
    "seq2seq": (Seq2Seq, {}, "ids"),
    "vit": (ViT, {}, "x"),
    "direct": (DirectAttention, {}, "x"),
    "direct no bias, per-head weights": (DirectAttention, {"bias": False, "average": False}, "x"),
    "direct bias_kv zero_attn": (
        DirectAttention,
        {"add_bias_kv": True, "add_zero_attn": True, "per_head_mask": False},
        "x",
    ),  # fmt: skip
    "direct kdim vdim": (DirectAttention, {"kdim": 24, "vdim": 16}, "x"),
    "direct unbatched": (DirectAttention, {"per_head_mask": False}, "x1"),
    "direct user subclass": (DirectAttention, {"subclass": True}, "x"),
}


def _inputs(kind: str, seed: int) -> torch.Tensor:
    if kind == "ids":
        return _ids(seed)
    x = torch.randn(2, 5, D // 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x if kind == "x" else x[0]


def _parity(tp: int) -> dict[str, dict]:
    group = _dist.mesh(tp).tp_group
    results = {}
    for label, (cls, kwargs, kind) in MODELS.items():
        torch.manual_seed(0)
        dense = cls(**kwargs).double()
        model = copy.deepcopy(dense)
        plan = apply_policy(model, group, "auto", verify=True, example_input=_inputs(kind, 0))
        errs = _dist.train_parity(dense, model, group, [_inputs(kind, s) for s in (1, 2)])
        dense.eval(), model.eval()
        with torch.no_grad():  # Lightning's evaluation loops: torch's fused path would read split weights
            x = _inputs(kind, 3)
            errs["eval"] = float((dense(x) - model(x)).abs().max())
        results[label] = {
            **errs,
            "classes": sorted(
                (isinstance(m, TensorParallelMultiheadAttention), isinstance(m, ScaledAttention), hasattr(m, "scale"))
                for m in model.modules()
                if isinstance(m, nn.MultiheadAttention)
            )[:1],
            "styles": sorted({r.style for r in plan.modules}),
            "unmatched": list(plan.unmatched),
            "heads": sorted(
                {(m.num_heads, m.local_heads) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
            ),
        }
    return results


@pytest.mark.parametrize("tp", [2, 4])
def test_torch_attention_and_transformer_layers_match_the_dense_model(tp):
    for rank_results in _dist.run(tp, _parity, tp):
        for label, r in rank_results.items():
            # weights: the key bias's gradient is zero up to rounding (softmax ignores a constant per query),
            # which AdamW's normalization turns into steps of ~1e-10 in both models alike; the rest agree to 1e-15
            assert r["out"] < 1e-12 and r["grad"] < 1e-11 and r["weight"] < 1e-8 and r["eval"] < 1e-12, (label, r)
            assert "mha" in r["styles"] and "row" in r["styles"], (label, r)
            subclass = "subclass" in label  # still the user's class, its buffer kept
            assert r["classes"] == [(True, subclass, subclass)], (label, r)
            heads = 8 if label.startswith("direct") else HEADS  # (ViT: HEADS)
            assert r["heads"] == [(heads, heads // tp)], (label, r)  # num_heads: the whole module's, as torch's
            if not label.startswith("direct"):  # linear1/linear2, the Sequential MLPs split too
                assert r["unmatched"] == (["patch"] if label == "vit" else []) and "column" in r["styles"], (label, r)


def _dropout_streams(with_tracker: bool) -> tuple[bool, list[str]]:
    """Whether this rank's heads and the other rank's get different attention-dropout masks; the warnings
    two calls that return the attention weights gave."""
    from lightning_tp.engine.random import model_parallel_seed

    m = _dist.mesh(2)
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(D, 8, dropout=0.5, batch_first=True).double()
    tracker = model_parallel_seed(1234, m.tp_rank, m.dp_rank) if with_tracker else None
    holder = nn.Sequential()
    holder.add_module("attn", attn)
    apply_policy(holder, m.tp_group, "auto", verify=False, rng_tracker=tracker)
    torch.manual_seed(1)  # the same default stream on both ranks
    x = torch.randn(2, 5, D, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _, weights = holder.attn(x, x, x, average_attn_weights=False)  # (B, 8, L, L), every rank's heads
        holder.attn(x, x, x)
    dropped = weights == 0
    return not torch.equal(dropped[:, :4], dropped[:, 4:]), [str(w.message) for w in said]  # rank 0's heads vs 1's


def test_attention_dropout_draws_per_rank_from_the_model_parallel_stream():
    for differ, said in _dist.run(2, _dropout_streams, True):
        assert differ
        assert len(said) == 1 and said[0].startswith("attn: split by heads") and "need_weights=False" in said[0]
    assert not any(differ for differ, _ in _dist.run(2, _dropout_streams, False))  # without the stream: one mask


def _checkpoint(tp: int, path: str, save: bool) -> dict:
    from lightning_tp.lightning.checkpoint import full_state_dict, load
    from lightning_tp.lightning.checkpoint import save as save_checkpoint

    mesh = _dist.mesh(tp)
    torch.manual_seed(0)
    model = DirectAttention(add_bias_kv=True, add_zero_attn=True, per_head_mask=False).double()
    apply_policy(model, mesh.tp_group, "auto", verify=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if save:
        model(_inputs("x", 1)).square().sum().backward()
        opt.step()
        save_checkpoint(path, model, [opt], mesh, {"epoch": 0})
    else:
        load(path, model, [opt], mesh)
    return {k: v.clone() for k, v in full_state_dict(model, mesh.tp_group).items()}


def test_checkpoint_reshards_the_heads(tmp_path):
    """The fused [q | k | v] rows, the per-head bias_k/bias_v (split on their last dim) and the row layer
    are saved per rank, read back at TP 1 and consolidated offline as the dense tensors."""
    from lightning_tp.lightning.checkpoint import consolidate

    path = str(tmp_path / "ckpt")
    saved = _dist.run(2, _checkpoint, 2, path, True)[0]
    assert {"attn.in_proj_weight", "attn.bias_k", "attn.out_proj.weight"} <= set(saved)
    offline = consolidate(path)
    loaded = _dist.run(1, _checkpoint, 1, path, False)[0]  # whole heads on one rank
    for key, value in saved.items():
        assert torch.equal(loaded[key], value) and torch.equal(offline[key], value), key


def test_plan_lists_heads_and_the_pairs():
    plan = plan_policy(EncoderLM(), 2)
    rows = {r.name: (r.style, r.local_shape) for r in plan.modules}
    assert rows["encoder.layers.0.self_attn"] == ("mha", (3 * D // 2, D))
    assert rows["encoder.layers.0.self_attn.out_proj"] == ("row", (D, D // 2))
    assert rows["encoder.layers.1.linear1"] == ("column", (D, D))
    assert rows["encoder.layers.1.linear2"] == ("row", (D, D))
    assert plan.attribute_changes == [] and plan.unmatched == []  # num_heads stays the whole module's


def test_sequential_mlps_pair_by_structure():
    """A linear layer, elementwise modules only, then a linear layer taking its width, in an nn.Sequential:
    a column/row pair. Not across a norm or a GLU (which mixes features), not onto an LM head (the
    vocabulary rule's), not where a name rule already paired them; a pair whose width does not split stays
    whole with a warning (before this rule it was left whole without one, so no model fails to plan)."""
    rows = {r.name: r.style for r in plan_policy(ViT(), 2).modules}
    assert rows["blocks.0.mlp.0"] == "column" and rows["blocks.0.mlp.3"] == "row"
    assert rows["head.0"] == "column" and rows["head.2"] == "row"

    def plan(*layers, tp=2):
        return {r.name: r.style for r in plan_policy(nn.Sequential(*layers), tp).modules}

    assert plan(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 8)) == {"0": "column", "3": "row"}
    assert plan(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8)) == {}
    assert plan(nn.Linear(8, 16), nn.GLU(), nn.Linear(8, 8)) == {}
    assert plan(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)) == {
        "0": "column",
        "2": "row",
    }
    with pytest.warns(PolicyWarning, match=r"pair '0' in an nn.Sequential MLP.*not divisible by 2.*stay whole"):
        assert plan(nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 2)) == {}


def test_refusals_name_the_module_and_the_fix():
    with pytest.raises(ShardingError, match=r"'attn': num_heads=8 cannot be split over tensor_parallel_size=3"):
        plan_policy(DirectAttention(), 3)
    with pytest.raises(PolicyError, match=r"out_proj must be a 'row' layer.*attn.out_proj': 'row'"):
        plan_policy(DirectAttention(), 2, {"attn": "mha", "*": "replicate"})

    class OwnForward(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = DirectAttention()
    model.attn = OwnForward(D, 8, batch_first=True)
    with pytest.raises(ShardingError, match=r"OwnForward overrides nn.MultiheadAttention.forward"):
        plan_policy(model, 2)
    with pytest.raises(PolicyError, match=r"not built for sequence parallelism.*sequence_parallel=False"):
        plan_policy(EncoderLM(), 2, sequence_parallel=True)
