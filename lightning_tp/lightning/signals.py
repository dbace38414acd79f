"""Preemption: SIGTERM / SIGINT (and SLURM's requeue signal) stop every rank after the same step.

Megatron's ``--exit-signal-handler`` is the model. The handler only records the signal (no
collective, no I/O: a handler runs between two bytecodes of whatever the rank was doing, maybe inside
a collective). Once per training step every rank contributes what it received to one small
reduction (the same one as the non-finite-loss check when that is on), so all ranks learn at the
same step that some rank was signalled; at the end of that step (after its optimizer step) they
write one checkpoint together and raise :class:`~lightning_tp.errors.PreemptedError`, naming the
signal, the step and the checkpoint. A second signal to a rank exits it at once (``128 + signal``),
unless it comes within :data:`REPEAT_WINDOW_S` of the first (a terminal's Ctrl-C reaches every process
of the group, and a spawn parent forwards it too: one press).

Lightning 2.6's own handling is replaced while training runs: its SIGTERM handler broadcasts from
inside the handler, its loop broadcasts rank 0's flag every batch (a signal to another rank is
lost), and SIGINT is not handled; the strategy installs these handlers at the start of training and
turns that per-batch broadcast off (``_compat.disable_sigterm_broadcast``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl

from lightning_tp.errors import PreemptedError

REPEAT_WINDOW_S = 1.0
log = logging.getLogger(__name__)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class SignalFlag:
    """Records the first of ``signals`` this process receives (see the module doc).

    Args:
        signals: the signals to handle (default SIGTERM and SIGINT).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(dict.fromkeys(signals))
        self.signum = 0
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Install the handlers (main thread only; a no-op elsewhere), keeping the previous ones."""
        for s in self.signals:
            try:
                previous = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                return
            self._previous.setdefault(s, previous)

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        for s, previous in self._previous.items():
            try:
                signal.signal(s, previous)
            except (ValueError, TypeError):
                pass
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum and now - self._at > REPEAT_WINDOW_S:
            os.write(2, f"lightning_tp: second signal ({signal_name(signum)}): exiting now.\n".encode())
            os._exit(128 + signum)
        if not self.signum:
            self.signum, self._at = signum, now


def signal_checkpoint_path(root: str | os.PathLike) -> str:
    """``root/hpc_ckpt_{N}.ckpt`` with ``N`` one above the highest there: where Lightning's SLURM
    auto-resume looks (``trainer.fit(ckpt_path=None)`` in a requeued job resumes from it)."""
    root = Path(root)
    names = [p.name for p in root.iterdir()] if root.is_dir() else []
    found = [int(m.group(1)) for n in names if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", n))]
    return str(root / f"hpc_ckpt_{max(found, default=0) + 1}.ckpt")


def requeue_slurm_job() -> int:
    """``scontrol requeue`` this SLURM job (array jobs as ``JOBID_TASKID``), as Lightning's SLURM
    auto-requeue does; returns scontrol's exit code."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job):
        raise ValueError(f"not a SLURM job id: {job!r}")
    return subprocess.call(["scontrol", "requeue", job])


class SignalStop(pl.Callback):
    """Added by the strategy while training runs: at the end of the step at which the ranks agreed
    that one of them was signalled (after its optimizer step; with gradient accumulation, at the
    next optimizer step, the epoch's last batch included), every rank writes one checkpoint together and raises
    :class:`~lightning_tp.errors.PreemptedError`."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self.pending: dict[int, int] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.pending.update(self.strategy.agreed_signals())
        progress = trainer.fit_loop.epoch_loop.batch_progress
        # Lightning steps at the epoch's last batch, accumulated or not (a loader of unknown length: is_last_batch)
        last_of_epoch = batch_idx + 1 == trainer.num_training_batches or progress.is_last_batch
        if not self.pending or ((batch_idx + 1) % trainer.accumulate_grad_batches and not last_of_epoch):
            return
        signum = min(self.pending.values())
        step, path = trainer.global_step, None
        if self.strategy.save_on_signal:
            path = self.strategy.broadcast(signal_checkpoint_path(trainer.default_root_dir))  # rank 0 names it
            trainer.save_checkpoint(path)  # collective: every rank is here, after the same step
        requeue = self.strategy.requeue_signal
        if requeue is not None and signum == requeue and trainer.is_global_zero:
            code = requeue_slurm_job()  # after the checkpoint: the requeued job resumes from it
            log.info("lightning_tp: scontrol requeue exited with %d", code)
        ranks = sorted(self.pending)
        who = "every rank" if len(ranks) == trainer.world_size else f"rank{'s' if len(ranks) > 1 else ''} {ranks}"
        saved = (
            f"saved checkpoint {path}; resume with trainer.fit(model, ckpt_path={path!r}) (a requeued SLURM job "
            "finds it by itself)"
            if path
            else "no checkpoint was written (save_on_signal=False)"
        )
        raise PreemptedError(
            f"training stopped on {signal_name(signum)} (received by {who}): every rank left the training loop after "
            f"global step {step} and {saved}. A second signal exits at once.",
            signum=signum,
            step=step,
            checkpoint=path,
        )
