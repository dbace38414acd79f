"""One rank fails mid-epoch: every rank exits non-zero within the process-group timeout, and no
checkpoint claims progress it does not hold.

Real processes run ``scripts/fault_fit.py`` (TP 2 on 2 CPU ranks, gloo, a 20 s process-group
timeout, ModelCheckpoint every 2 steps and Lightning's ``OnExceptionCheckpoint``) with one fault
injected at global step 3 on one rank: in ``training_step``, in a DataLoader worker, in a callback.
The launchers: ``external`` (both ranks started by the test, like torchrun/SLURM, each exit code
seen), ``popen`` (Lightning re-launches the script for rank 1) and ``spawn``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import lit
import pytest
import torch
from _procs import PG_TIMEOUT_S, pid_alive, run_fault_fit
from lightning.pytorch.callbacks import ModelCheckpoint

import _dist
from lightning_tp import MegatronTPStrategy, consolidate
from lightning_tp.lightning.checkpoint import read_meta

GOOD_STEP = 2  # checkpoints every 2 steps, the fault at step 3: the last good checkpoint holds step 2


def _fit_reference(ckpt_dir: str) -> int:
    """The fault-free run of the script's model up to the last good checkpoint."""
    with lit.external_launch(2):
        trainer = L.Trainer(
            **lit.trainer_kwargs(devices=2, strategy=MegatronTPStrategy(tensor_parallel_size=2), max_steps=GOOD_STEP,
                                 callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1)],
                                 enable_checkpointing=True)
        )  # fmt: skip
        trainer.fit(lit.LitGPT(batch_size=8, n_train=64))
        return trainer.global_step


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    ckpt_dir = tmp_path_factory.mktemp("reference")
    assert _dist.run(2, _fit_reference, str(ckpt_dir)) == [GOOD_STEP, GOOD_STEP]
    return consolidate(next(ckpt_dir.glob(f"*step={GOOD_STEP}.ckpt")))


def assert_only_good_checkpoint(ckpt_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    """Only the step-2 checkpoint exists (no on-exception checkpoint, no temporary or half-moved
    directory), it says step 2 and holds exactly the weights of a fault-free run after 2 steps."""
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert names == [f"epoch=0-step={GOOD_STEP}.ckpt"], names
    path = ckpt_dir / names[0]
    assert read_meta(path)["global_step"] == GOOD_STEP
    weights = consolidate(path)  # verifies sizes and checksums of every file
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in weights)
    lit.LitGPT().load_state_dict(weights, strict=True)


@pytest.mark.parametrize(
    ("fault", "rank", "launch"),
    [
        ("training_step", 1, "external"),
        ("dataloader", 0, "external"),
        ("callback", 1, "popen"),
        ("training_step", 1, "spawn"),
    ],
    ids=["training_step-rank1-external", "dataloader-rank0-external", "callback-rank1-popen", "training_step-spawn"],
)
def test_one_rank_raises_every_rank_exits(tmp_path, reference_weights, fault, rank, launch):
    run = run_fault_fit(tmp_path, "--fault", fault, "--rank", str(rank), "--step", "3", launch=launch)
    log = run.output[-6000:]
    # every process the test started exits non-zero ...
    assert run.returncodes and all(rc != 0 for rc in run.returncodes.values()), (run.returncodes, log)
    # ... every rank raised (popen: rank 1 is Lightning's child; spawn: the workers' errors reach the main process)
    expected = {"external": {"rank0", "rank1"}, "popen": {"rank0", "rank1"}, "spawn": {"main"}}[launch]
    assert set(run.records) == expected, (run.records.keys(), log)
    assert all(r["error"] for r in run.records.values()), log
    # ... within the process-group timeout after the fault (most exit within a second: the faulted rank
    # enters no collective, so its peers see its connection close instead of waiting for it)
    assert all(t < PG_TIMEOUT_S for t in run.seconds_to_exit().values()), (run.seconds_to_exit(), log)
    if launch == "popen":
        assert not pid_alive(run.records["rank1"]["pid"])  # no orphan left behind
    # the original error is what the faulted rank reports (not masked by a failing on-exception save)
    injected = {"training_step": "injected fault in training_step", "dataloader": "injected fault: cannot read",
                "callback": "injected fault in a callback"}[fault]  # fmt: skip
    faulted = run.records["main" if launch == "spawn" else f"rank{rank}"]
    assert injected in faulted["error"] + faulted["trace"], faulted
    # OnExceptionCheckpoint asked for a checkpoint on every interrupted process: refused, with a warning
    assert "not writing checkpoint" in run.output and "on_exception.ckpt" in run.output
    assert_only_good_checkpoint(tmp_path / "ckpts", reference_weights)
