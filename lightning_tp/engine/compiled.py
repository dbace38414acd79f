"""Regional compilation of a rewritten model: ``torch.compile`` of each layer.

The TP layers and the vocab-parallel loss trace without graph breaks (collectives become
functional ones in the graph; the LM head's :class:`~lightning_tp.engine.loss.VocabShardedLogits`
are traced through their dispatch), so a whole rewritten model, or a whole training step, also
compiles as one graph. Compiling the layers instead (what torchtitan does for its TP models: one
graph per transformer block, compiled once and reused by identical blocks) compiles less code and
keeps the head and the loss eager.

:class:`FusedKernel` is the other direction: a small function of the library's own (the fused
vocab-parallel loss's pieces) compiled into one kernel where the rest of the step stays eager, as
Megatron's ``jit_fuser`` does.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_tp._compat import is_compile_failure, library_compilation, user_dispatch_mode_active
from lightning_tp.engine.init import units


class FusedKernel:
    """``fn`` run as one ``torch.compile``'d function (inductor, ``fullgraph=True``), compiled at its first
    eager call: its elementwise work and reductions fuse into a few kernels that read their inputs once,
    with no intermediate tensor in memory. ``fn`` takes tensors and Python constants (each new constant,
    dtype or rank compiles again; sizes turn dynamic on the second size seen, torch's default). Its
    graphs are the library's: :func:`lightning_tp._compat.compile_counts` leaves them out.

    Where ``torch.compile`` is already tracing (the caller is compiled), ``fn`` is traced into the
    caller's graph instead; under a ``TorchDispatchMode`` of the user's (a FLOP counter, a fake mode),
    where ``torch.compile`` does not run, it runs eagerly. Where it cannot compile (no C++ compiler for the CPU backend, no Triton for
    the GPU one), a warning says so once and ``fn`` runs eagerly from then on: the same values, without
    the fusion."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None
        self._failed = False

    def __call__(self, *args: Any) -> Any:
        if self._failed or torch.compiler.is_compiling() or user_dispatch_mode_active():
            return self.fn(*args)  # traced into the caller's graph, or eagerly where compiling cannot run
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, fullgraph=True)
        try:
            with library_compilation():
                return self._compiled(*args)
        except Exception as err:
            if not is_compile_failure(err):
                raise
            self._failed = True
            warnings.warn(
                f"lightning_tp could not compile its fused kernel {self.fn.__qualname__} ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); it runs eagerly from now on (same values, more "
                "memory traffic). Pass loss_fusion=False to MegatronTPStrategy (or fused=False to the loss) to "
                "use the unfused loss.",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.fn(*args)


def compile_layers(model: nn.Module, **compile_kwargs: Any) -> list[str]:
    """``module.compile(**compile_kwargs)`` for every layer of ``model`` (an element of an
    ``nn.ModuleList``, e.g. each transformer block); returns their names. Call it after the rewrite
    (the strategy's ``setup``, e.g. in ``on_fit_start``) or before: compilation happens at the first
    call either way."""
    names = []
    for name, module, is_layer in units(model):
        parent = model.get_submodule(name.rpartition(".")[0]) if name else None
        if is_layer and isinstance(parent, nn.ModuleList):
            module.compile(**compile_kwargs)
            names.append(name)
    return names
