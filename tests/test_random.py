"""Model-parallel RNG tracker: which dropout masks are shared and which differ (TP2 x DP2)."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import _dist
from lightning_tp.engine.random import MODEL_PARALLEL, RNGTracker, TPDropout, derive_seed, model_parallel_seed


def _mask(drop: nn.Module, n: int = 256) -> torch.Tensor:
    return drop(torch.ones(n)) != 0


def _masks():
    m = _dist.mesh(2)
    tracker = model_parallel_seed(1234, m.tp_rank, m.dp_rank)
    plain, tp_drop = nn.Dropout(0.5), TPDropout(0.5, tracker=tracker)
    outside = _mask(plain)
    inside = _mask(tp_drop)
    outside_after = _mask(plain)  # the fork did not disturb the default stream...
    again = model_parallel_seed(1234, m.tp_rank, m.dp_rank)
    _mask(nn.Dropout(0.5))
    reference_after = _mask(nn.Dropout(0.5))  # ...it equals a run without the fork
    assert torch.equal(outside_after, reference_after)

    # Restoring a saved state reproduces the masks of both streams.
    state = again.state_dict()
    first = (_mask(TPDropout(0.5, tracker=again)), _mask(plain))
    again.load_state_dict(state)
    second = (_mask(TPDropout(0.5, tracker=again)), _mask(plain))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])

    # Eval mode and p=0 draw nothing.
    before = torch.get_rng_state()
    tp_drop.eval()
    assert torch.equal(tp_drop(torch.ones(8)), torch.ones(8))
    assert torch.equal(torch.get_rng_state(), before)
    return dist.get_rank(), outside, inside


def test_dropout_masks_across_tp_and_dp():
    results = {rank: (outside, inside) for rank, outside, inside in _dist.run(4, _masks)}
    # Outside TP regions: identical inside a TP group ([0, 1] and [2, 3])...
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[2][0], results[3][0])
    # ...and different across DP replicas.
    assert not torch.equal(results[0][0], results[2][0])
    # Inside TP regions: different on every rank.
    inside = [results[r][1] for r in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(inside[i], inside[j]), (i, j)
    # A mask is a real dropout mask (about half kept).
    for r in range(4):
        assert 0.3 < results[r][0].float().mean() < 0.7


def test_tracker_api_errors():
    tracker = RNGTracker("cpu")
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="RNG stream 'a' already exists"):
        tracker.add("a", 2)
    with pytest.raises(KeyError, match=r"RNG stream 'b' is not tracked \(have \['a'\]\)"):
        with tracker.fork("b"):
            pass
    assert tracker.names == ["a"] and MODEL_PARALLEL == "model-parallel"


def test_fork_restores_default_even_on_error():
    tracker = RNGTracker("cpu")
    tracker.add("x", 7)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    with pytest.raises(RuntimeError):
        with tracker.fork("x"):
            torch.rand(100)
            raise RuntimeError("boom")
    assert torch.equal(torch.rand(4), expected)


def test_derived_seeds_distinct():
    seeds = {derive_seed(1234, stream, dp, tp) for stream in (0, 1) for dp in range(16) for tp in range(16)}
    assert len(seeds) == 2 * 16 * 16
    assert all(0 <= s < 2**63 for s in seeds)
