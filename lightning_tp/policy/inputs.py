"""Inputs for a forward of a model the policy plans or checks: the fixed example batch
(:func:`make_example_input`), values for an example built on the meta device, the tensors a
batch or an output holds, and the call itself; used by the self-check and by the plan's trace of
where sequence parallelism splits the sequence (:mod:`lightning_tp.policy.stack`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_tp._compat import tree_map
from lightning_tp.errors import VerifyInputError
from lightning_tp.policy.rules import infer_vocab_size
from lightning_tp.policy.styles import as_linear


def make_example_input(
    model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0, device: torch.device | str | None = None
) -> Tensor:
    """A fixed random batch, identical on every rank: token ids for a model with embeddings (below
    the smallest embedding size), else floats of the first linear layer's input width; on
    ``device`` (default: where the model's first parameter is)."""
    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters(), None)
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    high = _token_bound(model)
    if high is not None:
        ids = torch.randint(0, high, (batch, seq), generator=gen).to(device)
        try:
            takes_decoder_ids = "decoder_input_ids" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            takes_decoder_ids = False
        if takes_decoder_ids:  # an encoder-decoder (T5, BART): the decoder needs its own ids
            return {
                "input_ids": ids,
                "decoder_input_ids": torch.randint(0, high, (batch, seq), generator=gen).to(device),
            }
        return ids
    for module in model.modules():
        if (lin := as_linear(module)) is not None:
            return torch.randn(batch, seq, lin[0], generator=gen, dtype=module.weight.dtype).to(device)
    raise VerifyInputError(
        "cannot build an example input for a model with no nn.Linear/nn.Embedding: set example_input_array on the "
        "LightningModule (or pass example_input= to apply_policy), or verify=False."
    )


def _token_bound(model: nn.Module) -> int | None:
    """Token ids below this are valid inputs of ``model`` (its vocabulary, else its smallest
    embedding); ``None`` for a model without embeddings."""
    embeddings = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        return None
    vocab = infer_vocab_size(model)
    return vocab if vocab is not None else min(embeddings)


def _integral_meta(t: Tensor) -> bool:
    return t.is_meta and not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def holds_meta(tree: Any) -> bool:
    """Whether ``tree`` (a batch: tensors in dicts, lists, tuples) holds a tensor on the meta device."""
    return any(t is not None and t.is_meta for t in leaves(tree))


def values_for_meta(tree: Any, model: nn.Module, seed: int = 0) -> Any:
    """``tree`` with each meta tensor (an ``example_input_array`` built under
    ``trainer.init_module(empty_init=True)``: a shape without values) replaced by a CPU tensor of
    its shape and dtype, the same on every rank: floats drawn from a normal distribution, booleans
    True, and a batch that is one integer tensor token ids below ``model``'s vocabulary (zeros for
    a model without embeddings).

    Raises:
        VerifyInputError: an integer meta tensor inside a structure (a dict or tuple of inputs: its
            values could be token ids, an attention mask, token types or positions, each valid in its
            own range only).
    """
    gen = torch.Generator().manual_seed(seed)
    if isinstance(tree, Tensor) and _integral_meta(tree):
        high = _token_bound(model)
        if high is None:
            return torch.zeros(tree.shape, dtype=tree.dtype)
        high = min(high, torch.iinfo(tree.dtype).max + 1)
        return torch.randint(0, high, tree.shape, generator=gen, dtype=tree.dtype)
    integers = [t for t in leaves(tree) if t is not None and _integral_meta(t)]
    if integers:
        raise VerifyInputError(
            f"the example input holds integer tensors on the meta device (shapes {[tuple(t.shape) for t in integers]}, "
            "built under trainer.init_module(empty_init=True)): they have no values, and which would be valid (token "
            "ids, an attention mask, token types, positions) cannot be told from the shape. Build example_input_array "
            "with device='cpu' (torch.zeros(..., device='cpu')), or pass verify=False."
        )

    def fill(t: Any) -> Any:
        if not isinstance(t, Tensor) or not t.is_meta:
            return t
        if t.dtype == torch.bool:
            return torch.ones(t.shape, dtype=torch.bool)
        return torch.randn(t.shape, generator=gen, dtype=t.dtype)

    return tree_map(fill, tree)


def leaves(tree: Any) -> Iterator[Tensor | None]:
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from leaves(v)
    elif isinstance(tree, list | tuple):
        for v in tree:
            yield from leaves(v)
    # other objects (caches, None) carry no comparable tensor


def call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def to_device(inputs: Any, device: torch.device | str) -> Any:
    """``inputs`` (a batch: tensors in dicts, lists, tuples) with every tensor moved to ``device``."""
    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, inputs)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter is: where the check's inputs go and its collectives' flags
    live (CPU for gloo, the GPU for NCCL)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


META_SCALARS = {
    Tensor.item: 0,
    Tensor.__bool__: False,
    Tensor.__int__: 0,
    Tensor.__float__: 0.0,
    Tensor.__index__: 0,
    Tensor.__contains__: False,  # `pad_token_id in input_ids[:, [-1, 0]]` (Hugging Face's padding warning)
}


class MetaScalars(TorchFunctionMode):
    """A forward on meta tensors (shapes only, for a meta-device model): data-dependent values
    (``.item()``, a mask check's ``bool``, ``value in tensor``) are taken as zero / False instead of
    raising."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in META_SCALARS and args and isinstance(args[0], Tensor) and args[0].is_meta:
            return META_SCALARS[func]
        return func(*args, **(kwargs or {}))
