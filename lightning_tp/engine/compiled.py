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

import contextlib
import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_tp._compat import compile_stance, fake_mode_active, library_compilation, user_dispatch_mode_active
from lightning_tp.engine.init import units

RECOMPILE_LIMIT = 32  # compiled variants of one fused kernel (torch's default for a function: 8)


class FusedKernel:
    """``fn`` run as a ``torch.compile``'d function (inductor), compiled at its first eager call: its
    elementwise work and reductions fuse into a few kernels that read their inputs once, with no
    intermediate tensor in memory. ``fn`` takes tensors and Python constants (each new constant, dtype,
    rank or grad mode compiles again, up to :data:`RECOMPILE_LIMIT` variants; sizes turn dynamic on the
    second size seen, torch's default). ``fn`` must be pure: after a failed compiled call it runs again.
    Its graphs are the library's: :func:`lightning_tp._compat.compile_counts` leaves them out.

    It runs ``fn`` eagerly instead (the same values, without the fusion) where compiling cannot or
    should not happen: where ``torch.compile`` is already tracing (``fn`` is traced into the caller's
    graph), under a ``TorchDispatchMode`` of the user's (a FLOP counter), on fake or meta tensors, where
    torch.compile is disabled (``TORCH_COMPILE_DISABLE``, the stance ``"force_eager"``) or past the
    recompile limit (torch's own fallback); under the stance ``"fail_on_recompile"`` (meant for the user's
    code) a new variant runs eagerly instead of raising. If compiling or the compiled call raises (other
    than out of memory) and ``fn`` eagerly does not (no C++ compiler for the CPU backend, no Triton for the
    GPU one, a Python torch.compile refuses), a warning says so once for this kernel and it runs eagerly
    from then on; if ``fn`` raises eagerly too (a bad argument), that error is raised and nothing changes."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None
        self._failed = False

    def _eager(self, args: tuple) -> bool:
        if self._failed or torch.compiler.is_compiling() or user_dispatch_mode_active():
            return True
        if compile_stance() == "force_eager":  # the user's stance: everything eager
            return True
        tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
        return any(t.device.type == "meta" for t in tensors) or fake_mode_active(tensors)

    def __call__(self, *args: Any) -> Any:
        if self._eager(args):
            return self.fn(*args)
        try:
            if self._compiled is None:
                # its own recompile limit: the variants a run meets (grad mode, sizes, dtypes) stay compiled
                self._compiled = torch.compile(self.fn, recompile_limit=RECOMPILE_LIMIT)
            # the user's "fail_on_recompile" is meant for their code: a new variant of this kernel runs eagerly
            stance = "eager_on_recompile" if compile_stance() == "fail_on_recompile" else None
            with library_compilation(), torch.compiler.set_stance(stance) if stance else contextlib.nullcontext():
                return self._compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            failure = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        # a bad argument raises here, as it would uncompiled (outside the except: the failed call's frames are freed)
        out = self.fn(*args)
        self._failed = True
        warnings.warn(
            f"lightning_tp could not run its fused kernel {self.fn.__qualname__} compiled ({failure}); it runs "
            "eagerly from now on (same values, more memory traffic). Pass loss_fusion=False to MegatronTPStrategy "
            "(or fused=False to the loss) for the unfused loss.",
            RuntimeWarning,
            stacklevel=2,
        )
        return out


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
