"""A TP-2 fit (2 ranks, or TP 2 x DP n with --devices) that injects one fault, for tests/reliability/test_faults.py.

    python fault_fit.py OUT --fault training_step --rank 1 --step 3 [--launch popen|spawn|external|slurm] [--debug]

``--launch popen``: Lightning re-launches this script for rank 1; ``external``: the caller starts
both ranks with LOCAL_RANK/WORLD_SIZE/MASTER_* set (like torchrun); ``slurm``: the caller starts both
ranks with SLURM_* set (like srun; Lightning picks its SLURMEnvironment, auto-requeue on SIGUSR1);
``spawn``: megatron_tp_spawn.
ModelCheckpoint writes every 2 steps and OnExceptionCheckpoint is on. Each rank records what it
raised (and the global step it started from) in ``OUT/rank{r}.json``; the injected fault's wall time
is in ``OUT/fault.json``.
"""

import argparse
import json
import os
import signal
import time
import traceback
from datetime import timedelta
from pathlib import Path

import lightning as L
import lit
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from torch.utils.data import DataLoader

from lightning_tp import MegatronTPStrategy

FAULTS = (
    "none",
    "training_step",
    "dataloader",
    "callback",
    "bad_shape",
    "skip_collective",
    "signal",
    "signal_parent",
    "requeue_signal",
    "second_signal_in_save",
)


def _mark_fault(out: Path, what: str) -> None:
    (out / "fault.json").write_text(json.dumps({"time": time.time(), "what": what}))


class FaultyData(lit.TokenData):
    """Raises when sample number ``fail_after`` is loaded (in a DataLoader worker process); samples
    load in the order of the batches, so that is the first sample of batch ``fail_after // batch_size``."""

    def __init__(self, fail_after: int | None, out: Path, n: int = 64):
        super().__init__(n)
        self.fail_after, self.out, self.loaded = fail_after, out, 0

    def __getitem__(self, i):
        if self.loaded == self.fail_after:
            _mark_fault(self.out, "dataloader")
            raise OSError(f"injected fault: cannot read sample {i}")
        self.loaded += 1
        return super().__getitem__(i)


class FaultyGPT(lit.LitGPT):
    def __init__(self, fault: str, rank: int, step: int, out: str):
        super().__init__(batch_size=8, n_train=64)
        self.fault, self.fault_rank, self.fault_step, self.out = fault, rank, step, Path(out)

    def training_step(self, batch, batch_idx):
        if self.fault == "training_step" and self._here():
            _mark_fault(self.out, "training_step")
            raise RuntimeError(f"injected fault in training_step on rank {self.global_rank} at step {self.global_step}")
        return super().training_step(batch, batch_idx)

    def _here(self) -> bool:
        return self.global_rank == self.fault_rank and self.global_step == self.fault_step

    def train_dataloader(self):
        fail = self.fault == "dataloader" and self.global_rank == self.fault_rank
        data = FaultyData(self.fault_step * self.hparams.batch_size if fail else None, self.out)
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=False, num_workers=1)


class FaultyCallback(L.Callback):
    """Faults in a callback: an exception, a mis-shaped collective, or a skipped collective."""

    def __init__(self, fault: str, rank: int, step: int, out: Path):
        self.fault, self.rank, self.step, self.out = fault, rank, step, out
        self.start_step = None

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step  # above 0 when resumed

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        """``second_signal_in_save``: SIGTERM while the checkpoint of step ``step`` is being written, then
        a second one 1.2 s later (this rank exits at once, mid-save)."""
        if trainer.global_step != self.step or trainer.global_rank != self.rank:
            return
        if self.fault == "second_signal_in_save":
            _mark_fault(self.out, self.fault)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.2)
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        """``signal``: SIGTERM to this rank's process; ``signal_parent``: to spawn's main process (rank 0
        sends it); ``requeue_signal``: SIGUSR1 (SLURM's requeue signal) to this rank's process."""
        if trainer.global_step != self.step or trainer.global_rank != self.rank:
            return
        if self.fault in ("signal", "signal_parent", "requeue_signal"):
            _mark_fault(self.out, self.fault)
            target = os.getppid() if self.fault == "signal_parent" else os.getpid()
            os.kill(target, signal.SIGUSR1 if self.fault == "requeue_signal" else signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        me = trainer.global_rank == self.rank
        if self.fault == "callback" and me:
            _mark_fault(self.out, "callback")
            raise ValueError(f"injected fault in a callback on rank {trainer.global_rank}")
        if self.fault == "bad_shape":
            if me:
                _mark_fault(self.out, "bad_shape")
            dist.all_reduce(torch.ones(4 + int(me)), group=trainer.strategy.tp_group)  # one rank sends 5 values
        if self.fault == "skip_collective":
            if me:
                _mark_fault(self.out, "skip_collective")
                return  # the others all-reduce; this rank goes on to the next batch's collectives
            dist.all_reduce(torch.ones(4))


def main(ns: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    out = Path(ns.out)
    strategy = MegatronTPStrategy(
        tensor_parallel_size=2,
        timeout=timedelta(seconds=ns.timeout),
        start_method="spawn" if ns.launch == "spawn" else "popen",
        debug=ns.debug,
    )
    faulty = FaultyCallback(ns.fault, ns.rank, ns.step, out)
    callbacks = [
        faulty,
        ModelCheckpoint(dirpath=out / "ckpts", every_n_train_steps=2, save_top_k=-1),
        OnExceptionCheckpoint(dirpath=out / "ckpts"),
    ]
    trainer = L.Trainer(
        **lit.trainer_kwargs(
            devices=ns.devices,
            strategy=strategy,
            max_steps=ns.max_steps,
            callbacks=callbacks,
            enable_checkpointing=True,
            default_root_dir=str(out),  # where a signal's checkpoint goes (hpc_ckpt_N.ckpt)
        )
    )
    trainer.fit(FaultyGPT(ns.fault, ns.rank, ns.step, str(out)))  # on SLURM: resumes from hpc_ckpt_N by itself
    return {"step": trainer.global_step, "start_step": faulty.start_step}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--fault", choices=FAULTS, default="none")
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--step", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--launch", choices=("popen", "external", "spawn", "slurm"), default="popen")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--devices", type=int, default=2, help="ranks (TP 2: more than 2 adds data parallelism)")
    parser.add_argument("--timeout", type=int, default=20)
    ns = parser.parse_args()
    local = os.environ.get("SLURM_LOCALID", os.environ.get("LOCAL_RANK", 0))
    name = "main" if ns.launch == "spawn" else f"rank{local}"  # the process, not the rank
    try:
        done = main(ns)
    except BaseException as exc:
        record = {"error": f"{type(exc).__name__}: {exc}", "time": time.time(), "pid": os.getpid()}
        record["trace"] = traceback.format_exc()
        (Path(ns.out) / f"{name}.json").write_text(json.dumps(record))
        raise
    (Path(ns.out) / f"{name}.json").write_text(
        json.dumps({"error": None, "time": time.time(), "pid": os.getpid(), **done})
    )
