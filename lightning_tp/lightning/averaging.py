"""Lightning's weight-averaging callbacks on a sharded model.

``WeightAveraging`` (``EMAWeightAveraging``, or a user's subclass) copies the LightningModule in its
``setup`` hook, which Lightning calls before the strategy shards the model: the copy holds dense
weights, the model this rank's shards, and the first update fails on a shape. Once the model is
sharded the strategy has the callback copy it again (its own ``setup``, so a subclass's choices
hold), the copy sharing the model's process groups (a handle, not data); under ZeRO the copy is split
over DP as the model is. Each rank then averages its own shards, elementwise, as one process averages
the whole model. Checkpoints follow Lightning's (the averaged weights are the model's state) and are
written by :mod:`lightning_tp.lightning.checkpoint` with every rank's shards.

``StochasticWeightAveraging`` keeps its copy of the model in the callback's own state, which rank 0
alone writes into a checkpoint: refused, as Lightning refuses it under FSDP and DeepSpeed.
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch.callbacks import StochasticWeightAveraging, WeightAveraging
from torch import nn

from lightning_tp._compat import averaged_model, shared_process_groups
from lightning_tp.errors import UnsupportedCallbackError


def averaging_callbacks(callbacks: list[Any]) -> list[WeightAveraging]:
    """The weight-averaging callbacks among ``callbacks``, after refusing those the strategy cannot run
    (:class:`UnsupportedCallbackError`, the same on every rank)."""
    for cb in callbacks:
        if isinstance(cb, StochasticWeightAveraging):
            raise UnsupportedCallbackError(
                "StochasticWeightAveraging is not supported by megatron_tp: it keeps a copy of the model in the "
                "callback's own state, which is neither sharded nor saved by every rank (Lightning refuses it under "
                "FSDP and DeepSpeed too). Use lightning.pytorch.callbacks.WeightAveraging (the default averages "
                "equally, as SWA does) or EMAWeightAveraging: megatron_tp averages each rank's shards and checkpoints "
                "them."
            )
    found = [cb for cb in callbacks if isinstance(cb, WeightAveraging)]
    if len(found) > 1:
        raise UnsupportedCallbackError(
            f"{len(found)} weight-averaging callbacks ({', '.join(type(cb).__name__ for cb in found)}): each puts its "
            "averaged weights in the checkpoint's model state, so only one can be restored. Keep one."
        )
    return found


def refuse_averaging_resharded(trainer: Any) -> None:
    """Refuse a weight-averaging callback for a fit of a model that an earlier fit sharded: the callback
    would copy it in its ``setup``, before the strategy can share the copy's process groups."""
    if trainer.state.fn != "fit":
        return
    found = averaging_callbacks(trainer.callbacks)
    if found:
        raise UnsupportedCallbackError(
            f"{type(found[0]).__name__} on a model already sharded by an earlier fit: the callback copies the model "
            "when fit starts, before megatron_tp can make that copy of a sharded model. Build the LightningModule "
            "anew and resume from a checkpoint (trainer.fit(model, ckpt_path=...)) to go on with weight averaging."
        )


def copy_sharded(callback: WeightAveraging, trainer: Any, module: nn.Module) -> nn.Module | None:
    """Have ``callback`` copy the (now sharded) ``module`` again. Returns the copy's module (its
    parameters in the order of ``module``'s), or ``None`` when the callback made no copy (not fitting)."""
    if averaged_model(callback) is None:
        return None
    with shared_process_groups(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its configure_model note came once already, from its first setup
        callback.setup(trainer, module, "fit")
    copy = averaged_model(callback).module
    for mine, theirs in zip(copy.parameters(), module.parameters(), strict=True):
        mine.__dict__.update(theirs.__dict__)  # the TP marks (shard specs, partial gradients): a deepcopy drops them
    return copy
