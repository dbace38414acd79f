"""Each collective's forward and backward, exactly, on a TP2 x DP2 world.

Inputs and output-grads depend on the global rank, so every expected value is a sum/concatenation
over exactly the members of the group under test: using the wrong group gives other numbers.
"""

from collections import Counter
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from torch import nn

import _dist
from lightning_tp.engine import comm
from lightning_tp.engine.layers import ColumnParallelLinear, RowParallelLinear
from lightning_tp.errors import ShardingError


def _val(rank: int, shape, scale: float = 1.0) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return (torch.arange(n, dtype=torch.float64).reshape(shape) + 1000.0 * rank) * scale


def _grad(rank, shape):
    return _val(rank, shape, scale=0.5) + 7.0


def _check_pair(fn, x_shape, expect_y, expect_grad, **kw):
    rank = dist.get_rank()
    x = _val(rank, x_shape).requires_grad_()
    y = fn(x, **kw)
    assert torch.equal(y, expect_y), (fn.__name__, y, expect_y)
    y.backward(_grad(rank, y.shape))
    assert torch.equal(x.grad, expect_grad), (fn.__name__, x.grad, expect_grad)


def _check_collectives(dim_name: str):
    m = _dist.mesh(2)
    group = m.tp_group if dim_name == "tensor_parallel" else m.dp_group
    members = dist.get_process_group_ranks(group)
    rank, me = dist.get_rank(), dist.get_rank(group)
    p = len(members)

    # copy_to_tp: identity / all-reduce
    _check_pair(comm.copy_to_tp, (2, 3), _val(rank, (2, 3)), sum(_grad(r, (2, 3)) for r in members), group=group)
    # reduce_from_tp: all-reduce / identity
    _check_pair(comm.reduce_from_tp, (2, 3), sum(_val(r, (2, 3)) for r in members), _grad(rank, (2, 3)), group=group)
    # scatter_to_tp: own chunk of the last dim / all-gather the last dim
    _check_pair(
        comm.scatter_to_tp,
        (2, 4),
        _val(rank, (2, 4)).chunk(p, -1)[me],
        torch.cat([_grad(r, (2, 4 // p)) for r in members], -1),
        group=group,
    )
    # gather_from_tp: all-gather last dim / own chunk
    _check_pair(
        comm.gather_from_tp,
        (2, 3),
        torch.cat([_val(r, (2, 3)) for r in members], -1),
        _grad(rank, (2, 3 * p)).chunk(p, -1)[me],
        group=group,
    )
    # scatter_to_sp: own chunk of the sequence dim / all-gather it
    _check_pair(
        comm.scatter_to_sp,
        (2, 4, 3),
        _val(rank, (2, 4, 3)).chunk(p, 1)[me],
        torch.cat([_grad(r, (2, 4 // p, 3)) for r in members], 1),
        group=group,
        dim=1,
    )
    # gather_from_sp: all-gather seq / reduce-scatter seq (grad_reduce) or own chunk
    for grad_reduce in (True, False):
        full_grad = sum(_grad(r, (2, 2 * p, 3)) for r in members) if grad_reduce else _grad(rank, (2, 2 * p, 3))
        _check_pair(
            comm.gather_from_sp,
            (2, 2, 3),
            torch.cat([_val(r, (2, 2, 3)) for r in members], 1),
            full_grad.chunk(p, 1)[me],
            group=group,
            dim=1,
            grad_reduce=grad_reduce,
        )
    # reduce_scatter_to_sp: reduce-scatter seq / all-gather seq
    _check_pair(
        comm.reduce_scatter_to_sp,
        (2, 4, 3),
        sum(_val(r, (2, 4, 3)) for r in members).chunk(p, 1)[me],
        torch.cat([_grad(r, (2, 4 // p, 3)) for r in members], 1),
        group=group,
        dim=1,
    )
    # Another sequence dim (dim 0) goes through the same movedim path.
    _check_pair(
        comm.reduce_scatter_to_sp,
        (4, 3),
        sum(_val(r, (4, 3)) for r in members).chunk(p, 0)[me],
        torch.cat([_grad(r, (4 // p, 3)) for r in members], 0),
        group=group,
        dim=0,
    )
    with pytest.raises(ShardingError, match="cannot split dim -1 of size 3 over a tensor-parallel group of 2"):
        comm.scatter_to_tp(torch.zeros(2, 3), group)
    with pytest.raises(ShardingError, match="reduce-scatter dim 1 of size 3 over a group of 2"):
        comm.reduce_scatter_to_sp(torch.zeros(2, 3, 4), group, dim=1)
    return members


@pytest.mark.parametrize("dim_name", ["tensor_parallel", "data_parallel"])
def test_collectives_exact_tp2_dp2(dim_name):
    members = _dist.run(4, _check_collectives, dim_name)
    if dim_name == "tensor_parallel":
        assert members == [[0, 1], [0, 1], [2, 3], [2, 3]]
    else:
        assert members == [[0, 2], [1, 3], [0, 2], [1, 3]]


def _check_outputs_modified_in_place():
    """Each split, gather and reduce-scatter output is a tensor of its own: a residual ``+=`` on it (Falcon
    and Llama 4 add to the row layer's reduce-scattered output in place) keeps forward and backward exact."""
    m = _dist.mesh(2)
    rank, me, members = dist.get_rank(), dist.get_rank(m.tp_group), dist.get_process_group_ranks(m.tp_group)
    cases = [  # (function, input shape, kwargs, its plain output, the gradient of its input for a grad g)
        (comm.reduce_scatter_to_sp, (1, 4, 3), {"dim": 1}, lambda: sum(_val(r, (1, 4, 3)) for r in members).chunk(2, 1)[me],
         lambda g: torch.cat([g(r, (1, 2, 3)) for r in members], 1)),
        (comm.scatter_to_sp, (1, 4, 3), {"dim": 1}, lambda: _val(rank, (1, 4, 3)).chunk(2, 1)[me],
         lambda g: torch.cat([g(r, (1, 2, 3)) for r in members], 1)),
        (comm.gather_from_sp, (2, 2, 3), {"dim": 1}, lambda: torch.cat([_val(r, (2, 2, 3)) for r in members], 1),
         lambda g: sum(g(r, (2, 4, 3)) for r in members).chunk(2, 1)[me]),
        (comm.scatter_to_tp, (4, 2), {}, lambda: _val(rank, (4, 2)).chunk(2, -1)[me],
         lambda g: torch.cat([g(r, (4, 1)) for r in members], -1)),
        (comm.gather_from_tp, (2, 3), {}, lambda: torch.cat([_val(r, (2, 3)) for r in members], -1),
         lambda g: g(rank, (2, 6)).chunk(2, -1)[me]),
    ]  # fmt: skip
    done = []
    for fn, shape, kw, plain, grad_of in cases:
        x = _val(rank, shape).requires_grad_()
        y = fn(x, m.tp_group, **kw)
        y += 1.0  # in place
        assert torch.equal(y, plain() + 1.0), fn.__name__
        y.backward(_grad(rank, y.shape))
        assert torch.equal(x.grad, grad_of(_grad)), fn.__name__
        done.append(fn.__name__)
    return done


def test_collective_outputs_can_be_modified_in_place():
    assert all(len(done) == 5 for done in _dist.run(2, _check_outputs_modified_in_place))


def _check_second_order_refused() -> list[str]:
    """A second derivative through a collective (a gradient penalty: ``create_graph=True``, then backward)
    would not run the collective again (their backward is a plain, untracked collective): each Function
    is once-differentiable, so it is an error instead of a silently wrong gradient."""
    m = _dist.mesh(2)
    torch.manual_seed(0)
    refused = []
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    layers = {
        "column": ColumnParallelLinear(8, 8, group=m.tp_group).double(),
        "row": RowParallelLinear(8, 8, group=m.tp_group, input_is_parallel=False).double(),
    }
    for what, layer in layers.items():
        (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            grad.square().sum().backward()
        refused.append(what)
    return refused


def test_second_order_gradients_through_collectives_are_refused():
    assert all(r == ["column", "row"] for r in _dist.run(2, _check_second_order_refused))


def _check_identity_on_group_of_one():
    m = _dist.mesh(1)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    for fn in (comm.copy_to_tp, comm.reduce_from_tp, comm.scatter_to_tp, comm.gather_from_tp):
        y = fn(x, m.tp_group)
        assert torch.equal(y, x)
    return True


def test_group_of_one_is_identity():
    assert all(_dist.run(2, _check_identity_on_group_of_one))


@contextmanager
def _count_collectives():
    counts: Counter = Counter()
    names = ["all_reduce", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
             "reduce_scatter_tensor", "all_gather", "broadcast"]  # fmt: skip
    saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return counted

    for n, fn in saved.items():
        setattr(dist, n, wrap(n, fn))
    try:
        yield counts
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)


def _count_mlp_collectives(tp):
    m = _dist.mesh(tp)
    torch.manual_seed(0)
    fc, proj = nn.Linear(8, 16), nn.Linear(16, 8)
    col = ColumnParallelLinear.from_dense(fc, m.tp_group)
    row = RowParallelLinear.from_dense(proj, m.tp_group)
    x = torch.randn(2, 5, 8, requires_grad=True)
    with _count_collectives() as fwd:
        y = row(torch.nn.functional.gelu(col(x)))
    with _count_collectives() as bwd:
        y.sum().backward()
    return dict(fwd), dict(bwd)


@pytest.mark.parametrize("tp", [2, 4])
def test_mlp_one_all_reduce_forward_one_backward(tp):
    for fwd, bwd in _dist.run(4, _count_mlp_collectives, tp):
        assert fwd == {"all_reduce": 1}
        assert bwd == {"all_reduce": 1}


def _check_copy_to_tp_linear():
    """Exact on TP2 x DP2, over the TP and the DP group: y = x W^T + b; dX summed over the group."""
    m = _dist.mesh(2)
    out = []
    for group in (m.tp_group, m.dp_group):
        members, rank = dist.get_process_group_ranks(group), dist.get_rank()
        w = _val(rank, (4, 3), 0.25).requires_grad_()
        b = _val(rank, (4,), 0.5).requires_grad_()
        x = _val(rank, (2, 5, 3)).requires_grad_()
        y = comm.copy_to_tp_linear(x, w, b, group)
        assert torch.equal(y, x.detach() @ w.detach().T + b.detach())
        g = _grad(rank, y.shape)
        y.backward(g)
        assert torch.equal(x.grad, sum(_grad(r, y.shape) @ _val(r, (4, 3), 0.25) for r in members))
        assert torch.equal(w.grad, g.reshape(-1, 4).T @ x.detach().reshape(-1, 3))
        assert torch.equal(b.grad, g.reshape(-1, 4).sum(0))
        out.append(True)
    return all(out)


def test_copy_to_tp_linear_exact_tp2_dp2():
    assert all(_dist.run(4, _check_copy_to_tp_linear))


def _trace_linear_backward(x_requires_grad, w_requires_grad):
    """The order of collectives, their waits and matmuls in copy_to_tp_linear's backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    m = _dist.mesh(2)
    events = []

    class _Mm(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.matmul):
                events.append("mm")
            return func(*args, **(kwargs or {}))

    class _Work:
        def __init__(self, work):
            self.work = work

        def wait(self):
            events.append("wait")
            return self.work.wait()

    real = dist.all_reduce

    def traced(t, *a, **k):
        events.append("all_reduce(async)" if k.get("async_op") else "all_reduce")
        work = real(t, *a, **k)
        return _Work(work) if k.get("async_op") else work

    x = torch.randn(3, 5, 8, requires_grad=x_requires_grad)
    w = torch.randn(6, 8, requires_grad=w_requires_grad)
    y = comm.copy_to_tp_linear(x, w, None, m.tp_group)
    dist.all_reduce = traced
    try:
        with _Mm():
            y.sum().backward()
    finally:
        dist.all_reduce = real
    return events, x.grad is None, w.grad is None


def test_copy_to_tp_linear_overlaps_the_input_grad_all_reduce_with_the_weight_grad():
    for events, _, _ in _dist.run(2, _trace_linear_backward, True, True):
        # dX, then its all-reduce starts, then dW is computed while it runs, then the wait
        assert events == ["mm", "all_reduce(async)", "mm", "wait"], events


@pytest.mark.parametrize(("x_grad", "w_grad"), [(False, True), (True, False)])
def test_copy_to_tp_linear_skips_what_needs_no_grad(x_grad, w_grad):
    for events, x_none, w_none in _dist.run(2, _trace_linear_backward, x_grad, w_grad):
        assert x_none is (not x_grad) and w_none is (not w_grad)
        if x_grad:
            assert events == ["mm", "all_reduce(async)", "wait"], events
        else:
            assert events == ["mm"], events  # no collective for an input without grad


def _check_inplace_reduce():
    m = _dist.mesh(2)
    members, rank = dist.get_process_group_ranks(m.tp_group), dist.get_rank()
    a = _val(rank, (2, 3)).requires_grad_()
    x = a * 2.0  # a fresh non-leaf tensor
    y = comm.reduce_from_tp(x, m.tp_group, inplace=True)
    assert y.data_ptr() == x.data_ptr()  # no copy
    assert torch.equal(y, sum(2.0 * _val(r, (2, 3)) for r in members))
    y.backward(_grad(rank, y.shape))
    assert torch.equal(a.grad, 2.0 * _grad(rank, y.shape))
    # exp saves its output for backward: reducing that output in place must not give a wrong grad
    b = _val(rank, (2, 3), 1e-4).requires_grad_()
    z = comm.reduce_from_tp(b.exp(), m.tp_group, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()
    return True


def test_reduce_from_tp_inplace():
    assert all(_dist.run(2, _check_inplace_reduce))


def _check_broadcast_coalesced():
    import torch.distributed as dist

    rank = dist.get_rank()
    tensors = [
        torch.full((3, 2), float(rank)),  # float32
        torch.full((5,), float(rank + 10), dtype=torch.float64),
        torch.tensor([rank % 2 == 1, True]),  # bool (sent as bytes)
        torch.arange(4, dtype=torch.int64) * (rank + 1),
        torch.full((300,), float(rank)),  # a second bucket at a tiny bucket size
    ]
    views = [t[:1] for t in tensors]  # written in place: views see the new values
    comm.broadcast_coalesced(tensors, src=0, bucket_bytes=64)
    expect = [
        torch.zeros(3, 2), torch.full((5,), 10.0, dtype=torch.float64), torch.tensor([False, True]),
        torch.arange(4, dtype=torch.int64), torch.zeros(300),
    ]  # fmt: skip
    return all(torch.equal(t, e) for t, e in zip(tensors, expect, strict=True)) and all(
        torch.equal(v, e[:1]) for v, e in zip(views, expect, strict=True)
    )


def test_broadcast_coalesced_gives_every_rank_rank0s_values():
    assert all(_dist.run(4, _check_broadcast_coalesced))


def _collective_device():
    from lightning_tp.engine.comm import collective_device

    m = _dist.mesh(2)
    return collective_device(m.tp_group) == collective_device() == torch.device("cpu")  # gloo


def test_collective_device_is_the_cpu_under_gloo():
    assert all(_dist.run(2, _collective_device))
