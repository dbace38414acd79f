"""Peak host memory per rank of setting up (and one SGD step of) a large GPT under lightning_tp:
the eager path (every rank builds the dense model, then shards it) against deferred init (built on
the meta device, materialized one layer at a time), at TP 1, 2, 4 on CPU.

    python benchmarks/bench_memory.py                                  # GPT 1.56B params (d 1600, 48 layers, 32 heads)
    python benchmarks/bench_memory.py --n-embd 1024 --n-layer 24 --tp 1 2 --modes deferred   # smaller

Each configuration runs in fresh processes (gloo, 1 thread each); every rank reports its peak RSS
(``ru_maxrss``) after setup and after one SGD step on a (1, 64) batch, next to the dense model's
bytes and the target ``dense/TP + largest layer + 1 GB``. Writes ``results.json`` / ``results.md``
to ``--out``. A configuration that does not fit the machine (the eager path needs the dense model
on every rank) is skipped when ``--max-gb`` says it would not fit, and reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GB = 2**30


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux: KiB


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, mode: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from lightning_tp.engine.init import Materializer
    from lightning_tp.engine.mesh import init_tp_mesh
    from lightning_tp.models import GPT
    from lightning_tp.policy import apply_policy

    mesh = init_tp_mesh(world, "cpu")
    start = time.perf_counter()

    def build():
        return GPT(args.vocab, args.ctx, args.n_layer, args.n_head, args.n_embd, 0.0, tie_weights=True)

    if mode.startswith("deferred"):
        with torch.device("meta"):
            model = build()
        materializer = Materializer(model, "cpu", 1234)
    else:
        torch.manual_seed(1234)
        model, materializer = build(), None
    # deferred+verify: the block-by-block parity check (one dense layer at a time) after the rewrite
    apply_policy(model, mesh.tp_group, "auto", verify=mode == "deferred+verify", materializer=materializer)
    setup_s, after_setup = time.perf_counter() - start, _rss_gb()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    ids = torch.randint(0, args.vocab, (1, 64), generator=torch.Generator().manual_seed(0))
    from lightning_tp import cross_entropy

    logits = model(ids)
    cross_entropy(logits.reshape(-1, logits.size(-1)), ids.reshape(-1)).backward()
    opt.step()
    queue.put({"rank": rank, "setup_s": setup_s, "rss_setup_gb": after_setup, "rss_step_gb": _rss_gb()})
    dist.barrier()
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dense_bytes(args: argparse.Namespace) -> tuple[int, int]:
    from lightning_tp.models import GPT

    with torch.device("meta"):
        model = GPT(args.vocab, args.ctx, args.n_layer, args.n_head, args.n_embd, 0.0, tie_weights=True)
    from lightning_tp.engine.init import Materializer

    params = {id(p): p for p in model.parameters()}.values()
    units = Materializer(model, "cpu", 0).units()  # what deferred init materializes at once
    layer = max(
        sum(p.numel() * 4 for p in (u.parameters() if deep else u.parameters(recurse=False))) for _, u, deep in units
    )
    return sum(p.numel() * 4 for p in params), layer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-embd", type=int, default=1600)
    p.add_argument("--n-layer", type=int, default=48)
    p.add_argument("--n-head", type=int, default=32)  # divisible by 1, 2, 4, 8
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--modes", nargs="+", default=["eager", "deferred"], choices=["eager", "deferred", "deferred+verify"]
    )
    p.add_argument("--max-gb", type=float, default=22.0, help="skip what would not fit the machine's memory")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory")
    args = p.parse_args()
    dense, layer = _dense_bytes(args)
    print(f"GPT d{args.n_embd} L{args.n_layer}: {dense / 4 / 1e9:.2f} B params, dense fp32 {dense / GB:.2f} GB")
    rows = []
    for mode in args.modes:
        for tp in args.tp:
            need = tp * (dense * (2 if mode == "eager" else 1) / (1 if mode == "eager" else tp) + 1.5 * GB)
            if mode == "deferred+verify":
                need += tp * 4 * layer  # the dense layer, its gradient and the gathers beside the shards
            if need / GB > args.max_gb:
                rows.append({"mode": mode, "tp": tp, "skipped": f"needs ~{need / GB:.0f} GB > --max-gb"})
                print(rows[-1])
                continue
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            port = _port()
            procs = [ctx.Process(target=_worker, args=(r, tp, port, args, mode, queue)) for r in range(tp)]
            for proc in procs:
                proc.start()
            results = sorted((queue.get(timeout=3600) for _ in procs), key=lambda r: r["rank"])
            for proc in procs:
                proc.join()
            target = dense / tp + layer + GB
            row = {
                "mode": mode, "tp": tp, "setup_s": max(r["setup_s"] for r in results),
                "peak_rss_setup_gb": max(r["rss_setup_gb"] for r in results),
                "peak_rss_step_gb": max(r["rss_step_gb"] for r in results),
                "target_gb": target / GB,
            }  # fmt: skip
            row["meets_target"] = row["peak_rss_setup_gb"] <= row["target_gb"]
            rows.append(row)
            print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"n_embd": args.n_embd, "n_layer": args.n_layer, "params_b": dense / 4 / 1e9, "dense_gb": dense / GB,
            "largest_layer_gb": layer / GB, "machine": f"{os.cpu_count()} CPUs", "python": sys.version.split()[0]}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps({"model": meta, "rows": rows}, indent=2))
    lines = [
        f"GPT {meta['params_b']:.2f} B params (dense fp32 {meta['dense_gb']:.2f} GB, largest layer "
        f"{meta['largest_layer_gb']:.2f} GB), CPU, one SGD step on a (1, 64) batch; peak RSS per rank (max over ranks).",
        "",
        "| mode | TP | setup (s) | peak RSS after setup (GB) | after one step (GB) | target dense/TP + layer + 1 GB | met |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['mode']} | {r['tp']} | - | {r['skipped']} | | | |")
        else:
            lines.append(
                f"| {r['mode']} | {r['tp']} | {r['setup_s']:.0f} | {r['peak_rss_setup_gb']:.2f} | "
                f"{r['peak_rss_step_gb']:.2f} | {r['target_gb']:.2f} | {'yes' if r['meets_target'] else 'no'} |"
            )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
