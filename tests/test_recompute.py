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
    # a class given by its name (as a YAML string), or by a misspelled import path, is read as a name pattern
    with pytest.raises(
        ValueError, match=r"'Block' is read as a module-name pattern, and it is the class name of 'transformer.h.0'.*"
        r"'lightning_tp.models.gpt.Block'.*'transformer.h.\*'"
    ):  # fmt: skip
        apply_activation_checkpointing(model, "Block")
    with pytest.raises(ValueError, match=r"'lightning_tp.models.gpt.Blok' looks like a class's import path.*spelling"):
        apply_activation_checkpointing(model, ["lightning_tp.models.gpt.Blok"])
    # layer classes are matched after the rewrite, where no nn.Linear is left to match
    from lightning_tp.engine.layers import ColumnParallelLinear, RowParallelLinear

    assert not issubclass(ColumnParallelLinear, torch.nn.Linear) and not issubclass(RowParallelLinear, torch.nn.Linear)
    with pytest.raises(ValueError, match=r"Linear is matched after the tensor-parallel rewrite.*target the blocks"):
        apply_activation_checkpointing(torch.nn.Sequential(torch.nn.ReLU()), torch.nn.Linear)


def _hf_llama_grads(tp: int, checkpointed: bool) -> tuple[dict[str, torch.Tensor], int]:
    """A Hugging Face Llama with its key/value cache on (``use_cache=True``, its default), attention
    dropout 0.1, at TP ``tp``: gradients of one step and how often layer 0's MLP ran."""
    import transformers

    m = _dist.mesh(tp)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_dropout=0.1, attn_implementation="eager",
    )  # fmt: skip
    assert config.use_cache
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double()
    tracker = model_parallel_seed(1234, m.tp_rank, m.dp_rank)
    apply_policy(model, m.tp_group, "auto", verify=False, rng_tracker=tracker)
    if checkpointed:
        assert apply_activation_checkpointing(model, "model.layers.*", tracker) == ["model.layers.0", "model.layers.1"]
    calls: list[int] = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    model.train()
    torch.manual_seed(7)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)


def _hf_llama_compare(tp: int) -> tuple[bool, int, int]:
    (off, n_off), (on, n_on) = _hf_llama_grads(tp, False), _hf_llama_grads(tp, True)
    assert off.keys() == on.keys() and off
    return all(torch.equal(off[k], on[k]) for k in off), n_off, n_on


def test_hugging_face_layers_with_their_cache_on_are_checkpointed():
    """A Hugging Face decoder layer checkpoints through its own switch (with the strategy's checkpoint
    function), which turns the key/value cache off for the checkpointed call: a model with its
    default ``use_cache=True`` trains (wrapping its forward, the recompute appended to the cache a
    second time and backward failed on the attention's shapes), gradients bitwise equal to those
    without checkpointing, dropout on, and the layer is really recomputed."""
    for same, n_off, n_on in _dist.run(2, _hf_llama_compare, 2):
        assert same
        assert (n_off, n_on) == (1, 2)  # run again in backward


def test_a_checkpointed_module_given_a_key_value_cache_is_a_clear_error():
    """A target inside a Hugging Face decoder layer that is handed the key/value cache (its attention)
    would append to it again in the recompute: a ValueError naming the module and both ways out, at the
    first forward with gradients (before any backward), instead of a shape error in backward. Without
    gradients, and for a target that gets no cache (the MLP), it runs."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="eager",
    )  # fmt: skip
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    attn = transformers.LlamaForCausalLM(config).train()
    apply_activation_checkpointing(attn, "model.layers.*.self_attn")
    with pytest.raises(ValueError, match=r"LlamaAttention.*cache=DynamicCache.*'model.layers.\*'.*use_cache=False"):
        attn(input_ids=ids, labels=ids)
    with torch.no_grad():
        attn(input_ids=ids)
    torch.manual_seed(0)
    mlp = transformers.LlamaForCausalLM(config).train()
    apply_activation_checkpointing(mlp, "model.layers.*.mlp")
    mlp(input_ids=ids, labels=ids).loss.backward()
    assert mlp.model.layers[0].mlp.up_proj.weight.grad is not None
