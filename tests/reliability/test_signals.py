"""Preemption: a SIGTERM / SIGINT to any rank stops every rank after the same step; they write one
checkpoint together and raise PreemptedError; resuming from it continues exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import lit
import pytest
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from test_strategy import Recorder

import _dist
from lightning_tp import MegatronTPStrategy, PreemptedError
from lightning_tp.lightning.checkpoint import read_meta

SIGNAL_STEP = 3


class SendSignal(L.Callback):
    """Deliver ``signum`` to this process at the start of batch ``step`` on the ranks in ``ranks``
    (what SLURM / Kubernetes / torchrun do on preemption)."""

    def __init__(self, signum: int, ranks: tuple[int, ...], step: int) -> None:
        self.signum, self.ranks, self.step = signum, ranks, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank in self.ranks:
            os.kill(os.getpid(), self.signum)


def _fit(root: str, steps: int, signal_spec=None, ckpt_path=None, save=True):
    with lit.external_launch(2):
        # 4 steps per epoch, the signal in step 4 (index 3): the stop is at an epoch's end, where Lightning
        # resumes a plain DataLoader exactly (mid-epoch it restarts the epoch's data unless the loader is stateful)
        model, rec = lit.LitGPT(batch_size=8, n_train=32, dropout=0.1), Recorder()
        callbacks = [rec, ModelCheckpoint(dirpath=os.path.join(root, "ckpts"), every_n_train_steps=2, save_top_k=-1)]
        if signal_spec is not None:
            callbacks.append(SendSignal(*signal_spec))
        strategy = MegatronTPStrategy(tensor_parallel_size=2, save_on_signal=save)
        trainer = L.Trainer(**lit.trainer_kwargs(max_steps=steps, devices=2, strategy=strategy, callbacks=callbacks,
                                                 enable_checkpointing=True, default_root_dir=root))  # fmt: skip
        start, error = time.time(), None
        try:
            trainer.fit(model, ckpt_path=ckpt_path)
        except PreemptedError as exc:
            error = {"message": str(exc), "signum": exc.signum, "step": exc.step, "checkpoint": exc.checkpoint}
        handler = signal.getsignal(signal.SIGTERM)
        return {"rank": dist.get_rank(), "losses": rec.losses, "error": error, "seconds": time.time() - start,
                "step": trainer.global_step, "handler_restored": handler is signal.SIG_DFL or callable(handler)}  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _dist.run(2, _fit, str(tmp_path_factory.mktemp("full")), 6)


@pytest.mark.parametrize(
    ("signum", "ranks"),
    [(signal.SIGTERM, (0, 1)), (signal.SIGTERM, (0,)), (signal.SIGINT, (1,))],
    ids=["sigterm-all", "sigterm-rank0", "sigint-rank1"],
)
def test_signal_stops_every_rank_at_the_same_step_and_resumes_exactly(tmp_path, uninterrupted, signum, ranks):
    root = str(tmp_path)
    stopped = _dist.run(2, _fit, root, 6, (signum, ranks, SIGNAL_STEP))
    for r in stopped:
        err = r["error"]
        assert err is not None, r  # every rank raised, not only the signalled ones
        assert err["signum"] == signum and err["step"] == SIGNAL_STEP + 1  # the signalled step was finished
        assert signal.Signals(signum).name in err["message"] and err["checkpoint"] in err["message"]
        assert r["step"] == SIGNAL_STEP + 1 and len(r["losses"]) == SIGNAL_STEP + 1
    path = Path(stopped[0]["error"]["checkpoint"])
    assert path == tmp_path / "hpc_ckpt_1.ckpt" and stopped[1]["error"]["checkpoint"] == str(path)
    assert read_meta(path)["global_step"] == SIGNAL_STEP + 1
    assert len(list(path.glob("*.distcp"))) == 2  # every rank's shards
    resumed = _dist.run(2, _fit, root, 6, None, str(path))
    for full, stop, res in zip(uninterrupted, stopped, resumed, strict=True):
        assert stop["losses"] + res["losses"] == full["losses"]  # exactly, dropout on
        assert res["error"] is None and res["step"] == 6


def test_save_on_signal_false_stops_without_a_checkpoint(tmp_path):
    for r in _dist.run(2, _fit, str(tmp_path), 6, (signal.SIGTERM, (1,), 1), None, False):
        assert r["error"]["checkpoint"] is None and "no checkpoint was written" in r["error"]["message"]
        assert r["step"] == 2
    assert not list(tmp_path.glob("hpc_ckpt_*"))


SECOND_SIGNAL = """
import os, signal, sys, time
from lightning_tp.lightning.signals import SignalFlag
flag = SignalFlag()
flag.install()
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)  # the same delivery twice at once (a forwarded copy): still one signal
assert flag.signum == signal.SIGTERM
time.sleep(1.5)
os.kill(os.getpid(), signal.SIGINT)  # a second signal: exit at once
time.sleep(30)
sys.exit(0)
"""


def test_second_signal_exits_at_once():
    start = time.time()
    out = subprocess.run([sys.executable, "-c", SECOND_SIGNAL], capture_output=True, text=True, timeout=60)
    assert out.returncode == 128 + signal.SIGINT, out.stderr
    assert "second signal (SIGINT): exiting now" in out.stderr
    assert time.time() - start < 20


@pytest.mark.parametrize(("launch", "fault", "rank"), [("popen", "signal", 1), ("spawn", "signal_parent", 0)],
                         ids=["popen-rank1", "spawn-parent-forwards"])  # fmt: skip
def test_signal_through_the_launchers(tmp_path, launch, fault, rank):
    """Real processes: SIGTERM to popen's child rank only, or to spawn's main process (which
    forwards it to the workers): every process exits non-zero naming the signal, within seconds,
    after one collective checkpoint of the step in which the signal came."""
    from _procs import pid_alive, run_fault_fit

    run = run_fault_fit(tmp_path, "--fault", fault, "--rank", str(rank), "--step", "3", launch=launch)
    assert all(code != 0 for code in run.returncodes.values()), run.output[-3000:]
    assert "PreemptedError" in run.output and "SIGTERM" in run.output, run.output[-3000:]
    assert max(run.seconds_to_exit().values()) < 60, run.seconds_to_exit()
    ckpt = tmp_path / "hpc_ckpt_1.ckpt"
    assert ckpt.is_dir() and read_meta(ckpt)["global_step"] == 4, sorted(p.name for p in tmp_path.iterdir())
    deadline = time.time() + 20  # popen's child rank ends on its own, maybe just after the main process
    while [r for r in run.records.values() if pid_alive(r["pid"])] and time.time() < deadline:
        time.sleep(0.2)
    assert not [r for r in run.records.values() if pid_alive(r["pid"])]  # no orphan left behind


def test_requeue_runs_scontrol_for_this_job(tmp_path, monkeypatch):
    """SLURM auto-requeue: after the signal's checkpoint, rank 0 requeues the job (a stand-in scontrol
    records its arguments)."""
    from lightning_tp.lightning.signals import requeue_slurm_job

    fake = tmp_path / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "called"}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert requeue_slurm_job() == 0 and (tmp_path / "called").read_text().split() == ["requeue", "4242"]
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert requeue_slurm_job() == 0 and (tmp_path / "called").read_text().split() == ["requeue", "77_3"]
