"""Behaviour under faults: non-finite losses, interrupted runs, collective debugging.

* :func:`check_finite_loss`: one all-reduce of a flag vector per training step, so every rank learns
  which ranks hold a NaN/inf loss and all of them raise :class:`NonFiniteLossError` together, before
  the backward pass and the optimizer step; the same reduction carries the signals each rank received
  (:mod:`lightning_tp.lightning.signals`; :func:`agree_on_signals` when the check is off).
* :func:`fault_in_flight`: the exception a rank is handling when the Trainer was interrupted by a
  fault. Such a rank must enter no collective (its peers may be blocked inside another one, and
  gloo/NCCL pair mismatched collectives silently or hang) and must write no checkpoint (its state
  may be mid-step, and under ``spawn`` the main process holds the untrained dense model).
  A signal while training runs is not such a fault: the strategy stops every rank after the same
  step and writes its checkpoint before raising (:mod:`lightning_tp.lightning.signals`).
* :func:`enable_collective_debug`: ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` before the process group is
  created, so torch checks before every collective that all ranks run the same op with the same
  shapes and raises a ``RuntimeError`` naming both sides of a mismatch instead of hanging.
  :func:`unchecked_dp_group` gives DDP a data-parallel group without that wrapper (torch's DDP
  crashes on a wrapped group).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_tp.engine.mesh import global_rank
from lightning_tp.errors import NonFiniteLossError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from lightning_tp.engine.mesh import TPMesh

_NAN, _INF = 1.0, 2.0


def loss_of(output: Any) -> Tensor | None:
    """The loss tensor of a ``training_step`` output (a tensor or a dict with ``"loss"``), else ``None``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    return None


def check_finite_loss(output: Any, device: torch.device, step: int, epoch: int, signum: int = 0) -> dict[int, int]:
    """Raise :class:`NonFiniteLossError` on every rank if the loss is NaN/inf on any rank. Collective.

    Every rank contributes one entry of a world-sized vector (0 finite, 1 NaN, 2 inf; 0 when the
    step returned no loss), and the signal it received (``signum``, 0 for none) to a second one;
    both are summed over the default group: one all-reduce and one host sync per step.

    Args:
        output: what ``training_step`` returned on this rank.
        device: where the flag vector lives (the strategy's root device).
        step: the trainer's global step (optimizer steps taken so far).
        epoch: the current epoch.
        signum: the signal this rank received (see :mod:`lightning_tp.lightning.signals`).

    Returns:
        ``{rank: signal}`` for the ranks that received a signal (the same on every rank).

    Raises:
        NonFiniteLossError: some rank's loss is not finite; the message names the step and the ranks.
    """
    loss = loss_of(output)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    flags = torch.zeros(2 * world, device=device)
    flags[world + rank] = float(signum)
    if loss is not None:
        loss = loss.detach()
        code = torch.where(torch.isnan(loss).any(), _NAN, torch.where(torch.isinf(loss).any(), _INF, 0.0))
        flags[rank] = code.to(device=device, dtype=flags.dtype)
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    values = flags.tolist()
    signalled = {r: int(values[world + r]) for r in range(world) if values[world + r]}
    bad = {r: ("NaN" if values[r] == _NAN else "inf") for r in range(world) if values[r]}
    if not bad:
        return signalled
    where = ", ".join(f"rank {r}: {kind}" for r, kind in sorted(bad.items()))
    raise NonFiniteLossError(
        f"the training loss is not finite at global step {step} (epoch {epoch}) on {len(bad)} of {world} ranks "
        f"({where}). Training stopped on every rank before the backward pass, so the weights are those after "
        f"step {step}; nothing was trained on the non-finite loss. Usual causes: a learning rate too high, "
        "no gradient clipping (set gradient_clip_val), bad input data, or overflow in low precision (16-mixed "
        "skips such steps with loss scaling). MegatronTPStrategy(nan_check=False) disables this check."
    )


def agree_on_signals(device: torch.device, signum: int) -> dict[int, int]:
    """``{rank: signal}`` for the ranks that received a signal, the same on every rank: one
    all-reduce of a world-sized vector (when the non-finite-loss check does not carry it). Collective."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    flags = torch.zeros(world, device=device)
    flags[dist.get_rank() if dist.is_initialized() else 0] = float(signum)
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    return {r: int(v) for r, v in enumerate(flags.tolist()) if v}


def fault_in_flight(trainer: Any, distributed: bool) -> BaseException | None:
    """The exception this rank is handling if the Trainer was interrupted by a fault, else ``None``.

    Lightning calls ``on_exception`` hooks (e.g. ``OnExceptionCheckpoint``) inside the ``except``
    block that caught the error, with the trainer status set to ``INTERRUPTED``.

    Args:
        trainer: the Trainer the module is attached to, or ``None`` (in the main process of a
            ``spawn`` launch the module is never attached: the ranks run in the workers).
        distributed: whether this process is part of the initialized process group (``False`` in the
            main process of a ``spawn`` launch, which never holds the trained shards).
    """
    from lightning.pytorch.trainer.states import TrainerStatus

    exc = sys.exc_info()[1]
    if trainer is None:
        return exc if exc is not None and not distributed else None  # spawn's main process, handling a worker's error
    if trainer.state.status != TrainerStatus.INTERRUPTED:
        return None
    return exc if exc is not None else RuntimeError("the Trainer was interrupted")


def enable_collective_debug() -> None:
    """Turn on torch's collective consistency checks for process groups created from now on.

    Sets ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` (inherited by processes launched later) and applies it
    to this process. Every collective then first compares op type, shapes and dtypes across ranks
    (a small extra gloo collective each: for debugging, not for speed).
    """
    os.environ["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"
    dist.set_debug_level_from_env()


def unchecked_dp_group(mesh: TPMesh, timeout: timedelta | None) -> ProcessGroup:
    """This rank's data-parallel group, built again without the debug wrapper. Collective.

    ``DistributedDataParallel`` segfaults while it is constructed on a group wrapped for
    ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` (seen with torch 2.13 on gloo), so in debug mode DDP gets
    these groups; every other collective keeps the checks.

    Args:
        mesh: the TP x DP mesh (its groups were created in debug mode).
        timeout: the process-group timeout for the new groups.
    """
    level = dist.get_debug_level()
    dist.set_debug_level(dist.DebugLevel.OFF)
    try:
        mine = None
        for tp_rank in range(mesh.tp_size):  # every rank creates every group, in the same order
            ranks = [global_rank(dp_rank, tp_rank, mesh.tp_size) for dp_rank in range(mesh.dp_size)]
            group = dist.new_group(ranks, timeout=timeout)
            if tp_rank == mesh.tp_rank:
                mine = group
        return mine
    finally:
        dist.set_debug_level(level)
