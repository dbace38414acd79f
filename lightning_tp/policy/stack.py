"""Where sequence parallelism splits the sequence.

Megatron splits it where the token embeddings leave the vocab-parallel embedding (a reduce-scatter
in place of the all-reduce) and gathers it at the LM head's input. That is right for a model whose
layers take the hidden states alone, or per-position inputs computed from the token ids. A model
that computes its layers' per-position inputs (positions, the causal mask, rotary tables) from the
embeddings' output, as Hugging Face models do (``cache_position`` from ``inputs_embeds.shape[1]``),
would build them for ``T/p`` positions from a split output, and some reshape the stack's output to
the input's sequence length (GPT-2's ``view(output_shape)``). For a model whose layers take such
inputs the sequence-sharded region is the layer stack instead (:func:`stack_split`): the first
layer's hidden-state inputs are split to this rank's chunk, the last layer's hidden-state outputs
all-gathered; what runs before and after the stack (embeddings, their dropout, the final norm, the
head) runs on the whole sequence, as without sequence parallelism. That costs one all-reduce of the
embeddings in place of a reduce-scatter, and the final norm's and the head's inputs are kept whole
for backward.

Whether the layers take per-position inputs is read from a forward of the dense model up to its first
layer (eval mode, no gradients; on meta tensors for a model on the meta device), and so is which of
its arguments carries the hidden states: only that one is split, the last layer's outputs of its
shape gathered, and only tensors of its rank gathered inside the stack, or 2-D ones as long as this
rank's tokens flattened with the batch (an encoder's states for cross-attention, or a float mask as
wide as a hidden width, pass unchanged).
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_tp.engine.init import is_deferred
from lightning_tp.engine.sequence import is_hidden
from lightning_tp.policy.inputs import MetaScalars, call, leaves, make_example_input, model_device, to_device
from lightning_tp.policy.rules import PolicyWarning


@dataclass(frozen=True)
class StackSplit:
    """The sequence-sharded region is the layer stack ``stack``: its ``first`` layer takes hidden
    states of a width in ``widths``, split there; its ``last`` layer's are gathered."""

    stack: str
    first: str
    last: str
    widths: frozenset[int]
    arg: int | str  # the argument that carries the hidden states: its position, or its keyword
    ndim: int  # their number of dims (masks as wide as a hidden width do not pass for them)

    def inside(self, name: str) -> bool:
        """Whether module ``name`` is in the stack's layers."""
        return name.startswith(self.stack + ".")


def layer_stack(modules: dict[str, nn.Module], blocks: Iterable[str]) -> str | None:
    """The innermost ``nn.ModuleList`` / ``nn.Sequential`` whose children hold or are every block in
    ``blocks`` (the blocks holding column layers): the model's layer stack; ``None`` if there is none."""
    blocks = list(blocks)
    found = None
    for name, module in modules.items():
        if not name or not isinstance(module, nn.ModuleList | nn.Sequential) or len(module) == 0:
            continue
        children = [f"{name}.{child}" for child, _ in module.named_children()]
        if blocks and all(any(b == c or b.startswith(c + ".") for c in children) for b in blocks):
            if found is None or name.startswith(found + "."):
                found = name
    return found


def stack_split(
    model: nn.Module,
    modules: dict[str, nn.Module],
    blocks: dict[str, set[int]],
    example_input: Any = None,
    forward_module: nn.Module | None = None,
    gathering: Collection[str] | None = None,
) -> StackSplit | None:
    """The layer stack as the sequence-sharded region unless the model's layers take the hidden states
    alone (no tensor other than them with the sequence length among its sizes), read from a forward of
    the dense model up to its first layer on ``example_input`` (default:
    :func:`~lightning_tp.policy.inputs.make_example_input`) through ``forward_module`` (default
    ``model``; on meta tensors for a model on the meta device, data-dependent values taken as zero).
    The hidden states are the first argument of a hidden width the first layer takes (its position or
    keyword is kept: only that argument is split). ``None``: Megatron's split at the embeddings, as for
    a model without a layer stack, whose layers take the hidden states alone, whose first or last layer
    is itself a block that gathers the sequence at its input (``gathering``, default every one of
    ``blocks``: the blocks holding column layers, by name -> their input widths), whose forward does
    not call the stack's first layer first (or through the layer's ``__call__``), or whose forward
    fails on that input (a ``PolicyWarning`` says so)."""
    stack = layer_stack(modules, blocks)
    if stack is None:
        return None
    layers = [f"{stack}.{child}" for child, _ in modules[stack].named_children()]
    gathering = blocks if gathering is None else gathering
    if layers[0] in gathering or layers[-1] in gathering:
        return None
    widths = frozenset(w for b, ws in blocks.items() for w in ws if b.startswith(stack + "."))
    run = model if forward_module is None else forward_module
    device = torch.device("meta") if is_deferred(model) else model_device(model)
    try:
        inputs = make_example_input(run, device=device) if example_input is None else to_device(example_input, device)
        first = _first_layer_call(model, run, inputs, {id(modules[n]): n for n in layers})
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - said, and Megatron's split (the self-check reports what fails)
        warnings.warn(
            f"sequence_parallel: a forward of the model up to its first layer ({stack}.0) failed, so whether its "
            f"layers take positions or masks it computes could not be read ({type(error).__name__}: "
            f"{str(error)[:200]}); the sequence is split at the embeddings (Megatron). Pass example_input "
            "(example_input_array on a LightningModule) that the model's forward takes.",
            PolicyWarning,
            stacklevel=4,
        )
        return None
    if first is None or first[0] != layers[0]:
        return None  # the forward calls no layer of the stack through it (a nested list), or not the first first
    _, args, kwargs = first
    keyed = [*enumerate(args), *kwargs.items()]
    hidden = [(key, t) for key, t in keyed if is_hidden(t, widths)]
    if not hidden:
        return None
    arg, states = hidden[0]  # the residual stream: the first argument of a hidden width
    length = states.shape[-2]
    others = [t for key, value in keyed if key != arg for t in leaves(value) if t is not None]
    if not any(length in t.shape for t in others):
        return None  # the layers take the hidden states alone (or nothing per position): Megatron's split
    return StackSplit(stack, layers[0], layers[-1], widths, arg, states.dim())


class _Reached(Exception):
    """Raised by the trace's hook at the first layer: nothing after it needs to run."""


def _first_layer_call(
    model: nn.Module, run: nn.Module, inputs: Any, layers: dict[int, str]
) -> tuple[str, tuple, dict] | None:
    """The first layer of ``layers`` (by module id) that a forward of ``run`` calls, with its inputs; the
    forward stops there (eval mode, no gradients, RNG and training flags left as they were)."""
    first: list[tuple[str, tuple, dict]] = []

    def pre(mod, args, kwargs):
        first.append((layers[id(mod)], args, kwargs))
        raise _Reached

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in model.modules() if id(m) in layers]
    training = {m: m.training for m in model.modules()}
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), MetaScalars():
            model.eval()
            call(run, inputs)
    except _Reached:
        pass
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.train(flag)
    return first[0] if first else None
