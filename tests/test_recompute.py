"""Activation checkpointing under tensor parallelism: the recompute draws the dropout masks the forward
drew, per-rank ones included, so gradients equal those without checkpointing bit for bit, dropout on."""

from __future__ import annotations

import pytest
import torch

import _dist
from lightning_tp import cross_entropy
from lightning_tp.engine.random import model_parallel_seed
from lightning_tp.engine.recompute import apply_activation_checkpointing
from lightning_tp.models import GPT
from lightning_tp.models.gpt import Block
from lightning_tp.policy import apply_policy


def _grads(tp: int, sp: bool, mode: str) -> dict[str, torch.Tensor]:
    """Gradients of one forward/backward with dropout 0.1; ``mode``: "off", "on" (the strategy's
    checkpointing, given the tracker) or "plain" (given no tracker: torch.utils.checkpoint alone)."""
    m = _dist.mesh(tp)
    torch.manual_seed(0)
    model = GPT(64, 16, 2, 4, 32, 0.1).double()
    tracker = model_parallel_seed(1234, m.tp_rank, m.dp_rank)
    apply_policy(model, m.tp_group, "auto", verify=False, sequence_parallel=sp, rng_tracker=tracker)
    if mode != "off":
        targets = [Block] if mode == "on" else "transformer.h.*"
        done = apply_activation_checkpointing(model, targets, tracker if mode == "on" else None)
        assert done == ["transformer.h.0", "transformer.h.1"]
    model.train()
    torch.manual_seed(7)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    logits = model(ids)
    cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(tp: int, sp: bool) -> tuple[bool, bool]:
    off, on, plain = (_grads(tp, sp, mode) for mode in ("off", "on", "plain"))
    assert off.keys() == on.keys() == plain.keys() and off
    same = all(torch.equal(off[k], on[k]) for k in off)
    plain_same = all(torch.equal(off[k], plain[k]) for k in off)
    return same, plain_same


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_checkpointed_gradients_are_bitwise_equal(sp):
    for same, plain_same in _dist.run(2, _compare, 2, sp):
        assert same  # the recomputed masks are the first ones
        # torch.utils.checkpoint alone too: the model-parallel stream derives from the default generators it
        # restores (a stream with a state of its own had moved on by the recompute: other per-rank masks)
        assert plain_same


def test_bad_targets_are_clear_errors():
    model = GPT(64, 16, 2, 4, 32, 0.0)
    with pytest.raises(ValueError, match=r"matches no module of GPT"):
        apply_activation_checkpointing(model, "layers.*")
    with pytest.raises(TypeError, match=r"neither nn.Module classes nor module-name patterns"):
        apply_activation_checkpointing(model, [3])
