"""The launchers of ``MegatronTPStrategy``: popen (subprocess/torchrun/SLURM) and spawn/fork.

Both plan the policy on the main process's model before they start any other process
(``strategy.plan_before_launch``): a policy that cannot be applied fails once, at once.
"""

from __future__ import annotations

import atexit
import inspect
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist

from lightning_tp._compat import (
    MultiProcessingLauncher,
    SubprocessScriptLauncher,
    clear_exit_handlers,
    run_exit_handlers,
)
from lightning_tp.lightning.checkpoint import full_state_dict


def record_weights_only(strategy: Any, function: Callable, args: tuple, kwargs: dict) -> None:
    """Keep the ``weights_only`` given to ``fit``/``validate``/``test``/``predict`` on the strategy:
    Lightning hands it to ``Strategy.load_checkpoint`` only when the strategy restores before setup,
    and megatron_tp restores after (into the sharded model)."""
    try:
        bound = inspect.signature(function).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return
    strategy.load_weights_only = bound.arguments.get("weights_only")


_EXIT_PAUSE_S = 0.05
_exit_pause = False  # registered in this process


def _pause_before_exit() -> None:
    """At interpreter exit (an ``atexit`` handler, before finalization): sleep briefly, so torch's
    collective worker threads get the GIL once more. A gloo worker thread releases the tensors of a
    collective it finished (their Python objects) under the GIL; one whose release is left until
    finalization has begun ends inside a C++ destructor, which aborts the process after the script
    has finished ("terminate called without an active exception", SIGABRT: about one 2-rank fit in
    ten on 2 cores, after the last step's signal agreement). Also after the script destroyed its
    process groups: their threads outlive that."""
    time.sleep(_EXIT_PAUSE_S)


class TPSubprocessScriptLauncher(SubprocessScriptLauncher):
    """Lightning's popen launcher (this script is started again for every other local rank), which
    first plans the policy on this process's model when it is the one that starts the others."""

    def __init__(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tp_strategy = strategy

    def launch(self, function: Callable, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        global _exit_pause
        if not _exit_pause:  # every rank runs the user's script to its end (this one, those it starts, torchrun's)
            atexit.register(_pause_before_exit)
            _exit_pause = True
        record_weights_only(self.tp_strategy, function, args, kwargs)
        if not self.cluster_environment.creates_processes_externally and args:
            self.tp_strategy.plan_before_launch(args[0])  # args[0]: the model given to fit/validate/test/predict
        return super().launch(function, *args, trainer=trainer, **kwargs)


class TPMultiProcessingLauncher(MultiProcessingLauncher):
    """Spawn/fork launcher that sends the *consolidated* (unsharded) weights back to the main
    process, where the user's module is still the original dense model, and ends a worker without
    torch's C++ teardown once its work is done. A model built on the meta device (deferred init)
    gets no weights back: the main process keeps its meta model; the trained weights are in the
    checkpoints the ranks wrote.

    Args:
        strategy: the :class:`~lightning_tp.lightning.strategy.MegatronTPStrategy` it launches.
        start_method: ``"spawn"``, ``"fork"`` or ``"forkserver"``.
    """

    def __init__(self, strategy: Any, start_method: str = "spawn") -> None:
        super().__init__(strategy, start_method=start_method)
        self.tp_strategy, self.start_method = strategy, start_method

    def launch(self, function: Callable, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        """Launch the workers; while they run, SIGTERM / SIGINT sent to this (main) process are
        forwarded to them, where the strategy stops every rank after the same step (a copy of a
        signal the workers also got, like a terminal's Ctrl-C, counts once there)."""

        record_weights_only(self.tp_strategy, function, args, kwargs)
        if args:
            self.tp_strategy.plan_before_launch(args[0])  # before any worker starts
        launcher_pid = os.getpid()

        def forward(signum: int, frame: Any) -> None:
            if os.getpid() != launcher_pid:  # a forked worker inherited this handler: not its job
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            for proc in self.procs:
                if proc.is_alive() and proc.pid is not None:
                    os.kill(proc.pid, signum)

        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[signum] = signal.signal(signum, forward)
            except ValueError:  # not the main thread: nothing to forward
                break
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        if self.start_method == "fork":
            # The parent's exit handlers (its temp dirs, loggers) are not this child's to run. (A
            # weakref.finalize the child creates itself then does not run at exit either.)
            clear_exit_handlers()
        try:
            super()._wrapping_function(*args, **kwargs)  # rank 0's results are in the (synchronous) queue
        except BaseException:
            if self.start_method == "fork":  # multiprocessing ends a forked child with os._exit: handlers now
                run_exit_handlers()
            raise
        # Every rank reaches this point after the same collectives. Left to a normal interpreter
        # exit, the teardown of torch's gloo process groups aborted about one worker in ten
        # ("terminate called without an active exception", SIGABRT in the parent's join; after
        # destroy_process_group the groups' runloop and tcp-loop threads are still alive). The
        # work is done: run Python's exit handlers (loggers finish), flush, and leave without
        # the C++ teardown.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        run_exit_handlers()  # this worker's own (a W&B run started here finishes and writes its data)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(0)

    def _collect_rank_zero_results(self, trainer: pl.Trainer, results: Any):
        if self.tp_strategy.deferred_init:  # built on meta: the main process never holds the dense model
            output = super()._collect_rank_zero_results(trainer, results)
            if output is not None and output.weights_path is not None:
                self.tp_strategy.checkpoint_io.remove_checkpoint(output.weights_path)  # rank 0's shards only
                output = output._replace(weights_path=None)
            return output
        full = full_state_dict(trainer.lightning_module, self.tp_strategy.tp_group)  # collective on every rank
        output = super()._collect_rank_zero_results(trainer, results)
        if output is None or output.weights_path is None:
            return output
        full = {k: v.cpu() for k, v in full.items()}  # the main process loads them: no CUDA context there
        self.tp_strategy.checkpoint_io.save_checkpoint(full, output.weights_path)
        return output
