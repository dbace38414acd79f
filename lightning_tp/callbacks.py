"""Callbacks for the recipes."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


def _batch_size(batch: Any) -> int:
    return int(batch[0].size(0))


def _length(batch: Any) -> int:
    return int(batch[0].size(1))


class TokenThroughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` for ``(tokens, targets)`` batches: samples/s, tokens/s and,
    where the device's peak FLOPs are known (CUDA), MFU from the module's ``flops_per_batch``.

    Args:
        window_size: batches averaged per measurement.
    """

    def __init__(self, window_size: int = 10) -> None:
        super().__init__(batch_size_fn=_batch_size, length_fn=_length, window_size=window_size)
