"""A small multi-process harness for tests: persistent gloo worlds of CPU processes.

``run(world_size, fn, *args)`` runs ``fn(*args)`` on every rank of a world of ``world_size`` new
processes (forked from multiprocessing's fork server; gloo, 1 thread each, short process-group
timeout) and returns the per-rank results. A world is started once and reused by later calls
(starting one costs seconds); a failure or a time-out tears it down so the next call starts clean. ``fn`` must be importable (a module-level function).

Inside a worker, :func:`mesh` returns a cached :class:`~lightning_tp.engine.mesh.TPMesh` per TP size.
"""

from __future__ import annotations

import datetime
import math
import os
import queue
import socket
import traceback
from typing import Any

import torch
import torch.multiprocessing as mp

PG_TIMEOUT_S = int(os.environ.get("LTP_TEST_PG_TIMEOUT", "30"))
CALL_TIMEOUT_S = int(os.environ.get("LTP_TEST_CALL_TIMEOUT", "120"))

_worlds: dict[int, _World] = {}
_meshes: dict[int, Any] = {}  # worker side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refuse_relaunching_pytest() -> None:
    """Make Lightning's subprocess launcher an error in this process. Under pytest it re-runs
    ``sys.argv``, the whole test session, as the other ranks: a test whose Trainer was not told its
    processes are already started (``lit.external_launch``) left full test sessions running beside
    the suite, orphaned, doubling its time. Tests that check that launcher run a script of their own."""
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    def refuse(self, *args, **kwargs):
        log = os.environ.get("LTP_TEST_RELAUNCH_LOG")
        if log:
            with open(log, "a") as f:
                f.write("".join(traceback.format_stack()) + "\n----\n")
        raise RuntimeError(
            "a test started Lightning's subprocess launcher, which would re-run the whole pytest session "
            "as the other ranks: inside a _dist worker wrap the Trainer in lit.external_launch(world_size)"
        )

    _SubprocessScriptLauncher._call_children_scripts = refuse


def _worker(rank: int, size: int, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
    import torch.distributed as dist

    refuse_relaunching_pytest()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args, kwargs = item
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the parent
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


# The workers fork from multiprocessing's fork server, a new interpreter that imported these once per
# test session: a world of 4 otherwise starts 4 interpreters importing torch and Lightning (about 20 s
# of a 2-core machine).
_PRELOAD = ["torch", "torch.distributed", "lightning.pytorch", "lightning_tp", "_dist"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


class _World:
    def __init__(self, size: int) -> None:
        ctx = _context()
        self.size = size
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(size)]
        port = _free_port()
        self.procs = [
            ctx.Process(target=_worker, args=(r, size, port, self.tasks[r], self.results), daemon=True)
            for r in range(size)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, args, kwargs, timeout: float) -> list[Any]:
        for q in self.tasks:
            q.put((fn, args, kwargs))
        out: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        while len(out) + len(errors) < self.size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            try:
                rank, ok, value = self.results.get(timeout=max(left, 0.1))
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                raise TimeoutError(
                    f"{fn.__name__} did not finish on ranks {sorted(set(range(self.size)) - set(out) - set(errors))} "
                    f"within {timeout}s (dead processes: {dead})"
                ) from None
            (out if ok else errors)[rank] = value
        if errors:
            first = min(errors)
            raise AssertionError(f"{fn.__name__} failed on ranks {sorted(errors)}; rank {first}:\n{errors[first]}")
        return [out[r] for r in range(self.size)]

    def close(self) -> None:
        for q in self.tasks:
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def run(world_size: int, fn, *args, timeout: float = CALL_TIMEOUT_S, **kwargs) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on every rank of a ``world_size`` gloo world; per-rank results."""
    world = _worlds.get(world_size)
    if world is None:
        world = _worlds[world_size] = _World(world_size)
    try:
        return world.run(fn, args, kwargs, timeout)
    except BaseException:
        _worlds.pop(world_size, None)
        world.close()
        raise


def close(world_size: int) -> None:
    """Stop the world of ``world_size`` (the next call starts a fresh one): after a test that leaves its
    processes holding much (failed fits: Trainers kept alive by their tracebacks), so that later tests,
    torch.compile ones especially (measured: 2x slower there), start clean."""
    world = _worlds.pop(world_size, None)
    if world is not None:
        world.close()


def close_all() -> None:
    """Stop every world (called at the end of the test session)."""
    while _worlds:
        _worlds.popitem()[1].close()


def mesh(tp: int):
    """Worker side: the (data_parallel, tensor_parallel) mesh for TP size ``tp``, built once."""
    from lightning_tp.engine.mesh import init_tp_mesh

    if tp not in _meshes:
        _meshes[tp] = init_tp_mesh(tp, "cpu")
    return _meshes[tp]


def gathered(param, tensor, group):
    """Worker side: the dense form of ``tensor`` (``param``'s weight, grad or optimizer state), gathered
    over TP when ``param`` is sharded. Collective for sharded parameters."""
    from lightning_tp.engine.layers import gather_sharded
    from lightning_tp.engine.sharding import shard_spec

    spec = shard_spec(param)
    return tensor if spec is None else gather_sharded(tensor.contiguous(), spec, group)


def train_parity(dense, model, group, inputs) -> dict[str, float]:
    """Worker side: AdamW steps of ``dense`` and its rewritten copy ``model`` on the same ``inputs`` (one
    batch per step, loss ``sum(out**2)``): the largest output difference, gradient difference relative
    to the dense gradient's largest entry, and weight difference after the last step. Partial gradients
    (marked) are summed over TP before the comparison and the step, as the strategy does."""
    from lightning_tp.lightning.precision import all_reduce_partial_grads

    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (dense, model)]
    errs = {"out": 0.0, "grad": 0.0, "weight": 0.0}

    def worst(what: str, err: float) -> None:
        if math.isnan(err) or (not math.isnan(errs[what]) and err > errs[what]):  # a NaN stays the worst
            errs[what] = err

    for x in inputs:
        outs = [m(x) for m in (dense, model)]
        worst("out", float((outs[0] - outs[1]).detach().abs().max()))
        for out in outs:
            out.square().sum().backward()
        all_reduce_partial_grads(list(model.parameters()), group)
        for name, p in model.named_parameters():
            ref = dense.get_parameter(name).grad
            scale = float(ref.abs().max()) or 1.0  # a zero gradient: the absolute error
            worst("grad", float((gathered(p, p.grad, group) - ref).abs().max()) / scale)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for name, p in model.named_parameters():
        worst("weight", float((gathered(p, p.detach(), group) - dense.get_parameter(name).detach()).abs().max()))
    return errs
