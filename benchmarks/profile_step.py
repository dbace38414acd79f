"""Where a training step's time goes: one ``bench_tp.py`` variant (one process) under torch.profiler.

    python benchmarks/profile_step.py single --preset gpt2-medium        # on a GPU: bf16-mixed
    python benchmarks/profile_step.py lightning_tp_tp1 --preset gpt2-medium

Runs the variant as ``bench_tp.py`` does (same model, data, Trainer, precision), profiles ``--active``
steps after ``--warmup`` and prints the operators with the most device (CPU: host) time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_tp  # noqa: E402
from comm_counter import CommCounter  # noqa: E402


class _Profile(L.Callback):
    def __init__(self, warmup: int, active: int) -> None:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=acts)
        self.warmup, self.active, self.step = warmup, active, 0

    def on_train_batch_start(self, *a, **k):
        if self.step == self.warmup:
            self.prof.__enter__()

    def on_train_batch_end(self, *a, **k):
        self.step += 1
        if self.step == self.warmup + self.active:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("variant", choices=sorted(bench_tp.SINGLE_DEVICE))
    p.add_argument("--preset", choices=sorted(bench_tp.PRESETS), default="cpu")
    for key in bench_tp.PRESETS["cpu"]:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--active", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--compile", nargs="?", const="blocks", choices=["blocks", "model"], default=None)
    ns = p.parse_args()
    cuda = torch.cuda.is_available()
    cfg = {k: getattr(ns, k) if getattr(ns, k) is not None else v for k, v in bench_tp.PRESETS[ns.preset].items()}
    cfg.update(flops_per_batch=bench_tp.model_flops_per_batch(cfg), compile=ns.compile)
    cfg.update(accelerator="cuda" if cuda else "cpu", precision="bf16-mixed" if cuda else "32-true")
    args = argparse.Namespace(warmup=ns.warmup + ns.active, steps=1, comm_steps=0, threads=1, **{
        k: cfg[k] for k in ("accelerator", "precision")})  # fmt: skip
    prof = _Profile(ns.warmup, ns.active)
    make = bench_tp._lightning_callbacks
    bench_tp._lightning_callbacks = lambda timer: [*make(timer), prof]
    timer, _ = bench_tp.RUNNERS[ns.variant](cfg, args, CommCounter())
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"== {ns.variant}: {cfg}; step {timer.times[-1]:.4f} s (after profiling)")
    print(prof.prof.key_averages().table(sort_by=key, row_limit=ns.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
