"""GPU runs for tests/test_cuda.py (needs CUDA): `python cuda_fit.py OUT.json MODE [--devices N] [--tp T]
[--precision P] [--steps S]`.

MODE ``fit``: lit.LitGPT on GPU(s) with MegatronTPStrategy (``--tp`` 0: plain Lightning, one device,
the reference; ``--compile``: every block compiled with inductor); rank 0 writes the per-step losses
and the loss scale. MODE ``deferred``: the same GPT built on the meta device in ``configure_model``,
materialized layer by layer on the GPU with ``verify=True`` (block by block), against the same
materialization done standalone on the GPU. MODE ``bad``: an out-of-range target or token id, which
must end the process. MODE ``layers``: at TP =
``--devices`` (one process per GPU, NCCL), the column/row/vocab layers and the vocab-parallel loss
against dense float32 on the same GPU; rank 0 writes the largest relative errors.
"""

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path

import lightning as L
import lit
import torch
import torch.nn.functional as F


class Losses(L.Callback):
    def __init__(self):
        self.losses, self.skipped = [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(ns) -> dict:
    from lightning_tp import MegatronTPStrategy
    from lightning_tp.engine.compiled import compile_layers

    torch.manual_seed(0)
    rec = Losses()
    strategy = "auto" if ns.tp == 0 else MegatronTPStrategy(tensor_parallel_size=ns.tp, timeout=timedelta(seconds=120))
    accelerator = "gpu" if ns.device == "cuda" else "cpu"
    trainer = L.Trainer(**lit.trainer_kwargs(accelerator=accelerator, devices=ns.devices, strategy=strategy,
                                             precision=ns.precision, max_steps=ns.steps, callbacks=[rec]))  # fmt: skip
    model = lit.LitGPT(batch_size=8, ref_sampler=ns.tp == 0)
    compiled: list[str] = []
    if ns.compile:
        model.on_fit_start = lambda: compiled.extend(compile_layers(model.model))  # after the strategy's rewrite
    trainer.fit(model)
    from lightning_tp._compat import compile_counts

    graphs, breaks = compile_counts()
    out = {"rank": trainer.global_rank, "losses": rec.losses, "global_step": trainer.global_step,
           "compiled": compiled, "graphs": graphs, "graph_breaks": breaks}  # fmt: skip
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    out["scale"] = None if scaler is None else float(scaler.get_scale())
    return out


class MetaGPT(lit.LitGPT):
    def __init__(self):
        super().__init__(batch_size=8)
        del self.model  # built on meta in configure_model
        self.register_buffer("logit_bias", torch.zeros(lit.VOCAB))  # built off meta, on the CPU: moved to the GPU

    def forward(self, idx):
        return self.model(idx) + self.logit_bias

    def configure_model(self):
        if not hasattr(self, "model"):
            with torch.device("meta"):
                self.model = lit.models.PlainGPT(vocab=lit.VOCAB, d=32, n_layers=2, n_heads=4, tied=True, ctx=lit.SEQ)

    def on_fit_start(self):
        self.start = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.devices = sorted({str(p.device) for p in self.model.parameters()})  # Lightning's teardown moves to CPU


def deferred(ns) -> dict:
    """TP 1 on one GPU: the Trainer's deferred init equals a standalone one on the same device."""
    import warnings

    import torch.distributed as dist

    from lightning_tp import MegatronTPStrategy, PolicyWarning, apply_policy
    from lightning_tp.engine.init import Materializer
    from lightning_tp.engine.mesh import init_tp_mesh
    from lightning_tp.engine.random import derive_seed

    seed = 7
    rec = Losses()
    model = MetaGPT()
    dev = torch.device("cuda", 0) if ns.device == "cuda" else torch.device("cpu")
    trainer = L.Trainer(**lit.trainer_kwargs(accelerator="gpu" if ns.device == "cuda" else "cpu", devices=1, precision=ns.precision, max_steps=ns.steps,
                                             callbacks=[rec], strategy=MegatronTPStrategy(tensor_parallel_size=1,
                                                                                          seed=seed, verify=True)))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", PolicyWarning)  # verify ran block by block: nothing left unchecked
        trainer.fit(model)
    holder = torch.nn.Module()  # seeds follow module names: the same names as inside the LightningModule
    with torch.device("meta"):
        holder.model = lit.models.PlainGPT(vocab=lit.VOCAB, d=32, n_layers=2, n_heads=4, tied=True, ctx=lit.SEQ)
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_tp_mesh(1, dev.type)
    apply_policy(holder, mesh.tp_group, "auto", verify=False,
                 materializer=Materializer(holder, dev, derive_seed(seed, 0x1417)))  # fmt: skip
    expected = holder.model.state_dict()
    diff = max(float((model.start[k].float() - v.float()).abs().max()) for k, v in expected.items())
    return {"rank": 0, "losses": rec.losses, "global_step": trainer.global_step, "start_max_diff": diff,
            "keys_equal": sorted(model.start) == sorted(expected), "param_devices":
            model.devices, "deferred": trainer.strategy.deferred_init}  # fmt: skip


def layers(ns) -> dict:
    import torch.distributed as dist

    from lightning_tp import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        VocabParallelLMHead,
        cross_entropy,
        vocab_parallel_cross_entropy,
    )
    from lightning_tp.engine.mesh import init_tp_mesh

    rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = ns.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=120))
    mesh = init_tp_mesh(ns.devices, ns.device)
    group, dev = mesh.tp_group, torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(64, 128).to(dev), torch.nn.Linear(128, 64).to(dev)
    emb, head = torch.nn.Embedding(100, 64).to(dev), torch.nn.Linear(64, 100, bias=False).to(dev)
    ids = torch.randint(0, 100, (4, 16), device=dev)
    tgt = torch.randint(0, 100, (4, 16), device=dev)
    col = ColumnParallelLinear.from_dense(lin1, group)
    row = RowParallelLinear.from_dense(lin2, group, input_is_parallel=True)
    vemb = VocabParallelEmbedding.from_dense(emb, group)
    vhead = VocabParallelLMHead.from_dense(head, group, gather_output=False)
    dense = head(lin2(F.gelu(lin1(emb(ids)))))
    ref = F.cross_entropy(dense.reshape(-1, 100), tgt.reshape(-1))
    sharded = vhead(row(F.gelu(col(vemb(ids)))))
    loss = cross_entropy(sharded.reshape(-1, sharded.size(-1)), tgt.reshape(-1))
    ref.backward()
    loss.backward()
    errs = {"loss": float((loss.detach() - ref.detach()).abs() / ref.detach().abs())}
    odd = torch.nn.Linear(64, 99, bias=False).to(dev)  # 99 rows: padded at TP 2, gathered through an index
    gathered = VocabParallelLMHead.from_dense(odd, group, gather_output=True)
    h = torch.randn(4, 64, device=dev)
    errs["gathered_head"] = float((gathered(h) - odd(h)).abs().max() / odd(h).abs().max())
    # the fused loss (compiled Triton kernels; the default on CUDA) against the unfused one, padded vocabulary
    local = VocabParallelLMHead.from_dense(odd, group, gather_output=False)(torch.randn(64, 64, device=dev))
    local = local.as_subclass(torch.Tensor).detach()
    t99 = torch.randint(0, 99, (64,), device=dev)
    t99[:4] = -100
    got = {}
    for fused in (False, True):
        x = local.clone().requires_grad_()
        value = vocab_parallel_cross_entropy(x, t99, group, 99, label_smoothing=0.1, fused=fused)
        value.backward()
        got[fused] = (value.detach(), x.grad)
    errs["fused_loss"] = float((got[True][0] - got[False][0]).abs() / got[False][0].abs())
    errs["fused_grad"] = float((got[True][1] - got[False][1]).abs().max() / got[False][1].abs().max())
    from lightning_tp.engine.loss import fused_kernels_failed

    errs["fused_ran_eagerly"] = float(fused_kernels_failed())  # 1: the Triton kernels did not compile
    if rank == 0:  # rank 0's slices of the split weights' gradients
        n1, n2 = col.weight.shape[0], row.weight.shape[1]
        errs["column_grad"] = float(
            (col.weight.grad - lin1.weight.grad[:n1]).abs().max() / lin1.weight.grad.abs().max()
        )
        errs["row_grad"] = float(
            (row.weight.grad - lin2.weight.grad[:, :n2]).abs().max() / lin2.weight.grad.abs().max()
        )
    dist.destroy_process_group()
    return {"rank": rank, "errors": errs}


def bad(ns) -> dict:
    """An out-of-range target (``--what target``) or token id (``--what ids``, TP = ``--devices``) on
    the GPU: the process must fail (a device-side assert) rather than train on a wrong value."""
    import torch.distributed as dist

    from lightning_tp import VocabParallelEmbedding, VocabParallelLMHead, cross_entropy
    from lightning_tp.engine.mesh import init_tp_mesh

    rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", timeout=timedelta(seconds=60))
    group, dev = init_tp_mesh(ns.devices, "cuda").tp_group, torch.device("cuda", rank)
    emb = VocabParallelEmbedding.from_dense(torch.nn.Embedding(100, 16).to(dev), group)
    head = VocabParallelLMHead.from_dense(torch.nn.Linear(16, 100, bias=False).to(dev), group, gather_output=False)
    ids = torch.randint(0, 100, (2, 8), device=dev)
    tgt = ids.clone()
    if ns.what == "ids":
        ids[0, 0] = 100
    else:
        tgt[0, 0] = 100
    loss = cross_entropy(head(emb(ids)).reshape(-1, 100), tgt.reshape(-1))  # 100: read as the local slice
    torch.cuda.synchronize()
    return {"rank": rank, "loss": float(loss)}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("mode", choices=("fit", "layers", "deferred", "bad"))
    p.add_argument("--what", choices=("target", "ids"), default="target")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a check of this script only")
    ns = p.parse_args()
    result = {"fit": fit, "layers": layers, "deferred": deferred, "bad": bad}[ns.mode](ns)
    if result["rank"] == 0:
        Path(ns.out).write_text(json.dumps(result))
