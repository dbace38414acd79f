"""Count bytes, calls and time of every torch.distributed collective while enabled.

The wrappers replace the functions on the ``torch.distributed`` module, so every caller that looks
them up at call time (lightning_tp.engine.comm, DDP's Python paths, Lightning's collectives, DTensor's
functional collectives are not Python-level and are counted through ``_c10d_functional`` ops where
possible) is seen.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.distributed as dist

_NAMES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
    "reduce_scatter_single", "reduce_scatter", "broadcast", "all_to_all_single", "all_gather_object",
    "broadcast_object_list", "barrier",
)  # fmt: skip


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, list | tuple):
        return sum(_nbytes(t) for t in x)
    return 0


class CommCounter:
    """Wraps the collectives; ``start()`` / ``stop()`` bracket a measured step."""

    def __init__(self) -> None:
        self.active = False
        self.stats: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "bytes": 0, "seconds": 0.0})

    def install(self) -> None:
        for name in _NAMES:
            fn = getattr(dist, name, None)
            if fn is None or getattr(fn, "_counted", False):
                continue
            setattr(dist, name, self._wrap(name, fn))
        self._wrap_functional()

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            st = self.stats[name]
            st["calls"] += 1
            # bytes of the input payload (all_gather*: the local input, counted once)
            payload = args[1] if name in ("all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
                                          "reduce_scatter_single") and len(args) > 1 else (args[0] if args else None)  # fmt: skip
            if name in ("all_gather_into_tensor", "all_gather_single") and isinstance(args[0], torch.Tensor):
                payload = args[0]  # the gathered output: what every rank receives
            st["bytes"] += _nbytes(payload)
            st["seconds"] += time.perf_counter() - t0
            return out

        counted._counted = True
        return counted

    def _wrap_functional(self) -> None:
        """DTensor uses torch.ops._c10d_functional; count those through a dispatch mode."""
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = str(func.overloadpacket)
                # _wrap_tensor_autograd only wraps an already issued collective's result: count it as waiting
                waits = "wait" in name or "wrap_tensor" in name
                if counter.active and "_c10d_functional" in name and not waits:
                    t0 = time.perf_counter()
                    out = func(*args, **kwargs)
                    if isinstance(out, torch.Tensor):
                        out.wait() if hasattr(out, "wait") else None
                    st = counter.stats[name.split(".")[-1]]
                    st["calls"] += 1
                    payload = out if "all_gather" in name else args[0]
                    st["bytes"] += _nbytes(payload)
                    st["seconds"] += time.perf_counter() - t0
                    return out
                if counter.active and "_c10d_functional" in name:
                    t0 = time.perf_counter()
                    out = func(*args, **kwargs)
                    counter.stats["wait_tensor"]["seconds"] += time.perf_counter() - t0
                    return out
                return func(*args, **kwargs)

        self._mode = _Mode()

    def start(self) -> None:
        self.stats.clear()
        self.active = True
        self._mode.__enter__()

    def stop(self) -> dict[str, dict[str, float]]:
        self._mode.__exit__(None, None, None)
        self.active = False
        return {k: dict(v) for k, v in self.stats.items()}
