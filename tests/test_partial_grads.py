"""Partial gradients of replicated parameters: planned (HF ``replicated_with_grad_allreduce``, per-head
parameters found from the block's attributes), summed over TP, checked by verify's backward and by the
first-step safety net. The Qwen3 regression: its q_norm/k_norm gradients were silently wrong."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _dist
from lightning_tp import PolicyMismatchError, apply_policy, plan_policy
from lightning_tp.engine.sharding import has_partial_grad, shard_spec
from lightning_tp.errors import PartialGradError
from lightning_tp.lightning.precision import all_reduce_partial_grads, check_partial_grad_marks
from lightning_tp.policy.rules import hf_plan, translate_hf_plan

HAS_HF = importlib.util.find_spec("transformers") is not None
hf = pytest.mark.skipif(not HAS_HF, reason="transformers (extra 'hf') not installed")
TOL = {"atol": 1e-9, "rtol": 1e-7}  # Qwen3's RMSNorm computes in float32 inside the float64 model


def _qwen3(seed=0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=32,
                      attn_implementation="eager", tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).double()


def _loss(model, ids):
    return F.cross_entropy(model(input_ids=ids).logits.view(-1, 64), ids.view(-1).roll(1))


def _grads_match(model, dense, group):
    from lightning_tp.engine.comm import all_gather_dim

    for name, p in model.named_parameters():
        ref, got = dense.get_parameter(name).grad, p.grad
        spec = shard_spec(p)
        if spec is not None:
            got = spec.unshard(list(all_gather_dim(got, group, spec.dim).chunk(spec.tp_size, dim=spec.dim)))
        torch.testing.assert_close(got, ref, **TOL, msg=lambda s, n=name: f"{n}: {s}")


def _qwen3_fixed(tp):
    m = _dist.mesh(tp)
    dense, model = _qwen3(), _qwen3()
    plan = apply_policy(model, m.tp_group, "auto")  # verify=True: outputs and gradients checked
    rows = {e.name: e.options for e in plan.modules if e.options.get("partial_grad")}
    assert set(rows) == {f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_norm", "k_norm")}
    assert "partial_grad" in str(plan)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    _loss(dense, ids).backward()
    _loss(model, ids).backward()
    named = list(model.named_parameters())
    assert check_partial_grad_marks(named, m.tp_group)  # the marks fit the gradients
    all_reduce_partial_grads([p for _, p in named], m.tp_group)
    _grads_match(model, dense, m.tp_group)
    return True


def _qwen3_fix_disabled(tp):
    m = _dist.mesh(tp)
    model = _qwen3()
    policy = {k: v for k, v in translate_hf_plan(hf_plan(model)).items()}
    for pattern in [p for p in policy if p.endswith(("q_norm", "k_norm"))]:
        policy[pattern] = {"style": "replicate", "partial_grad": False}  # the old translation: plain replicate
    with pytest.raises(PolicyMismatchError, match=r"q_norm.weight'.*Summed over the TP ranks it is right"):
        apply_policy(model, m.tp_group, policy)
    model = _qwen3()
    apply_policy(model, m.tp_group, policy, verify=False)
    assert not any(has_partial_grad(p) for p in model.parameters())
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    _loss(model, ids).backward()
    with pytest.raises(PartialGradError, match=r"self_attn.q_norm.weight.*differ across the tensor-parallel ranks"):
        check_partial_grad_marks(list(model.named_parameters()), m.tp_group)
    return True


@hf
@pytest.mark.parametrize("tp", [2, 4])
def test_qwen3_qk_norm_gradients_are_summed(tp):
    assert all(_dist.run(4, _qwen3_fixed, tp))


@hf
def test_qwen3_without_the_fix_is_caught_by_verify_and_the_first_step_net():
    assert all(_dist.run(2, _qwen3_fix_disabled, 2))


class _GainAttention(nn.Module):
    """Attention written differently from HF: fused ``to_qkv`` read as [Q|K|V], a learned per-head
    gain vector on the queries held by a child module, no HF plan."""

    class Gain(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.g = nn.Parameter(torch.linspace(0.5, 1.5, d))

        def forward(self, x):
            return x * self.g

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.to_qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.gain = self.Gain(self.head_dim)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(self.gain(q), k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


def _custom_gain(tp):
    m = _dist.mesh(tp)
    torch.manual_seed(0)
    dense = _GainAttention().double()
    model = _GainAttention().double()
    model.load_state_dict(dense.state_dict())
    plan = apply_policy(model, m.tp_group, "auto")
    assert [e.name for e in plan.modules if e.options.get("partial_grad")] == ["gain"]
    x = torch.randn(2, 6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dense(x).square().sum().backward()
    model(x).square().sum().backward()
    all_reduce_partial_grads(list(model.parameters()), m.tp_group)
    torch.testing.assert_close(model.gain.g.grad, dense.gain.g.grad, atol=1e-12, rtol=0)
    return True


def test_per_head_parameter_of_a_users_block_is_found_and_summed():
    assert all(_dist.run(2, _custom_gain, 2))


def test_partial_grad_option_is_validated_and_shown():
    model = _GainAttention()
    plan = plan_policy(model, 2, {"to_qkv": "qkv", "proj": "row", "gain": {"style": "replicate", "partial_grad": True}})
    assert "partial_grad" in str(plan)
    from lightning_tp.policy import PolicyError

    with pytest.raises(PolicyError, match=r"options \['partial'\] do not apply to style 'replicate'"):
        plan_policy(model, 2, {"gain": {"style": "replicate", "partial": True}})


# -- the safety net in the strategy: a Trainer run whose plan misses a partial gradient -------------------


def _fit_unmarked(world):
    import lightning as L
    import torch.distributed as dist
    from lit import TokenData, external_launch, trainer_kwargs
    from torch.utils.data import DataLoader

    from lightning_tp import MegatronTPStrategy

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.attn, self.head = nn.Embedding(30, 32), _GainAttention(), nn.Linear(32, 30)

            self.automatic_optimization = False  # two optimizers: the gain's is the second one stepped

        def training_step(self, batch, _):
            x, y = batch
            self.manual_backward(F.cross_entropy(self.head(self.attn(self.emb(x))).reshape(-1, 30), y.reshape(-1)))
            for opt in self.optimizers():
                opt.step()
                opt.zero_grad()

        def configure_optimizers(self):
            gain = self.attn.gain.g
            rest = [p for p in self.parameters() if p is not gain]
            return torch.optim.SGD(rest, lr=0.1), torch.optim.SGD([gain], lr=0.1)

        def train_dataloader(self):
            return DataLoader(TokenData(16), batch_size=4)

    policy = {"attn.to_qkv": "qkv", "attn.proj": "row", "attn.gain": {"style": "replicate", "partial_grad": False},
              "emb": "vocab", "head": "vocab"}  # fmt: skip
    model = Lit()
    before = model.attn.gain.g.detach().clone()
    with external_launch(world):
        strategy = MegatronTPStrategy(tensor_parallel_size=2, policy=policy, verify=False)
        trainer = L.Trainer(devices=world, strategy=strategy, **trainer_kwargs(max_steps=2))
        with pytest.raises(PartialGradError, match=r"\['attn.gain.g'\] differ across the tensor-parallel ranks"):
            trainer.fit(model)
    assert torch.equal(model.attn.gain.g.detach(), before)  # raised before the gain's optimizer stepped
    return dist.get_rank()


def test_first_step_net_stops_every_rank_before_the_step():
    assert sorted(_dist.run(4, _fit_unmarked, 4)) == [0, 1, 2, 3]


class _ManualGPT(__import__("lit").LitGPT):
    """Manual optimization, clipping itself before the step (Lightning's documented pattern)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.automatic_optimization = False

    def training_step(self, batch, _):
        opt = self.optimizers()
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x).reshape(-1, 30), y.reshape(-1))
        opt.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
        opt.step()
        self.losses.append(float(loss.detach()))
        return loss


def _manual_fit(world, tp):
    import lightning as L
    import lit

    from lightning_tp import MegatronTPStrategy

    kw = dict(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu")  # fmt: skip
    if world == 1:
        model = _ManualGPT(batch_size=8, ref_sampler=True)
        L.Trainer(devices=1, **kw).fit(model)
        return model.losses
    with lit.external_launch(world):
        model = _ManualGPT(batch_size=8)
        strategy = MegatronTPStrategy(tensor_parallel_size=tp, sequence_parallel=True)
        L.Trainer(devices=world, strategy=strategy, **kw).fit(model)
        return model.losses


def test_manual_optimization_clips_after_the_partial_gradients_are_summed():
    """self.clip_gradients before opt.step (manual optimization) under sequence parallelism: the norms'
    and position table's partial gradients are summed over TP first, so the clip and the steps are one
    process's (before: the first-step check refused them, or with those frozen, the steps differed)."""
    want = _manual_fit(1, 1)
    for got in _dist.run(2, _manual_fit, 2, 2):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)
