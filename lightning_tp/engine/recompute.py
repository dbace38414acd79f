"""Activation checkpointing that is right for tensor parallelism (Megatron's ``CheckpointFunction``).

A checkpointed module keeps only its inputs in forward and runs its forward again in backward.
``torch.utils.checkpoint`` restores the default generators for the recompute, so dropout on
replicated activations draws the same masks again; but per-rank dropouts draw from the
model-parallel stream of an :class:`~lightning_tp.engine.random.RNGTracker`, which has moved on
by then. :func:`checkpoint_module` snapshots the tracker's streams when the forward runs and puts
them back for the recompute (then restores what they were), so the recomputed masks equal the
first ones and the gradients equal those without checkpointing, bit for bit.

The module's hooks (a sequence-parallel gather, FSDP2's parameter gathers) run outside the
recomputed region: only its own ``forward`` is run again, on the same inputs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_tp.engine.init import module_aliases
from lightning_tp.engine.random import RNGTracker

Targets = type | str | Iterable[type | str]

_WRAPPED = "_tp_checkpointed_forward"


def _contexts(tracker: RNGTracker | None):
    """``context_fn`` for ``torch.utils.checkpoint``: (forward context, recompute context)."""
    saved: dict[str, Tensor] = {}

    @contextmanager
    def forward() -> Iterator[None]:
        if tracker is not None:
            saved.update({k: v for k, v in tracker.state_dict().items() if k != "default"})
        yield

    @contextmanager
    def recompute() -> Iterator[None]:
        if tracker is None:
            yield
            return
        current = tracker.state_dict()  # includes the default generator, which stays as torch sets it
        current.pop("default")
        tracker.load_state_dict(saved)
        try:
            yield
        finally:
            tracker.load_state_dict(current)

    return forward(), recompute()


def checkpoint_module(module: nn.Module, tracker: RNGTracker | None = None) -> nn.Module:
    """Recompute ``module``'s forward in backward (in place; returns ``module``), restoring
    ``tracker``'s model-parallel streams for the recompute. Idempotent."""
    if _WRAPPED in module.__dict__:
        return module
    inner = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(inner, *args, use_reentrant=False, context_fn=lambda: _contexts(tracker), **kwargs)

    module.forward = forward
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
        )
    return done
