"""Sequence parallelism around modules the policy leaves whole that mix the sequence (an attention left
whole, a convolution over the sequence, an attention under names no rule knows, a cross-attention):
each runs on the whole sequence, replicated over TP (``sequence_whole``). Float64 parity with the
unsharded model: logits, every gradient, an AdamW step, no-grad forwards of any length."""

import copy

import models
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _dist
from lightning_tp import gather_logits
from lightning_tp.engine.sharding import has_partial_grad, shard_spec
from lightning_tp.lightning.precision import all_reduce_partial_grads
from lightning_tp.policy import apply_policy, plan_policy
from lightning_tp.policy.verify import PolicyMismatchError

TOL = {"atol": 1e-10, "rtol": 0.0}
VOCAB = 30


POLICY = {
    "embed": "vocab",
    "lm_head": "vocab",
    "blocks.*.mlp.gate_proj": "column",
    "blocks.*.mlp.up_proj": "column",
    "blocks.*.mlp.down_proj": "row",
}


def _hybrid_parity(tp):
    m = _dist.mesh(tp)
    torch.manual_seed(0)
    dense = models.HybridLM().double()
    model = copy.deepcopy(dense)
    plan = apply_policy(model, m.tp_group, POLICY, sequence_parallel=True)  # verify=True: the self-check passes
    rows = {r.name: r for r in plan.modules}
    g = torch.Generator().manual_seed(3 + m.dp_rank)
    ids, tgt = torch.randint(0, VOCAB, (3, 12), generator=g), torch.randint(0, VOCAB, (3, 12), generator=g)
    ids[1, 7:] = 0  # padding: the convolution mixer reads the mask of the whole sequence
    models.loss_parity_backward(dense(ids), model(ids), tgt, VOCAB, TOL)
    partial = sorted(n for n, p in model.named_parameters() if has_partial_grad(p))
    all_reduce_partial_grads(list(model.parameters()), m.tp_group)
    opt_d, opt_t = (torch.optim.AdamW(x.parameters(), lr=1e-2) for x in (dense, model))
    for pname, param in model.named_parameters():
        spec, ref = shard_spec(param), dense.get_parameter(pname).grad
        ref = spec.shard(ref, m.tp_rank) if spec is not None else ref
        torch.testing.assert_close(param.grad, ref, **TOL, msg=lambda s, n=pname: f"grad {n}: {s}")
    opt_d.step()
    opt_t.step()
    for pname, param in model.named_parameters():
        spec, ref = shard_spec(param), dense.get_parameter(pname).detach()
        ref = spec.shard(ref, m.tp_rank) if spec is not None else ref
        torch.testing.assert_close(param.detach(), ref, **TOL, msg=lambda s, n=pname: f"step {n}: {s}")
    odd = {}
    with torch.no_grad():  # a length that does not divide by TP runs whole; one that does, sequence parallel
        for T in (1, 5, 8, 11):
            x = torch.randint(1, VOCAB, (2, T), generator=torch.Generator().manual_seed(T))
            odd[T] = float((gather_logits(model(x)) - dense(x)).abs().max())
    return {n: (r.style, dict(r.options)) for n, r in rows.items()}, partial, odd


def _refused_without_whole_mixers(tp):
    """The same model, the mixers left on this rank's chunk: ``verify`` refuses it."""
    import lightning_tp.policy.plan as plan

    m = _dist.mesh(tp)
    model = models.HybridLM().double()
    original = plan._whole_mixers
    plan._whole_mixers = lambda *a, **k: {}
    try:
        apply_policy(model, m.tp_group, POLICY, sequence_parallel=True)
    except PolicyMismatchError as error:
        return str(error)
    finally:
        plan._whole_mixers = original
    return None


@pytest.mark.parametrize(("world", "tp"), [(2, 2), (4, 4)], ids=["tp2", "tp4"])
def test_modules_left_whole_that_mix_the_sequence_run_on_the_whole_sequence(world, tp):
    for rows, partial, odd in _dist.run(world, _hybrid_parity, tp):
        for mixer in ("blocks.0.mixer", "blocks.1.mixer", "blocks.2.mixer"):
            assert rows[mixer] == ("sequence_whole", {"in_features": [32], "chunks_only": True}), rows[mixer]
        assert rows["blocks.1.mlp"][0] == "sequence_gather" and rows["blocks.0"][0] == "sequence_stack"
        assert not any(".mixer." in n for n in partial), partial  # replicated: their gradients are whole
        assert "blocks.1.norm1.weight" in partial, partial  # the chunk's norms stay partial
        assert all(err < 1e-12 for err in odd.values()), odd
    for error in _dist.run(world, _refused_without_whole_mixers, tp):
        assert error is not None and "blocks.0" in error, error


class _CrossLayer(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.RMSNorm(d), nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn, self.cross = models.RopeAttention(d, heads), _Cross(d, heads)
        self.mlp = models.SwiGLU(d, 2 * d)

    def forward(self, x, mem, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        x = x + self.cross(self.norm2(x), mem)
        return x + self.mlp(self.norm3(x))


class _Cross(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.n_heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, mem):
        (B, T, _), S = x.shape, mem.shape[1]
        q = self.q_proj(x).view(B, T, self.n_heads, -1).transpose(1, 2)
        k, v = (f(mem).view(B, S, self.n_heads, -1).transpose(1, 2) for f in (self.k_proj, self.v_proj))
        return self.o_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1))


class _CrossLM(nn.Module):
    """A decoder whose layers attend to a memory of another length (the source's embeddings), handed
    whole to every layer; the policy splits the self-attention and the MLP and leaves the cross-attention
    whole."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.head_dim = d // heads
        self.embed, self.src = nn.Embedding(VOCAB, d), nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(_CrossLayer(d, heads) for _ in range(2))
        self.lm_head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, ids, src):
        x, mem = self.embed(ids), self.src(src)
        pos = torch.arange(x.size(1), dtype=x.dtype)
        inv = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2, dtype=x.dtype) / self.head_dim)
        angles = torch.cat([torch.outer(pos, inv)] * 2, -1)
        for block in self.blocks:
            x = block(x, mem, angles.cos(), angles.sin())
        return self.lm_head(x)


def _cross_parity(tp):
    m = _dist.mesh(tp)
    torch.manual_seed(0)
    dense = _CrossLM().double()
    model = copy.deepcopy(dense)
    g = torch.Generator().manual_seed(1)
    ids, src, tgt = (torch.randint(0, VOCAB, (2, n), generator=g) for n in (8, 12, 8))
    policy = {r.name: {"style": r.style, **r.options} for r in plan_policy(dense, tp, "auto").modules}
    policy.update({f"blocks.{i}.cross.{p}_proj": "replicate" for i in range(2) for p in "qkvo"})
    plan = apply_policy(model, m.tp_group, policy, sequence_parallel=True, example_input=(ids, src))
    styles = {r.name: r.style for r in plan.modules}
    models.loss_parity_backward(dense(ids, src), model(ids, src), tgt, VOCAB, TOL)
    all_reduce_partial_grads(list(model.parameters()), m.tp_group)
    for pname, param in model.named_parameters():
        spec, ref = shard_spec(param), dense.get_parameter(pname).grad
        ref = spec.shard(ref, m.tp_rank) if spec is not None else ref
        torch.testing.assert_close(param.grad, ref, **TOL, msg=lambda s, n=pname: f"grad {n}: {s}")
    with torch.no_grad():  # a memory of another length, a decoder length that runs whole
        errs = [
            float((gather_logits(model(i, s)) - dense(i, s)).abs().max())
            for i, s in ((ids, src[:, :5]), (ids[:, :7], src))
        ]
    return styles, max(errs)


def test_a_cross_attention_left_whole_gathers_its_queries_not_its_memory():
    for styles, err in _dist.run(2, _cross_parity, 2):
        assert styles["blocks.0.cross"] == "sequence_whole" and styles["blocks.0.attn"] == "sequence_gather"
        assert err < 1e-12, err
