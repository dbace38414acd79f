"""Memory across data parallelism: ZeRO stages 0 / 2 / 3 at TP 2 x DP 2, and activation checkpointing.

    python benchmarks/bench_zero.py                       # GPT d256 L4 V8192 ctx128, global batch 8, CPU
    python benchmarks/bench_zero.py --n-embd 512 --steps 8

Four processes (gloo, 1 thread each) train lightning_tp.models.GPT rewritten by apply_policy at
TP 2; stage 0 wraps it in DDP over the DP group, stages 2 and 3 ``fully_shard`` it over the DP group
(``lightning_tp.lightning.zero.dp_shard``, what ``MegatronTPStrategy(zero_stage=...)`` does). Each
rank reports, after a step, the bytes of its parameters, gradients and AdamW state (this rank's
parts: TP shard, and DP part under ZeRO; at rest, between steps: stage 2 holds the whole TP shard of
the parameters only from the forward to the end of the backward), the theory for each stage, tokens/s (median over the
measured steps) and the bytes of the tensors autograd saves for backward in one forward (unique
storages, counted with ``torch.autograd.graph.saved_tensors_hooks``) without and with activation
checkpointing of every layer. Writes ``results.json`` / ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from bench_tp import spawn_variant  # noqa: E402

MB = 2**20


def _saved_bytes(step) -> int:
    """Bytes of the unique storages autograd saves for backward while ``step()`` runs its forward."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor subclass without one storage
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values())


def _worker(rank: int, world: int, port: int, name: str, cfg: dict, args: argparse.Namespace, queue) -> None:
    try:
        _measure(rank, world, port, cfg["stage"], cfg["checkpointing"], args, queue)
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put({"rank": rank, "error": traceback.format_exc()})


def _measure(rank: int, world: int, port: int, stage: int, ckpt: bool, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel

    from lightning_tp import cross_entropy
    from lightning_tp.engine.mesh import init_tp_mesh
    from lightning_tp.engine.random import model_parallel_seed
    from lightning_tp.engine.recompute import apply_activation_checkpointing
    from lightning_tp.lightning.precision import clip_grads_by_norm_
    from lightning_tp.lightning.zero import dp_mesh, dp_shard, local
    from lightning_tp.models import GPT
    from lightning_tp.models.gpt import Block
    from lightning_tp.policy import apply_policy

    mesh = init_tp_mesh(args.tp, "cpu")
    torch.manual_seed(0)
    model = GPT(args.vocab, args.ctx, args.n_layer, args.n_head, args.n_embd, 0.0, tie_weights=False)
    tracker = model_parallel_seed(1234, mesh.tp_rank, mesh.dp_rank)
    apply_policy(model, mesh.tp_group, "auto", verify=False, rng_tracker=tracker)
    if ckpt:
        apply_activation_checkpointing(model, Block, tracker)
    params = list(model.parameters())
    tp_local = sum(p.numel() for p in params)
    run = model
    if stage == 0:
        run = DistributedDataParallel(model, process_group=mesh.dp_group)
    else:
        dp_shard(model, dp_mesh(mesh.dp_group, "cpu"), stage)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(mesh.dp_rank)
    per_rank = args.batch // mesh.dp_size

    def forward():
        ids = torch.randint(0, args.vocab, (per_rank, args.ctx + 1), generator=gen)
        logits = run(ids[:, :-1])
        return cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))

    times, saved = [], 0
    for step in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        if step == 0:
            saved = _saved_bytes(forward)
        else:
            forward().backward()
        clip_grads_by_norm_(params, 1.0, mesh.tp_group, mesh.dp_group if stage else None)
        nbytes = {
            "params": sum(local(p).nbytes for p in params),
            "grads": sum(local(p.grad).nbytes for p in params if p.grad is not None),
        }
        opt.step()
        nbytes["optimizer"] = sum(
            local(t).nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0
        )
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    queue.put({"rank": rank, "step_s": statistics.median(times), "saved_bytes": saved, "tp_local_params": tp_local,
               **nbytes})  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "zero")
    args = p.parse_args()
    from lightning_tp.models import GPT

    with torch.device("meta"):
        dense = sum(x.numel() for x in GPT(args.vocab, args.ctx, args.n_layer, args.n_head, args.n_embd, 0.0,
                                           tie_weights=False).parameters())  # fmt: skip
    unsharded = 16 * dense  # fp32 parameter + gradient + AdamW exp_avg + exp_avg_sq
    rows = []
    for stage, ckpt in ((0, False), (2, False), (3, False), (3, True)):
        res = spawn_variant(_worker, f"zero{stage}", args.tp * args.dp, {"stage": stage, "checkpointing": ckpt}, args)
        n_tp = max(r["tp_local_params"] for r in res)
        # at rest (between steps): stage 2 also keeps only its DP part of the parameters; it holds the whole TP
        # shard of them from the forward to the end of the backward, stage 3 one layer's at a time
        theory = {0: 16 * n_tp, 2: 16 * n_tp / args.dp, 3: 16 * n_tp / args.dp}[stage]
        total = max(r["params"] + r["grads"] + r["optimizer"] for r in res)
        tokens = args.batch * args.ctx
        row = {
            "stage": stage, "checkpointing": ckpt,
            "params_mb": max(r["params"] for r in res) / MB, "grads_mb": max(r["grads"] for r in res) / MB,
            "optimizer_mb": max(r["optimizer"] for r in res) / MB, "total_mb": total / MB,
            "theory_mb": theory / MB, "fraction_of_unsharded": total / unsharded,
            "tokens_per_s": tokens / max(r["step_s"] for r in res),
            "saved_activation_mb": max(r["saved_bytes"] for r in res) / MB,
        }  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"params": dense, "unsharded_mb": unsharded / MB, "tp": args.tp, "dp": args.dp, "n_embd": args.n_embd,
            "n_layer": args.n_layer, "vocab": args.vocab, "ctx": args.ctx, "batch": args.batch,
            "machine": f"{os.cpu_count()} CPUs", "python": sys.version.split()[0], "torch": torch.__version__}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps({"setup": meta, "rows": rows}, indent=2))
    lines = [
        f"GPT {dense / 1e6:.1f} M params (d{args.n_embd} L{args.n_layer} V{args.vocab} ctx{args.ctx}), TP {args.tp} x DP "
        f"{args.dp}, global batch {args.batch}, fp32 AdamW, CPU gloo ({meta['machine']}). Unsharded parameter + "
        f"gradient + optimizer bytes: {unsharded / MB:.1f} MB; 1/(TP*DP) of it: {unsharded / MB / args.tp / args.dp:.1f} MB.",
        "",
        "| zero_stage | activation checkpointing | params MB | grads MB | optimizer MB | total MB/rank | theory MB | "
        "of unsharded | tokens/s | saved activations MB |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {'yes' if r['checkpointing'] else 'no'} | {r['params_mb']:.1f} | {r['grads_mb']:.1f} | "
            f"{r['optimizer_mb']:.1f} | {r['total_mb']:.1f} | {r['theory_mb']:.1f} | {r['fraction_of_unsharded']:.3f} | "
            f"{r['tokens_per_s']:.0f} | {r['saved_activation_mb']:.1f} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
