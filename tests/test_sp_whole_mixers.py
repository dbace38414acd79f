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


def _step_parity(dense, model, inputs, tgt, m, call=None):
    """The loss, every gradient (partial ones summed over TP) and the weights after an AdamW step equal the
    dense model's (this rank's part of them), ``model`` run through ``call`` (default: itself); the
    parameters with partial gradients, by name."""
    models.loss_parity_backward(dense(*inputs), (model if call is None else call)(*inputs), tgt, VOCAB, TOL)
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
    return partial


def _hybrid_parity(tp, d=32, heads=4, batch=3, length=12):
    m = _dist.mesh(tp)
    torch.manual_seed(0)
    dense = models.HybridLM(d=d, heads=heads).double()
    model = copy.deepcopy(dense)
    plan = apply_policy(model, m.tp_group, POLICY, sequence_parallel=True)  # verify=True: the self-check passes
    rows = {r.name: r for r in plan.modules}
    g = torch.Generator().manual_seed(3 + m.dp_rank)
    ids, tgt = (torch.randint(0, VOCAB, (batch, length), generator=g) for _ in range(2))
    ids[1, length // 2 + 1 :] = 0  # padding: the convolution mixer reads the mask of the whole sequence
    partial = _step_parity(dense, model, (ids,), tgt, m)
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
    plan._whole_mixers = lambda *a, **k: []
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
            want = ("sequence_whole", {"in_features": [32], "hidden_only": True, "ndim": 3})
            assert rows[mixer] == want, rows[mixer]
        assert rows["blocks.1.mlp"][0] == "sequence_gather" and rows["blocks.0"][0] == "sequence_stack"
        assert not any(".mixer." in n for n in partial), partial  # replicated: their gradients are whole
        assert "blocks.1.norm1.weight" in partial, partial  # the chunk's norms stay partial
        assert all(err < 1e-12 for err in odd.values()), odd
    for error in _dist.run(world, _refused_without_whole_mixers, tp):
        assert error is not None and "blocks.0" in error, error


def test_only_the_hidden_states_are_gathered_not_a_mask_as_long_as_the_hidden_width():
    """Hidden width 8, 8 tokens, a batch of 4 (this rank's chunk at TP 2): the (B, T) padding mask
    the mixers take is as wide as the hidden states and as long as the chunk, and stays as given."""
    for rows, _, odd in _dist.run(2, _hybrid_parity, 2, 8, 2, 4, 8):
        assert rows["blocks.1.mixer"][1]["in_features"] == [8]
        assert all(err < 1e-12 for err in odd.values()), odd


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


def _cross_parity(tp, memory, compiled):
    """Training steps with a memory of ``memory`` tokens (8 decoder tokens: 4 is this rank's chunk at TP 2),
    eager or compiled (where no lengths are recorded); then no-grad forwards of other lengths."""
    m = _dist.mesh(tp)
    torch.manual_seed(0)
    dense = _CrossLM().double()
    model = copy.deepcopy(dense)
    g = torch.Generator().manual_seed(1)
    ids, src, tgt = (torch.randint(0, VOCAB, (2, n), generator=g) for n in (8, memory, 8))
    policy = {r.name: {"style": r.style, **r.options} for r in plan_policy(dense, tp, "auto").modules}
    policy.update({f"blocks.{i}.cross.{p}_proj": "replicate" for i in range(2) for p in "qkvo"})
    plan = apply_policy(model, m.tp_group, policy, sequence_parallel=True, example_input=(ids, src))
    styles = {r.name: r.style for r in plan.modules}
    run = torch.compile(model, backend="eager", fullgraph=True) if compiled else model
    _step_parity(dense, model, (ids, src), tgt, m, call=run)
    with torch.no_grad():  # a memory of another length, a decoder length that runs whole
        errs = [
            float((gather_logits(run(i, s)) - dense(i, s)).abs().max())
            for i, s in ((ids, src[:, :5]), (ids[:, :7], src))
        ]
    return styles, max(errs)


@pytest.mark.parametrize(
    ("memory", "compiled"), [(12, False), (4, False), (12, True)], ids=["eager", "chunk", "compiled"]
)
def test_a_cross_attention_left_whole_gathers_its_queries_not_its_memory(memory, compiled):
    """The memory as long as this rank's chunk of the decoder's sequence, or compiled (no lengths recorded):
    still given whole, as the second input of the hidden width."""
    for styles, err in _dist.run(2, _cross_parity, 2, memory, compiled):
        assert styles["blocks.0.cross"] == "sequence_whole" and styles["blocks.0.attn"] == "sequence_gather"
        assert err < 1e-12, err


class _PreMixer(nn.Module):
    """A causal depthwise convolution after a linear layer: mixes the sequence, inside an attention block."""

    def __init__(self, d):
        super().__init__()
        self.lin, self.conv = nn.Linear(d, d), nn.Conv1d(d, d, 3, groups=d, padding=2)

    def forward(self, x):
        return self.conv(self.lin(x).transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)


class _AttentionWithPre(models.RopeAttention):
    def __init__(self, d, heads):
        super().__init__(d, heads)
        self.pre = _PreMixer(d)

    def forward(self, x, cos, sin):
        return super().forward(self.pre(x), cos, sin)


class _HeadGate(nn.Module):
    """Position-wise, with a head count of its own: a sigmoid gate per head, ``(B, T, heads)``."""

    def __init__(self, d, heads):
        super().__init__()
        self.num_heads, self.lin = heads, nn.Linear(d, heads)

    def forward(self, x):
        return torch.sigmoid(self.lin(x))


class _GatedLayer(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn, self.gate, self.mlp = _AttentionWithPre(d, heads), _HeadGate(d, heads), models.SwiGLU(d, 2 * d)

    def forward(self, x, cos, sin):
        B, T, D = x.shape
        a = self.attn(self.norm1(x), cos, sin).view(B, T, self.heads, -1) * self.gate(x)[..., None]
        x = x + a.view(B, T, D)
        return x + self.mlp(self.norm2(x))


class _GatedLM(models.RopeGPT):
    """RopeGPT's rotary tables and head, with layers whose attention block mixes the sequence in a whole
    submodule before its split projections, and whose per-head gates are position-wise."""

    def __init__(self, d=16, heads=4):
        super().__init__(vocab=VOCAB, d=d, n_heads=heads, n_layers=2)
        self.blocks = nn.ModuleList(_GatedLayer(d, heads) for _ in range(2))


def _inside_blocks_parity(tp):
    m = _dist.mesh(tp)
    torch.manual_seed(0)
    dense = _GatedLM().double()
    model = copy.deepcopy(dense)
    policy = {**POLICY, **{f"blocks.*.attn.{p}_proj": "column" for p in "qkv"}, "blocks.*.attn.o_proj": "row"}
    plan = apply_policy(model, m.tp_group, policy, sequence_parallel=True)  # verify=True: the self-check passes
    g = torch.Generator().manual_seed(2)
    ids, tgt = (torch.randint(0, VOCAB, (2, 8), generator=g) for _ in range(2))
    partial = _step_parity(dense, model, (ids,), tgt, m)
    return {r.name: r.style for r in plan.modules}, partial


def test_a_whole_module_inside_a_gathering_block_or_a_position_wise_one_runs_as_before():
    """A convolution inside an attention block that gathers the sequence already sees it whole: it runs
    there, its gradients partial and summed, as before; a per-head gate (a head count, no projection
    back to the hidden width) is position-wise and runs on this rank's chunk."""
    for styles, partial in _dist.run(2, _inside_blocks_parity, 2):
        assert styles["blocks.0.attn"] == "sequence_gather", styles
        assert not any(s == "sequence_whole" for s in styles.values()), styles
        assert {"blocks.0.attn.pre.conv.weight", "blocks.0.gate.lin.weight"} <= set(partial), partial
