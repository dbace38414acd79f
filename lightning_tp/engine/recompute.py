"""Activation checkpointing that is right for tensor parallelism (Megatron's ``CheckpointFunction``).

A checkpointed module keeps only its inputs in forward and runs its forward again in backward.
``torch.utils.checkpoint`` restores the CPU generator and those of the devices its tensor arguments
live on for the recompute, so dropout on replicated activations draws the same masks again, and so
do per-rank dropouts: the model-parallel stream of an
:class:`~lightning_tp.engine.random.RNGTracker` is derived from the default generators where it is
drawn. What torch does not restore is whether a split region
(:class:`~lightning_tp.engine.random.SplitRegion`) was open: a checkpointed module that holds a row
layer but not its column layers (or the reverse) starts its recompute with the region as the forward
found it, and what the recompute leaves open is dropped after it. The recomputed masks equal the
first ones and the gradients equal those without checkpointing, bit for bit (as under Hugging Face's
or timm's own gradient checkpointing of whole blocks, which use ``torch.utils.checkpoint`` too).

The module's hooks (a sequence-parallel gather, FSDP2's parameter gathers) run outside the
recomputed region: only its own ``forward`` is run again, on the same inputs.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, noop_context_fn

from lightning_tp._compat import own_checkpointing
from lightning_tp.engine.init import module_aliases
from lightning_tp.engine.random import RNGTracker

Targets = type | str | Iterable[type | str]

_WRAPPED = "_tp_checkpointed_forward"


class _RegionAsInForward:
    """``context_fn`` for ``torch.utils.checkpoint``: the forward context notes the split region's
    state, the recompute context puts it back and, after, drops whatever the recompute left open
    (torch's own restore of the generators follows)."""

    def __init__(self, tracker: RNGTracker) -> None:
        self.tracker = tracker
        self.at_forward: Tensor | None = None

    @contextmanager
    def forward(self) -> Iterator[None]:
        self.at_forward = self.tracker.region_state
        yield

    @contextmanager
    def recompute(self) -> Iterator[None]:
        before = self.tracker.swap_region(self.at_forward)
        try:
            yield
        finally:
            self.tracker.swap_region(before)


def _contexts(tracker: RNGTracker) -> tuple[Any, Any]:
    region = _RegionAsInForward(tracker)
    return region.forward(), region.recompute()


def _checkpointed(tracker: RNGTracker | None, inner: Any, *args: Any, **kwargs: Any) -> Any:
    contexts = noop_context_fn if tracker is None else functools.partial(_contexts, tracker)
    return checkpoint(inner, *args, use_reentrant=False, context_fn=contexts, **kwargs)


def _is_kv_cache(value: Any) -> bool:
    """A Hugging Face key/value cache object (``DynamicCache`` and its kin): appended to in forward."""
    return type(value).__name__.endswith("Cache") and callable(getattr(value, "update", None))


def _checkpointed_forward(inner: Any, tracker: RNGTracker | None, *args: Any, **kwargs: Any) -> Any:
    if torch.is_grad_enabled() and (cache := [k for k, v in kwargs.items() if _is_kv_cache(v)]):
        owner = getattr(inner, "__self__", None)
        raise ValueError(
            f"activation checkpointing of {type(owner).__name__ if owner is not None else inner!r}: it is called with "
            f"a key/value cache ({cache[0]}={type(kwargs[cache[0]]).__name__}) while gradients are on, and its "
            "recompute in backward would append to that cache a second time. Checkpoint the whole decoder layers "
            "instead (e.g. 'model.layers.*': a Hugging Face decoder layer turns its cache off when checkpointed), or "
            "turn the cache off in training (config.use_cache=False)."
        )
    return _checkpointed(tracker, inner, *args, **kwargs)


def checkpoint_module(module: nn.Module, tracker: RNGTracker | None = None) -> nn.Module:
    """Recompute ``module``'s forward in backward (in place; returns ``module``). Idempotent. With
    ``tracker`` (the one the model's split regions use) the recompute starts with the split region as
    the forward found it: needed where ``module`` holds a row layer but not its column layers, or
    the reverse. A Hugging Face decoder layer (``GradientCheckpointingLayer``) is checkpointed
    through its own switch, with this checkpoint function: it turns its key/value cache off for the
    checkpointed call, as Hugging Face's ``gradient_checkpointing_enable`` does, so a model with
    ``use_cache=True`` trains (the cache it returns then lacks those layers); that switch checkpoints
    in training mode with gradients on only."""
    if _WRAPPED in module.__dict__:
        return module
    inner = module.forward
    if not own_checkpointing(module, functools.partial(_checkpointed, tracker)):
        module.forward = functools.partial(_checkpointed_forward, inner, tracker)
    module.__dict__[_WRAPPED] = inner
    return module


def _matches(name: str, module: nn.Module, targets: list[type | str]) -> bool:
    return any(
        (isinstance(t, str) and fnmatch.fnmatchcase(name, t)) or (isinstance(t, type) and isinstance(module, t))
        for t in targets
    )


def checkpoint_targets(targets: Targets) -> list[type | str]:
    """``targets`` as a list, checked: module classes and fnmatch patterns on module names.

    Raises:
        TypeError: a target that is neither a module class nor a string.
    """
    items = [targets] if isinstance(targets, type | str) else list(targets)
    bad = [t for t in items if not (isinstance(t, str) or (isinstance(t, type) and issubclass(t, nn.Module)))]
    if bad or not items:
        raise TypeError(
            f"activation_checkpointing: {bad or targets!r} are neither nn.Module classes nor module-name patterns; give "
            "classes (e.g. the transformer block class) or fnmatch patterns on module names (e.g. 'model.layers.*')."
        )
    return items


def apply_activation_checkpointing(model: nn.Module, targets: Targets, tracker: RNGTracker | None = None) -> list[str]:
    """Checkpoint every module of ``model`` that is an instance of one of the classes in ``targets``
    or whose name matches one of its fnmatch patterns (an outermost match only: nothing inside a
    checkpointed module is checkpointed again). Returns the names of the checkpointed modules.

    Raises:
        TypeError: a target that is neither a module class nor a string.
        ValueError: the targets match no module (a typo would otherwise silently save nothing).
    """
    items = checkpoint_targets(targets)
    aliases = module_aliases(model)  # a module registered under several names matches by any of them
    done: list[str] = []
    for name, module in model.named_modules():
        if (
            not name
            or any(name.startswith(d + ".") for d in done)
            or not any(_matches(n, module, items) for n in aliases.get(name, (name,)))
        ):
            continue
        checkpoint_module(module, tracker)
        done.append(name)
    if not done:
        raise ValueError(
            f"activation_checkpointing={targets!r} matches no module of {type(model).__name__}. Module names look "
            f"like {[n for n, _ in model.named_modules()][1:4]} (fnmatch patterns on them, or module classes)."
            f"{_class_name_hint(model, items)}"
        )
    return done


def _class_name_hint(model: nn.Module, items: list[type | str]) -> str:
    """For a string target that names a module class rather than module names: how to give the class."""
    hints = []
    for t in items:
        if isinstance(t, type) and issubclass(t, nn.Linear | nn.Embedding):
            hints.append(
                f" {t.__name__} is matched after the tensor-parallel rewrite, and the parallel layers are not "
                f"{t.__name__} subclasses: target the blocks that hold them (a block class, or a pattern such as "
                "'model.layers.*')."
            )
        if not isinstance(t, str):
            continue
        short = t.rpartition(".")[2]
        named = next(((n, type(m)) for n, m in model.named_modules() if n and type(m).__name__ in (t, short)), None)
        if named is not None:
            name, cls = named
            parent = name.rpartition(".")[0]
            hints.append(
                f" {t!r} is read as a module-name pattern, and it is the class name of {name!r}: give the class "
                f"itself (in YAML or on the command line its full import path, e.g. '{cls.__module__}.{cls.__name__}'), "
                f"or a name pattern such as '{parent + '.*' if parent else name}'."
            )
        elif "." in t and not any(c in t for c in "*?[") and short[:1].isupper():
            hints.append(
                f" {t!r} looks like a class's import path but is read as a module-name pattern (a class path that "
                "imports is resolved to the class on the command line and in YAML): check its spelling."
            )
    return "".join(hints)
