"""Throughput, memory and communication of lightning_tp against its anchors, on one machine.

    python benchmarks/bench_tp.py                      # CPU defaults: GPT d512 L4 V8192 ctx256 b8, fp32
    python benchmarks/bench_tp.py --steps 4 --repeats 1 --variants lightning_tp dtensor   # quick

Variants, all training the same GPT (lightning_tp.models.GPT, untied head) with AdamW (fused on CUDA) on the same
global batch:

* ``single``               one process (all cores), Lightning Trainer
* ``lightning_tp``         MegatronTPStrategy TP=2, vocab-sharded logits + vocab-parallel loss
* ``lightning_tp_gather``  the same with gathered logits (the default for unchanged user code)
* ``model_parallel``       Lightning's ModelParallelStrategy with the equivalent torch DTensor plan
                           (ColwiseParallel / RowwiseParallel, loss_parallel)
* ``ddp``                  Lightning DDP, 2 processes
* ``dtensor``              raw torch DTensor TP=2, no Lightning
* ``lightning_tp_sp``      ``lightning_tp`` with Megatron sequence parallelism (``sequence_parallel=True``)
* ``lightning_tp_tp1``     MegatronTPStrategy at TP=1 on one device: the strategy's own cost against ``single``
* ``lightning_tp_tp1_gather`` the same with gathered logits, so the loss is ``F.cross_entropy`` as in ``single``
                           (in the logits' dtype) instead of the vocab-parallel loss (fp32): the strategy's cost
                           apart from the loss's precision
* ``lightning_tp_compute`` ``lightning_tp`` with every collective turned into a no-op after setup:
                           not a result, the compute floor of the same engine (how fast TP=2 could
                           be with free communication); bounds the ratio any engine can reach

CUDA path: ``--accelerator cuda`` (the default when a GPU is present) runs the same variants on
GPUs with NCCL and ``--precision bf16-mixed``; ``--preset gpt2-medium --variants single`` is the
TP=1 MFU run. Model FLOPs per step come from ``measure_flops`` on a meta-device copy of the dense
model and MFU from Lightning's ``ThroughputMonitor`` (``Throughput`` for raw DTensor), which knows
the GPU's peak FLOPs (an H100 SXM / H200 is taken at its dense bf16/fp16 peak, 989.4 TFLOP/s, and
the report says so: Lightning's table misses the name "NVIDIA H200" and lists its H200 entries with
sparsity); on CPU there is no peak, so FLOP/s are reported without MFU. Variants that
need more GPUs than present are skipped with a message.

``--compile`` (or ``--compile blocks``): every variant ``torch.compile``s each transformer block (inductor;
``lightning_tp.engine.compiled.compile_layers``); ``--compile model``: the whole model (``module.compile()``; for
lightning_tp the vocab-sharded logits come out of the graph and the vocab-parallel loss runs on them). The report
adds the compiled graphs and graph breaks per variant; compare with an eager run in another ``--out``.

Writes ``results.json``, ``results.md`` and ``results.png`` to ``--out``. Each rank counts the
bytes, calls and time of every collective in the measured steps (the torch.distributed functions
are wrapped), and the report compares them with Megatron's minimum for this model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import resource
import socket
import statistics
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from comm_counter import CommCounter  # noqa: E402

VARIANTS = [
    "single", "lightning_tp", "lightning_tp_gather", "model_parallel", "ddp", "dtensor", "lightning_tp_compute",
    "lightning_tp_sp", "lightning_tp_tp1", "lightning_tp_tp1_gather",
]  # fmt: skip
SINGLE_DEVICE = {
    "single",
    "lightning_tp_tp1",
    "lightning_tp_tp1_gather",
}  # one process; every other variant runs TP 2 / 2 ranks
PRESETS = {
    "cpu": {"n_embd": 512, "n_layer": 4, "n_head": 8, "vocab": 8192, "ctx": 256, "batch": 8},
    "gpt2-medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16, "vocab": 50304, "ctx": 1024, "batch": 8},
}


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------


def build_gpt(cfg: dict) -> torch.nn.Module:
    from lightning_tp.models import GPT

    torch.manual_seed(0)
    return GPT(cfg["vocab"], cfg["ctx"], cfg["n_layer"], cfg["n_head"], cfg["n_embd"], 0.0, tie_weights=False)


def model_flops_per_batch(cfg: dict) -> int:
    """Forward + backward FLOPs of the dense model for one global batch, counted on the meta device."""
    from lightning.fabric.utilities.throughput import measure_flops

    from lightning_tp.models import GPT

    with torch.device("meta"):
        model = GPT(cfg["vocab"], cfg["ctx"], cfg["n_layer"], cfg["n_head"], cfg["n_embd"], 0.0, tie_weights=False)
        x = torch.zeros(cfg["batch"], cfg["ctx"], dtype=torch.long)
    return measure_flops(model, lambda: model(x), loss_fn=torch.Tensor.sum)


def batches(cfg: dict, n: int, per_rank: int, rank_offset: int = 0):
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg["vocab"], (n * cfg["batch"], cfg["ctx"] + 1), generator=g)
    out = []
    for i in range(n):
        chunk = data[i * cfg["batch"] : (i + 1) * cfg["batch"]][rank_offset * per_rank : (rank_offset + 1) * per_rank]
        out.append((chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()))
    return out


def state_bytes(module: torch.nn.Module, optimizers: list) -> dict[str, int]:
    params = list(module.parameters())

    def nbytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    opt_state = sum(
        nbytes(v) for opt in optimizers for st in opt.state.values() for v in st.values() if torch.is_tensor(v)
    )
    return {
        "params": sum(nbytes(p) for p in params),
        "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
        "optimizer": opt_state,
    }


class Timer:
    """Step phases: ``warmup`` untimed steps, ``steps`` timed steps (no instrumentation at all),
    then ``comm_steps`` steps with every collective counted (wrapping the collectives costs
    Python-level time on every op, so those steps are never used for throughput)."""

    def __init__(self, args, counter: CommCounter) -> None:
        self.warmup, self.timed, self.counter = args.warmup, args.steps, counter
        self.cuda = args.accelerator == "cuda"
        self.throughput: dict[str, float] = {}  # ThroughputMonitor's metrics after the timed steps
        self.on_timed_end = None  # called once, when the last timed step has been measured
        self.total = args.warmup + args.steps + args.comm_steps
        self.times: list[float] = []  # timed steps
        self.counted_times: list[float] = []  # steps under the collective counter
        self.comm: list[dict] = []
        self._t0 = 0.0
        self._step = 0

    def _counting(self) -> bool:
        return self._step >= self.warmup + self.timed

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        if self._counting():
            self.counter.start()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._t0
        if self._counting():
            self.counted_times.append(elapsed)
            self.comm.append(self.counter.stop())
        elif self._step >= self.warmup:
            self.times.append(elapsed)
            if len(self.times) == self.timed and self.on_timed_end is not None:
                self.on_timed_end()
        self._step += 1


def _lightning_callbacks(timer: Timer) -> list:
    """Lightning's ThroughputMonitor (FLOP/s, MFU where the device's peak is known) and the step
    timer; the monitor's window is the timed steps, read when the last of them ends (rank 0)."""
    import lightning as L
    from lightning.pytorch.callbacks import ThroughputMonitor
    from lightning.pytorch.trainer.states import RunningStage

    monitor = ThroughputMonitor(
        batch_size_fn=lambda batch: batch[0].size(0), length_fn=lambda batch: batch[0].numel(),
        window_size=max(2, timer.timed),
    )  # fmt: skip

    def read() -> None:
        tp = monitor._throughputs.get(RunningStage.TRAINING)
        if tp is not None and dist_rank() == 0:
            timer.throughput = {k: float(v) for k, v in tp.compute().items()}

    timer.on_timed_end = read

    class _CB(L.Callback):
        def on_train_batch_start(self, *a, **k):
            timer.start()

        def on_train_batch_end(self, *a, **k):
            timer.stop()

    return [monitor, _CB()]  # the monitor updates before the timer reads it


def dist_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def compile_model(model: torch.nn.Module, how) -> None:
    """``how``: falsy (eager), ``"model"`` (the whole model) or ``"blocks"`` / ``True`` (each transformer block)."""
    if how == "model":
        model.compile()
    elif how:
        from lightning_tp.engine.compiled import compile_layers

        compile_layers(model)


def _lit_module(cfg: dict, n_batches: int, per_rank: int, loss_fn=None, configure=None):
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_tp import cross_entropy

    class LitBench(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build_gpt(cfg)
            self.flops_per_batch = cfg["flops_per_batch"]  # dense model, global batch (ThroughputMonitor)

        def forward(self, x):
            return self.model(x)

        def configure_model(self):
            if configure is not None:
                configure(self)

        def on_fit_start(self):
            compile_model(self.model, cfg.get("compile"))  # after the strategy's rewrite

        def training_step(self, batch, _):
            x, y = batch
            logits = self(x)
            if loss_fn is not None:
                return loss_fn(logits, y)
            return cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

        def backward(self, loss, *args, **kwargs):
            if loss_fn is not None and hasattr(loss_fn, "backward"):
                loss_fn.backward(loss)
            else:
                loss.backward()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4, fused=cfg["accelerator"] == "cuda")

        def train_dataloader(self):
            return DataLoader(_List(batches(cfg, n_batches, per_rank)), batch_size=None)

    return LitBench()


class _List(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _trainer(args, strategy, devices: int, timer: Timer):
    import lightning as L

    return L.Trainer(
        accelerator=args.accelerator, devices=devices, strategy=strategy, precision=args.precision,
        max_steps=timer.total, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, callbacks=_lightning_callbacks(timer),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Variants (run on every rank; rank 0's result is reported)
# ------------------------------------------------------------------------------------------------


def run_single(cfg, args, counter):
    timer = Timer(args, counter)
    model = _lit_module(cfg, timer.total, cfg["batch"])
    trainer = _trainer(args, "auto", 1, timer)
    trainer.fit(model)
    return timer, state_bytes(model, trainer.optimizers)


def _lightning_tp(cfg, args, counter, gather: bool, comm: bool = True, sp: bool = False, tp: int = 2):
    from lightning_tp import MegatronTPStrategy

    policy = {
        "model.transformer.h.*.attn.c_attn": "qkv",
        "model.transformer.h.*.attn.c_proj": "row",
        "model.transformer.h.*.mlp.c_fc": "column",
        "model.transformer.h.*.mlp.c_proj": "row",
        "model.transformer.wte": "vocab",
        "model.transformer.wpe": "replicate",
        "model.lm_head": {"style": "vocab", "gather_output": gather},
    }
    timer = Timer(args, counter)
    model = _lit_module(cfg, timer.total, cfg["batch"])
    strategy = MegatronTPStrategy(
        tensor_parallel_size=tp, policy=policy, sequence_parallel=sp, timeout=datetime.timedelta(seconds=120),
        loss_fusion=cfg.get("loss_fusion"),
    )  # fmt: skip
    trainer = _trainer(args, strategy, tp, timer)
    if not comm:
        trainer.callbacks.append(_NoCollectives())
    trainer.fit(model)
    return timer, state_bytes(model, trainer.optimizers)


def _NoCollectives():
    """From the first training batch on, all-reduce, all-gather and reduce-scatter return at once
    without communicating (values are wrong, shapes are right): what remains is compute."""
    import lightning as L

    names = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor")

    class _Done:
        def wait(self):
            return True

    class NoCollectives(L.Callback):
        def on_train_start(self, *_):
            self.saved = {n: getattr(dist, n) for n in names}
            for n in names:
                setattr(dist, n, lambda *a, **k: _Done() if k.get("async_op") else None)

        def on_train_end(self, *_):
            for n, fn in self.saved.items():
                setattr(dist, n, fn)

    return NoCollectives()


def run_lightning_tp(cfg, args, counter):
    return _lightning_tp(cfg, args, counter, gather=False)


def run_lightning_tp_gather(cfg, args, counter):
    return _lightning_tp(cfg, args, counter, gather=True)


def run_lightning_tp_sp(cfg, args, counter):
    return _lightning_tp(cfg, args, counter, gather=False, sp=True)


def run_lightning_tp_tp1(cfg, args, counter):
    return _lightning_tp(cfg, args, counter, gather=False, tp=1)


def run_lightning_tp_tp1_gather(cfg, args, counter):
    return _lightning_tp(cfg, args, counter, gather=True, tp=1)


def run_lightning_tp_compute(cfg, args, counter):
    return _lightning_tp(cfg, args, counter, gather=False, comm=False)


def dtensor_parallelize(model: torch.nn.Module, tp_mesh) -> None:
    """The torch DTensor plan equivalent to lightning_tp's policy (q/k/v rows reordered so each
    rank's contiguous shard holds whole heads of q, k and v, as lightning_tp's qkv style does)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lightning_tp.engine.sharding import ShardSpec

    tp = tp_mesh.size()
    plan: dict[str, Any] = {
        "transformer.wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False),
    }
    for i, block in enumerate(model.transformer.h):
        attn = block.attn
        spec = ShardSpec(dim=0, sizes=(attn.n_embd,) * 3, tp_size=tp)
        with torch.no_grad():
            for p in (attn.c_attn.weight, attn.c_attn.bias):
                p.copy_(torch.cat([spec.shard(p, r) for r in range(tp)]))
        attn.n_head //= tp
        attn.n_embd //= tp
        plan.update({
            f"transformer.h.{i}.attn.c_attn": ColwiseParallel(),
            f"transformer.h.{i}.attn.c_proj": RowwiseParallel(),
            f"transformer.h.{i}.mlp.c_fc": ColwiseParallel(),
            f"transformer.h.{i}.mlp.c_proj": RowwiseParallel(),
        })  # fmt: skip
    parallelize_module(model, tp_mesh, plan)


class _LossParallel:
    def __call__(self, logits, y):
        from torch.distributed.tensor.parallel import loss_parallel

        with loss_parallel():
            return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def backward(self, loss):
        from torch.distributed.tensor.parallel import loss_parallel

        with loss_parallel():
            loss.backward()


def run_model_parallel(cfg, args, counter):
    from lightning.pytorch.strategies import ModelParallelStrategy

    timer = Timer(args, counter)

    def configure(module):
        dtensor_parallelize(module.model, module.device_mesh["tensor_parallel"])

    model = _lit_module(cfg, timer.total, cfg["batch"], loss_fn=_LossParallel(), configure=configure)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    trainer = _trainer(args, strategy, 2, timer)
    trainer.fit(model)
    return timer, state_bytes(model, trainer.optimizers)


def run_ddp(cfg, args, counter):
    timer = Timer(args, counter)
    per_rank = cfg["batch"] // 2
    model = _lit_module(cfg, timer.total, per_rank)
    # each rank reads its half of every global batch
    rank = dist.get_rank()
    model.train_dataloader = lambda: torch.utils.data.DataLoader(
        _List(batches(cfg, timer.total, per_rank, rank)), batch_size=None
    )
    trainer = _trainer(args, "ddp", 2, timer)
    trainer.fit(model)
    return timer, state_bytes(model, trainer.optimizers)


def run_dtensor(cfg, args, counter):
    from lightning.fabric.utilities.throughput import Throughput, get_available_flops
    from torch.distributed.device_mesh import init_device_mesh

    device = torch.device(args.accelerator, dist.get_rank()) if args.accelerator == "cuda" else torch.device("cpu")
    mesh = init_device_mesh(device.type, (2,), mesh_dim_names=("tensor_parallel",))
    model = build_gpt(cfg).to(device)
    dtensor_parallelize(model, mesh)
    compile_model(model, cfg.get("compile"))  # as the other variants
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cfg["accelerator"] == "cuda")
    loss_fn = _LossParallel()
    timer = Timer(args, counter)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    # the same FLOP/s and MFU bookkeeping ThroughputMonitor does, through the class it uses
    throughput = Throughput(available_flops=get_available_flops(device, dtype or torch.float32), world_size=2,
                            window_size=max(2, timer.timed))  # fmt: skip
    t_start, done = time.perf_counter(), 0

    def read() -> None:
        timer.throughput = {k: float(v) for k, v in throughput.compute().items()}

    timer.on_timed_end = read
    for x, y in batches(cfg, timer.total, cfg["batch"]):
        x, y = x.to(device), y.to(device)
        timer.start()
        opt.zero_grad(set_to_none=True)  # at the start, as Lightning does: grads count in the memory
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        loss_fn.backward(loss)
        opt.step()
        done += 1
        throughput.update(time=time.perf_counter() - t_start, batches=done, samples=done * cfg["batch"],
                          flops=cfg["flops_per_batch"])  # fmt: skip
        timer.stop()
    return timer, state_bytes(model, [opt])


RUNNERS = {name: globals()[f"run_{name}"] for name in VARIANTS}


# ------------------------------------------------------------------------------------------------
# Process management
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, name: str, cfg: dict, args, results) -> None:
    try:
        torch.set_num_threads(args.threads * (2 if world == 1 else 1))
        cuda = args.accelerator == "cuda"
        if cuda:
            torch.cuda.set_device(rank)
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
            LOCAL_RANK=str(rank), NODE_RANK="0",
        )  # fmt: skip
        if world > 1:
            dist.init_process_group(
                "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                timeout=datetime.timedelta(seconds=120),
            )  # fmt: skip
        counter = CommCounter()
        counter.install()
        timer, mem = RUNNERS[name](cfg, args, counter)
        from lightning_tp._compat import compile_counts  # what torch.compile traced (zero when not compiling)

        graphs, breaks = compile_counts()

        tokens = cfg["batch"] * cfg["ctx"]
        out = {
            "rank": rank,
            "step_s": timer.times,
            "tokens_per_s": tokens / statistics.median(timer.times),
            "comm": timer.comm,
            "counted_step_s": timer.counted_times,
            "bytes": mem,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "throughput": timer.throughput,
            "graphs": graphs,
            "graph_breaks": breaks,
        }
        results.put(out)
    except Exception:
        results.put({"rank": rank, "error": traceback.format_exc()})


def spawn_variant(worker, name: str, world: int, cfg: dict, args, join_s: float = 10) -> list[dict]:
    """Run ``worker(rank, world, port, name, cfg, args, results)`` in ``world`` spawned processes and
    return their result dicts by rank; the first error (or a time-out of ``args.timeout``) raises."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, name, cfg, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = []
    try:
        for _ in range(world):
            out.append(results.get(timeout=args.timeout))
            if "error" in out[-1]:
                break
    except queue.Empty:
        out.append({"rank": -1, "error": f"{name} timed out after {args.timeout}s"})
    for p in procs:
        p.join(timeout=join_s)
        if p.is_alive():
            p.kill()
    failed = [r for r in out if "error" in r]
    if failed:
        raise RuntimeError(f"variant {name} failed (rank {failed[0]['rank']}):\n{failed[0]['error']}")
    return sorted(out, key=lambda r: r["rank"])


def run_variant(name: str, cfg: dict, args) -> list[dict]:
    return spawn_variant(_worker, name, 1 if name in SINGLE_DEVICE else 2, cfg, args)


# ------------------------------------------------------------------------------------------------
# Theory and report
# ------------------------------------------------------------------------------------------------


def megatron_minimum(cfg: dict, tp: int, gathered_logits: bool) -> dict[str, int]:
    """Bytes per training step that Megatron-style TP must communicate for this model (activations
    in fp32, or 2 bytes under 16-bit precision, except the embedding's output under mixed precision,
    which keeps the fp32 parameters' dtype as ``nn.Embedding`` does under autocast; the loss's
    reductions are always fp32).

    Forward: the vocab-parallel embedding's all-reduce (b*s*h) and 2 all-reduces of b*s*h per layer
    (attention and MLP outputs). Backward: 2 per layer (grads of the attention and MLP inputs) and
    one for the LM head's input grad. Loss: vocab-parallel cross entropy needs 3 all-reduces of b*s
    values (max, target logit, sum of exp); gathered logits need an all-gather of b*s*V instead.
    """
    b, s, h, L, V = cfg["batch"], cfg["ctx"], cfg["n_embd"], cfg["n_layer"], cfg["vocab"]
    precision = cfg.get("precision", "32-true")
    act = 2 if "16" in precision else 4
    emb = 2 if precision.endswith("-true") and act == 2 else 4
    bsh = b * s * h * act
    layers = {"forward": 2 * L * bsh + b * s * h * emb, "backward": (2 * L + 1) * bsh}
    layers["loss"] = b * s * V * act * (tp - 1) // tp if gathered_logits else 3 * b * s * 4
    layers["total"] = sum(layers.values())
    return layers


def megatron_minimum_sp(cfg: dict) -> dict[str, int]:
    """The same for Megatron sequence parallelism, counted as the counter counts (all-gather: the
    gathered output; reduce-scatter: the full input). Every all-reduce of b*s*h becomes a
    reduce-scatter plus an all-gather (the same bytes on the wire in a ring, twice the payload
    counted). Forward: the embedding's reduce-scatter, per layer 2 all-gathers (attention and MLP
    inputs) and 2 reduce-scatters (their outputs), the LM head's all-gather; backward mirrors it
    and, as Megatron does, all-gathers each column layer's input again for its weight gradient
    (2 per layer for this GPT's fused q/k/v, plus the LM head) instead of keeping it. Plus the
    position table's grad all-gather (s*h) and one all-reduce of the partial grads (LayerNorm
    weights and biases, row-parallel biases). fp32 only."""
    b, s, h, L = cfg["batch"], cfg["ctx"], cfg["n_embd"], cfg["n_layer"]
    bsh = b * s * h * 4
    out = {"forward": (4 * L + 2) * bsh, "backward": (4 * L + 2) * bsh + (2 * L + 1) * bsh + s * h * 4}
    out["partial_grads"] = ((2 * L + 1) * 2 * h + 2 * L * h) * 4
    out["loss"] = 3 * b * s * 4
    out["total"] = sum(out.values())
    return out


def _median_metric(repeats: list[list[dict]], key: str) -> float | None:
    vals = [rep[0]["throughput"][key] for rep in repeats if key in rep[0].get("throughput", {})]
    return statistics.median(vals) if vals else None


DENSE_PEAK_16BIT = {"H100": 989.4e12, "H200": 989.4e12}  # SXM parts, dense bf16/fp16 tensor cores


def dense_peak_flops(cfg: dict) -> float | None:
    name = cfg.get("device_name") or ""
    if cfg["accelerator"] != "cuda" or not any(p in cfg["precision"] for p in ("bf16", "16-")):
        return None
    if "PCIE" in name.upper() or "NVL" in name.upper():
        return None
    return next((v for k, v in DENSE_PEAK_16BIT.items() if k in name.upper()), None)


def summarize(raw: dict[str, list[list[dict]]], cfg: dict) -> dict[str, Any]:
    summary: dict[str, Any] = {"config": cfg, "variants": {}}
    for name, repeats in raw.items():
        tps = [rep[0]["tokens_per_s"] for rep in repeats]
        rank0 = repeats[-1][0]
        comm_steps = rank0["comm"]
        per_op: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "bytes": 0, "seconds": 0.0})
        for step in comm_steps:
            for op, st in step.items():
                for k in ("calls", "bytes", "seconds"):
                    per_op[op][k] += st[k] / len(comm_steps)
        comm_s = sum(v["seconds"] for v in per_op.values())
        step_s = statistics.median([t for rep in repeats for t in rep[0]["step_s"]])  # all repeats, rank 0
        counted_s = statistics.median(rank0["counted_step_s"]) if rank0["counted_step_s"] else step_s
        summary["variants"][name] = {
            "tokens_per_s_median": statistics.median(tps),
            "tokens_per_s_repeats": tps,
            "step_s_median": step_s,
            "comm_per_step": dict(per_op),
            "comm_bytes_per_step": sum(v["bytes"] for v in per_op.values()),
            "comm_calls_per_step": sum(v["calls"] for v in per_op.values()),
            "comm_s_per_step": comm_s,
            "comm_fraction": comm_s / counted_s if counted_s else 0.0,
            "state_bytes_rank0": rank0["bytes"],
            "peak_rss_mb": [r["peak_rss_mb"] for r in repeats[-1]],
            "peak_device_mb": [r["peak_device_mb"] for r in repeats[-1]],
            "flops_per_s_per_device": _median_metric(repeats, "device/flops_per_sec"),
            "mfu": _median_metric(repeats, "device/mfu"),
            "peak_flops_source": "Lightning",
            "graphs": rank0.get("graphs", 0),
            "graph_breaks": rank0.get("graph_breaks", 0),
        }
    v = summary["variants"]
    peak = dense_peak_flops(cfg)
    for r in v.values():  # Lightning misses "NVIDIA H200" and lists its H200 entries with sparsity: ours, dense
        if peak is not None and r["flops_per_s_per_device"] is not None:
            r["mfu"], r["peak_flops_source"] = (
                r["flops_per_s_per_device"] / peak,
                f"dense peak {peak / 1e12:.1f} TFLOP/s",
            )
    if "lightning_tp" in v:
        ours = v["lightning_tp"]["tokens_per_s_median"]
        summary["ratios"] = {
            f"lightning_tp / {k}": ours / x["tokens_per_s_median"]
            for k, x in v.items()
            if k not in ("lightning_tp", "lightning_tp_compute")
        }
        theory = megatron_minimum(cfg, 2, gathered_logits=False)
        summary["theory_lightning_tp"] = theory
        summary["comm_vs_theory"] = v["lightning_tp"]["comm_bytes_per_step"] / theory["total"]
        if "single" in v:
            dense = sum(v["single"]["state_bytes_rank0"].values())
            summary["state_bytes_ratio_vs_unsharded"] = sum(v["lightning_tp"]["state_bytes_rank0"].values()) / dense
    if "lightning_tp_sp" in v:
        theory = megatron_minimum_sp(cfg)
        summary["theory_lightning_tp_sp"] = theory
        summary["comm_vs_theory_sp"] = v["lightning_tp_sp"]["comm_bytes_per_step"] / theory["total"]
    if "lightning_tp_compute" in v:
        floor = v["lightning_tp_compute"]["tokens_per_s_median"]
        summary["bound_with_free_communication"] = {
            f"lightning_tp_compute / {k}": floor / x["tokens_per_s_median"]
            for k in ("dtensor", "model_parallel")
            if (x := v.get(k)) is not None
        }
    if "lightning_tp_gather" in v:
        summary["theory_lightning_tp_gather"] = megatron_minimum(cfg, 2, gathered_logits=True)
        if "lightning_tp" in v:
            summary["vocab_parallel_loss_saving_bytes"] = (
                v["lightning_tp_gather"]["comm_bytes_per_step"] - v["lightning_tp"]["comm_bytes_per_step"]
            )
    return summary


def markdown(summary: dict[str, Any]) -> str:
    cfg = summary["config"]
    where = (
        f"CUDA ({torch.cuda.get_device_name()})" if cfg["accelerator"] == "cuda" else f"CPU ({os.cpu_count()} cores)"
    )
    cuda = cfg["accelerator"] == "cuda"
    lines = [
        f"GPT d_model {cfg['n_embd']}, {cfg['n_layer']} layers, vocab {cfg['vocab']}, ctx {cfg['ctx']}, batch {cfg['batch']}, "
        f"{cfg['precision']}, {where}, median of {len(next(iter(summary['variants'].values()))['tokens_per_s_repeats'])} repeats; "
        f"model {cfg['flops_per_batch'] / 1e12:.2f} TFLOP per step"
        + {"model": "; the whole model torch.compile'd (inductor).", None: "; eager.", False: "; eager."}.get(
            cfg.get("compile"), "; every transformer block torch.compile'd (inductor)."
        )
        + {
            True: " lightning_tp's loss fused (loss_fusion=True).",
            False: " lightning_tp's loss unfused (loss_fusion=False).",
        }.get(cfg.get("loss_fusion"), f" lightning_tp's loss {'fused' if cuda else 'unfused'} (loss_fusion=None)."),
        "",
        "| variant | tokens/s | step (s) | TFLOP/s per device | MFU | comm MB/step | comm calls/step | comm time share "
        f"| param+grad+optim MB (rank 0) | peak {'GPU memory' if cuda else 'RSS'} MB/rank |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in summary["variants"].items():
        state = sum(r["state_bytes_rank0"].values()) / 2**20
        flops = "-" if r["flops_per_s_per_device"] is None else f"{r['flops_per_s_per_device'] / 1e12:.3f}"
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}" + ("" if r["peak_flops_source"] == "Lightning" else "*")
        peak = r["peak_device_mb"] if cuda else r["peak_rss_mb"]
        lines.append(
            f"| {name} | {r['tokens_per_s_median']:,.0f} | {r['step_s_median']:.3f} | {flops} | {mfu} | "
            f"{r['comm_bytes_per_step'] / 2**20:.1f} | {r['comm_calls_per_step']:.0f} | {r['comm_fraction']:.0%} | {state:.1f} | "
            f"{', '.join(f'{m:.0f}' for m in peak)} |"
        )
    sources = {r["peak_flops_source"] for r in summary["variants"].values() if r["mfu"] is not None} - {"Lightning"}
    lines += [f"\n\\* MFU against the {s} of {cfg['device_name']}." for s in sources]
    if cfg.get("compile"):
        lines += ["", "| variant | compiled graphs (rank 0) | graph breaks |", "| --- | ---: | ---: |"]
        lines += [f"| {n} | {r['graphs']} | {r['graph_breaks']} |" for n, r in summary["variants"].items()]
    lines.append("")
    for k, x in summary.get("ratios", {}).items():
        lines.append(f"- {k}: **{x:.2f}x**")
    for k, x in summary.get("bound_with_free_communication", {}).items():
        lines.append(f"- {k} (communication free: the ceiling of lightning_tp's ratio): {x:.2f}x")
    if "comm_vs_theory" in summary:
        t = summary["theory_lightning_tp"]
        lines.append(
            f"- lightning_tp communication: {summary['variants']['lightning_tp']['comm_bytes_per_step'] / 2**20:.2f} MB/step vs "
            f"Megatron minimum {t['total'] / 2**20:.2f} MB/step (forward {t['forward'] / 2**20:.1f}, backward {t['backward'] / 2**20:.1f}, "
            f"loss {t['loss'] / 2**10:.1f} KB): ratio **{summary['comm_vs_theory']:.3f}**"
        )
    if "comm_vs_theory_sp" in summary:
        lines.append(
            f"- lightning_tp_sp communication (all-gather + reduce-scatter payloads): "
            f"{summary['variants']['lightning_tp_sp']['comm_bytes_per_step'] / 2**20:.2f} MB/step vs the sequence-parallel "
            f"minimum {summary['theory_lightning_tp_sp']['total'] / 2**20:.2f} MB/step: ratio **{summary['comm_vs_theory_sp']:.3f}**"
        )
    if "state_bytes_ratio_vs_unsharded" in summary:
        lines.append(
            f"- per-rank parameter + gradient + optimizer bytes vs unsharded: **{summary['state_bytes_ratio_vs_unsharded']:.3f}** (target <= 0.55)"
        )
    if "vocab_parallel_loss_saving_bytes" in summary:
        lines.append(
            f"- vocab-parallel loss saves {summary['vocab_parallel_loss_saving_bytes'] / 2**20:.1f} MB/step of communication "
            "against gathering the logits"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["variants"])
    v = summary["variants"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    tps = [v[n]["tokens_per_s_median"] for n in names]
    step = [v[n]["step_s_median"] for n in names]
    comm = [v[n]["comm_fraction"] * t for n, t in zip(names, step, strict=True)]
    a.bar(names, tps, color=["#4c72b0" if n != "lightning_tp" else "#dd8452" for n in names])
    a.set_ylabel("tokens / s (median)")
    a.set_title("Training throughput")
    a.tick_params(axis="x", rotation=30)
    b.bar(names, [s - c for s, c in zip(step, comm, strict=True)], label="compute")
    b.bar(names, comm, bottom=[s - c for s, c in zip(step, comm, strict=True)], label="communication")
    b.set_ylabel("seconds / step (rank 0)")
    b.set_title("Step time split")
    b.tick_params(axis="x", rotation=30)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--variants", nargs="+", default=VARIANTS[:-2], choices=VARIANTS, help="default: all but the TP=1 ones"
    )
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--comm-steps", type=int, default=2, help="extra steps with every collective counted (not timed)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="threads per TP/DP rank (single process: 2x)")
    p.add_argument("--accelerator", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if present")
    p.add_argument("--precision", default=None, help="Lightning precision; default 32-true on CPU, bf16-mixed on CUDA")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="model size; flags below override")
    for key in PRESETS["cpu"]:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument(
        "--compile",
        nargs="?",
        const="blocks",
        choices=["blocks", "model"],
        default=None,
        help="torch.compile every transformer block (blocks, the default) or the whole model (all variants)",
    )
    p.add_argument(
        "--loss-fusion",
        choices=["auto", "on", "off"],
        default="auto",
        help="MegatronTPStrategy(loss_fusion=): auto (fused on CUDA), on, off",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.accelerator == "auto":
        args.accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision is None:
        args.precision = "bf16-mixed" if args.accelerator == "cuda" else "32-true"
    cfg = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in PRESETS[args.preset].items()}
    cfg["flops_per_batch"] = model_flops_per_batch(cfg)
    cfg["accelerator"], cfg["precision"], cfg["compile"] = args.accelerator, args.precision, args.compile
    cfg["loss_fusion"] = {"auto": None, "on": True, "off": False}[args.loss_fusion]
    cfg["device_name"] = torch.cuda.get_device_name() if args.accelerator == "cuda" else None
    gpus = torch.cuda.device_count() if args.accelerator == "cuda" else 0
    variants = [n for n in args.variants if args.accelerator == "cpu" or n in SINGLE_DEVICE or gpus >= 2]
    for n in set(args.variants) - set(variants):
        print(f"skipping {n}: needs 2 GPUs, {gpus} present", flush=True)
    raw: dict[str, list] = {name: [] for name in variants}
    for rep in range(args.repeats):
        for name in variants:  # interleaved so drift hits every variant alike
            t0 = time.time()
            raw[name].append(run_variant(name, cfg, args))
            print(
                f"[{rep + 1}/{args.repeats}] {name}: {raw[name][-1][0]['tokens_per_s']:,.0f} tokens/s ({time.time() - t0:.0f}s)",
                flush=True,
            )
    summary = summarize(raw, cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    (args.out / "results.md").write_text(markdown(summary))
    plot(summary, args.out / "results.png")
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
