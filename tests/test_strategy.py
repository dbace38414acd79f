"""Trainer-level tests of the megatron_tp strategy (CPU/gloo, assertions inside hooks)."""

import hashlib
import importlib.util

import lightning as L
import lit
import pytest
import torch
import torch.distributed as dist

import _dist
from lightning_tp import MegatronTPStrategy
from lightning_tp.engine.loss import fused_kernels_failed
from lightning_tp.engine.sequence import SequenceShardedEmbedding
from lightning_tp.engine.sharding import shard_spec
from lightning_tp.errors import MeshConfigError
from lightning_tp.lightning.zero import dp_rows_start, local


class Recorder(L.Callback):
    """Per-step global loss (mean over DP replicas) and a hash of each rank's batch."""

    def __init__(self):
        self.losses, self.batch_hashes = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach()
        if dist.is_initialized() and hasattr(trainer.strategy, "tp_mesh"):
            loss = trainer.strategy.reduce(loss, reduce_op="mean")
        self.losses.append(float(loss))
        self.batch_hashes.append(hashlib.sha1(batch[0].numpy().tobytes()).hexdigest())


def _replicated_digest(module):
    """A digest of what every rank of a TP group must hold alike: the whole parameters, and the rows of
    a shared chunk held by every TP rank (one key/value head: multi-query attention)."""
    h = hashlib.sha1()
    for name, p in sorted(module.named_parameters()):
        spec, part = shard_spec(p), local(p).detach()  # ZeRO: this DP rank's part
        if spec is None:
            h.update(name.encode())
            h.update(part.contiguous().view(torch.uint8).numpy().tobytes())
            continue
        start = dp_rows_start(p)
        for c, first, size in spec.chunk_ranges((start, start + part.shape[0])):
            if spec.pieces[c] == 1:  # one piece: every TP rank holds it
                h.update(f"{name}[{start + first}:{start + first + size}]".encode())
                h.update(part.narrow(0, first, size).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def reference_losses(steps=10, batch_size=8, clip=0.5, model="plain", **kw):
    torch.manual_seed(0)
    model, rec = lit.LitGPT(batch_size=batch_size, ref_sampler=True, model=model), Recorder()
    kwargs = lit.trainer_kwargs(max_steps=steps, devices=1, gradient_clip_val=clip, callbacks=[rec], **kw)
    L.Trainer(**kwargs).fit(model)
    return rec.losses


def _token_embedding(model):
    if hasattr(model, "get_input_embeddings"):  # a Hugging Face model
        return model.get_input_embeddings()
    return model.embed_tokens if hasattr(model, "embed_tokens") else model.transformer.wte


def _odd_length_validation(trainer, model) -> tuple[float, float]:
    """Validation losses of 11-token batches (a length that does not divide by TP: on the whole sequence
    under sequence parallelism) and of the same batches at 12 tokens with the last target ignored
    (sequence parallel): the model is causal, so the two are the same function of the same weights."""
    from torch.utils.data import DataLoader

    data = lit.TokenData(8, seed=3)
    short = [(x[:-1], y[:-1]) for x, y in data]
    masked = [(x, torch.cat([y[:-1], torch.tensor([-100])])) for x, y in data]
    trainer.limit_val_batches = 1.0  # (the tests' Trainers validate nothing while fitting)
    losses = [
        trainer.validate(model, DataLoader(d, batch_size=4), verbose=False)[0]["val_loss"] for d in (short, masked)
    ]
    return float(losses[0]), float(losses[1])


def _fit(world, tp, steps=10, global_batch=8, clip=0.5, dropout=0.0, sp=False, model="plain", strategy_kw=None,
         odd_validation=False, **kw):  # fmt: skip
    with lit.external_launch(world):
        dp = world // tp
        model, rec = lit.LitGPT(batch_size=global_batch // dp, dropout=dropout, model=model), Recorder()
        strategy = MegatronTPStrategy(tensor_parallel_size=tp, sequence_parallel=sp, **(strategy_kw or {}))
        trainer = L.Trainer(
            **lit.trainer_kwargs(max_steps=steps, devices=world, strategy=strategy, gradient_clip_val=clip,
                                 callbacks=[rec], **kw)
        )  # fmt: skip
        trainer.fit(model)
        mesh = strategy.tp_mesh
        norm = trainer.callback_metrics.get("grad_norm")
        odd = _odd_length_validation(trainer, model) if odd_validation else None
        return {
            "odd_validation": odd,
            "rank": dist.get_rank(),
            "tp_rank": mesh.tp_rank,
            "dp_rank": mesh.dp_rank,
            "losses": rec.losses,
            "hashes": rec.batch_hashes,
            "replicated": _replicated_digest(model),
            "grad_norm": None if norm is None else float(norm),
            "lm_head_tied": model.model.lm_head.weight is _token_embedding(model.model).weight,
            "sequence_sharded": any(isinstance(x, SequenceShardedEmbedding) for x in model.modules()),
            "optimizer_bytes": sum(
                local(t).nbytes
                for opt in trainer.optimizers
                for state in opt.state.values()
                for t in state.values()
                if torch.is_tensor(t) and t.dim() > 0
            ),
            "zero_active": strategy.zero_active,
            "checkpointed": sum("_tp_checkpointed_forward" in m.__dict__ for m in model.modules()),
            # TP-local parameter bytes (a ZeRO DTensor's shape is the TP-local shape, its local part 1/DP of it)
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "loss_fusion": [ws.fused for m in model.modules() if (ws := getattr(m, "_loss_workspace", None))],
            "fusion_fell_back": fused_kernels_failed(),
        }


@pytest.fixture(scope="module")
def ref_losses():
    return reference_losses()


@pytest.mark.parametrize(("world", "tp"), [(2, 2), (4, 2)], ids=["tp2", "tp2xdp2"])
def test_losses_match_single_process(world, tp, ref_losses):
    results = _dist.run(world, _fit, world, tp)
    for r in results:
        assert len(r["losses"]) == 10
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=0)
        assert r["lm_head_tied"]
        assert r["grad_norm"] is not None and r["grad_norm"] > 0
    # Replicated parameters are bit-identical across the TP ranks of a replica.
    for dp in range(world // tp):
        digests = {r["replicated"] for r in results if r["dp_rank"] == dp}
        assert len(digests) == 1
    # Batches: identical within a TP group, different across DP.
    for dp in range(world // tp):
        group = [r["hashes"] for r in results if r["dp_rank"] == dp]
        assert all(h == group[0] for h in group)
    if world // tp > 1:
        a = next(r["hashes"] for r in results if r["dp_rank"] == 0)
        b = next(r["hashes"] for r in results if r["dp_rank"] == 1)
        assert all(x != y for x, y in zip(a, b, strict=True))


def test_fused_loss_losses_match_single_process(ref_losses):
    """loss_fusion=True (the default on CUDA) in the Trainer on CPU: the LM head's loss through the compiled
    kernels, the same losses as one process; Lightning's validation (inference mode) at 11 tokens too."""
    for r in _dist.run(2, _fit, 2, 2, strategy_kw={"loss_fusion": True}, odd_validation=True):
        assert r["loss_fusion"] == [True] and not r["fusion_fell_back"]  # compiled, not run eagerly
        whole, sharded = r["odd_validation"]
        assert abs(whole - sharded) <= 1e-6 * abs(sharded), r["odd_validation"]
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=0)


def test_loss_fusion_is_checked():
    with pytest.raises(TypeError, match="loss_fusion must be True .* got 'on'"):
        MegatronTPStrategy(loss_fusion="on")


@pytest.mark.parametrize(("world", "tp"), [(2, 2), (4, 2)], ids=["tp2", "tp2xdp2"])
def test_sequence_parallel_losses_match_single_process(world, tp, ref_losses):
    """Megatron sequence parallelism in the Trainer: same losses as one process (10 AdamW steps with
    clipping: the norms' partial grads are summed over TP before clipping and the step)."""
    results = _dist.run(world, _fit, world, tp, sp=True, odd_validation=True)
    for r in results:
        assert r["sequence_sharded"] and r["lm_head_tied"]
        whole, sharded = r["odd_validation"]  # Lightning's validation at 11 tokens: on the whole sequence
        assert abs(whole - sharded) <= 1e-6 * abs(sharded), r["odd_validation"]
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=0)
        assert r["grad_norm"] is not None and r["grad_norm"] > 0
    for dp in range(world // tp):
        assert len({r["replicated"] for r in results if r["dp_rank"] == dp}) == 1


def test_multi_query_attention_trains_as_one_process():
    """One key/value head at TP 2 x DP 2, with sequence parallelism and ZeRO-3: every rank holds the k/v
    projections' one head (split again over DP), their partial gradients are summed over the TP ranks
    before the clipping (each head counted once in the norm) and the step: the losses of one process,
    the head identical on both TP ranks."""
    ref = reference_losses(model="plain_mqa")
    results = _dist.run(4, _fit, 4, 2, sp=True, model="plain_mqa", strategy_kw={"zero_stage": 3})
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref), rtol=1e-5, atol=0)
        assert r["zero_active"] and r["sequence_sharded"]
    for dp in range(2):
        assert len({r["replicated"] for r in results if r["dp_rank"] == dp}) == 1


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers (extra 'hf')")
def test_gpt_oss_experts_train_as_one_process():
    """Hugging Face GPT-OSS under policy='names' at TP 2 x DP 2 with ZeRO-3 and clipping: its experts split
    on their hidden units with gate/up interleaved, the bias after their down projection added on one rank
    (its gradient summed over TP before the clipping), the attention sinks split with the heads: the
    losses of one process, the replicated weights identical across each TP group. Its decoder layers are
    checkpointed (inside FSDP2's units) with its key/value cache on, as a `from_pretrained` model has it:
    each layer turns its cache off for the checkpointed call (the recompute appended to it a second time
    and backward failed before)."""
    ref = reference_losses(model="hf_gpt_oss")
    kw = {"policy": "names", "zero_stage": 3, "activation_checkpointing": "model.model.layers.*"}
    results = _dist.run(4, _fit, 4, 2, model="hf_gpt_oss_cache", strategy_kw=kw)
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref), rtol=1e-5, atol=0)
        assert r["zero_active"] and r["checkpointed"] == 2
    for dp in range(2):
        assert len({r["replicated"] for r in results if r["dp_rank"] == dp}) == 1


@pytest.mark.skipif(importlib.util.find_spec("litgpt") is None, reason="litgpt (extra 'litgpt')")
def test_litgpt_mixture_of_experts_trains_under_sequence_parallelism_as_one_process():
    """LitGPT's LLaMAMoE at TP 2 x DP 2 with sequence parallelism: each mixture-of-experts layer runs on
    the whole sequence (its gate's gradient complete), the rest sequence parallel (the first step's
    check of every whole parameter's gradient across TP passes): the losses of one process."""
    ref = reference_losses(model="litgpt_moe")
    results = _dist.run(4, _fit, 4, 2, sp=True, model="litgpt_moe")
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref), rtol=1e-5, atol=0)
    for dp in range(2):
        assert len({r["replicated"] for r in results if r["dp_rank"] == dp}) == 1


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers (extra 'hf')")
def test_hugging_face_model_trains_sequence_parallel_as_one_process():
    """Hugging Face GPT-2 under sequence parallelism at TP 2 x DP 2 with ZeRO-2: its positions and mask
    come from the embeddings' output, so only its layer stack is sequence-sharded (split at the first
    layer's input, gathered at the last one's output; the embeddings, ln_f and the tied head as without
    it): the losses of one process, the replicated weights identical across each TP group. With its
    dropouts on, the embedding dropout (before the stack) draws one mask for the whole sequence on every
    TP rank and those in the layers per rank: the first steps' check of every whole parameter's gradient
    across TP passes and the replicated weights stay identical."""
    ref = reference_losses(model="hf_gpt2")
    results = _dist.run(4, _fit, 4, 2, sp=True, model="hf_gpt2", strategy_kw={"zero_stage": 2})
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref), rtol=1e-5, atol=0)
        assert r["zero_active"] and r["lm_head_tied"] and not r["sequence_sharded"]  # wpe runs on the whole sequence
    for dp in range(2):
        assert len({r["replicated"] for r in results if r["dp_rank"] == dp}) == 1
    results = _dist.run(2, _fit, 2, 2, steps=6, dropout=0.1, sp=True, model="hf_gpt2")
    assert len({r["replicated"] for r in results}) == 1
    assert all(r["losses"] == results[0]["losses"] for r in results)
    assert results[0]["losses"] != ref[:6]  # the dropouts were on


def test_torch_transformer_layers_train_as_one_process():
    """torch's own nn.TransformerEncoder under policy "auto" (its nn.MultiheadAttention split by heads,
    linear1/linear2 a column/row pair) gives the losses of one process at TP 2 x DP 2 with ZeRO-3 and its
    layers checkpointed. With its dropouts on, the attention weights' and the MLP's are drawn per rank
    and the residual ones alike on every rank: the replicated weights (norms, biases) stay identical."""
    ref = reference_losses(steps=6, model="torch_encoder")
    kw = {"zero_stage": 3, "activation_checkpointing": "model.encoder.layers.*"}
    results = _dist.run(4, _fit, 4, 2, steps=6, model="torch_encoder", strategy_kw=kw)
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref), rtol=1e-5, atol=0)
        assert r["zero_active"] and r["checkpointed"] == 2
    results = _dist.run(2, _fit, 2, 2, steps=6, dropout=0.1, model="torch_encoder")
    assert len({r["replicated"] for r in results}) == 1
    assert all(r["losses"] == results[0]["losses"] for r in results)
    assert results[0]["losses"] != ref  # the dropouts were on


def test_sequence_parallel_dropout_keeps_replicated_weights_identical():
    results = _dist.run(2, _fit, 2, 2, steps=6, dropout=0.1, sp=True, model="nano")
    assert len({r["replicated"] for r in results}) == 1
    assert all(r["losses"] == results[0]["losses"] for r in results)


def test_dropout_keeps_replicated_weights_identical_tp4():
    results = _dist.run(4, _fit, 4, 4, steps=6, dropout=0.1)
    assert len({r["replicated"] for r in results}) == 1
    assert all(r["losses"] == results[0]["losses"] for r in results)


def _bad_tp_size():
    with lit.external_launch(4):
        with pytest.raises(MeshConfigError, match="tensor_parallel_size=3 does not divide the world size 4"):
            L.Trainer(**lit.trainer_kwargs(devices=4, strategy=MegatronTPStrategy(tensor_parallel_size=3))).fit(
                lit.LitGPT()
            )
    return True


def test_tp_not_dividing_world_raises_before_collective():
    assert all(_dist.run(4, _bad_tp_size))


def test_constructor_errors():
    with pytest.raises(MeshConfigError, match=r"tensor_parallel_size must be 'auto' or an int >= 1, got 0"):
        MegatronTPStrategy(tensor_parallel_size=0)


def test_registered_names():
    from lightning.pytorch.strategies import StrategyRegistry

    for name, method in (("megatron_tp", "popen"), ("megatron_tp_spawn", "spawn"), ("megatron_tp_fork", "fork")):
        strategy = StrategyRegistry.get(name)
        assert isinstance(strategy, MegatronTPStrategy) and strategy.start_method == method


class InjectInf(L.Callback):
    """At one step, put an inf into one TP rank's gradient shard (under ZeRO: its DP part of it);
    record scale and whether the parameters changed."""

    def __init__(self, step):
        self.step, self.rows = step, []

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step and trainer.strategy.tp_mesh.tp_rank == 1:
            p = next(p for p in pl_module.parameters() if shard_spec(p) is not None and p.grad is not None)
            local(p.grad).view(-1)[0] = float("inf")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = [local(p).detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = [local(p) for p in pl_module.parameters()]
        unchanged = all(torch.equal(a, b) for a, b in zip(self._before, after, strict=True))
        scale = float(trainer.precision_plugin.scaler.get_scale())
        self.rows.append((trainer.global_step, unchanged, scale))


def _fit_fp16(world, tp, inject_step, fused=False):
    from lightning_tp import TPMixedPrecision

    with lit.external_launch(world):
        model, cb = lit.LitGPT(batch_size=8 // (world // tp), lr=1e-3), InjectInf(inject_step)
        if fused:  # unscales inside its step: Lightning skips unscale_ (and refuses clipping)
            model.configure_optimizers = lambda: torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        trainer = L.Trainer(
            **lit.trainer_kwargs(max_steps=6, devices=world, strategy=MegatronTPStrategy(tensor_parallel_size=tp),
                                 plugins=[TPMixedPrecision("16-mixed", "cpu")], callbacks=[cb],
                                 gradient_clip_val=None if fused else 1.0)
        )  # fmt: skip
        trainer.fit(model)
        assert trainer.precision_plugin.precision == "16-mixed"  # not silently turned into bf16
        return cb.rows


@pytest.mark.parametrize(("world", "tp", "fused"), [(2, 2, False), (4, 2, False), (2, 2, True)],
                         ids=["tp2", "tp2xdp2", "tp2-fused-adamw"])  # fmt: skip
def test_fp16_inf_on_one_rank_skips_everywhere(world, tp, fused):
    inject = 2
    results = _dist.run(world, _fit_fp16, world, tp, inject, fused)
    assert all(rows == results[0] for rows in results)  # every rank: same skips, same scales
    rows = results[0]
    # global_step does not advance on a skipped step; rows are (step after, unchanged, scale)
    skipped = [i for i, (_, unchanged, _) in enumerate(rows) if unchanged]
    assert skipped, rows
    first = skipped[0]
    scale_before = rows[first - 1][2] if first else 65536.0
    assert rows[first][2] == scale_before / 2  # backed off once, identically everywhere
    assert any(not unchanged for _, unchanged, _ in rows[first + 1 :])  # training continues


class LogProbe(L.LightningModule):
    """self.log(sync_dist=True) and strategy collectives see one value per DP replica."""

    def __init__(self):
        super().__init__()
        self.inner = lit.LitGPT()
        self.seen = {}

    def forward(self, x):
        return self.inner(x)

    def test_step(self, batch, _):
        s = self.trainer.strategy
        value = torch.tensor(float(s.tp_mesh.dp_rank + 1))
        self.log("dp_value", value, sync_dist=True, reduce_fx="mean")
        self.seen["reduce_sum"] = float(s.reduce(value.clone(), reduce_op="sum"))
        self.seen["gather"] = s.all_gather(value).tolist()
        self.seen["broadcast"] = s.broadcast(dist.get_rank() + 100, src=1)
        s.barrier()

    def test_dataloader(self):
        return self.inner.val_dataloader()


def _log_semantics():
    with lit.external_launch(4):
        model = LogProbe()
        trainer = L.Trainer(**lit.trainer_kwargs(devices=4, strategy=MegatronTPStrategy(tensor_parallel_size=2)))
        metrics = trainer.test(model, verbose=False)[0]
        return metrics["dp_value"], model.seen


def test_reduce_gather_broadcast_over_dp():
    for logged, seen in _dist.run(4, _log_semantics):
        assert logged == pytest.approx(1.5)  # mean over the 2 DP replicas (values 1 and 2)
        assert seen["reduce_sum"] == 3.0  # not 6: TP ranks are not counted twice
        assert seen["gather"] == [1.0, 2.0]
        assert seen["broadcast"] == 101


def test_clip_by_value_matches_single_process():
    """Clipping by value at TP 2: the losses of one process, and the whole model's gradient norm before
    clipping logged as `grad_norm` (as under clipping by norm), equal to the one a single rank logs."""
    ref = reference_losses(steps=6, clip=0.05, gradient_clip_algorithm="value")
    (one,) = _dist.run(1, _fit, 1, 1, steps=6, clip=0.05, gradient_clip_algorithm="value")
    assert one["grad_norm"] is not None and one["grad_norm"] > 0.05
    for r in _dist.run(2, _fit, 2, 2, steps=6, clip=0.05, gradient_clip_algorithm="value"):
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref), rtol=1e-5, atol=0)
        assert r["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precisions_train(precision):
    for r in _dist.run(2, _fit, 2, 2, steps=4, precision=precision):
        assert len(r["losses"]) == 4 and all(torch.isfinite(torch.tensor(r["losses"])))
        assert r["losses"][-1] < r["losses"][0]
