"""Model-parallel RNG tracker: dropout masks that are right for tensor parallelism.

Two kinds of random streams (Megatron's rule):

* the **default** generator: the same on every rank of a TP group (so dropout on replicated
  activations, e.g. after a row-parallel layer, draws the same mask everywhere and replicated
  activations stay identical) and different across data-parallel replicas;
* the **model-parallel** stream, used inside TP regions (activations split over TP, e.g. attention
  probabilities of this rank's heads): different on every rank.

:class:`RNGTracker` keeps named streams and swaps one in for the duration of ``fork(name)``; its
state round-trips through ``state_dict`` / ``load_state_dict`` for checkpoints. Works for the CPU
generator and for CUDA devices.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

MODEL_PARALLEL = "model-parallel"
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *keys: int) -> int:
    """A seed for the stream named by ``keys`` (e.g. stream id, dp rank, tp rank), decorrelated from
    ``seed`` and from every other key tuple; fits a torch seed (< 2**63)."""
    x = _splitmix64(seed & _MASK64)
    for k in keys:
        x = _splitmix64(x ^ (k & _MASK64))
    return x >> 1


def _device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def get_rng_state(device: torch.device | str) -> Tensor:
    """State of the default generator of ``device``."""
    device = _device(device)
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def set_rng_state(state: Tensor, device: torch.device | str) -> None:
    """Set the default generator of ``device`` to ``state``."""
    device = _device(device)
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGTracker:
    """Named RNG streams for one device, swapped into the default generator by :meth:`fork`.

    Args:
        device: the device whose default generator the streams drive (``"cpu"`` or a CUDA device).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = _device(device)
        self._states: dict[str, Tensor] = {}

    @property
    def names(self) -> list[str]:
        return list(self._states)

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` seeded with ``seed`` (the default generator is left untouched)."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists; streams are seeded once.")
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        self._states[name] = gen.get_state()

    @contextmanager
    def fork(self, name: str = MODEL_PARALLEL) -> Iterator[None]:
        """Draw from stream ``name`` inside the block; the default generator resumes after it."""
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} is not tracked (have {self.names}); call add() first.")
        outer = get_rng_state(self.device)
        set_rng_state(self._states[name], self.device)
        try:
            yield
        finally:
            self._states[name] = get_rng_state(self.device)
            set_rng_state(outer, self.device)

    def state_dict(self) -> dict[str, Tensor]:
        """Tracked stream states plus the device's default generator (key ``"default"``)."""
        states = {name: s.clone() for name, s in self._states.items()}
        states["default"] = get_rng_state(self.device).clone()
        return states

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (the default generator included)."""
        state = dict(state)
        default = state.pop("default", None)
        self._states = {name: s.clone() for name, s in state.items()}
        if default is not None:
            set_rng_state(default, self.device)


def model_parallel_seed(seed: int, tp_rank: int, dp_rank: int, device: torch.device | str = "cpu") -> RNGTracker:
    """Seed the default generator (same over TP, differs over DP) and return a tracker whose
    ``"model-parallel"`` stream differs on every rank.

    Call it after the model's weights are built (weights come from the user's seed, identical on
    every rank) and before training.
    """
    device = _device(device)
    default_seed = derive_seed(seed, 0, dp_rank)
    if device.type == "cuda":
        torch.cuda.manual_seed(default_seed)
    torch.manual_seed(default_seed)
    tracker = RNGTracker(device)
    tracker.add(MODEL_PARALLEL, derive_seed(seed, 1, dp_rank, tp_rank))
    return tracker


class TPDropout(nn.Dropout):
    """``nn.Dropout`` that draws its mask from a tracker stream (default: model-parallel).

    Use it where the activation is split over TP (attention probabilities of this rank's heads, the
    hidden activation between column and row layers), so each rank's slice gets its own mask.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, *, tracker: RNGTracker,
                 stream: str = MODEL_PARALLEL) -> None:  # fmt: skip
        super().__init__(p, inplace)
        self.tracker, self.stream = tracker, stream

    @classmethod
    def from_dense(cls, module: nn.Dropout, tracker: RNGTracker, stream: str = MODEL_PARALLEL) -> TPDropout:
        """Wrap an existing ``nn.Dropout`` (same ``p`` and ``inplace``)."""
        return cls(module.p, module.inplace, tracker=tracker, stream=stream)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        with self.tracker.fork(self.stream):
            return super().forward(x)
