"""Typed exceptions raised by lightning_tp.

Every error names the offending value, the constraint it breaks and the fix. They subclass the
builtin a user would expect (`ValueError` for a bad size, `TypeError` for a wrong module type), so
code that catches builtins keeps working.
"""

from __future__ import annotations

from typing import Any


def few(names: list[Any], n: int = 3) -> str:
    """The first ``n`` of ``names`` for a message, `` ...`` after them where there are more."""
    return f"{list(names[:n])}{' ...' if len(names) > n else ''}"


class LightningTPError(Exception):
    """Base class of every lightning_tp error."""


class MeshConfigError(LightningTPError, ValueError):
    """The requested tensor x data parallel layout does not fit the world."""


class ShardingError(LightningTPError, ValueError):
    """A size (features, heads, chunks) cannot be split evenly over the tensor-parallel group."""


class PolicyMismatchError(LightningTPError, RuntimeError):
    """The rewritten model's output differs from the unsharded model's output."""


class NonFiniteLossError(LightningTPError, FloatingPointError):
    """The training loss is NaN or infinite on some rank (``MegatronTPStrategy(nan_check=True)``).

    Raised on every rank at the same step, before the backward pass and the optimizer step, so the
    weights stay those of the last finite step.
    """


class CheckpointSkippedWarning(UserWarning):
    """A checkpoint was not written because the run was interrupted by a fault on this rank."""


class PartialGradError(LightningTPError, RuntimeError):
    """A replicated parameter's gradient differs across the tensor-parallel ranks (it sees only this
    rank's heads, features or sequence chunk) but is not marked for a sum over TP, or is marked but
    complete on every rank (summing it would multiply it by TP). Raised at the first optimizer step."""


class SequenceParallelGradError(PartialGradError):
    """Sequence parallelism would sum a complete gradient over TP, or leave a partial one unsummed."""


class VerifyInputError(LightningTPError, ValueError):
    """The parity self-check (``verify=True``) cannot run the unsharded model on its example input.

    Raised before the model is rewritten; pass a batch the model accepts (``example_input_array``
    on the LightningModule, ``example_input=`` to ``apply_policy``) or ``verify=False``."""


class DeferredInitError(LightningTPError, TypeError):
    """A model built on the meta device cannot be initialized: a module holding tensors has no
    initializer (``reset_parameters``, its model's ``_init_weights`` or the LightningModule's
    ``init_weights(module)`` hook)."""


class UnsupportedCallbackError(LightningTPError, TypeError):
    """A Lightning callback the strategy cannot run on sharded weights (it keeps a dense copy of the
    model in its own state). Raised on every rank in ``setup``, before the model is sharded."""


class PreemptedError(LightningTPError, RuntimeError):
    """Training stopped on a signal (SIGTERM, SIGINT, SLURM's requeue signal): every rank left the
    loop after the same step and, unless ``save_on_signal=False``, wrote one checkpoint together. The
    message names the signal, the ranks that received it, the step and the checkpoint. ``checkpoint`` is
    the one to resume from: the one written, or, for a signal before the first training step (no
    checkpoint is written then), the one this fit started from (``None`` if none)."""

    def __init__(self, message: str, signum: int = 0, step: int = 0, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
