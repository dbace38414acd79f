"""Training throughput of a Hugging Face Llama: lightning_tp vs transformers' own tensor parallelism.

    python benchmarks/bench_hf_llama.py            # defaults: 2 warm-up + 6 timed steps, 3 repeats
    python benchmarks/bench_hf_llama.py --quick    # smoke check (ctx 128, 1 + 2 steps, 1 repeat)

The model is ``LlamaForCausalLM`` built from a ``LlamaConfig`` (hidden 512, 4 layers, 8 heads,
4 kv heads (GQA), intermediate 1376, vocab 8192, ctx 256, untied embeddings, fp32), initialised once
with a fixed seed and saved with ``save_pretrained``; every variant loads that checkpoint with
``from_pretrained`` and trains it with AdamW in a plain PyTorch loop (no Lightning), with the user
code left unchanged::

    loss = model(input_ids=x, labels=x).loss; loss.backward(); opt.step(); opt.zero_grad()

Variants (each in freshly spawned processes, gloo on CPU):

* ``single``           one process, 2 threads
* ``single_1t``        one process, 1 thread: the per-core reference. Not a target, but on a loaded
                       machine 2 OpenMP threads that spin-wait can be several times slower than 1
                       (``OMP_WAIT_POLICY=PASSIVE`` avoids that; it is recorded in the results)
* ``lightning_tp``     2 processes x 1 thread: ``init_tp_mesh(2)`` and
                       ``apply_policy(model, mesh.tp_group, "auto", verify=False)``
* ``transformers_tp``  2 processes x 1 thread: transformers' own TP, the model's ``tp_plan``
                       (``from_pretrained(dir, distributed_config=DistributedConfig(tp_plan="auto",
                       tp_size=2))``; the older ``tp_plan="auto"`` keyword is the same, deprecated).
                       Needs ``accelerate`` installed (transformers refuses a TP load without it).

Every variant sees the same batches (random token ids from a fixed seed, the same on both TP
ranks). Tokens/s = batch * ctx / median step time of rank 0 over the timed steps, median over
repeats (variants interleaved within each repeat). The losses of the first ``--check-losses`` steps
are compared with ``single`` (relative difference; fp32 should agree to ~1e-4). Optional extra
``--comm-steps`` after the timed ones count the bytes of every collective (never timed).

Writes ``results.json`` and ``results.md`` to ``--out`` (default ``benchmarks/results/hf_llama``;
``--quick``: a temporary directory, so a smoke check does not overwrite the recorded results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from bench_tp import spawn_variant, state_bytes  # noqa: E402
from comm_counter import CommCounter  # noqa: E402

VARIANTS = ["single", "single_1t", "lightning_tp", "transformers_tp"]
DEFAULTS = {
    "hidden": 512, "layers": 4, "heads": 8, "kv_heads": 4, "intermediate": 1376, "vocab": 8192, "ctx": 256,
    "batch": 8,
}  # fmt: skip
TARGETS = {"lightning_tp / transformers_tp": 1.2, "lightning_tp / single": 0.95, "lightning_tp / single_1t": None}
LOSS_RTOL = 1e-4


# ------------------------------------------------------------------------------------------------
# Model, data
# ------------------------------------------------------------------------------------------------


def llama_config(cfg: dict, attn: str):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"], intermediate_size=cfg["intermediate"], vocab_size=cfg["vocab"],
        max_position_embeddings=cfg["ctx"], tie_word_embeddings=False, attention_dropout=0.0,
        attn_implementation=attn, dtype="float32",
    )  # fmt: skip


def save_initial_model(cfg: dict, attn: str, path: Path) -> int:
    """Initialise the model once (seed 0) and save it: every variant starts from these weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(cfg, attn))
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def make_batches(cfg: dict, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return list(torch.randint(0, cfg["vocab"], (n, cfg["batch"], cfg["ctx"]), generator=g))


def load_model(name: str, ckpt: str, attn: str):
    """The variant's model, ready for the unchanged training loop."""
    from transformers import LlamaForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": attn}
    if name == "transformers_tp":
        from transformers import DistributedConfig

        # transformers' own TP: the model's tp_plan (embed_tokens embedding_rowwise, colwise
        # q/k/v/gate/up, rowwise o/down, lm_head colwise_gather_output; norms replicated), DTensors.
        kwargs["distributed_config"] = DistributedConfig(tp_plan="auto", tp_size=dist.get_world_size())
    model = LlamaForCausalLM.from_pretrained(ckpt, **kwargs)
    if name == "lightning_tp":
        import lightning_tp

        mesh = lightning_tp.init_tp_mesh(dist.get_world_size(), "cpu")
        lightning_tp.apply_policy(model, mesh.tp_group, "auto", verify=False)
    model.train()
    return model


# ------------------------------------------------------------------------------------------------
# Worker (every rank)
# ------------------------------------------------------------------------------------------------


def _scalar(t: torch.Tensor) -> float:
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return float(t)


def _worker(rank: int, world: int, port: int, name: str, cfg: dict, args, results) -> None:
    try:
        torch.set_num_threads(args.threads * (2 if name == "single" else 1))
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
            LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        )  # fmt: skip
        if world > 1:
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                timeout=datetime.timedelta(seconds=300),
            )  # fmt: skip
        counter = CommCounter()
        counter.install()
        t_setup = time.perf_counter()
        model = load_model(name, args.ckpt, args.attn)
        setup_s = time.perf_counter() - t_setup
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        total = args.warmup + args.steps + args.comm_steps
        losses, times, comm = [], [], []
        for i, x in enumerate(make_batches(cfg, total)):
            counting = i >= args.warmup + args.steps
            if world > 1:
                dist.barrier()  # both ranks start the step together (outside the timed region)
            if counting:
                counter.start()
            t0 = time.perf_counter()
            # ---- the user's code, unchanged ----
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            # -------------------------------------
            elapsed = time.perf_counter() - t0
            if counting:
                comm.append(counter.stop())
            elif i >= args.warmup:
                times.append(elapsed)
            losses.append(_scalar(loss))
        state = state_bytes(model, [opt])  # after zero_grad: grads are None; count them as params' size
        state["grads"] = state["params"]
        results.put({
            "rank": rank,
            "losses": losses,
            "step_s": times,
            "tokens_per_s": cfg["batch"] * cfg["ctx"] / statistics.median(times),
            "comm": comm,
            "setup_s": setup_s,
            "state_bytes": state,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        })  # fmt: skip
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
    except Exception:
        results.put({"rank": rank, "error": traceback.format_exc()})


def run_variant(name: str, cfg: dict, args) -> list[dict]:
    return spawn_variant(_worker, name, 1 if name.startswith("single") else 2, cfg, args, join_s=30)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def summarize(raw: dict[str, list], errors: dict[str, str], cfg: dict, meta: dict, args) -> dict[str, Any]:
    s: dict[str, Any] = {"config": cfg, "meta": meta, "variants": {}, "errors": errors}
    for name, reps in raw.items():
        if not reps:
            continue
        tps = [rep[0]["tokens_per_s"] for rep in reps]
        last = reps[-1]
        comm_bytes = [sum(op["bytes"] for op in step.values()) for step in last[0]["comm"]]
        comm_calls = [sum(op["calls"] for op in step.values()) for step in last[0]["comm"]]
        s["variants"][name] = {
            "tokens_per_s_median": statistics.median(tps),
            "tokens_per_s_repeats": tps,
            "step_s_median": statistics.median([t for rep in reps for t in rep[0]["step_s"]]),
            "losses": last[0]["losses"],
            "losses_by_rank_agree": all(r["losses"] == last[0]["losses"] for r in last),
            "comm_mb_per_step": statistics.mean(comm_bytes) / 2**20 if comm_bytes else None,
            "comm_calls_per_step": statistics.mean(comm_calls) if comm_calls else None,
            "comm_per_op_last_step": last[0]["comm"][-1] if last[0]["comm"] else {},
            "state_mb_rank0": sum(last[0]["state_bytes"].values()) / 2**20,
            "peak_rss_mb": [r["peak_rss_mb"] for r in last],
            "setup_s": [r["setup_s"] for r in last],
        }
    v = s["variants"]
    s["ratios"] = {
        key: v[a]["tokens_per_s_median"] / v[b]["tokens_per_s_median"]
        for key in TARGETS
        for a, b in [key.split(" / ")]
        if a in v and b in v
    }
    s["targets"] = TARGETS
    n = args.check_losses
    if "single" in v:
        ref = v["single"]["losses"][:n]
        s["loss_check"] = {}
        for name, r in v.items():
            if name == "single":
                continue
            rel = [abs(a - b) / abs(b) for a, b in zip(r["losses"][:n], ref, strict=False)]
            s["loss_check"][name] = {"max_rel_diff_vs_single": max(rel), "ok": max(rel) <= LOSS_RTOL}
    return s


def markdown(s: dict[str, Any]) -> str:
    cfg, meta = s["config"], s["meta"]
    v = s["variants"]
    nrep = len(next(iter(v.values()))["tokens_per_s_repeats"]) if v else 0
    lines = [
        f"HF `LlamaForCausalLM`: hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads / "
        f"{cfg['kv_heads']} kv heads, intermediate {cfg['intermediate']}, vocab {cfg['vocab']}, ctx {cfg['ctx']}, "
        f"batch {cfg['batch']}, fp32, untied, attn `{meta['attn']}`, AdamW lr {meta['lr']}; "
        f"{cfg['params'] / 1e6:.1f}M parameters.",
        f"CPU ({os.cpu_count()} cores), torch {meta['torch']}, transformers {meta['transformers']}; "
        f"{meta['warmup']} warm-up + {meta['steps']} timed steps, median of {nrep} interleaved repeats; "
        f"OMP_WAIT_POLICY={meta['omp_wait_policy'] or 'unset'}. "
        f"Load average {meta['loadavg_start']} at start, {meta['loadavg_end']} at end.",
    ]
    if meta.get("note"):
        lines.append(f"Note: {meta['note']}")
    lines += [
        "",
        "| variant | tokens/s (median) | repeats | step (s) | comm MB/step | collectives/step "
        "| param+grad+optim MB (rank 0) | peak RSS MB/rank |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in v.items():
        comm = "-" if r["comm_mb_per_step"] is None else f"{r['comm_mb_per_step']:.1f}"
        calls = "-" if r["comm_calls_per_step"] is None else f"{r['comm_calls_per_step']:.0f}"
        lines.append(
            f"| {name} | {r['tokens_per_s_median']:,.0f} | {', '.join(f'{t:,.0f}' for t in r['tokens_per_s_repeats'])} "
            f"| {r['step_s_median']:.3f} | {comm} | {calls} | {r['state_mb_rank0']:.1f} "
            f"| {', '.join(f'{m:.0f}' for m in r['peak_rss_mb'])} |"
        )
    lines.append("")
    for key, x in s["ratios"].items():
        goal = s["targets"][key]
        verdict = "no target, reference" if goal is None else f"target >= {goal}x: {'met' if x >= goal else 'not met'}"
        lines.append(f"- {key}: **{x:.2f}x** ({verdict})")
    if "loss_check" in s:
        n = min(len(r["losses"]) for r in v.values())
        k = min(n, meta["check_losses"])
        lines.append(f"- losses of the first {k} steps (the same batches, the same initial weights):")
        for name, r in v.items():
            chk = s["loss_check"].get(name)
            tail = (
                ""
                if chk is None
                else f" (max rel diff vs single {chk['max_rel_diff_vs_single']:.1e}: {'ok' if chk['ok'] else 'MISMATCH'})"
            )
            lines.append(f"  - {name}: {', '.join(f'{x:.6f}' for x in r['losses'][:k])}{tail}")
    for name, err in s["errors"].items():
        lines.append(f"- {name} FAILED: `{err.strip().splitlines()[-1]}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 6; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 2; --quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="default 3; --quick 1")
    p.add_argument("--comm-steps", type=int, default=None, help="extra counted, untimed steps (default 1; --quick 0)")
    p.add_argument("--check-losses", type=int, default=4, help="compare the losses of this many first steps")
    p.add_argument("--quick", action="store_true", help="smoke check: ctx 128, 1 warm-up + 2 steps, 1 repeat")
    p.add_argument("--threads", type=int, default=1, help="threads per TP rank (single process: 2x)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attn_implementation, all variants")
    p.add_argument("--lr", type=float, default=1e-3)
    for key in DEFAULTS:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    p.add_argument("--note", default="", help="free text recorded with the results (e.g. machine load)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    quick = {"steps": 2, "warmup": 1, "repeats": 1, "comm_steps": 0}
    full = {"steps": 6, "warmup": 2, "repeats": 3, "comm_steps": 1}
    for k, d in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, d)
    cfg = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in DEFAULTS.items()}
    if args.quick and args.ctx is None:
        cfg["ctx"] = 128
    if args.out is None:
        args.out = (
            Path(tempfile.gettempdir()) / "bench_hf_llama_quick"
            if args.quick
            else Path(__file__).parent / "results" / "hf_llama"
        )

    import transformers

    meta = {
        "attn": args.attn, "lr": args.lr, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "comm_steps": args.comm_steps, "check_losses": args.check_losses, "threads_per_rank": args.threads,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()], "note": args.note,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "transformers_tp_enabled_by": 'LlamaForCausalLM.from_pretrained(ckpt, distributed_config='
                                      'DistributedConfig(tp_plan="auto", tp_size=2)) after init_process_group("gloo")',
    }  # fmt: skip
    raw: dict[str, list] = {name: [] for name in args.variants}
    errors: dict[str, str] = {}
    if "transformers_tp" in args.variants:
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            errors["transformers_tp"] = "transformers' tensor parallel loading needs `pip install accelerate`"
            print(f"skipping transformers_tp: {errors['transformers_tp']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_hf_llama_") as ckpt:
        cfg["params"] = save_initial_model(cfg, args.attn, Path(ckpt))
        args.ckpt = ckpt
        for rep in range(args.repeats):
            for name in args.variants:  # interleaved so drift hits every variant alike
                if name in errors:
                    continue
                t0 = time.time()
                try:
                    res = run_variant(name, cfg, args)
                except RuntimeError as e:
                    errors[name] = str(e)
                    print(f"[{rep + 1}/{args.repeats}] {name}: FAILED\n{e}", flush=True)
                    continue
                raw[name].append(res)
                print(
                    f"[{rep + 1}/{args.repeats}] {name}: {res[0]['tokens_per_s']:,.0f} tokens/s, "
                    f"losses {', '.join(f'{x:.6f}' for x in res[0]['losses'][: args.check_losses])} "
                    f"({time.time() - t0:.0f}s)",
                    flush=True,
                )
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    summary = summarize(raw, errors, cfg, meta, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    (args.out / "results.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return summary


if __name__ == "__main__":
    main()
