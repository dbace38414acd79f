"""Parallel layers against their dense float64 reference: outputs, input grads, weight grads.

Worlds: TP=2 (world 2), TP=4 (world 4) and DP2 x TP2 (world 4, tp 2; each DP replica gets its own
inputs, so a collective over the wrong group shows up as a mismatch).
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import _dist
from lightning_tp import cross_entropy
from lightning_tp.engine.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    gather_weight,
)
from lightning_tp.engine.loss import VocabShardedLogits
from lightning_tp.engine.sharding import ShardSpec, has_partial_grad, shard_spec
from lightning_tp.errors import ShardingError

TOL = {"atol": 1e-10, "rtol": 0.0}
WORLDS = [pytest.param(2, 2, id="tp2"), pytest.param(4, 4, id="tp4"), pytest.param(4, 2, id="dp2xtp2")]
F64 = torch.float64


def close(a, b, what=""):
    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: {m}")


def _inputs(m, *shape, dtype=F64):
    # Same within a TP group, different across DP replicas.
    g = torch.Generator().manual_seed(1000 + m.dp_rank)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _local(full, spec: ShardSpec, m):
    return spec.shard(full, m.tp_rank)


def _act_spec(param_spec: ShardSpec) -> ShardSpec:
    return ShardSpec(dim=-1, sizes=param_spec.sizes, tp_size=param_spec.tp_size, pad=param_spec.pad)


# ------------------------------------------------------------------------------------------------


def _check_column(tp, gather_output, bias, chunks):
    m = _dist.mesh(tp)
    torch.manual_seed(0)
    out = 24 if isinstance(chunks, int) else sum(chunks)
    dense = nn.Linear(10, out, bias=bias, dtype=F64)
    par = ColumnParallelLinear.from_dense(dense, m.tp_group, gather_output=gather_output, chunks=chunks)
    assert par.weight.shape == (out // tp, 10)
    x = _inputs(m, 3, 5, 10)
    xd, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    yd, yp = dense(xd), par(xp)
    gy = _inputs(m, *yd.shape)
    yd.backward(gy)
    if gather_output:
        close(yp, yd, "gathered output")
        yp.backward(gy)
    else:
        close(yp, _local(yd, _act_spec(par.weight_spec), m), "local output")
        yp.backward(_local(gy, _act_spec(par.weight_spec), m))
    close(xp.grad, xd.grad, "input grad")
    close(par.weight.grad, _local(dense.weight.grad, par.weight_spec, m), "weight grad")
    close(gather_weight(par.weight, m.tp_group), dense.weight, "gathered weight")
    if bias:
        close(par.bias.grad, _local(dense.bias.grad, shard_spec(par.bias), m), "bias grad")
    return True


@pytest.mark.parametrize(("world", "tp"), WORLDS)
@pytest.mark.parametrize(
    ("gather_output", "bias", "chunks"),
    [(False, True, 1), (True, True, 1), (False, False, 1), (True, True, 3), (False, True, 3), (True, False, (8, 4, 4))],
    ids=["local", "gather", "nobias", "qkv-gather", "qkv-local", "gqa-gather"],
)
def test_column_parallel(world, tp, gather_output, bias, chunks):
    assert all(_dist.run(world, _check_column, tp, gather_output, bias, chunks))


def _check_row(tp, input_is_parallel, bias):
    m = _dist.mesh(tp)
    torch.manual_seed(1)
    dense = nn.Linear(16, 6, bias=bias, dtype=F64)
    par = RowParallelLinear.from_dense(dense, m.tp_group, input_is_parallel=input_is_parallel)
    assert par.weight.shape == (6, 16 // tp)
    x = _inputs(m, 3, 5, 16)
    xd = x.clone().requires_grad_()
    xp = (x.chunk(tp, -1)[m.tp_rank] if input_is_parallel else x).clone().requires_grad_()
    yd, yp = dense(xd), par(xp)
    close(yp, yd, "output")
    gy = _inputs(m, *yd.shape)
    yd.backward(gy)
    yp.backward(gy)
    xg = xd.grad.chunk(tp, -1)[m.tp_rank] if input_is_parallel else xd.grad
    close(xp.grad, xg, "input grad")
    close(par.weight.grad, _local(dense.weight.grad, par.weight_spec, m), "weight grad")
    if bias:
        close(par.bias.grad, dense.bias.grad, "bias grad (added once)")
        assert shard_spec(par.bias) is None
    return True


@pytest.mark.parametrize(("world", "tp"), WORLDS)
@pytest.mark.parametrize(("input_is_parallel", "bias"), [(True, True), (False, True), (True, False)])
def test_row_parallel(world, tp, input_is_parallel, bias):
    assert all(_dist.run(world, _check_row, tp, input_is_parallel, bias))


def _check_embedding(tp, vocab, padding_idx):
    m = _dist.mesh(tp)
    torch.manual_seed(2)
    dense = nn.Embedding(vocab, 6, padding_idx=padding_idx, dtype=F64)
    par = VocabParallelEmbedding.from_dense(dense, m.tp_group)
    local_rows = math.ceil(vocab / tp)
    assert par.weight.shape == (local_rows, 6)
    g = torch.Generator().manual_seed(50 + m.dp_rank)
    ids = torch.randint(0, vocab, (4, 7), generator=g)
    ids[0, :3] = torch.tensor([0, vocab - 1, padding_idx if padding_idx is not None else 1])
    yd, yp = dense(ids), par(ids)
    close(yp, yd, "embedding output")
    gy = _inputs(m, *yd.shape)
    yd.backward(gy)
    yp.backward(gy)
    close(par.weight.grad, _local(dense.weight.grad, par.weight_spec, m), "embedding grad")
    # Padded rows (past the vocabulary) are zero and get zero grad.
    start, n_valid = par.weight_spec.valid_range(m.tp_rank)
    assert torch.count_nonzero(par.weight.detach()[n_valid:]) == 0
    assert torch.count_nonzero(par.weight.grad[n_valid:]) == 0
    close(gather_weight(par.weight, m.tp_group), dense.weight, "gathered weight")
    with pytest.raises(IndexError, match=f"index {vocab} is out of range for an embedding of {vocab} rows"):
        par(torch.tensor([[vocab]]))
    return True


@pytest.mark.parametrize(("world", "tp"), WORLDS)
@pytest.mark.parametrize(("vocab", "padding_idx"), [(32, None), (30, 7), (29, None)])
def test_vocab_parallel_embedding(world, tp, vocab, padding_idx):
    assert all(_dist.run(world, _check_embedding, tp, vocab, padding_idx))


def _check_lm_head(tp, vocab, gather_output, label_smoothing):
    m = _dist.mesh(tp)
    torch.manual_seed(3)
    dense = nn.Linear(8, vocab, bias=True, dtype=F64)
    par = VocabParallelLMHead.from_dense(dense, m.tp_group, gather_output=gather_output)
    x = _inputs(m, 3, 5, 8)
    g = torch.Generator().manual_seed(70 + m.dp_rank)
    y = torch.randint(0, vocab, (3, 5), generator=g)
    y[0, :2] = -100
    y[1, 0] = vocab - 1
    xd, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    ld = F.cross_entropy(dense(xd).view(-1, vocab), y.view(-1), label_smoothing=label_smoothing)
    logits = par(xp)
    if gather_output:
        assert logits.shape == (3, 5, vocab) and not isinstance(logits, VocabShardedLogits)
    else:
        assert isinstance(logits, VocabShardedLogits) and logits.shape == (3, 5, math.ceil(vocab / tp))
    # Unchanged user code: view with the local last dim, then the loss.
    lp = cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), label_smoothing=label_smoothing)
    close(lp, ld, "loss")
    ld.backward()
    lp.backward()
    close(xp.grad, xd.grad, "input grad")
    close(par.weight.grad, _local(dense.weight.grad, par.weight_spec, m), "head weight grad")
    close(par.bias.grad, _local(dense.bias.grad, shard_spec(par.bias), m), "head bias grad")
    return True


@pytest.mark.parametrize(("world", "tp"), WORLDS)
@pytest.mark.parametrize("vocab", [30, 32])
@pytest.mark.parametrize(("gather_output", "label_smoothing"), [(True, 0.0), (False, 0.0), (False, 0.1)])
def test_vocab_parallel_lm_head(world, tp, vocab, gather_output, label_smoothing):
    assert all(_dist.run(world, _check_lm_head, tp, vocab, gather_output, label_smoothing))


def _check_tied_embedding_head(tp):
    m = _dist.mesh(tp)
    torch.manual_seed(4)
    vocab, hidden = 30, 8
    wte, head = nn.Embedding(vocab, hidden, dtype=F64), nn.Linear(hidden, vocab, bias=False, dtype=F64)
    head.weight = wte.weight
    pwte = VocabParallelEmbedding.from_dense(wte, m.tp_group)
    phead = VocabParallelLMHead.from_dense(head, m.tp_group, gather_output=False)
    assert torch.equal(phead.weight, pwte.weight)  # same layout: the tie can be kept
    phead.weight = pwte.weight
    g = torch.Generator().manual_seed(90 + m.dp_rank)
    ids = torch.randint(0, vocab, (2, 6), generator=g)
    tgt = torch.randint(0, vocab, (2, 6), generator=g)
    ld = F.cross_entropy(head(torch.tanh(wte(ids))).view(-1, vocab), tgt.view(-1))
    lp = cross_entropy(phead(torch.tanh(pwte(ids))), tgt)
    close(lp, ld, "tied loss")
    ld.backward()
    lp.backward()
    close(pwte.weight.grad, _local(wte.weight.grad, pwte.weight_spec, m), "tied grad")
    return True


@pytest.mark.parametrize(("world", "tp"), WORLDS)
def test_tied_embedding_and_head(world, tp):
    assert all(_dist.run(world, _check_tied_embedding_head, tp))


# ------------------------------------------------------------------------------------------------
# Blocks built from the layers.


class DenseMLP(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.fc, self.proj = nn.Linear(h, 4 * h, dtype=F64), nn.Linear(4 * h, h, dtype=F64)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


def _check_mlp(tp, sequence_parallel):
    m = _dist.mesh(tp)
    torch.manual_seed(5)
    dense = DenseMLP(8)
    fc = ColumnParallelLinear.from_dense(dense.fc, m.tp_group, sequence_parallel=sequence_parallel)
    proj = RowParallelLinear.from_dense(dense.proj, m.tp_group, sequence_parallel=sequence_parallel)
    x = _inputs(m, 2, 8, 8)
    xd = x.clone().requires_grad_()
    xp = (x.chunk(tp, 1)[m.tp_rank] if sequence_parallel else x).clone().requires_grad_()
    yd, yp = dense(xd), proj(F.gelu(fc(xp)))
    gy = _inputs(m, *yd.shape)
    yd.backward(gy)
    if sequence_parallel:
        close(yp, yd.chunk(tp, 1)[m.tp_rank], "sp output")
        yp.backward(gy.chunk(tp, 1)[m.tp_rank])
        close(xp.grad, xd.grad.chunk(tp, 1)[m.tp_rank], "sp input grad")
        assert has_partial_grad(proj.bias)
        bias_grad = proj.bias.grad.clone()
        dist.all_reduce(bias_grad, group=m.tp_group)  # what the strategy does for partial grads
        close(bias_grad, dense.proj.bias.grad, "sp bias grad (after TP all-reduce)")
    else:
        close(yp, yd, "output")
        yp.backward(gy)
        close(xp.grad, xd.grad, "input grad")
        close(proj.bias.grad, dense.proj.bias.grad, "row bias grad")
    close(fc.weight.grad, _local(dense.fc.weight.grad, fc.weight_spec, m), "fc grad")
    close(fc.bias.grad, _local(dense.fc.bias.grad, fc.weight_spec, m), "fc bias grad")
    close(proj.weight.grad, _local(dense.proj.weight.grad, proj.weight_spec, m), "proj grad")
    return True


@pytest.mark.parametrize(("world", "tp"), WORLDS)
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
def test_mlp_block(world, tp, sequence_parallel):
    assert all(_dist.run(world, _check_mlp, tp, sequence_parallel))


class DenseAttention(nn.Module):
    """Causal self-attention with a fused q/k/v projection and grouped-query heads."""

    def __init__(self, h, n_head, n_kv_head):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, h // n_head
        self.qkv = nn.Linear(h, (n_head + 2 * n_kv_head) * self.head_dim, dtype=F64)
        self.proj = nn.Linear(h, h, dtype=F64)

    def forward(self, x):
        return attention(x, self.qkv, self.proj, self.n_head, self.n_kv_head, self.head_dim)


def attention(x, qkv, proj, n_head, n_kv_head, head_dim):
    B, T, _ = x.shape
    q, k, v = qkv(x).split([n_head * head_dim, n_kv_head * head_dim, n_kv_head * head_dim], dim=-1)
    q = q.view(B, T, n_head, head_dim).transpose(1, 2)  # (B, nh, T, hd)
    k = k.view(B, T, n_kv_head, head_dim).transpose(1, 2)  # (B, nkv, T, hd)
    v = v.view(B, T, n_kv_head, head_dim).transpose(1, 2)
    k = k.repeat_interleave(n_head // n_kv_head, dim=1)
    v = v.repeat_interleave(n_head // n_kv_head, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
    return proj(y.transpose(1, 2).reshape(B, T, n_head * head_dim))


def _check_attention(tp, n_head, n_kv_head):
    m = _dist.mesh(tp)
    torch.manual_seed(6)
    h = 16
    dense = DenseAttention(h, n_head, n_kv_head)
    hd = dense.head_dim
    sizes = (n_head * hd, n_kv_head * hd, n_kv_head * hd)
    qkv = ColumnParallelLinear.from_dense(dense.qkv, m.tp_group, chunks=sizes, head_dim=hd)
    proj = RowParallelLinear.from_dense(dense.proj, m.tp_group)
    x = _inputs(m, 2, 6, h)
    xd, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    yd = dense(xd)
    yp = attention(xp, qkv, proj, n_head // tp, n_kv_head // tp, hd)
    close(yp, yd, "attention output")
    gy = _inputs(m, *yd.shape)
    yd.backward(gy)
    yp.backward(gy)
    close(xp.grad, xd.grad, "input grad")
    close(qkv.weight.grad, _local(dense.qkv.weight.grad, qkv.weight_spec, m), "qkv grad")
    close(qkv.bias.grad, _local(dense.qkv.bias.grad, qkv.weight_spec, m), "qkv bias grad")
    close(proj.weight.grad, _local(dense.proj.weight.grad, proj.weight_spec, m), "proj grad")
    close(proj.bias.grad, dense.proj.bias.grad, "proj bias grad")
    return True


@pytest.mark.parametrize(("world", "tp"), WORLDS)
@pytest.mark.parametrize(("n_head", "n_kv_head"), [(4, 4), (8, 4)], ids=["mha", "gqa"])
def test_attention_block(world, tp, n_head, n_kv_head):
    assert all(_dist.run(world, _check_attention, tp, n_head, n_kv_head))


# ------------------------------------------------------------------------------------------------
# Typed errors.


def _check_errors(tp):
    g = _dist.mesh(tp).tp_group
    with pytest.raises(ShardingError, match=r"out_features of 'blk.fc' of size 6 over tensor_parallel_size=4"):
        ColumnParallelLinear(8, 6, group=g, name="blk.fc")
    with pytest.raises(ShardingError, match=r"in_features of 'blk.proj' of size 10 over tensor_parallel_size=4"):
        RowParallelLinear(10, 8, group=g, name="blk.proj")
    with pytest.raises(ShardingError, match=r"'attn.qkv': 2 heads .* tensor_parallel_size=4.*whole heads"):
        ColumnParallelLinear(8, 24, group=g, chunks=3, head_dim=4, name="attn.qkv")
    with pytest.raises(ShardingError, match=r"chunk size 8 is not a whole number of heads of size 3"):
        ColumnParallelLinear(8, 24, group=g, chunks=3, head_dim=3, name="attn.qkv")
    with pytest.raises(ValueError, match=r"out_features=10 cannot be divided into 3 equal fused chunks"):
        ColumnParallelLinear(8, 10, group=g, chunks=3)
    with pytest.raises(ValueError, match=r"chunk sizes \[8, 4\] must be positive and sum to out_features=16"):
        ColumnParallelLinear(8, 16, group=g, chunks=(8, 4))
    with pytest.raises(TypeError, match="expects an nn.Linear, got Embedding"):
        ColumnParallelLinear.from_dense(nn.Embedding(4, 4), g)
    with pytest.raises(TypeError, match="expects an nn.Embedding, got Linear"):
        VocabParallelEmbedding.from_dense(nn.Linear(4, 4), g)
    with pytest.raises(ValueError, match=r"options \['max_norm', 'sparse'\] cannot be vocab-parallel"):
        VocabParallelEmbedding.from_dense(nn.Embedding(8, 4, max_norm=1.0, sparse=True), g)
    # Vocab sizes never raise: they are padded.
    assert VocabParallelEmbedding(30, 4, group=g).weight.shape == (8, 4)
    return True


def test_typed_errors_tp4():
    assert all(_dist.run(4, _check_errors, 4))


def _check_constructor_matches_dense_init(tp):
    # Built from scratch with the same seed, a parallel layer is a shard of the same dense layer.
    m = _dist.mesh(tp)
    torch.manual_seed(7)
    dense = nn.Linear(8, 12)
    torch.manual_seed(7)
    col = ColumnParallelLinear(8, 12, group=m.tp_group)
    close(gather_weight(col.weight, m.tp_group).double(), dense.weight.detach().double(), "init")
    torch.manual_seed(7)
    emb = nn.Embedding(30, 4)
    torch.manual_seed(7)
    pemb = VocabParallelEmbedding(30, 4, group=m.tp_group)
    close(gather_weight(pemb.weight, m.tp_group).double(), emb.weight.detach().double(), "embedding init")
    return True


def test_init_independent_of_tp_size():
    assert all(_dist.run(4, _check_constructor_matches_dense_init, 4))
    assert all(_dist.run(2, _check_constructor_matches_dense_init, 2))


def _check_autocast_bf16(tp):
    """Under CPU bf16 autocast the parallel layers compute like nn.Linear does (bf16 matmuls), and
    the grads keep the parameters' fp32 dtype."""
    m = _dist.mesh(tp)
    torch.manual_seed(3)
    fc, proj = nn.Linear(16, 32), nn.Linear(32, 16)
    col = ColumnParallelLinear.from_dense(fc, m.tp_group)
    row = RowParallelLinear.from_dense(proj, m.tp_group)
    x = _inputs(m, 2, 4, 16, dtype=torch.float32)
    xd, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hd, hp = fc(xd), col(xp)
        assert hp.dtype == hd.dtype == torch.bfloat16
        yd, yp = proj(F.gelu(hd)), row(F.gelu(hp))
    assert yp.dtype == yd.dtype == torch.bfloat16
    torch.testing.assert_close(hp, _local(hd, _act_spec(col.weight_spec), m), atol=0, rtol=0)  # same bf16 math
    torch.testing.assert_close(yp.float(), yd.float(), atol=2e-2, rtol=2e-2)  # reduction order differs
    yd.float().sum().backward()
    yp.float().sum().backward()
    assert col.weight.grad.dtype == torch.float32 and xp.grad.dtype == torch.float32
    torch.testing.assert_close(col.weight.grad, _local(fc.weight.grad, col.weight_spec, m), atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(xp.grad, xd.grad, atol=5e-2, rtol=2e-2)
    if tp == 1:  # a group of one is nn.Linear's own call: bit for bit, bias fused into the row matmul
        assert torch.equal(yp, yd) and torch.equal(xp.grad, xd.grad)
        assert torch.equal(row.weight.grad, proj.weight.grad) and torch.equal(row.bias.grad, proj.bias.grad)
    return True


@pytest.mark.parametrize("tp", [1, 2])
def test_parallel_layers_under_bf16_autocast(tp):
    assert all(_dist.run(tp, _check_autocast_bf16, tp))


def _gather_into_matches(tp):
    from lightning_tp.engine.layers import gather_sharded, gather_sharded_into

    m = _dist.mesh(tp)
    gen = torch.Generator().manual_seed(0)
    specs = [
        ShardSpec(0, (12,), tp),
        ShardSpec(1, (8,), tp),
        ShardSpec(0, (8, 4, 4), tp),  # plain, dim 1, fused
        ShardSpec(0, (30,), tp, pad=True),
        ShardSpec(0, (6, 3, 3), tp, pad=True),
    ]  # padded (vocab), fused padded
    for spec in specs:
        shape = [spec.full_size, 5] if spec.dim == 0 else [5, spec.full_size]
        full = torch.randn(shape, generator=gen)
        local = spec.shard(full, m.tp_rank)
        dst = torch.full_like(full, float("nan"))
        gather_sharded_into(dst, local, spec, m.tp_group)
        assert torch.equal(dst, full) and torch.equal(gather_sharded(local, spec, m.tp_group), full), spec
        dst_t = torch.empty(full.t().shape).t()  # a transposed view, as for a Conv1D weight
        gather_sharded_into(dst_t, local, spec, m.tp_group)
        assert torch.equal(dst_t, full), spec
    return True


@pytest.mark.parametrize("world", [2, 4])
def test_gather_sharded_into_writes_the_dense_layout(world):
    assert all(_dist.run(world, _gather_into_matches, world))
