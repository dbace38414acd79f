"""The language-model loss alone: time, memory and precision of each way to compute it, on one device.

    python benchmarks/bench_loss.py                          # CPU: 1024 tokens, vocab 50304, bf16 logits
    python benchmarks/bench_loss.py --tokens 8192 --compiled # CUDA: gpt2-medium's loss (batch 8 x ctx 1024)

Part of the gap between plain Lightning and ``MegatronTPStrategy`` at TP 1 in ``bench_tp.py`` is the
loss: plain Lightning's ``F.cross_entropy`` on bf16 logits (``bf16-true``) computes in bf16, the
strategy's vocab-parallel loss (on a group of one at TP 1) in fp32, as Megatron does. This script
times forward + backward of each on the same ``(tokens, vocab)`` logits and measures the error of the
loss and of the logits' gradient against float64:

* ``F``                ``F.cross_entropy(logits, target)``, in the logits' dtype
* ``F_fp32``           ``F.cross_entropy(logits.float(), target)``
* ``vocab_parallel``   ``lightning_tp.vocab_parallel_cross_entropy`` on a group of one, unfused (``fused=False``),
                       with the head's reusable workspace (the strategy's default on CPU)
* ``vocab_parallel_fused`` the same with ``fused=True``: two compiled kernels, no float32 copy of the logits
                       (the strategy's default on CUDA, ``loss_fusion``)
* ``*_compiled``       (``--compiled``) the same functions under ``torch.compile`` (inductor)

Reports the median of ``--repeats`` timed calls after ``--warmup``, peak memory above the logits
(CUDA only) and the errors; writes ``loss.json`` and ``loss.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _group_of_one(device: torch.device):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    return dist.group.WORLD


def variants(group, vocab: int, compiled: bool) -> dict:
    from lightning_tp import vocab_parallel_cross_entropy
    from lightning_tp.engine.loss import LossWorkspace

    workspace = LossWorkspace()
    out = {
        "F": lambda z, t: F.cross_entropy(z, t),
        "F_fp32": lambda z, t: F.cross_entropy(z.float(), t),
        "vocab_parallel": lambda z, t: vocab_parallel_cross_entropy(
            z, t, group, vocab, workspace=workspace, fused=False
        ),
        "vocab_parallel_fused": lambda z, t: vocab_parallel_cross_entropy(z, t, group, vocab, fused=True),
    }
    if compiled:
        out["F_compiled"] = torch.compile(out["F"])
        out["F_fp32_compiled"] = torch.compile(out["F_fp32"])
        out["vocab_parallel_compiled"] = torch.compile(lambda z, t: vocab_parallel_cross_entropy(z, t, group, vocab))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, logits: torch.Tensor, target: torch.Tensor, ref_loss: float, ref_grad: torch.Tensor, args) -> dict:
    device = logits.device
    times = []
    for i in range(args.warmup + args.repeats):
        logits.grad = None
        _sync(device)
        if device.type == "cuda" and i == args.warmup:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        loss = fn(logits, target)
        loss.backward()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    grad = logits.grad.double()
    return {
        "ms": 1e3 * statistics.median(times),
        "peak_mib_above_logits": peak,
        "loss_rel_err": abs(float(loss.detach()) - ref_loss) / abs(ref_loss),
        "grad_max_rel_err": float((grad - ref_grad).abs().max() / ref_grad.abs().max()),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=None, help="rows of logits; default 8192 on CUDA, 1024 on CPU")
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compiled", action="store_true", help="also the torch.compile'd functions (inductor)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "loss")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    tokens = args.tokens or (8192 if device.type == "cuda" else 1024)
    group = _group_of_one(device)
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(tokens, args.vocab, device=device, generator=gen) * 2).to(DTYPES[args.dtype])
    target = torch.randint(0, args.vocab, (tokens,), device=device, generator=gen)
    exact = logits.double().requires_grad_()  # the same rounded logits, float64
    ref = F.cross_entropy(exact, target)
    ref.backward()
    ref_loss, ref_grad = float(ref), exact.grad
    del exact
    logits.requires_grad_()
    rows = {}
    for name, fn in variants(group, args.vocab, args.compiled).items():
        rows[name] = measure(fn, logits, target, ref_loss, ref_grad, args)
        print(name, rows[name], flush=True)
    dist.destroy_process_group()

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({args.threads} threads)"
    head = (f"Loss forward + backward on ({tokens}, {args.vocab}) {args.dtype} logits, {where}, torch "
            f"{torch.__version__}; median of {args.repeats} after {args.warmup} warm-up calls; errors against float64.")  # fmt: skip
    lines = [head, "", "| loss | ms | peak MiB above the logits | loss rel. error | grad max rel. error |",
             "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, r in rows.items():
        peak = "-" if r["peak_mib_above_logits"] is None else f"{r['peak_mib_above_logits']:.0f}"
        lines.append(f"| {name} | {r['ms']:.2f} | {peak} | {r['loss_rel_err']:.1e} | {r['grad_max_rel_err']:.1e} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loss.md").write_text("\n".join(lines) + "\n")
    meta = {"tokens": tokens, "vocab": args.vocab, "dtype": args.dtype, "device": where, "torch": torch.__version__}
    (args.out / "loss.json").write_text(json.dumps({"config": meta, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
