"""The registered launchers end to end: spawn (fit) and fork (validate, test, predict) from this process, and
popen (a script re-launched)."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import lit
import torch

from lightning_tp.engine.layers import ColumnParallelLinear


class PredictionFiles(L.Callback):
    """Spawned workers write what they predicted (Lightning returns no predictions under spawn)."""

    def __init__(self, out):
        self.out = str(out)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        torch.save(outputs, Path(self.out) / f"pred-rank{trainer.global_rank}-{batch_idx}.pt")


def _fresh_port():
    # Lightning's spawn launcher leaves MASTER_PORT in this process's environment; the next Trainer
    # would reuse the port of the processes that just exited. Let each launch pick a free one.
    os.environ.pop("MASTER_PORT", None)


def test_spawn_fit_then_fork_validate_test_predict(tmp_path):
    _fresh_port()
    model = lit.LitGPT(batch_size=8, n_train=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = lit.trainer_kwargs(devices=2, strategy="megatron_tp_spawn", max_steps=4, limit_val_batches=2)
    trainer = L.Trainer(**kwargs)
    trainer.fit(model)
    # The main process holds the original dense model, updated with the consolidated trained weights.
    assert not any(isinstance(m, ColumnParallelLinear) for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.model.lm_head.weight.shape == (lit.VOCAB, 32)
    # The other entry points fork their ranks (the same launcher class, no interpreter start-up each: -20 s)
    kwargs["strategy"] = "megatron_tp_fork"
    trainer = L.Trainer(**kwargs)
    _fresh_port()
    val = trainer.validate(model, verbose=False)
    _fresh_port()
    test = trainer.test(model, verbose=False)
    _fresh_port()
    trainer = L.Trainer(**{**kwargs, "callbacks": [PredictionFiles(tmp_path)]})
    assert trainer.predict(model) is None  # as with ddp_spawn
    assert val[0]["val_loss"] > 0 and test[0]["test_loss"] > 0
    files = sorted(tmp_path.glob("pred-*.pt"))
    assert len(files) == 4  # 8 samples, batch 4, 2 ranks with the same data (DP = 1)
    preds = [torch.load(f, weights_only=True) for f in files]
    assert all(p.shape == (4, lit.SEQ) for p in preds)
    assert torch.equal(preds[0], preds[2])  # both TP ranks of the replica predict the same tokens


def test_popen_launcher_script(tmp_path):
    script = Path(__file__).parent / "scripts" / "popen_fit.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("rank*.done")) == ["rank0.done", "rank1.done"]
