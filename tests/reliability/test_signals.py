"""Preemption: a SIGTERM / SIGINT to any rank stops every rank after the same step; they write one
checkpoint together and raise PreemptedError; resuming from it continues exactly."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L
import lit
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from test_strategy import Recorder

import _dist
from lightning_tp import MegatronTPStrategy, PreemptedError
from lightning_tp.lightning.checkpoint import read_meta

SIGNAL_STEP = 3


class SendSignal(L.Callback):
    """Deliver ``signum`` to this process on the ranks in ``ranks`` (what SLURM / Kubernetes / torchrun do
    on preemption): at the start of batch ``step`` (``where="batch"``), in the callbacks' ``setup`` (fit
    setting up, before the model is sharded), at the start of the sanity check, in the callbacks'
    ``on_train_end`` (after the last step's agreement), or right after the strategy's final agreement."""

    def __init__(self, signum: int, ranks: tuple[int, ...], step: int, where: str = "batch") -> None:
        self.signum, self.ranks, self.step, self.where = signum, ranks, step, where

    def _send(self, trainer, where: str) -> None:
        if where == self.where and trainer.global_rank in self.ranks:
            os.kill(os.getpid(), self.signum)

    def setup(self, trainer, pl_module, stage):
        self._send(trainer, "setup")

    def on_sanity_check_start(self, trainer, pl_module):
        self._send(trainer, "sanity")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self._send(trainer, "batch")

    def on_train_end(self, trainer, pl_module):
        self._send(trainer, "train_end")
        if self.where == "after_final_check" and trainer.global_rank in self.ranks:  # in the strategy's on_train_end
            stop = trainer.strategy.signal_stop
            check = stop.at_train_end

            def check_then_signal():
                check()
                os.kill(os.getpid(), self.signum)

            stop.at_train_end = check_then_signal


class CountingGPT(lit.LitGPT):
    """Updates a buffer in its own ``on_train_batch_end`` (as an EMA of the weights would): a checkpoint
    written at a step's end must hold that step's update."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("hook_calls", torch.zeros((), dtype=torch.float64))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.hook_calls += 1


def _corpus_data(root: str):
    """The project's data module on a small local text (bytes below lit.VOCAB): 64 blocks, 8 batches
    of 4 per data-parallel replica at DP 2."""
    from lightning_tp.data import TextDataModule

    text = Path(root) / "corpus.txt"
    if not text.exists():  # written once by the test, before the ranks start
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_text("".join(chr((7 * i) % lit.VOCAB) for i in range(64 * lit.SEQ + 64)))
    return TextDataModule(paths=[str(text)], tokenizer="byte", vocab_size=256, block_size=lit.SEQ, batch_size=4,
                          val_fraction=0.05, cache_dir=str(Path(root) / "cache"))  # fmt: skip


def _fit(root: str, steps: int, signal_spec=None, ckpt_path=None, save=True, data=False):
    with lit.external_launch(2):
        # 4 steps per epoch, the signal in step 4 (index 3): the stop is at an epoch's end, where Lightning
        # resumes a plain DataLoader exactly (mid-epoch it restarts the epoch's data unless the loader is stateful)
        model, rec = CountingGPT(batch_size=8, n_train=32, dropout=0.1), Recorder()
        callbacks = [rec, ModelCheckpoint(dirpath=os.path.join(root, "ckpts"), every_n_train_steps=2, save_top_k=-1)]
        extra = {}
        if signal_spec is not None:
            callbacks.append(SendSignal(*signal_spec))
            if signal_spec[3:] == ("sanity",):
                extra = {"num_sanity_val_steps": 1, "limit_val_batches": 1}
        # data=True: TP 1 x DP 2 on the project's data module, which resumes mid-epoch exactly
        strategy = MegatronTPStrategy(tensor_parallel_size=1 if data else 2, save_on_signal=save)
        trainer = L.Trainer(**lit.trainer_kwargs(max_steps=steps, devices=2, strategy=strategy, callbacks=callbacks,
                                                 enable_checkpointing=True, default_root_dir=root, **extra))  # fmt: skip
        delivered = []  # the process's own SIGTERM handler: it sees only a signal the strategy did not act on
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: delivered.append(signum))
        handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
        start, error = time.time(), None
        try:
            trainer.fit(model, datamodule=_corpus_data(root) if data else None, ckpt_path=ckpt_path)
        except PreemptedError as exc:
            error = {"message": str(exc), "signum": exc.signum, "step": exc.step, "checkpoint": exc.checkpoint}
        finally:
            restored = handlers == [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
            signal.signal(signal.SIGTERM, previous)
        return {"rank": dist.get_rank(), "losses": rec.losses, "error": error, "seconds": time.time() - start,
                "step": trainer.global_step, "handlers_restored": restored, "hook_calls": float(model.hook_calls),
                "own_hook": "on_train_batch_end" not in vars(model), "delivered": delivered}  # fmt: skip


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
        assert r["handlers_restored"] and r["own_hook"]  # the process's handlers and the module's hook are back
        assert r["delivered"] == []  # acted on by the strategy only
        assert r["hook_calls"] == SIGNAL_STEP + 1  # the module's on_train_batch_end ran before the checkpoint
    path = Path(stopped[0]["error"]["checkpoint"])
    assert path == tmp_path / "hpc_ckpt_1.ckpt" and stopped[1]["error"]["checkpoint"] == str(path)
    assert read_meta(path)["global_step"] == SIGNAL_STEP + 1
    assert len(list(path.glob("*.distcp"))) == 2  # every rank's shards
    resumed = _dist.run(2, _fit, root, 6, None, str(path))
    for full, stop, res in zip(uninterrupted, stopped, resumed, strict=True):
        assert stop["losses"] + res["losses"] == full["losses"]  # exactly, dropout on
        assert res["error"] is None and res["step"] == 6 and res["hook_calls"] == full["hook_calls"] == 6
        assert res["handlers_restored"] and full["handlers_restored"]


@pytest.mark.parametrize(
    ("where", "ranks"), [("setup", (1,)), ("sanity", (0,))], ids=["in-setup-rank1", "sanity-rank0"]
)
def test_signal_before_training_stops_every_rank_before_the_first_step(tmp_path, where, ranks):
    """A signal while fit sets up (the callbacks' setup, before the model is sharded) or during the sanity
    check: no rank hangs or dies; every rank stops when training starts, before its first step, without
    a checkpoint (nothing was trained), and the handlers from before fit are back."""
    for r in _dist.run(2, _fit, str(tmp_path), 6, (signal.SIGTERM, ranks, 0, where)):
        err = r["error"]
        assert err is not None and err["step"] == 0 and err["checkpoint"] is None, r
        assert "before its first training step" in err["message"] and "no checkpoint was written" in err["message"]
        assert r["losses"] == [] and r["hook_calls"] == 0 and r["handlers_restored"] and r["own_hook"]
        assert r["seconds"] < 60
    assert not list(tmp_path.glob("hpc_ckpt_*"))


def test_signal_after_the_last_step_checkpoints_the_finished_run(tmp_path):
    """A signal after the last step's agreement (the callbacks' on_train_end) is not lost: every rank
    writes hpc_ckpt_1 of the last step (the weights of that step's ModelCheckpoint) and raises. A fit for
    more steps from it that is signalled while it sets up stops before its first step, naming the checkpoint
    it started from. The requeued job (the same fit from it) ends at once, training nothing; a signal
    while that one sets up reaches the process's own handler once fit is done."""
    from lightning_tp.lightning.checkpoint import consolidate

    root = str(tmp_path)
    stopped = _dist.run(2, _fit, root, 4, (signal.SIGINT, (1,), 0, "train_end"))
    path = str(tmp_path / "hpc_ckpt_1.ckpt")
    for r in stopped:
        err = r["error"]
        assert err is not None and err["step"] == 4 and err["checkpoint"] == path and "SIGINT" in err["message"], r
        assert "after its last training step" in err["message"] and r["handlers_restored"] and r["own_hook"]
    assert read_meta(path)["global_step"] == 4
    final, at_step = consolidate(path), consolidate(tmp_path / "ckpts" / "epoch=0-step=4.ckpt")
    assert final.keys() == at_step.keys() and all(torch.equal(final[k], at_step[k]) for k in final if k != "hook_calls")
    # ModelCheckpoint (a callback) writes before the module's own on_train_batch_end; the stop holds its update
    assert float(final["hook_calls"]) == 4 and float(at_step["hook_calls"]) == 3
    again = _dist.run(2, _fit, root, 6, (signal.SIGTERM, (0,), 0, "setup"), path)
    for r in again:
        assert r["error"]["step"] == 4 and r["error"]["checkpoint"] == path and r["losses"] == []
        assert f"started from checkpoint {path}" in r["error"]["message"] and r["delivered"] == []
    assert sorted(p.name for p in tmp_path.glob("hpc_ckpt_*")) == ["hpc_ckpt_1.ckpt"]
    for r in _dist.run(2, _fit, root, 4, None, path):
        assert r["error"] is None and r["losses"] == [] and r["step"] == 4 and r["hook_calls"] == 4
    # that fit trains nothing (no training start, no stop): a signal while it sets up reaches the process's handler
    late = _dist.run(2, _fit, root, 4, (signal.SIGTERM, (1,), 0, "setup"), path)
    assert [r["delivered"] for r in late] == [[], [signal.SIGTERM]] and not [r for r in late if r["error"]]


def test_a_signal_after_the_final_check_reaches_the_process_handler(tmp_path):
    """A signal between the final agreement and the handlers being put back is delivered again, to the
    handler the process had before fit: it is not lost."""
    for r in _dist.run(2, _fit, str(tmp_path), 2, (signal.SIGTERM, (0,), 0, "after_final_check")):
        assert r["error"] is None and r["step"] == 2 and r["handlers_restored"], r
        assert r["delivered"] == ([signal.SIGTERM] if r["rank"] == 0 else [])


class HandlerAtSanityCheck(L.Callback):
    """Records whether the strategy's handler is SIGTERM's when the sanity check starts and when training does."""

    def __init__(self) -> None:
        self.ours = []

    def _record(self, trainer) -> None:
        flag = trainer.strategy.signal_flag
        self.ours.append(flag is not None and signal.getsignal(signal.SIGTERM) == flag._handle)

    def on_sanity_check_start(self, trainer, pl_module):
        self._record(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self._record(trainer)


class SignalledInSweep(lit.LitGPT):
    """SIGTERM to rank 1 at the second batch of the LR finder's sweep (the finder runs no other callbacks)."""

    def on_train_batch_start(self, batch, batch_idx):
        from lightning_tp._compat import lr_finder_running

        if lr_finder_running(self.trainer) and batch_idx == 1 and self.global_rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def _fit_with_lr_finder(root: str, in_sweep: bool = False):
    from lightning.pytorch.callbacks import LearningRateFinder

    with lit.external_launch(2):
        check = HandlerAtSanityCheck()
        finder = LearningRateFinder(num_training_steps=3, early_stop_threshold=None, update_attr=False)
        trainer = L.Trainer(**lit.trainer_kwargs(max_steps=2, devices=2, strategy=MegatronTPStrategy(tensor_parallel_size=2),
                                                 callbacks=[finder, check], num_sanity_val_steps=1, limit_val_batches=1,
                                                 default_root_dir=root))  # fmt: skip
        try:
            trainer.fit(SignalledInSweep() if in_sweep else lit.LitGPT())
        except PreemptedError as exc:
            return str(exc), exc.checkpoint
        return check.ours, trainer.global_step


def test_a_run_inside_fit_keeps_the_strategys_handlers(tmp_path):
    """The LR finder runs the fit loop inside fit (from on_fit_start): its end must not give the handlers
    back, or Lightning installs its own for the sanity check (a SIGTERM to one rank then hangs every rank).
    A signal during its sweep stops every rank without a checkpoint: the sweep's weights are not the fit's."""
    assert _dist.run(2, _fit_with_lr_finder, str(tmp_path)) == [([True, True], 2)] * 2
    for message, checkpoint in _dist.run(2, _fit_with_lr_finder, str(tmp_path), True):
        assert "in the learning-rate finder's sweep" in message and checkpoint is None
    assert not list(tmp_path.glob("hpc_ckpt_*"))


class SignalInEvaluation(L.Callback):
    """SIGTERM to rank ``rank`` at the first batch of validate / test / predict; counts the batches run."""

    def __init__(self, rank: int) -> None:
        self.rank, self.batches = rank, 0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)

    on_test_batch_start = on_predict_batch_start = on_validation_batch_start

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.batches += 1

    on_test_batch_end = on_predict_batch_end = on_validation_batch_end


def _evaluate(stage: str):
    with lit.external_launch(2):
        send, seen = SignalInEvaluation(rank=1), []
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append((signum, send.batches)))
        try:
            trainer = L.Trainer(**lit.trainer_kwargs(devices=2, strategy=MegatronTPStrategy(tensor_parallel_size=2),
                                                     callbacks=[send], limit_val_batches=2, limit_test_batches=2))  # fmt: skip
            start = time.time()
            out = getattr(trainer, stage)(lit.LitGPT())
            return {"seen": seen, "seconds": time.time() - start, "results": len(out), "batches": send.batches}
        finally:
            signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_signal_in_evaluation_acts_when_the_stage_ends(stage):
    """SIGTERM to rank 1 during validate / test / predict: no rank waits in a collective (Lightning's handler
    broadcast inside the handler: both ranks hung until the process-group timeout); the stage runs to its
    end on every rank, then the signal reaches rank 1's own handler."""
    results = _dist.run(2, _evaluate, stage)
    assert [r["seen"] for r in results] == [[], [(signal.SIGTERM, 2)]], results
    assert all(r["results"] and r["batches"] == 2 and r["seconds"] < 20 for r in results), results


def test_mid_epoch_signal_resumes_exactly_with_the_data_module(tmp_path):
    """A stop in the middle of an epoch (step 3 of 8) at DP 2: the project's data module records the
    batches done, and the resumed run (found as Lightning's SLURM auto-resume finds it, ``ckpt_path="hpc"``)
    continues with the next batch of each replica: the same losses as an uninterrupted run."""
    root = str(tmp_path / "stopped")
    _corpus_data(root), _corpus_data(str(tmp_path / "full"))
    full = _dist.run(2, _fit, str(tmp_path / "full"), 6, None, None, True, True)
    stopped = _dist.run(2, _fit, root, 6, (signal.SIGTERM, (1,), 2), None, True, True)
    assert [r["error"]["step"] for r in stopped] == [3, 3]
    resumed = _dist.run(2, _fit, root, 6, None, "hpc", True, True)
    for f, stop, res in zip(full, stopped, resumed, strict=True):
        assert len(stop["losses"]) == 3 and res["step"] == 6
        assert stop["losses"] + res["losses"] == f["losses"]


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
    from _forkserver import server
    from _procs import clean_env

    out = server().run(["-c", SECOND_SIGNAL], env=clean_env(), cwd=os.getcwd(), timeout=60)  # a process of its own
    assert out.returncode == 128 + signal.SIGINT, out.stderr
    assert "second signal (SIGINT): exiting now" in out.stderr
    assert time.time() - start < 20


SECOND_SIGNAL_IN_RENAME = """
import os, signal, sys, threading, time
from pathlib import Path
from lightning_tp.lightning.checkpoint import _replace
from lightning_tp.lightning.signals import SignalFlag
root = Path(os.environ["CKPT_ROOT"])
path, tmp = root / "step=4.ckpt", root / "tmp"
path.mkdir()
tmp.mkdir()
(tmp / "meta").write_text("new")
flag = SignalFlag()
flag.install()
flag.signum, flag._at = signal.SIGTERM, 0.0  # a first signal long ago
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # takes the signal the main thread holds
rename = Path.rename
def rename_then_signal(self, target):
    out = rename(self, target)
    if self == path:  # between the two renames: the second signal
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
    return out
Path.rename = rename_then_signal
_replace(tmp, path, root / "old")
time.sleep(30)
sys.exit(0)
"""


def test_a_second_signal_during_the_rename_exits_once_the_checkpoint_is_in_place(tmp_path):
    """With a second thread (as NCCL's watchdog, a pin-memory thread), a signal reaches the process while
    the main thread holds it: the handler still runs between the two renames. The second signal's exit
    waits until the new checkpoint is at the path."""
    from _forkserver import server
    from _procs import clean_env

    out = server().run(["-c", SECOND_SIGNAL_IN_RENAME], env=clean_env(CKPT_ROOT=str(tmp_path)), cwd=os.getcwd(),
                       timeout=60)  # fmt: skip
    assert out.returncode == 128 + signal.SIGTERM, out.stderr
    assert "exiting after the rename" in out.stderr
    assert (tmp_path / "step=4.ckpt" / "meta").read_text() == "new" and not (tmp_path / "tmp").exists()


def _assert_no_process_left(run) -> None:
    from _procs import pid_alive

    deadline = time.time() + 20  # popen's child rank ends on its own, maybe just after the main process
    while [r for r in run.records.values() if pid_alive(r["pid"])] and time.time() < deadline:
        time.sleep(0.2)
    assert not [r for r in run.records.values() if pid_alive(r["pid"])]  # no orphan left behind


def _assert_complete(ckpt: Path, step: int) -> None:
    """A finished, loadable checkpoint of ``step``: every rank's files as its manifest lists them."""
    from lightning_tp.lightning.checkpoint import consolidate, verify_files

    meta = read_meta(ckpt)
    assert meta["global_step"] == step and not verify_files(ckpt, meta["lightning_tp"]["files"])
    assert consolidate(ckpt)  # the whole model reads back


@pytest.mark.parametrize(("launch", "fault", "rank"),
                         [("popen", "signal", 1), ("spawn", "signal_parent", 0), ("external", "signal", 0)],
                         ids=["popen-rank1", "spawn-parent-forwards", "torchrun-style-rank0"])  # fmt: skip
def test_signal_through_the_launchers(tmp_path, launch, fault, rank):
    """Real processes: SIGTERM to popen's child rank only, to spawn's main process (which forwards it
    to the workers), or to rank 0 of two externally started ranks (torchrun): every process exits
    non-zero naming the signal, within seconds, after one collective checkpoint of the step in which
    the signal came."""
    from _procs import run_fault_fit

    run = run_fault_fit(tmp_path, "--fault", fault, "--rank", str(rank), "--step", "3", launch=launch)
    assert all(code != 0 for code in run.returncodes.values()), run.output[-3000:]
    assert "PreemptedError" in run.output and "SIGTERM" in run.output, run.output[-3000:]
    assert max(run.seconds_to_exit().values()) < 60, run.seconds_to_exit()
    ckpt = tmp_path / "hpc_ckpt_1.ckpt"
    assert ckpt.is_dir(), sorted(p.name for p in tmp_path.iterdir())
    _assert_complete(ckpt, 4)
    _assert_no_process_left(run)


def test_slurm_requeue_signal_checkpoints_requeues_and_the_requeued_job_resumes(tmp_path):
    """srun-style ranks with SLURM's variables (Lightning's SLURMEnvironment, auto_requeue on): SIGUSR1
    to rank 1 stops both ranks after step 4 with hpc_ckpt_1, rank 0 runs ``scontrol requeue 4242``;
    the requeued job (the same command again) resumes from hpc_ckpt_1 without being given a path."""
    from _procs import run_fault_fit

    run = run_fault_fit(tmp_path, "--fault", "requeue_signal", "--rank", "1", "--step", "3", launch="slurm")
    assert all(code != 0 for code in run.returncodes.values()), run.output[-3000:]
    assert "PreemptedError" in run.output and "SIGUSR1" in run.output, run.output[-3000:]
    assert max(run.seconds_to_exit().values()) < 60, run.seconds_to_exit()
    _assert_complete(tmp_path / "hpc_ckpt_1.ckpt", 4)
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]  # once, by rank 0
    (tmp_path / "fault.json").unlink()
    again = run_fault_fit(tmp_path, launch="slurm")
    assert all(code == 0 for code in again.returncodes.values()), again.output[-3000:]
    assert [again.records[f"rank{r}"]["start_step"] for r in range(2)] == [4, 4]
    assert [again.records[f"rank{r}"]["step"] for r in range(2)] == [6, 6]


class SignalInSave(L.Callback):
    """SIGTERM to rank 1 while the checkpoint of step 2 is being written (Lightning's hook inside the save)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.global_step == 2 and trainer.global_rank == 1 and not trainer.strategy.signal_flag.signum:
            os.kill(os.getpid(), signal.SIGTERM)


def _fit_signal_in_save(root: str):
    with lit.external_launch(2):
        callbacks = [SignalInSave(), ModelCheckpoint(dirpath=os.path.join(root, "ckpts"), every_n_train_steps=2,
                                                     save_top_k=-1)]  # fmt: skip
        trainer = L.Trainer(**lit.trainer_kwargs(max_steps=6, devices=2, strategy=MegatronTPStrategy(tensor_parallel_size=2),
                                                 callbacks=callbacks, enable_checkpointing=True, default_root_dir=root))  # fmt: skip
        with pytest.raises(PreemptedError) as info:
            trainer.fit(lit.LitGPT(batch_size=8, n_train=32))
        return info.value.step


def test_signal_during_a_save(tmp_path):
    """SIGTERM while the step-2 checkpoint is written: that save finishes (complete, loadable) and the
    ranks stop after the next step with hpc_ckpt_1 of step 3."""
    assert _dist.run(2, _fit_signal_in_save, str(tmp_path)) == [3, 3]
    _assert_complete(tmp_path / "ckpts" / "epoch=0-step=2.ckpt", 2)
    _assert_complete(tmp_path / "hpc_ckpt_1.ckpt", 3)


def test_second_signal_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    """A second SIGTERM while the step-4 checkpoint is written: that rank exits at once (143); the other
    fails promptly; the step-2 checkpoint is intact and loadable, and no step-4 checkpoint exists."""
    from _procs import run_fault_fit

    run = run_fault_fit(tmp_path, "--fault", "second_signal_in_save", "--rank", "1", "--step", "4",
                        launch="external")  # fmt: skip
    assert run.returncodes["rank1"] == 128 + signal.SIGTERM, run.output[-3000:]
    assert run.returncodes["rank0"] != 0 and "second signal (SIGTERM): exiting now" in run.output
    assert max(run.seconds_to_exit().values()) < 60, run.seconds_to_exit()
    _assert_complete(tmp_path / "ckpts" / "epoch=0-step=2.ckpt", 2)
    assert sorted(p.name for p in (tmp_path / "ckpts").glob("*.ckpt")) == ["epoch=0-step=2.ckpt"]
    assert not list(tmp_path.glob("hpc_ckpt_*"))
    _assert_no_process_left(run)


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


def _fake_trainer(module, accumulate: int = 1, **attrs):
    """What SignalStop reads of a Trainer: the module, the accumulation window, the batch progress."""
    from types import SimpleNamespace

    progress = SimpleNamespace(is_last_batch=False)
    return SimpleNamespace(accumulate_grad_batches=accumulate, num_training_batches=6, lightning_module=module,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)), **attrs)  # fmt: skip


def test_stop_waits_for_the_optimizer_step_of_an_accumulation_window():
    """With accumulate_grad_batches=4 the stop comes at the next optimizer step: batch 4 of a window, or
    the epoch's last batch, where Lightning steps with a partial window."""
    from types import SimpleNamespace

    from lightning_tp.lightning.signals import SignalStop

    strategy = SimpleNamespace(
        agreed_signals=lambda: {1: int(signal.SIGTERM)}, save_on_signal=False, requeue_signal=None
    )
    module = SimpleNamespace(on_train_batch_end=lambda outputs, batch, batch_idx: None)
    trainer = _fake_trainer(module, accumulate=4, global_step=1, world_size=2, is_global_zero=True)
    stops = []
    for batch_idx in range(6):
        try:
            SignalStop(strategy, trainer).after_batch(batch_idx)
        except PreemptedError as exc:
            stops.append(batch_idx)
            assert "rank [1]" in str(exc) and exc.checkpoint is None
    assert stops == [3, 5]


def test_stop_runs_after_the_modules_own_batch_end_hook_and_gives_it_back():
    """The stop is checked right after the LightningModule's on_train_batch_end (the checkpoint holds
    what that hook did); removing the stop gives the module its hook back, one set on the instance too."""
    from types import SimpleNamespace

    from lightning_tp.lightning.signals import SignalStop

    calls = []
    module = L.LightningModule()
    module.on_train_batch_end = lambda outputs, batch, batch_idx: calls.append(("module", batch_idx))
    own = module.on_train_batch_end
    strategy = SimpleNamespace(agreed_signals=lambda: calls.append(("agree", None)) or {})
    trainer = _fake_trainer(module)
    stop = SignalStop(strategy, trainer)
    module.on_train_batch_end(None, None, 2)
    assert calls == [("module", 2), ("agree", None)]
    stop.remove()
    assert module.on_train_batch_end is own
    plain = L.LightningModule()
    trainer.lightning_module = plain
    SignalStop(strategy, trainer).remove()
    assert "on_train_batch_end" not in vars(plain)


class HookCounter(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.calls.append(batch_idx)


def test_a_copy_of_the_module_while_training_gets_its_own_hook():
    """The wrapped hook does not keep the module from being pickled or copied during training (a callback
    saving it with torch.save, a DataLoader worker started with spawn); the copy calls its own hook only."""
    import copy
    import pickle
    from types import SimpleNamespace

    from lightning_tp.lightning.signals import SignalStop

    agreed = []
    module = HookCounter()
    SignalStop(SimpleNamespace(agreed_signals=lambda: agreed.append(1) or {}), _fake_trainer(module))
    for clone in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
        clone.on_train_batch_end(None, None, 7)
        assert clone.calls == [7] and module.calls == [] and agreed == []
    module.on_train_batch_end(None, None, 1)
    assert module.calls == [1] and agreed == [1]


@pytest.mark.parametrize("env", ["no-job-id", "no-scontrol"])
def test_a_failed_requeue_keeps_the_preempted_error(tmp_path, monkeypatch, env):
    """Rank 0 requeues after the checkpoint; when that fails (no SLURM job id, or no scontrol even
    through a shell) the stop still raises PreemptedError, saying the requeue failed."""
    from types import SimpleNamespace

    from lightning_tp.lightning.signals import SignalStop

    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    if env == "no-job-id":
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    else:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no scontrol, for the shell either
    strategy = SimpleNamespace(agreed_signals=lambda: {0: int(signal.SIGUSR1)}, save_on_signal=False,
                               requeue_signal=int(signal.SIGUSR1))  # fmt: skip
    trainer = SimpleNamespace(global_step=3, world_size=2, is_global_zero=True, ckpt_path=None,
                              lightning_module=SimpleNamespace(on_train_batch_end=None))  # fmt: skip
    with pytest.raises(PreemptedError, match="SIGUSR1") as info:
        SignalStop(strategy, trainer).at_train_end()
    expected = "the SLURM requeue failed (no SLURM job id" if env == "no-job-id" else "scontrol requeue exited with 127"
    assert expected in str(info.value) and "requeue the job by hand" in str(info.value)
