"""Run with `python popen_fit.py OUTDIR`: Lightning re-launches this script for rank 1 (popen)."""

import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import lit
import torch

from lightning_tp import MegatronTPStrategy

if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    strategy = MegatronTPStrategy(timeout=timedelta(seconds=60))  # "auto": TP = devices per node = 2
    trainer = L.Trainer(**lit.trainer_kwargs(devices=2, strategy=strategy, max_steps=3))
    trainer.fit(lit.LitGPT())
    assert strategy.tp_mesh.tp_size == 2 and strategy.tp_mesh.dp_size == 1
    (out / f"rank{trainer.global_rank}.done").write_text(str(trainer.global_step))
