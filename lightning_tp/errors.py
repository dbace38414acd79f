"""Typed exceptions raised by lightning_tp.

Every error names the offending value, the constraint it breaks and the fix. They subclass the
builtin a user would expect (`ValueError` for a bad size, `TypeError` for a wrong module type), so
code that catches builtins keeps working.
"""

from __future__ import annotations


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


class SequenceParallelGradError(LightningTPError, RuntimeError):
    """Sequence parallelism would sum a complete gradient over TP, or leave a partial one unsummed."""
