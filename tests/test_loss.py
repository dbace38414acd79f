"""Vocab-parallel cross entropy against F.cross_entropy on the unsharded logits (float64)."""

import math
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import _dist
from lightning_tp import cross_entropy, vocab_parallel_cross_entropy
from lightning_tp.engine.loss import VocabShardedLogits
from lightning_tp.engine.sharding import ShardSpec

TOL = {"atol": 1e-10, "rtol": 0.0}
WORLDS = [
    pytest.param(1, 1, id="tp1"),
    pytest.param(2, 2, id="tp2"),
    pytest.param(4, 4, id="tp4"),
    pytest.param(4, 2, id="dp2xtp2"),
]


def _data(m, vocab, n=24, dtype=torch.float64):
    g = torch.Generator().manual_seed(11 + m.dp_rank)  # same in a TP group, differs across DP
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, vocab, (n,), generator=g)
    target[:3] = -100
    target[3] = vocab - 1  # a target in the last (possibly padded) shard
    target[4] = 0
    return logits.to(dtype), target


def _fused_in_graph(loss) -> bool:
    """Whether ``loss`` came through the fused vocab-parallel loss (else the unfused one)."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        seen_name = type(node).__name__
        if seen_name.endswith("VocabParallelCrossEntropyBackward"):
            return seen_name.startswith("_Fused")
        stack.extend(n for n, _ in node.next_functions)
    raise AssertionError("no vocab-parallel loss in the graph")


def _check_loss(tp, vocab, label_smoothing, reduction, fused=False):
    m = _dist.mesh(tp)
    spec = ShardSpec(dim=-1, sizes=(vocab,), tp_size=tp, pad=True)
    logits, target = _data(m, vocab)
    ld_in = logits.clone().requires_grad_()
    lp_in = spec.shard(logits, m.tp_rank).requires_grad_()
    assert lp_in.shape[-1] == math.ceil(vocab / tp)
    ld = F.cross_entropy(ld_in, target, label_smoothing=label_smoothing, reduction=reduction)
    lp = vocab_parallel_cross_entropy(
        lp_in, target, m.tp_group, vocab, label_smoothing=label_smoothing, reduction=reduction, fused=fused
    )
    assert _fused_in_graph(lp) == fused
    torch.testing.assert_close(lp, ld, **TOL)
    g = torch.linspace(0.5, 1.5, ld.numel(), dtype=torch.float64).reshape(ld.shape)
    ld.backward(g)
    lp.backward(g)
    torch.testing.assert_close(lp_in.grad, spec.shard(ld_in.grad, m.tp_rank), **TOL)
    _, n_valid = spec.valid_range(m.tp_rank)
    assert torch.count_nonzero(lp_in.grad[:, n_valid:]) == 0  # padded columns: no gradient
    assert torch.count_nonzero(lp_in.grad[:3]) == 0  # ignored targets: no gradient
    return True


@pytest.mark.parametrize(("world", "tp"), WORLDS)
@pytest.mark.parametrize("vocab", [30, 32, 5])
@pytest.mark.parametrize(("label_smoothing", "reduction"), [(0.0, "mean"), (0.1, "mean"), (0.0, "sum"), (0.2, "none")])
def test_vocab_parallel_cross_entropy(world, tp, vocab, label_smoothing, reduction):
    assert all(_dist.run(world, _check_loss, tp, vocab, label_smoothing, reduction))


def _check_low_precision(tp, dtype, label_smoothing, fused=False):
    m = _dist.mesh(tp)
    vocab = 30
    spec = ShardSpec(dim=-1, sizes=(vocab,), tp_size=tp, pad=True)
    logits, target = _data(m, vocab, dtype=dtype)
    target[5:8] = target[5:8] % 2  # (targets in the first shard too)
    logits[5:8, 0] += 60.0  # confident rows: softmax - 1 at the target cancels (rounded first, it would be 0)
    exact = logits.double().requires_grad_()  # the same (rounded) logits, in float64
    ref = F.cross_entropy(exact, target, label_smoothing=label_smoothing, reduction="sum")
    local = spec.shard(logits, m.tp_rank).requires_grad_()
    out = vocab_parallel_cross_entropy(
        local, target, m.tp_group, vocab, label_smoothing=label_smoothing, reduction="sum", fused=fused
    )
    assert out.dtype == torch.float32  # computed in fp32 like Megatron
    torch.testing.assert_close(out.double(), ref, atol=0, rtol=1e-6)
    out.backward()
    ref.backward()
    assert local.grad.dtype == dtype
    # the float64 gradient rounded once to the logits' dtype (half a unit in the last place), the target
    # entries included; padded columns and ignored rows exactly 0
    want = spec.shard(exact.grad, m.tp_rank)
    ulp = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}[dtype]
    err = (local.grad.double() - want).abs() - ulp * want.abs()
    assert float(err.max()) <= 1e-7 * float(want.abs().max()), float(err.max())
    _, n_valid = spec.valid_range(m.tp_rank)
    assert torch.count_nonzero(local.grad[:, n_valid:]) == 0 and torch.count_nonzero(local.grad[:3]) == 0
    return True


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_low_precision_logits_computed_in_fp32(dtype, tp, label_smoothing):
    """The loss in fp32 and the gradient within half a unit of the logits' dtype of the exact one."""
    assert all(_dist.run(tp, _check_low_precision, tp, dtype, label_smoothing))


def _check_reduction_sizes(tp):
    """Only (b*s)-sized reductions: never the logits."""
    m = _dist.mesh(tp)
    vocab, n = 64, 10
    logits, target = _data(m, vocab, n=n)
    local = logits.chunk(tp, -1)[m.tp_rank].clone().requires_grad_()
    sizes = []
    real = dist.all_reduce

    def counted(t, *a, **k):
        sizes.append(t.numel())
        return real(t, *a, **k)

    dist.all_reduce = counted
    try:
        vocab_parallel_cross_entropy(local, target, m.tp_group, vocab).backward()
        no_smoothing = list(sizes)
        sizes.clear()
        vocab_parallel_cross_entropy(local, target, m.tp_group, vocab, label_smoothing=0.1).backward()
    finally:
        dist.all_reduce = real
    return no_smoothing, sizes


def test_only_token_sized_reductions():
    for plain, smoothed in _dist.run(2, _check_reduction_sizes, 2):
        assert plain == [10, 20]  # max, then (target logit, sum exp) stacked
        assert smoothed == [10, 30]


def _check_sharded_logits_api(tp):
    m = _dist.mesh(tp)
    vocab = 30
    logits, target = _data(m, vocab, n=12)
    local = ShardSpec(dim=-1, sizes=(vocab,), tp_size=tp, pad=True).shard(logits, m.tp_rank)
    sharded = VocabShardedLogits.wrap(local.view(3, 4, -1), m.tp_group, vocab)
    flat = sharded.view(-1, sharded.size(-1)).contiguous().to(torch.float64)
    assert isinstance(sharded.float(), VocabShardedLogits)
    assert isinstance(flat, VocabShardedLogits) and flat.vocab_size == vocab
    assert not isinstance(sharded.argmax(-1), VocabShardedLogits)  # other ops: plain local tensors
    assert not isinstance(sharded[..., :2], VocabShardedLogits)
    torch.testing.assert_close(cross_entropy(flat, target), F.cross_entropy(logits, target), **TOL)
    with pytest.raises(ValueError, match=r"need a target of shape \(12,\) \(class dim last\), got \(3, 4\)"):
        cross_entropy(flat, target.view(3, 4))
    bad = target.clone()
    bad[5] = vocab
    with pytest.raises(IndexError, match="target 30 is out of bounds for a vocabulary of 30 classes"):
        cross_entropy(flat, bad)
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none', got 'avg'"):
        cross_entropy(flat, target, reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        cross_entropy(flat, target, label_smoothing=1.5)
    return True


def test_sharded_logits_api_and_errors():
    assert all(_dist.run(2, _check_sharded_logits_api, 2))


@pytest.mark.parametrize("shape", [(6, 9), (2, 9, 4)])
def test_fallback_is_f_cross_entropy(shape):
    torch.manual_seed(0)
    logits = torch.randn(*shape, requires_grad=True)
    target = torch.randint(0, 9, (shape[0], *shape[2:]))
    target[0] = -100
    a = cross_entropy(logits, target, label_smoothing=0.1)
    b = F.cross_entropy(logits, target, label_smoothing=0.1)
    assert torch.equal(a, b)


def _check_second_backward_is_refused(tp):
    m = _dist.mesh(tp)
    logits, target = _data(m, 30)
    local = ShardSpec(dim=-1, sizes=(30,), tp_size=tp, pad=True).shard(logits, m.tp_rank).requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, m.tp_group, 30)
    loss.backward(retain_graph=True)
    # backward turns the saved exp buffer into the gradient in place: a second pass must fail loudly
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    return True


def test_second_backward_through_the_loss_is_an_error_not_a_wrong_grad():
    assert all(_dist.run(2, _check_second_backward_is_refused, 2))


def _head_and_reference(m, tp, vocab=30, hidden=6):
    from torch import nn

    from lightning_tp.engine.layers import VocabParallelLMHead

    torch.manual_seed(2)
    dense = nn.Linear(hidden, vocab, bias=False, dtype=torch.float64)
    head = VocabParallelLMHead.from_dense(dense, m.tp_group, gather_output=False)
    return dense, head


def _step(m, dense, head, seed, keep=None):
    """One head + loss + backward, checked against the dense reference; returns the grad buffer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 5, dense.in_features, generator=g, dtype=torch.float64)
    y = torch.randint(0, dense.out_features, (4, 5), generator=g)
    dense.zero_grad()
    head.zero_grad()
    ref = F.cross_entropy(dense(x).flatten(0, 1), y.flatten())
    ref.backward()
    logits = head(x)
    if keep is not None:
        logits.register_hook(lambda grad: keep.append(grad))
    loss = cross_entropy(logits.view(-1, logits.size(-1)), y.flatten())
    torch.testing.assert_close(loss, ref, **TOL)
    loss.backward()
    torch.testing.assert_close(head.weight.grad, head.weight_spec.shard(dense.weight.grad, m.tp_rank), **TOL)
    return head._loss_workspace._buf


def _check_workspace(tp):
    m = _dist.mesh(tp)
    dense, head = _head_and_reference(m, tp)
    ptrs = [_step(m, dense, head, seed).data_ptr() for seed in range(3)]
    assert ptrs[0] == ptrs[1] == ptrs[2], "the loss buffer is reused across steps"

    # a grad kept by a user's hook is never overwritten by a later step
    kept: list = []
    _step(m, dense, head, 10, keep=kept)
    snapshot = kept[0].clone()
    buf = _step(m, dense, head, 11)
    assert torch.equal(kept[0], snapshot)
    assert buf.data_ptr() != kept[0].data_ptr()
    del kept

    # two losses from the same head before one backward: two buffers, exact grads
    x1, x2 = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    y1, y2 = torch.tensor([1, 29, 4]), torch.tensor([0, 7, 28])
    dense.zero_grad()
    head.zero_grad()
    (F.cross_entropy(dense(x1), y1) + F.cross_entropy(dense(x2), y2)).backward()
    (cross_entropy(head(x1), y1) + cross_entropy(head(x2), y2)).backward()
    torch.testing.assert_close(head.weight.grad, head.weight_spec.shard(dense.weight.grad, m.tp_rank), **TOL)

    # a view of the buffer held by the user also blocks reuse
    view = head._loss_workspace._buf.view(-1)
    before = view.clone()
    _step(m, dense, head, 12)
    assert torch.equal(view, before)
    return True


def test_loss_workspace_is_reused_only_when_unreferenced():
    assert all(_dist.run(2, _check_workspace, 2))


# -- the fused loss (Megatron's cross_entropy_loss_fusion): compiled kernels, on CPU here -------------------


@pytest.mark.parametrize(("world", "tp"), [WORLDS[0], WORLDS[2]])
@pytest.mark.parametrize("vocab", [30, 5])  # at TP 4 a vocabulary of 5 leaves rank 3 no column at all
@pytest.mark.parametrize(("label_smoothing", "reduction"), [(0.0, "mean"), (0.2, "none")])
def test_fused_vocab_parallel_cross_entropy(world, tp, vocab, label_smoothing, reduction):
    """The same float64 value and gradient as F.cross_entropy on the dense logits (padding and
    ignored rows included), through two compiled kernels."""
    assert all(_dist.run(world, _check_loss, tp, vocab, label_smoothing, reduction, True))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_fused_loss_of_bf16_logits_computed_in_fp32(label_smoothing):
    assert all(_dist.run(2, _check_low_precision, 2, torch.bfloat16, label_smoothing, True))


def _saved_by_the_loss(tp, fused, dtype):
    """Shapes and dtypes autograd keeps for the loss's backward, and the first gradient, twice."""
    m = _dist.mesh(tp)
    logits, target = _data(m, 30, n=64, dtype=dtype)
    local = ShardSpec(dim=-1, sizes=(30,), tp_size=tp, pad=True).shard(logits, m.tp_rank).requires_grad_()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.data_ptr() == local.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = vocab_parallel_cross_entropy(local, target, m.tp_group, 30, fused=fused)
    loss.backward(retain_graph=fused)
    first = local.grad.clone()
    if fused:  # the logits are saved, not consumed: a second backward adds the same gradient again
        loss.backward()
        assert torch.equal(local.grad, 2 * first)
    return saved


def test_fused_loss_keeps_no_buffer_as_large_as_the_logits():
    """Unfused, backward keeps a float32 (N, V/p) buffer (exp(z - M)) beside bf16 logits; fused, the only
    logits-sized tensor kept is the logits themselves (bf16, half that size); (N,)-sized ones besides."""
    for fused in (False, True):
        for saved in _dist.run(2, _saved_by_the_loss, 2, fused, torch.bfloat16):
            large = [(dtype, is_logits) for shape, dtype, is_logits in saved if len(shape) == 2]
            assert large == ([(torch.bfloat16, True)] if fused else [(torch.float32, False)]), (fused, saved)


def _doubled(x, k=2):
    return x * k


def _broken(*args):
    raise RuntimeError("inductor: no working C++ compiler")


def test_a_kernel_that_cannot_compile_runs_eagerly_after_one_warning():
    from lightning_tp.engine.compiled import FusedKernel

    kernel = FusedKernel(_doubled)
    kernel._compiled = _broken  # what torch.compile gives where its backend cannot build the kernel
    x = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="could not run its fused kernel _doubled compiled .*no working C"):
        assert torch.equal(kernel(x), 2 * x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # once: no second warning, no second attempt
        assert torch.equal(kernel(-x), -2 * x)
    assert kernel._failed


def test_torch_compile_refusing_runs_the_kernel_eagerly(monkeypatch):
    """torch.compile() itself raising (torch refuses some Python versions) is a failure to compile too."""
    from lightning_tp.engine.compiled import FusedKernel

    def refuse(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", refuse)
    kernel = FusedKernel(_doubled)
    with pytest.warns(RuntimeWarning, match="not supported on this Python"):
        assert torch.equal(kernel(torch.ones(2)), torch.full((2,), 2.0))
    assert kernel._failed


def test_a_bad_argument_raises_its_own_error_and_leaves_the_kernel_compiled():
    """A call that fails eagerly too (a float target's gather) raises that error; fusion stays on."""
    from lightning_tp.engine.loss import _local_stats

    logits = torch.randn(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeError, match="gather"):
            _local_stats(logits, torch.zeros(4), 6, False, torch.float32)  # float indices
        assert not _local_stats._failed
        local_max, local_sum, z_t = _local_stats(logits, torch.zeros(4, dtype=torch.long), 6, False, torch.float32)
    torch.testing.assert_close(local_max, logits.amax(-1))
    torch.testing.assert_close(z_t, logits[:, 0])
    assert not _local_stats._failed


def test_where_torch_compile_does_not_run_the_kernel_runs_eagerly():
    """Disabled (TORCH_COMPILE_DISABLE), past the recompile limit, on fake or meta tensors: eager values,
    no warning, no error, fusion not switched off."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lightning_tp.engine.compiled import FusedKernel

    x = torch.arange(6.0).reshape(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        kernel = FusedKernel(_doubled)
        with torch._dynamo.config.patch(disable=True):
            assert torch.equal(kernel(x, 3), 3 * x)
        with torch._dynamo.config.patch(recompile_limit=1):  # the second constant is past it
            for k in (2, 3, 4):
                assert torch.equal(kernel(x, k), k * x)
        with torch.compiler.set_stance("force_eager"):
            assert torch.equal(kernel(x, 5), 5 * x)
        with torch.compiler.set_stance(
            "fail_on_recompile"
        ):  # the user's own recompiles fail; a new variant here is eager
            assert torch.equal(kernel(x.double(), 6), 6 * x.double())
        with FakeTensorMode():
            fake = torch.empty(5, 7)
            assert kernel(fake, 2).shape == (5, 7)
        assert kernel(torch.empty(5, 7, device="meta"), 2).shape == (5, 7)
    assert not kernel._failed


def _check_strided_logits(tp):
    """Logits that are no (N, m) view (the shifted positions of a (B, T + 1, V) output; sequence-first logits
    transposed): the kernels take them as they are, with no copy, and give the dense loss and gradient."""
    from lightning_tp.engine.loss import _rows

    m = _dist.mesh(tp)
    spec = ShardSpec(dim=-1, sizes=(30,), tp_size=tp, pad=True)
    g = torch.Generator().manual_seed(5)
    full = torch.randn(3, 6, 30, generator=g, dtype=torch.float64)
    target = torch.randint(0, 30, (3, 5), generator=g)
    for name, cut in (
        ("shifted", lambda z: z[:, :-1]),
        ("transposed", lambda z: z[:, :5].transpose(0, 1).contiguous().transpose(0, 1)),
    ):
        dense = cut(full).clone().requires_grad_()
        ref = F.cross_entropy(dense.reshape(-1, 30), target.reshape(-1))
        ref.backward()
        whole = spec.shard(full, m.tp_rank).requires_grad_()
        local = cut(whole)
        assert not local.is_contiguous() and _rows(local).data_ptr() == local.data_ptr() and _rows(local).dim() == 3, (
            name
        )
        loss = vocab_parallel_cross_entropy(local, target, m.tp_group, 30, fused=True)
        torch.testing.assert_close(loss, ref, **TOL)
        loss.backward()
        torch.testing.assert_close(cut(whole.grad), spec.shard(dense.grad, m.tp_rank), **TOL)
    return True


def test_fused_loss_of_strided_logits():
    assert all(_dist.run(2, _check_strided_logits, 2))


def _check_nan_logit(tp):
    """A NaN logit on one rank: NaN loss in its row, as F.cross_entropy on the dense logits gives, fused
    or not (even where the MAX all-reduce drops the NaN, as gloo's does)."""
    m = _dist.mesh(tp)
    vocab = 8
    logits, target = _data(m, vocab, n=6)
    logits[2, vocab - 1] = float("nan")  # in the last rank's slice
    target[2] = 0  # its target on the first rank
    dense = F.cross_entropy(logits, target, reduction="none")
    local = ShardSpec(dim=-1, sizes=(vocab,), tp_size=tp, pad=True).shard(logits, m.tp_rank)
    for fused in (False, True):
        loss = vocab_parallel_cross_entropy(local, target, m.tp_group, vocab, reduction="none", fused=fused)
        assert torch.equal(loss.isnan(), dense.isnan()), (fused, loss, dense)
        torch.testing.assert_close(loss[~dense.isnan()], dense[~dense.isnan()], **TOL)
    # fused, a +inf logit as F.cross_entropy (log_softmax shifts by the max): NaN, whichever class is the target
    logits[3, 0], logits[4, 0], target[3], target[4] = float("inf"), float("inf"), 1, 0
    dense = F.cross_entropy(logits, target, reduction="none")
    local = ShardSpec(dim=-1, sizes=(vocab,), tp_size=tp, pad=True).shard(logits, m.tp_rank)
    loss = vocab_parallel_cross_entropy(local, target, m.tp_group, vocab, reduction="none", fused=True)
    assert dense[3].isnan() and dense[4].isnan()
    torch.testing.assert_close(loss, dense, equal_nan=True, **TOL)
    return True


def test_a_nan_logit_gives_a_nan_loss():
    assert all(_dist.run(2, _check_nan_logit, 2))


def test_heads_built_under_a_loss_fusion_default_take_it():
    from lightning_tp.engine.loss import LossWorkspace, loss_fusion_default

    with loss_fusion_default(True):
        assert LossWorkspace().fused is True and LossWorkspace(False).fused is False
    assert LossWorkspace().fused is None


def test_library_kernels_are_left_out_of_the_compile_counts():
    from torch._dynamo.utils import counters

    from lightning_tp._compat import compile_counts
    from lightning_tp.engine.compiled import FusedKernel

    kernel = FusedKernel(lambda x, k: (x * k).exp().sum(-1))
    before, raw = compile_counts(), counters["stats"]["unique_graphs"]
    for k in (2, 3):  # a new constant: a second graph
        torch.testing.assert_close(kernel(torch.ones(2, 5), k), torch.full((2,), 5 * math.exp(k)))
    assert counters["stats"]["unique_graphs"] - raw == 2
    assert compile_counts() == before
    counters.clear()  # (a user resetting torch's counters) resets the library's share too
    assert compile_counts() == (0, 0)


def test_fused_argument_is_checked():
    with pytest.raises(TypeError, match="fused must be True, False or None"):
        vocab_parallel_cross_entropy(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), None, 4, fused="yes")


def test_fused_loss_under_a_users_dispatch_mode():
    """torch.compile refuses to run under a TorchDispatchMode that is not torch's own (a FLOP counter, a
    comm counter): the fused kernels then run eagerly, with the same values, and the mode sees their ops."""
    assert all(_dist.run(1, _check_under_mode))


class _CountOps(TorchDispatchMode):
    ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        _CountOps.ops += 1
        return func(*args, **(kwargs or {}))


def _check_under_mode():
    mode_cls = _CountOps
    m = _dist.mesh(1)
    logits, target = _data(m, 30)
    dense = logits.clone().requires_grad_()
    ref = F.cross_entropy(dense, target)
    ref.backward()
    local = logits.clone().requires_grad_()
    with mode_cls():
        loss = vocab_parallel_cross_entropy(local, target, m.tp_group, 30, fused=True)
        loss.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(local.grad, dense.grad, **TOL)
    return mode_cls.ops > 10
