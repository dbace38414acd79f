"""Inputs of all heads made outside a head-split block (style ``head_inputs``, engine/features.py HeadSlice).

BLOOM builds its ALiBi biases once in the model from all heads, ``(batch * n_head, 1, kv_len)``, and
hands them to every attention layer; a layer whose projections are split holds this rank's heads only.
The model below is written differently from BLOOM on purpose: separate ``wq``/``wk``/``wv``/``wo``
projections, head counts as a plain ``n_heads`` attribute, and a *learned* per-head slope at the model
level, so the bias needs a gradient summed over TP (each rank's covers its heads). Its bias is a full
``(batch * heads, T, T)`` tensor rather than BLOOM's broadcast row. At TP 2 and 4 (float64) it gives the
dense model's outputs, gradients and weights after AdamW steps. Hugging Face's BLOOM itself runs in
tests/test_hf_models.py.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _dist
from lightning_tp import apply_policy, plan_policy
from lightning_tp.engine.recompute import checkpoint_module
from lightning_tp.errors import ShardingError

D, HEADS, T = 32, 4, 6


class SlopedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.n_heads, self.head_dim = HEADS, D // HEADS
        self.wq, self.wk, self.wv = (nn.Linear(D, D, bias=False) for _ in range(3))
        self.wo = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, alibi: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:  # (b * heads, t, head_dim)
            return y.view(b, t, self.n_heads, self.head_dim).transpose(1, 2).reshape(b * self.n_heads, t, -1)

        q, k, v = heads(self.wq(x)), heads(self.wk(x)), heads(self.wv(x))
        scores = torch.baddbmm(alibi, q, k.transpose(1, 2), alpha=self.head_dim**-0.5)
        y = torch.bmm(scores.softmax(-1), v).view(b, self.n_heads, t, -1).transpose(1, 2).reshape(b, t, -1)
        return self.wo(y)


class SlopedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.slopes = nn.Parameter(torch.linspace(0.2, 1.0, HEADS))
        self.layers = nn.ModuleList(SlopedAttention() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        pos = torch.arange(t, dtype=x.dtype)
        distance = -(pos[None, :] - pos[:, None]).abs()  # (t, t)
        alibi = (self.slopes.view(1, HEADS, 1, 1) * distance).expand(b, HEADS, t, t).reshape(b * HEADS, t, t)
        for layer in self.layers:
            x = x + layer(F.layer_norm(x, (D,)), alibi)
        return x


def _model() -> SlopedModel:
    torch.manual_seed(0)
    return SlopedModel().double()


def test_the_all_heads_input_is_planned_and_named_in_the_plan():
    plan = plan_policy(_model(), 2, "auto")
    rows = {m.name: m for m in plan.modules}
    for i in range(2):
        assert rows[f"layers.{i}"].style == "head_inputs" and rows[f"layers.{i}"].options == {"inputs": {"alibi": 4}}
        assert rows[f"layers.{i}.wo"].style == "row"
    assert "head_inputs" in str(plan)
    wrapped = _model()
    checkpoint_module(wrapped.layers[0])  # forward replaced on the instance by a (*args, **kwargs) wrapper
    assert [m.name for m in plan_policy(wrapped, 2, "auto").modules if m.style == "head_inputs"] == [
        "layers.0",
        "layers.1",
    ]


def test_head_inputs_named_by_a_policy_and_its_errors():
    split = {"layers.*.w[qkv]": "column", "layers.*.wo": "row"}
    given = plan_policy(_model(), 2, {**split, "layers.?": {"style": "head_inputs", "inputs": {"alibi": 4}}})
    rows = [(m.pattern, m.options) for m in given.modules if m.style == "head_inputs"]
    assert rows == [("layers.?", {"inputs": {"alibi": 4}})] * 2
    with pytest.raises(
        ShardingError, match=r"'layers.0' \(style 'head_inputs'\): inputs=\{'bias': 4\} must map .*'alibi'"
    ):
        plan_policy(_model(), 2, {**split, "layers.?": {"style": "head_inputs", "inputs": {"bias": 4}}})
    with pytest.raises(ShardingError, match=r"'alibi' holds 4 heads, which tensor_parallel_size=8 does not divide"):
        plan_policy(_model(), 8, {"layers.?": {"style": "head_inputs", "inputs": {"alibi": 4}}})
    with pytest.raises(TypeError, match=r"'head_inputs'.*does not fit module 'layers.0.wq'"):
        plan_policy(_model(), 2, {"layers.0.wq": {"style": "head_inputs", "inputs": {"alibi": 4}}})


def _parity(tp: int) -> dict:
    group = _dist.mesh(tp).tp_group
    dense, model = _model(), _model()
    checkpoint_module(model.layers[1])  # a forward wrapped before the rewrite still shows its alibi argument
    apply_policy(model, group, "auto")  # verify=True: outputs and gradients checked too
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, T, D, dtype=torch.float64, generator=g) for _ in range(2)]
    errs = _dist.train_parity(dense, model, group, batches)
    errs["slopes"] = model.slopes.detach().clone()  # whole, and equal on every rank after the steps
    errs["local_heads"] = model.layers[0].n_heads
    return errs


@pytest.mark.parametrize("tp", [2, 4])
def test_a_learned_all_heads_bias_trains_as_the_dense_model(tp):
    per_rank = _dist.run(4, _parity, tp)
    for rank, r in enumerate(per_rank):
        assert r["local_heads"] == HEADS // tp
        assert r["out"] <= 1e-12 and r["grad"] <= 1e-11 and r["weight"] <= 1e-12, (tp, rank, r)
        assert torch.equal(r["slopes"], per_rank[0]["slopes"])


def _wrong_layout() -> str:
    group = _dist.mesh(2).tp_group
    model = _model()
    apply_policy(model, group, "auto", verify=False)
    x = torch.randn(2, T, D, dtype=torch.float64)
    alibi = torch.zeros(2, HEADS, T, T, dtype=torch.float64)  # (batch, heads, ...): 4-D, not the layout cut
    try:
        model.layers[0](x, alibi=alibi)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_an_input_of_another_layout_is_an_error_naming_it():
    message = _dist.run(2, _wrong_layout)[0]
    assert "'alibi' of shape (2, 4, 6, 6) does not hold 4 heads on dim 0 as (batch * heads, q, kv)" in message


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers (extra 'hf') not installed")
def test_bloom_under_sequence_parallelism_cuts_its_alibi_inside_the_layer_stack():
    """BLOOM builds its ALiBi biases for the whole sequence and hands them to every layer: under sequence
    parallelism its layer stack is the sequence-sharded region, and each attention block's row both
    gathers the sequence and cuts the biases to the rank's heads. (BLOOM is still refused by the
    self-check under sequence parallelism: its attention adds the residual stream it is given after its
    row layer, tests/test_hf_models.py.)"""
    import hf_zoo

    rows = {r.name: r for r in plan_policy(hf_zoo.build("bloom"), 2, "auto", sequence_parallel=True).modules}
    attn = rows["transformer.h.0.self_attention"]
    assert attn.style == "sequence_gather" and attn.options["inputs"] == {"alibi": 4}, attn
    assert rows["transformer.h.0"].style == "sequence_stack" and rows["transformer.h.1"].options["gather_output"]


class _LayersWithoutStack(nn.Module):
    """Two layers held as attributes (no nn.ModuleList): no layer stack to make the region, so Megatron's
    split at the embeddings, for which ALiBi biases built for the whole sequence do not fit."""

    def __init__(self):
        super().__init__()
        import models

        inner = models.RopeGPT(alibi=True, n_layers=2)
        self.embed, self.norm, self.lm_head = inner.embed, inner.norm, inner.lm_head
        self.first, self.second = inner.blocks
        self.n_heads = inner.n_heads

    def forward(self, ids):
        x = self.embed(ids)
        slopes = 2.0 ** -torch.arange(1, self.n_heads + 1, dtype=x.dtype)
        alibi = (slopes[:, None] * torch.arange(ids.shape[1], dtype=x.dtype)[None, :]).repeat(x.size(0), 1)[:, None]
        return self.lm_head(self.norm(self.second(self.first(x, alibi=alibi), alibi=alibi)))


def test_alibi_with_the_sequence_split_at_the_embeddings_is_refused_naming_the_block():
    with pytest.raises(ShardingError, match=r"block 'first.attn' takes inputs of all .*\['alibi'\]"):
        plan_policy(_LayersWithoutStack(), 2, "auto", sequence_parallel=True)
