"""A module that reads a whole split feature dim (style ``gather_input``, engine/features.py).

OLMo-2 normalizes q and k over all heads at once (an RMSNorm of width ``n_head * head_dim``) before
splitting them into heads. Under TP the block holds this rank's heads only, so such a norm must see
the gathered width. The block below is written differently from LitGPT's and Hugging Face's OLMo-2
on purpose: separate q/k/v projections, grouped-query attention (the k norm is as wide as the
key/value heads), torch's own ``nn.LayerNorm`` (with a bias on q), head counts as plain attributes. At TP 2
and 4 (float64) it gives the dense block's output, gradients and weights after AdamW steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _dist
from lightning_tp import apply_policy, mark_partial_grad, plan_policy
from lightning_tp.errors import ShardingError

D, HEADS, KV, HEAD_DIM = 32, 8, 4, 6  # head_dim * heads (48) differs from D


class QKNormAttention(nn.Module):
    """Attention with LayerNorms over the whole q (heads * head_dim) and k (kv * head_dim) widths."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = HEADS, KV, HEAD_DIM
        self.q_proj = nn.Linear(D, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(D, KV * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(D, KV * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, D)
        self.q_norm = nn.LayerNorm(HEADS * HEAD_DIM)
        self.k_norm = nn.LayerNorm(KV * HEAD_DIM, bias=False)  # a key bias has no gradient (softmax shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k = self.q_norm(self.q_proj(x)), self.k_norm(self.k_proj(x))
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        rep = self.num_heads // self.num_key_value_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


def _block(seed: int = 0) -> QKNormAttention:
    torch.manual_seed(seed)
    block = QKNormAttention().double()
    with torch.no_grad():  # away from the identity affine, so a wrong slice of weight or bias shows
        block.q_norm.weight.uniform_(0.5, 1.5)
        block.q_norm.bias.uniform_(-0.5, 0.5)
        block.k_norm.weight.uniform_(0.5, 1.5)
    return block


def test_full_width_norms_are_planned_to_read_the_gathered_width():
    plan = plan_policy(_block(), 2, "auto")
    rows = {m.name: m for m in plan.modules}
    assert rows["q_norm"].style == rows["k_norm"].style == "gather_input"
    assert rows["q_norm"].options["width"] == HEADS * HEAD_DIM and rows["k_norm"].options["width"] == KV * HEAD_DIM
    assert rows["q_norm"].local_shape == (HEADS * HEAD_DIM,)  # the weights stay whole
    assert "gather_input" in str(plan)


def test_gather_input_named_by_a_policy_and_its_errors():
    explicit = {"q_proj": "column", "k_proj": "column", "v_proj": "column", "o_proj": "row"}
    plan = plan_policy(_block(), 2, {**explicit, "*_norm": "gather_input"})
    assert [(m.name, m.options["width"]) for m in plan.modules if m.style == "gather_input"] == [
        ("q_norm", HEADS * HEAD_DIM),
        ("k_norm", KV * HEAD_DIM),
    ]
    bilinear = nn.ModuleDict({"mix": nn.Bilinear(4, 4, 4)})  # parameters (4, 4, 4) and (4,): no one width
    with pytest.raises(ShardingError, match=r"module 'mix' \(style 'gather_input'\): width=None.*'width': <full width"):
        plan_policy(bilinear, 2, {"mix": "gather_input"})
    assert plan_policy(bilinear, 2, {"mix": {"style": "gather_input", "width": 4}}).modules[0].options == {"width": 4}
    with pytest.raises(ShardingError, match=r"'k_norm' \(style 'gather_input'\): width=24 is not divisible by .*=5"):
        plan_policy(_block(), 5, {"k_norm": "gather_input"})
    mixed = _block()
    mark_partial_grad(mixed.q_norm.weight, True)
    mark_partial_grad(mixed.q_norm.bias, False)
    with pytest.raises(ShardingError, match=r"'q_norm' \(style 'gather_input'\): some .* marked partial and some"):
        plan_policy(mixed, 2, "auto")
    with pytest.raises(TypeError, match=r"'gather_input'.*does not fit module 'q_proj'"):
        plan_policy(_block(), 2, {"q_proj": "gather_input"})


def _parity(tp: int) -> dict:
    from lightning_tp.engine.sharding import has_partial_grad

    group = _dist.mesh(tp).tp_group
    dense, model = _block(), _block()
    plan = apply_policy(model, group, "auto")  # verify=True: outputs and gradients checked too
    g = torch.Generator().manual_seed(1)
    errs = _dist.train_parity(
        dense, model, group, [torch.randn(2, 5, D, dtype=torch.float64, generator=g) for _ in range(2)]
    )
    norms = [model.q_norm.weight, model.q_norm.bias, model.k_norm.weight]
    errs["partial"] = any(has_partial_grad(p) for p in norms)
    errs["styles"] = sorted({m.style for m in plan.modules})
    errs["norm_weight"] = model.q_norm.weight.detach().clone()  # compared across ranks: whole and equal
    return errs


@pytest.mark.parametrize("tp", [2, 4])
def test_user_block_with_full_width_qk_norms_matches_dense(tp):
    per_rank = _dist.run(4, _parity, tp)
    for rank, r in enumerate(per_rank):
        assert r["styles"] == ["column", "gather_input", "row"], r["styles"]
        assert r["out"] <= 1e-12 and r["grad"] <= 1e-11 and r["weight"] <= 1e-12, (tp, rank, r)
        assert not r["partial"]  # complete gradients: no sum over TP
        assert torch.equal(r["norm_weight"], per_rank[0]["norm_weight"])


def _one_norm(tp: int, partial_grads: bool) -> bool:
    """The hook on its own: a full-width (replicated) input passes through; this rank's chunk is
    gathered, and the gradients are complete on every rank, or partial (sequence parallelism's
    form) with their sum over TP complete and the input grads reduce-scattered."""
    from lightning_tp.engine.comm import all_reduce
    from lightning_tp.engine.features import FeatureGather

    group = _dist.mesh(tp).tp_group
    rank = torch.distributed.get_rank(group)
    torch.manual_seed(0)
    dense = nn.LayerNorm(8).double()
    with torch.no_grad():
        dense.weight.uniform_(0.5, 1.5)
        dense.bias.uniform_(-0.5, 0.5)
    norm = copy.deepcopy(dense)
    FeatureGather(group, 8, partial_grads=partial_grads).attach(norm)
    g = torch.Generator().manual_seed(0)
    full, out_grad = (
        torch.randn(3, 8, dtype=torch.float64, generator=g),
        torch.randn(3, 8, dtype=torch.float64, generator=g),
    )
    torch.testing.assert_close(norm(full), dense(full), atol=0, rtol=0)  # not this rank's width: unchanged
    x = full.clone().requires_grad_()
    dense(x).backward(out_grad)
    local = full.chunk(tp, -1)[rank].clone().requires_grad_()
    y = norm(local)
    torch.testing.assert_close(y, dense(full).chunk(tp, -1)[rank], atol=0, rtol=0)
    y.backward(out_grad.chunk(tp, -1)[rank])
    torch.testing.assert_close(local.grad, x.grad.chunk(tp, -1)[rank], atol=1e-12, rtol=0)
    for got, ref in ((norm.weight.grad, dense.weight.grad), (norm.bias.grad, dense.bias.grad)):
        if partial_grads:
            assert not torch.allclose(got, ref)  # this rank's part only
            got = all_reduce(got.clone(), group)
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    return True


@pytest.mark.parametrize("partial_grads", [False, True], ids=["complete", "partial"])
def test_feature_gather_on_one_module(partial_grads):
    assert all(_dist.run(2, _one_norm, 2, partial_grads))


def _compiled(tp: int) -> tuple[int, float, float]:
    from test_compile import _recording

    group = _dist.mesh(tp).tp_group
    eager, model = _block(), _block()
    for m in (eager, model):
        apply_policy(m, group, "auto", verify=False)
    graphs: list = []
    torch.compiler.reset()
    compiled = torch.compile(model, backend=_recording(graphs), fullgraph=True)  # a graph break is an error
    x = torch.randn(2, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outs = [eager(x), compiled(x)]
    for out in outs:
        out.square().sum().backward()
    grad = max(
        float((a.grad - b.grad).abs().max()) for a, b in zip(eager.parameters(), model.parameters(), strict=True)
    )
    return len(graphs), float((outs[0] - outs[1]).detach().abs().max()), grad


def test_gathered_norm_compiles_in_one_graph():
    for graphs, out_err, grad_err in _dist.run(2, _compiled, 2):
        assert graphs == 1 and out_err <= 1e-12 and grad_err <= 1e-12, (graphs, out_err, grad_err)
