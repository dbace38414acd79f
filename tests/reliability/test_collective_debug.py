"""A rank that sends a mis-shaped tensor or skips a collective: with ``MegatronTPStrategy(debug=True)``
a named error on every rank within the process-group timeout, not a hang.

Without debug mode gloo cannot tell: a mis-shaped all-reduce aborts the process (SIGABRT inside
gloo) and a skipped collective leaves every rank waiting until the timeout with a generic
"Timed out waiting" error. ``debug=True`` sets ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` before the process
group exists, so torch compares op, shapes and dtypes across ranks before every collective.
"""

from __future__ import annotations

import os

import pytest
from _procs import PG_TIMEOUT_S, run_fault_fit


@pytest.mark.parametrize(
    ("fault", "names"),
    [
        ("bad_shape", ["OpType=ALLREDUCE, TensorShape=[5]", "OpType=ALLREDUCE, TensorShape=[4]"]),
        ("skip_collective", ["Rank 0 is running collective", "OpType=ALLREDUCE"]),
    ],
)
def test_debug_mode_names_collective_mismatch(tmp_path, fault, names):
    run = run_fault_fit(tmp_path, "--fault", fault, "--rank", "1", "--step", "3", "--debug", launch="external")
    log = run.output[-6000:]
    assert all(rc != 0 for rc in run.returncodes.values()), (run.returncodes, log)
    assert all(t < PG_TIMEOUT_S for t in run.seconds_to_exit().values()), (run.seconds_to_exit(), log)
    assert "Detected mismatch between collectives on ranks" in run.output, log
    for name in names:
        assert name in run.output, (name, log)
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["epoch=0-step=2.ckpt"]


def test_debug_mode_with_data_parallelism_trains(tmp_path):
    """TP 2 x DP 2 in debug mode: DDP gets a data-parallel group without the debug wrapper (torch's
    DDP segfaults on a wrapped one); training and checkpoints work."""
    run = run_fault_fit(tmp_path, "--fault", "none", "--debug", "--max-steps", "2", launch="external", world=4)
    assert run.returncodes == {f"rank{r}": 0 for r in range(4)}, run.output[-6000:]
    assert all(record["step"] == 2 for record in run.records.values())
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["epoch=0-step=2.ckpt"]


def test_enable_collective_debug_sets_the_detail_level():
    import torch.distributed as dist

    from lightning_tp.lightning.faults import enable_collective_debug

    saved, level = os.environ.pop("TORCH_DISTRIBUTED_DEBUG", None), dist.get_debug_level()
    try:
        enable_collective_debug()  # what setup_environment calls before init_process_group
        assert os.environ["TORCH_DISTRIBUTED_DEBUG"] == "DETAIL"
        assert dist.get_debug_level() == dist.DebugLevel.DETAIL
    finally:  # later tests start processes with this environment
        os.environ.pop("TORCH_DISTRIBUTED_DEBUG", None)
        if saved is not None:
            os.environ["TORCH_DISTRIBUTED_DEBUG"] = saved
        dist.set_debug_level(level)
