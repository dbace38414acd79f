"""Model-parallel RNG tracker: dropout masks that are right for tensor parallelism.

Two kinds of random streams (Megatron's rule):

* the **default** generator: the same on every rank of a TP group (so dropout on replicated
  activations, e.g. after a row-parallel layer, draws the same mask everywhere and replicated
  activations stay identical) and different across data-parallel replicas;
* the **model-parallel** stream, used inside TP regions (activations split over TP, e.g. attention
  probabilities of this rank's heads): different on every rank.

A model-parallel draw is a function of the default generators' state where it happens: each
:meth:`RNGTracker.fork` draws one number from the CPU default generator (alike on every rank of a
TP group, which keeps it in step), seeds the device's generator with that number mixed with the
stream's per-rank key for the block, and puts the device's generator back afterwards. Whatever
restores the default generators for a recompute (``torch.utils.checkpoint``, so Hugging Face's and
timm's gradient checkpointing as well as the strategy's) therefore draws the same per-rank masks
again, and nothing but the default generators needs saving for an exact resume.

:class:`SplitRegion` puts the stretch of a block from its column layers' outputs to its row layer's
input on the model-parallel stream, whatever draws there (``F.dropout`` in Hugging Face's attention
functions, ``scaled_dot_product_attention``'s ``dropout_p``, an ``nn.Dropout`` of any name).
Works for the CPU generator and for CUDA devices.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tp._compat import fake_mode_active
from lightning_tp.engine.comm import sequence_whole

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


def _seed_device(seed: int, device: torch.device) -> None:
    """Seed only ``device``'s default generator (CUDA: of that device alone). The CPU generator
    (Mersenne Twister) keeps 32 bits of a seed: each fork's stream is one of 2**32 there (CUDA's
    Philox keeps 64), so two forks of a long CPU run may, rarely, draw the same masks."""
    if device.type == "cuda":
        torch.cuda.default_generators[device.index].manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def _draw() -> int:
    """One number from the CPU default generator (advances it by one draw)."""
    return int(torch.randint(0, 1 << 62, (), dtype=torch.int64, device="cpu"))


class RNGTracker:
    """Named RNG streams for one device, swapped into the default generator by :meth:`fork`.

    A stream holds no state of its own: each fork derives the device generator's state from the
    stream's key (per rank: see :func:`model_parallel_seed`) and one draw of the CPU default
    generator, so a recompute that restores the default generators draws the same masks again.

    Args:
        device: the device whose default generator the streams drive (``"cpu"`` or a CUDA device).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = _device(device)
        self._keys: dict[str, int] = {}
        self._region: Tensor | None = None  # an open split region: the device state its close puts back

    @property
    def names(self) -> list[str]:
        return list(self._keys)

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` keyed by ``seed`` (the default generator is left untouched)."""
        if name in self._keys:
            raise ValueError(f"RNG stream {name!r} already exists; streams are seeded once.")
        self._keys[name] = int(seed)

    def enter(self, name: str = MODEL_PARALLEL) -> Tensor:
        """Make the device's default generator draw from stream ``name``; returns the state to put
        back (:func:`set_rng_state`) when done. :meth:`fork` is the block form."""
        if name not in self._keys:
            raise KeyError(f"RNG stream {name!r} is not tracked (have {self.names}); call add() first.")
        drawn = _draw()
        outer = get_rng_state(self.device)
        _seed_device(derive_seed(self._keys[name], drawn), self.device)
        return outer

    @contextmanager
    def fork(self, name: str = MODEL_PARALLEL) -> Iterator[None]:
        """Draw from stream ``name`` inside the block. After it the device's generator resumes where
        it was before the block but one draw further on the CPU (the CPU default generator gives the
        draw; on the CPU device that is the device's generator), alike on every rank of a TP group."""
        outer = self.enter(name)
        try:
            yield
        finally:
            set_rng_state(outer, self.device)

    @property
    def region_open(self) -> bool:
        """Whether a split region (:class:`SplitRegion`) is open: the device draws from the stream."""
        return self._region is not None

    def open_region(self, name: str = MODEL_PARALLEL) -> None:
        """Open the split region (stream ``name``) unless it is open."""
        if self._region is None:
            self._region = self.enter(name)

    def close_region(self) -> None:
        """Close the split region if it is open: the device's generator resumes."""
        if self._region is not None:
            outer, self._region = self._region, None
            set_rng_state(outer, self.device)

    def swap_region(self, region: Tensor | None) -> Tensor | None:
        """Set the split region's state (what :attr:`region_state` returned: ``None`` is closed) without
        touching a generator; returns the state it replaces. For a recompute, which runs a module's
        forward again with the generators as they were (``torch.utils.checkpoint`` restores them), and
        the region as it was, then drops what the recompute left."""
        before, self._region = self._region, region
        return before

    @property
    def region_state(self) -> Tensor | None:
        return self._region

    def state_dict(self) -> dict[str, Tensor]:
        """The default generators the streams derive from: the device's (key ``"default"``) and, for
        a CUDA device, the CPU's (key ``"cpu"``)."""
        states = {"default": get_rng_state(self.device).clone()}
        if self.device.type == "cuda":
            states["cpu"] = torch.get_rng_state().clone()
        return states

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned. Other keys (the stream states that checkpoints
        of earlier versions held) are ignored: streams derive from the default generators."""
        if (default := state.get("default")) is not None:
            set_rng_state(default, self.device)
        if (cpu := state.get("cpu")) is not None and self.device.type == "cuda":
            torch.set_rng_state(cpu)


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


_TRACKER_ATTR = "_lightning_tp_rng_tracker"


def attach_tracker(model: nn.Module, tracker: RNGTracker) -> None:
    """Record on ``model`` the tracker its per-rank dropouts and split regions use (not a submodule, not
    in its state_dict), for whoever trains it next (a second Trainer's strategy)."""
    object.__setattr__(model, _TRACKER_ATTR, tracker)


def attached_tracker(model: nn.Module) -> RNGTracker | None:
    """The tracker :func:`attach_tracker` recorded on ``model``, ``None`` if none."""
    tracker = getattr(model, _TRACKER_ATTR, None)
    return tracker if isinstance(tracker, RNGTracker) else None


class TPDropout(nn.Dropout):
    """``nn.Dropout`` that draws its mask from a tracker stream (default: model-parallel).

    Use it where the activation is split over TP (attention probabilities of this rank's heads, the
    hidden activation between column and row layers), so each rank's slice gets its own mask. With
    ``sequence_only`` (a dropout on sequence-sharded activations) a forward that runs on the whole
    sequence (:func:`~lightning_tp.engine.comm.sequence_whole`) draws as ``nn.Dropout`` does: its
    activations are replicated then.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, *, tracker: RNGTracker,
                 stream: str = MODEL_PARALLEL, sequence_only: bool = False) -> None:  # fmt: skip
        super().__init__(p, inplace)
        self.tracker, self.stream, self.sequence_only = tracker, stream, sequence_only

    @classmethod
    def from_dense(
        cls, module: nn.Dropout, tracker: RNGTracker, stream: str = MODEL_PARALLEL, sequence_only: bool = False
    ) -> TPDropout:
        """Wrap an existing ``nn.Dropout`` (same ``p`` and ``inplace``)."""
        return cls(module.p, module.inplace, tracker=tracker, stream=stream, sequence_only=sequence_only)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if self.sequence_only and sequence_whole(x.shape[-2] if x.dim() >= 2 else None, flat=x.dim() == 2):
            return super().forward(x)
        if fake_mode_active():  # (no values: the stream's draw cannot be read; the mask's values do not matter)
            return super().forward(x)
        with self.tracker.fork(self.stream):
            return super().forward(x)


class SplitRegion:
    """The stretch of a block's forward where its activations are split over TP: from its column
    layers' outputs to its row layer's input (attention probabilities of this rank's heads, an MLP's
    hidden units). Random draws there, whatever makes them, come from ``tracker``'s model-parallel
    stream, so each rank's heads and units get masks of their own, as in the unsharded model; before
    and after it the default stream, shared by the TP ranks, drops replicated activations alike on
    every rank (Megatron's rule). The open/closed state lives on the tracker (one region at a time
    per device), where the strategy's activation checkpointing finds it for a recompute.

    :meth:`install` adds forward hooks (bound methods): open after a column layer's forward, close
    before a row layer's, after each block that holds them, before the forward of every module above
    a block, and after the model's forward (and its children's that hold blocks) even when it raises.
    In training mode only, not under ``torch.compile`` (swapping generators would break the graph:
    compiled, those draws stay shared by the TP ranks) and not on fake tensors."""

    def __init__(self, tracker: RNGTracker, stream: str = MODEL_PARALLEL) -> None:
        self.tracker, self.stream = tracker, stream

    def open(self, module: nn.Module, *_: Any) -> None:
        if module.training and not torch.compiler.is_compiling() and not fake_mode_active():
            self.tracker.open_region(self.stream)

    def close(self, *_: Any) -> None:
        self.tracker.close_region()

    def install(
        self,
        root: nn.Module,
        blocks: list[nn.Module],
        columns: list[nn.Module],
        rows: list[nn.Module],
        entries: Sequence[nn.Module] = (),
    ) -> None:
        """Hooks: ``columns`` open the region after their forward, ``entries`` (blocks split from their
        input on, torch's ``nn.MultiheadAttention`` split by heads) before theirs; ``rows`` and ``blocks``
        (those holding both) close it, and so
        does every module above a block before its forward (a forward that raised mid-stretch and was
        caught, a retry after running out of memory, leaves no region open for the next forward, whichever
        module its caller calls: a LightningModule's ``training_step`` calls its model, not its own
        forward); ``root`` and its children holding blocks also close it after their forward even when it
        raises (``always_call``). Blocks get plain hooks: Dynamo guards on each ``always_call`` hook, so one
        per block would compile identical blocks once each."""
        for column in columns:
            column.register_forward_hook(self.open)
        for row in rows:
            row.register_forward_pre_hook(self.close)
        for block in blocks:
            block.register_forward_hook(self.close)
        held = {id(b) for b in blocks}
        above = [m for m in root.modules() if any(id(sub) in held for sub in m.modules())]  # blocks included
        for module in above:
            module.register_forward_pre_hook(self.close)
        for entry in entries:  # after the close it gets as a block: its forward runs with the region open
            entry.register_forward_pre_hook(self.open)
        for top in [root, *(c for c in root.children() if any(c is m for m in above))]:
            top.register_forward_hook(self.close, always_call=True)
