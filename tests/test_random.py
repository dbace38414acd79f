"""Model-parallel RNG tracker: which dropout masks are shared and which differ (TP2 x DP2)."""

from unittest import mock

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


class _TimmMlp(nn.Module):
    """timm's Mlp: fc1 -> act -> drop1 -> fc2 -> drop2 (drop1 on this rank's hidden units, drop2 on the
    replicated output), written without any name the planner knows for a dropout."""

    def __init__(self, d=32):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(0.5)
        self.fc2, self.drop2 = nn.Linear(4 * d, d), nn.Dropout(0.5)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4, attn_pdrop=0.5, resid_pdrop=0.5,
                     embd_pdrop=0.0, attn_implementation="eager")  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _split_masks(kind: str) -> dict:
    """Every dropout mask of one training forward at TP 2 (the default generator seeded alike on both
    ranks, as the strategy has it), and per call the fraction of its entries equal on the two ranks."""
    import torch.nn.functional as F

    from lightning_tp.policy import apply_policy

    m = _dist.mesh(2)
    torch.manual_seed(0)
    if kind == "gpt2":  # Hugging Face's eager attention drops the probabilities with F.dropout, not the module
        model, x = _gpt2().double(), torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    else:
        model, x = _TimmMlp().double(), torch.randn(2, 8, 32, dtype=torch.float64)
    tracker = model_parallel_seed(1234, m.tp_rank, m.dp_rank)
    apply_policy(model, m.tp_group, "auto", example_input=x, rng_tracker=tracker)
    masks, dropout = [], F.dropout

    def recorded(t, p=0.5, training=True, inplace=False):
        out = dropout(t, p, training, inplace)
        masks.append(out == 0)
        return out

    model.train()
    torch.manual_seed(42)
    with mock.patch.object(F, "dropout", recorded):
        model(x)
    equal = []
    for mask in masks:
        both = [torch.empty_like(mask, dtype=torch.uint8) for _ in range(2)]
        dist.all_gather(both, mask.to(torch.uint8).contiguous(), group=m.tp_group)
        equal.append((tuple(mask.shape), float((both[0] == both[1]).double().mean())))
    states = [torch.empty_like(torch.get_rng_state()) for _ in range(2)]
    dist.all_gather(states, torch.get_rng_state(), group=m.tp_group)
    return {"equal": equal, "default_in_step": torch.equal(states[0], states[1])}


@pytest.mark.parametrize("kind", ["gpt2", "timm-mlp"])
def test_draws_between_column_and_row_layers_differ_per_rank(kind):
    """Dropout between a block's column layers and its row layer acts on this rank's heads or hidden units:
    its masks must be independent across TP ranks, as they are across heads in the unsharded model, whatever
    draws them (Hugging Face's attention calls F.dropout itself; timm's drop1 has no name the planner knows).
    They were identical on every rank (heads h and h + H/2 dropped together). Dropouts on the replicated
    activations (GPT-2's residual dropouts, timm's drop2) keep equal masks, and the default stream stays in
    step across ranks."""
    r = _dist.run(2, _split_masks, kind)[0]
    split = [eq for shape, eq in r["equal"] if shape[-1] != 32]  # (b, heads, t, t) probabilities, (b, t, 128/2)
    replicated = [eq for shape, eq in r["equal"] if shape[-1] == 32]
    assert split and replicated, r
    # half the entries agree by chance (GPT-2: plus the causally masked zeros, 28 of 64)
    assert all(eq < 0.8 for eq in split), r
    assert all(eq == 1.0 for eq in replicated), r
    assert r["default_in_step"]
