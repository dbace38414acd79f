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

The handlers are installed once the process group exists (before the model is built or loaded, the
data prepared, the sanity check run) and put back at teardown. A signal before the first training step is
agreed on when training starts: every rank stops there, with no checkpoint (nothing was trained in
this fit). A signal after the last step's agreement (in the final validation or save) is agreed on
once more when training ends: every rank writes the checkpoint and raises, as after a step.

``validate`` / ``test`` / ``predict`` record a signal the same way and act on none mid-stage (no
per-batch collective; a rank stopping alone would leave its peers waiting in their next collective):
when the stage ends the handlers from before it are put back and the signal delivered to them, as if
it came then. A second signal exits at once there too. One process evaluating keeps Lightning's
handling (no peer waits for it).

Lightning 2.6's own handling is replaced in every stage: its SIGTERM handler broadcasts from inside the
handler, its loop broadcasts rank 0's flag every batch (a signal to another rank is lost), and SIGINT
is not handled; the strategy keeps Lightning from installing its handlers and turns that
per-batch broadcast off (``_compat.take_over_signal_handling``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl

from lightning_tp._compat import lr_finder_running
from lightning_tp.errors import PreemptedError

REPEAT_WINDOW_S = 1.0
log = logging.getLogger(__name__)
_held = 0  # blocks of exits_held() open
_pending_exit = 0  # the exit code a second signal asked for while one was open


@contextmanager
def exits_held() -> Iterator[None]:
    """A second signal's immediate exit waits until this block ends (a checkpoint renamed into place):
    the handler runs in the main thread whichever thread the signal reached, so blocking it with
    ``pthread_sigmask`` holds it only in a process of one thread."""
    global _held, _pending_exit
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending_exit:
            os._exit(_pending_exit)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class SignalFlag:
    """Records the first of ``signals`` this process receives (see the module doc).

    Args:
        signals: the signals to handle (default SIGTERM and SIGINT).
        notice: written to stderr at the first signal (``lightning_tp: SIGTERM received: {notice}``): what
            will happen.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), notice: str = "") -> None:
        self.signals = tuple(dict.fromkeys(signals))
        self.notice = notice
        self.signum = 0
        self._at = 0.0
        self._pid = os.getpid()  # a forked DataLoader worker inherits the handler: it records, quietly
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
        global _pending_exit
        if self.signum and now - self._at > REPEAT_WINDOW_S:
            if _held:  # a checkpoint is being renamed into place: exit right after
                os.write(
                    2, f"lightning_tp: second signal ({signal_name(signum)}): exiting after the rename.\n".encode()
                )
                _pending_exit = _pending_exit or 128 + signum
                return
            os.write(2, f"lightning_tp: second signal ({signal_name(signum)}): exiting now.\n".encode())
            os._exit(128 + signum)
        if not self.signum:
            self.signum, self._at = signum, now
            if self.notice and os.getpid() == self._pid:
                os.write(2, f"lightning_tp: {signal_name(signum)} received: {self.notice}\n".encode())


def signal_checkpoint_path(root: str | os.PathLike) -> str:
    """``root/hpc_ckpt_{N}.ckpt`` with ``N`` one above the highest there: where Lightning's SLURM
    auto-resume looks (``trainer.fit(ckpt_path=None)`` in a requeued job resumes from it)."""
    root = Path(root)
    names = [p.name for p in root.iterdir()] if root.is_dir() else []
    found = [int(m.group(1)) for n in names if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", n))]
    return str(root / f"hpc_ckpt_{max(found, default=0) + 1}.ckpt")


def requeue_slurm_job() -> int:
    """``scontrol requeue`` this SLURM job (array jobs as ``JOBID_TASKID``), as Lightning's SLURM
    auto-requeue does (through a shell when ``scontrol`` is not found directly); returns scontrol's exit
    code. Raises ``ValueError`` when no SLURM job id is set, ``OSError`` when it cannot be run."""
    array_job, job = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_JOB_ID")
    if array_job:
        job = f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    if not job or not re.fullmatch(r"[0-9]+(_[0-9]+)?", job):
        raise ValueError(f"no SLURM job id to requeue: SLURM_JOB_ID (or SLURM_ARRAY_JOB_ID with SLURM_ARRAY_TASK_ID) "
                         f"gives {job!r}")  # fmt: skip
    try:
        return subprocess.call(["scontrol", "requeue", job])
    except FileNotFoundError:  # as Lightning does; /bin/sh exits 127 when it does not find scontrol either
        return subprocess.call(f"scontrol requeue {job}", shell=True)


_UNSET = object()


class _StopAfterHook:
    """The LightningModule's ``on_train_batch_end`` while training runs: its own hook, then the stop. A copy
    of the module (pickle, deepcopy) gets its own hook back, not this fit's stop."""

    def __init__(self, module: Any, stop: SignalStop) -> None:
        self._module, self._hook, self._stop = module, module.on_train_batch_end, stop

    def __call__(self, outputs: Any, batch: Any, batch_idx: int) -> Any:
        result = self._hook(outputs, batch, batch_idx)
        self._stop.after_batch(batch_idx)
        return result

    def __reduce__(self) -> tuple[Any, tuple[Any, str]]:
        # rebuilt while the copy's attributes are not set yet: its class's hook, bound to the copy
        return getattr, (self._module, "on_train_batch_end")


class SignalStop:
    """Made by the strategy when training starts; stops every rank together once they agree that one of
    them was signalled:

    - when training starts (:meth:`at_train_start`): for a signal since fit began to set up; no checkpoint;
    - at the end of a step (:meth:`after_batch`, run right after the LightningModule's own
      ``on_train_batch_end``, so the checkpoint holds what that hook did): after its optimizer step; with
      gradient accumulation, at the next optimizer step, the epoch's last batch included;
    - when training ends (:meth:`at_train_end`): for a signal after the last step's agreement.

    Every rank then writes one checkpoint together (unless ``save_on_signal=False``; none before the first
    step) and raises :class:`~lightning_tp.errors.PreemptedError`.
    """

    def __init__(self, strategy: Any, trainer: pl.Trainer) -> None:
        self.strategy, self.trainer = strategy, trainer
        self.pending: dict[int, int] = {}
        self._module = trainer.lightning_module
        self._previous = vars(self._module).get("on_train_batch_end", _UNSET)  # a hook set on the instance
        self._hook = _StopAfterHook(self._module, self)
        self._module.on_train_batch_end = self._hook

    def remove(self) -> None:
        """Give the LightningModule its own ``on_train_batch_end`` back."""
        if vars(self._module).get("on_train_batch_end") is self._hook:
            if self._previous is _UNSET:
                del self._module.on_train_batch_end
            else:
                self._module.on_train_batch_end = self._previous

    def at_train_start(self) -> None:
        self.pending = self.strategy.agreed_signals()
        if self.pending:
            self._stop("first")

    def after_batch(self, batch_idx: int) -> None:
        trainer = self.trainer
        self.pending.update(self.strategy.agreed_signals())
        progress = trainer.fit_loop.epoch_loop.batch_progress
        # Lightning steps at the epoch's last batch, accumulated or not (a loader of unknown length: is_last_batch)
        last_of_epoch = batch_idx + 1 == trainer.num_training_batches or progress.is_last_batch
        if self.pending and (not (batch_idx + 1) % trainer.accumulate_grad_batches or last_of_epoch):
            self._stop("step")

    def at_train_end(self) -> None:
        self.pending.update(self.strategy.agreed_signals())
        if self.pending:
            self._stop("last")

    def _stop(self, when: str) -> None:
        trainer, strategy = self.trainer, self.strategy
        signum, step, path = min(self.pending.values()), trainer.global_step, None
        if lr_finder_running(trainer):  # its steps are a sweep it undoes: the fit has trained nothing yet
            when = "finder"
        if when in ("first", "finder"):
            path = trainer.ckpt_path  # this fit's state is the one it started from
            started = f"from checkpoint {path}" if path else "from the start"
            saved = (f"no checkpoint was written (no step was trained in this fit, which started {started}); run "
                     "the same fit again")  # fmt: skip
        elif strategy.save_on_signal:
            path = strategy.broadcast(signal_checkpoint_path(trainer.default_root_dir))  # rank 0 names it
            trainer.save_checkpoint(path)  # collective: every rank is here, at the same point
            saved = (f"saved checkpoint {path}; resume with trainer.fit(model, ckpt_path={path!r}) (a requeued "
                     "SLURM job finds it by itself)")  # fmt: skip
        else:
            saved = "no checkpoint was written (save_on_signal=False)"
        requeue = strategy.requeue_signal
        if requeue is not None and signum == requeue and trainer.is_global_zero:
            saved += self._requeue()  # after the checkpoint: the requeued job resumes from it
        ranks = sorted(self.pending)
        who = "every rank" if len(ranks) == trainer.world_size else f"rank{'s' if len(ranks) > 1 else ''} {ranks}"
        where = {
            "first": f"before its first training step (global step {step})",
            "finder": f"in the learning-rate finder's sweep (its global step {step}), before the first training step",
            "step": f"after global step {step}",
            "last": f"after its last training step (global step {step}; the signal came after that step's check)",
        }[when]  # fmt: skip
        raise PreemptedError(
            f"training stopped on {signal_name(signum)} (received by {who}): every rank left the training loop "
            f"{where} and {saved}. A second signal exits at once.",
            signum=signum,
            step=step,
            checkpoint=path,
        )

    @staticmethod
    def _requeue() -> str:
        """Requeue the SLURM job; what the error message adds when that failed."""
        try:
            code = requeue_slurm_job()
        except (OSError, ValueError) as exc:
            log.warning("lightning_tp: the SLURM requeue failed: %s", exc)
            failed = f"the SLURM requeue failed ({exc})"
        else:
            log.info("lightning_tp: scontrol requeue exited with %d", code)
            if not code:
                return "; the SLURM job was requeued"
            failed = f"scontrol requeue exited with {code}"
        return f"; {failed}: requeue the job by hand (scontrol requeue JOBID)"
