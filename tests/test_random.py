"""Model-parallel RNG tracker: which dropout masks are shared and which differ (TP2 x DP2)."""

from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import nn

import _dist
from lightning_tp.engine.random import (
    MODEL_PARALLEL,
    RNGTracker,
    TPDropout,
    attached_tracker,
    derive_seed,
    model_parallel_seed,
)


def _mask(drop: nn.Module, n: int = 256) -> torch.Tensor:
    return drop(torch.ones(n)) != 0


def _masks():
    m = _dist.mesh(2)
    tracker = model_parallel_seed(1234, m.tp_rank, m.dp_rank)
    plain, tp_drop = nn.Dropout(0.5), TPDropout(0.5, tracker=tracker)
    outside = _mask(plain)
    inside = _mask(tp_drop)
    after = torch.get_rng_state()  # the fork moved the default stream alike on every rank of the TP group
    states = [torch.empty_like(after) for _ in range(2)]
    dist.all_gather(states, after, group=m.tp_group)
    assert torch.equal(states[0], states[1])
    again = model_parallel_seed(1234, m.tp_rank, m.dp_rank)

    # Restoring a saved state reproduces the masks of both streams.
    state = again.state_dict()
    first = (_mask(TPDropout(0.5, tracker=again)), _mask(plain))
    again.load_state_dict(state)
    second = (_mask(TPDropout(0.5, tracker=again)), _mask(plain))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])

    # Eval mode and p=0 draw nothing.
    before = torch.get_rng_state()
    tp_drop.eval()
    assert torch.equal(tp_drop(torch.ones(8)), torch.ones(8))
    assert torch.equal(torch.get_rng_state(), before)
    return dist.get_rank(), outside, inside


def test_dropout_masks_across_tp_and_dp():
    results = {rank: (outside, inside) for rank, outside, inside in _dist.run(4, _masks)}
    # Outside TP regions: identical inside a TP group ([0, 1] and [2, 3])...
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[2][0], results[3][0])
    # ...and different across DP replicas.
    assert not torch.equal(results[0][0], results[2][0])
    # Inside TP regions: different on every rank.
    inside = [results[r][1] for r in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(inside[i], inside[j]), (i, j)
    # A mask is a real dropout mask (about half kept).
    for r in range(4):
        assert 0.3 < results[r][0].float().mean() < 0.7


def test_tracker_api_errors():
    tracker = RNGTracker("cpu")
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="RNG stream 'a' already exists"):
        tracker.add("a", 2)
    with pytest.raises(KeyError, match=r"RNG stream 'b' is not tracked \(have \['a'\]\)"):
        with tracker.fork("b"):
            pass
    assert tracker.names == ["a"] and MODEL_PARALLEL == "model-parallel"


def test_fork_restores_default_even_on_error():
    """What is drawn inside a fork does not move the default stream, whether the block ends or raises
    (a fork moves it by its one draw of the stream's seed)."""
    tracker = RNGTracker("cpu")
    tracker.add("x", 7)
    torch.manual_seed(3)
    with tracker.fork("x"):
        pass
    expected = torch.rand(4)
    torch.manual_seed(3)
    with pytest.raises(RuntimeError):
        with tracker.fork("x"):
            torch.rand(100)
            raise RuntimeError("boom")
    assert torch.equal(torch.rand(4), expected)


def test_derived_seeds_distinct():
    seeds = {derive_seed(1234, stream, dp, tp) for stream in (0, 1) for dp in range(16) for tp in range(16)}
    assert len(seeds) == 2 * 16 * 16
    assert all(0 <= s < 2**63 for s in seeds)


class _TimmMlp(nn.Module):
    """timm's Mlp: fc1 -> act -> drop1 -> fc2 -> drop2 (drop1 on this rank's hidden units, drop2 on the
    replicated output), written without any name the planner knows for a dropout."""

    def __init__(self, d=32):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(0.5)
        self.fc2, self.drop2 = nn.Linear(4 * d, d), nn.Dropout(0.5)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def _hf(kind: str):
    if kind == "gpt2":  # Hugging Face's eager attention drops the probabilities with F.dropout, not the module
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, attn_pdrop=0.5,
                         resid_pdrop=0.5, embd_pdrop=0.5, attn_implementation="eager")  # fmt: skip
        return GPT2LMHeadModel(cfg)
    # BERT: the heads' projections (self.query) and the row layer (output.dense) sit in sibling modules
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=16, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5,
                     attn_implementation="eager")  # fmt: skip
    return BertModel(cfg, add_pooling_layer=False)


# auto leaves BERT replicated (its projections and row layers sit in sibling modules): a policy of one's own
_LAYER = "encoder.layer.*."
_BERT = {_LAYER + "attention.self.[qkv]*": "column", _LAYER + "attention.output.dense": "row",
         _LAYER + "intermediate.dense": "column", _LAYER + "output.dense": "row"}  # fmt: skip


def _split_model(kind: str, m):
    from lightning_tp.policy import apply_policy

    torch.manual_seed(0)
    if kind == "timm-mlp":
        model, x = _TimmMlp().double(), torch.randn(2, 8, 32, dtype=torch.float64)
    else:
        model, x = _hf(kind).double(), torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    tracker = model_parallel_seed(1234, m.tp_rank, m.dp_rank)
    policy = "auto"
    if kind == "bert":
        policy = _BERT
    apply_policy(model, m.tp_group, policy, example_input=x, rng_tracker=tracker)
    return model, x


def _output(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _split_masks(kind: str) -> dict:
    """Every dropout mask of one training forward at TP 2 (the default generator seeded alike on both
    ranks, as the strategy has it), and per call the fraction of its entries equal on the two ranks."""
    import torch.nn.functional as F

    m = _dist.mesh(2)
    model, x = _split_model(kind, m)
    masks, dropout = [], F.dropout

    def recorded(t, p=0.5, training=True, inplace=False):
        out = dropout(t, p, training, inplace)
        masks.append(out == 0)
        return out

    model.train()
    torch.manual_seed(42)
    with mock.patch.object(F, "dropout", recorded):
        _output(model(x)).sum().backward()
    equal = []
    for mask in masks:
        both = [torch.empty_like(mask, dtype=torch.uint8) for _ in range(2)]
        dist.all_gather(both, mask.to(torch.uint8).contiguous(), group=m.tp_group)
        equal.append((tuple(mask.shape), float((both[0] == both[1]).double().mean())))
    states = [torch.empty_like(torch.get_rng_state()) for _ in range(2)]
    dist.all_gather(states, torch.get_rng_state(), group=m.tp_group)
    return {"equal": equal, "default_in_step": torch.equal(states[0], states[1])}


@pytest.mark.parametrize("kind", ["gpt2", "bert", "timm-mlp"])
def test_draws_between_column_and_row_layers_differ_per_rank(kind):
    """Dropout between a block's column layers and its row layer acts on this rank's heads or hidden units:
    its masks must be independent across TP ranks, as they are across heads in the unsharded model, whatever
    draws them (Hugging Face's attention calls F.dropout itself; timm's drop1 has no name the planner knows;
    BERT's projections and row layer sit in sibling modules). They were identical on every rank (heads h and
    h + H/2 dropped together). Dropouts on the replicated activations (residual and embedding dropouts,
    timm's drop2) keep equal masks, and the default stream stays in step across ranks."""
    r = _dist.run(2, _split_masks, kind)[0]
    split = [eq for shape, eq in r["equal"] if shape[-1] != 32]  # (b, heads, t, t) probabilities, (b, t, 128/2)
    replicated = [eq for shape, eq in r["equal"] if shape[-1] == 32]
    assert split and replicated, r
    # half the entries agree by chance (GPT-2: plus the causally masked zeros, 28 of 64)
    assert all(eq < 0.8 for eq in split), r
    assert all(eq == 1.0 for eq in replicated), r
    assert r["default_in_step"]


class _TimmBlock(nn.Module):
    """timm's Attention written as timm writes it (a named attn_drop module on the probabilities, planned
    as a per-rank TPDropout) inside a block the model checkpoints itself (timm's checkpoint_seq)."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.num_heads, self.head_dim = heads, d // heads
        self.qkv, self.attn_drop, self.proj, self.proj_drop = (
            nn.Linear(d, 3 * d),
            nn.Dropout(0.5),
            nn.Linear(d, d),
            nn.Dropout(0.5),
        )

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.attn_drop((q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(-1))
        return x + self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(b, t, -1)))


class _Timm(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks, self.grad_checkpointing = nn.Sequential(_TimmBlock(), _TimmBlock()), False

    def forward(self, x):
        for block in self.blocks:
            x = (
                torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
                if self.grad_checkpointing
                else block(x)
            )
        return x


def _recomputed_grads(kind: str) -> float:
    """The largest gradient difference between a training step with the model's own gradient
    checkpointing (plain torch.utils.checkpoint, without the strategy) and one without, from the same
    generator states, at TP 2."""
    from lightning_tp.policy import apply_policy

    m = _dist.mesh(2)
    torch.manual_seed(0)
    if kind == "timm":
        model, x = _Timm().double(), torch.randn(2, 8, 32, dtype=torch.float64)
        tracker = model_parallel_seed(1234, m.tp_rank, m.dp_rank)
        apply_policy(model, m.tp_group, "auto", example_input=x, rng_tracker=tracker)
        assert any(isinstance(mod, TPDropout) for mod in model.modules())
    else:
        model, x = _split_model(kind, m)
    grads = []
    for checkpointed in (False, True):
        if checkpointed and kind == "timm":
            model.grad_checkpointing = True
        elif checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model.zero_grad()
        torch.manual_seed(42)
        _output(model(x)).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    return max(float((a - b).abs().max()) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize("kind", ["gpt2", "timm"])
def test_the_models_own_gradient_checkpointing_draws_the_same_per_rank_masks(kind):
    """Hugging Face's gradient_checkpointing_enable() and timm's checkpoint_seq recompute a block with
    torch.utils.checkpoint alone (not the strategy's activation checkpointing): the recompute must draw the
    masks the forward drew, per-rank ones included, or the gradients are silently wrong. A model-parallel
    stream with a state of its own had moved on by the recompute (timm's named attn_drop, planned per-rank,
    drew other masks); one derived from the default generators, which torch restores, draws the same."""
    assert max(_dist.run(2, _recomputed_grads, kind)) < 1e-12


def _tp1_against_dense(kind: str) -> float:
    """The largest difference of a training forward's output and gradients between the dense model and
    the same model rewritten at TP 1 with the strategy's tracker, from the same default generator state."""
    import copy

    from lightning_tp.policy import apply_policy

    m = _dist.mesh(1)
    torch.manual_seed(0)
    if kind == "timm":
        dense, x = _Timm().double(), torch.randn(2, 8, 32, dtype=torch.float64)
    else:
        dense, x = _hf(kind).double(), torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    split = copy.deepcopy(dense)
    tracker = model_parallel_seed(1234, m.tp_rank, m.dp_rank)
    apply_policy(split, m.tp_group, "auto", example_input=x, rng_tracker=tracker)
    diffs = []
    for model in (dense, split):
        model.train()
        torch.manual_seed(42)
        out = _output(model(x))
        out.square().sum().backward()
        diffs.append({"out": out.detach(), **{n: p.grad for n, p in model.named_parameters()}})
    assert diffs[0].keys() == diffs[1].keys()
    flipped = {f"{n}.weight" for n, mod in dense.named_modules() if type(mod).__name__ == "Conv1D"}  # (in, out)
    pairs = [(a, diffs[1][n].t() if n in flipped else diffs[1][n]) for n, a in diffs[0].items()]
    return max(float((a - b).abs().max()) for a, b in pairs)


@pytest.mark.parametrize("kind", ["gpt2", "timm"])
def test_at_tp_1_a_rewritten_model_draws_the_dense_models_masks(kind):
    """A group of one holds every head and unit: its draws need no stream of their own, so at TP 1 (here
    TP 1 x DP 2) the rewritten model trains with the dense model's dropout masks and skips
    the split regions' generator swaps in every forward (host time each step). Before, it drew the
    attention-probability and hidden-unit masks from the model-parallel stream: other masks, other grads."""
    assert max(_dist.run(2, _tp1_against_dense, kind)) < 1e-12  # float64: F.linear against Conv1D's addmm


class _Raises(Exception):
    pass


class _Holder(nn.Module):
    """A LightningModule's shape: the model is a child, and what trains calls the child, not this forward."""

    def __init__(self):
        super().__init__()
        self.net = _TimmMlp()

    def forward(self, x):
        return self.net(x)


def _region_after_an_error() -> dict:
    """A forward that raises between a column layer and its row layer (the region open) and is caught by
    its caller (who called the model held by the module the policy was applied to, as a training_step
    does) leaves the default generator as it was outside the region, in step across the TP ranks."""
    import torch.nn.functional as F

    from lightning_tp.policy import apply_policy

    m = _dist.mesh(2)
    torch.manual_seed(0)
    holder, x = _Holder().double(), torch.randn(2, 8, 32, dtype=torch.float64)
    apply_policy(holder, m.tp_group, "auto", example_input=x, rng_tracker=model_parallel_seed(1234, m.tp_rank, 0))
    model = holder.net
    model.train()
    torch.manual_seed(5)
    with mock.patch.object(F, "gelu", side_effect=_Raises), pytest.raises(_Raises):
        model(x)
    tracker = attached_tracker(holder)
    after = torch.get_rng_state()
    states = [torch.empty_like(after) for _ in range(2)]
    dist.all_gather(states, after, group=m.tp_group)
    torch.manual_seed(5)
    with tracker.fork():  # the one draw a region's opening takes from the CPU default generator
        pass
    expected = torch.get_rng_state()
    return {
        "closed": not tracker.region_open,
        "in_step": torch.equal(states[0], states[1]),
        "as_outside": torch.equal(after, expected),
    }


def test_a_region_left_by_an_error_is_closed():
    assert all(all(r.values()) for r in _dist.run(2, _region_after_an_error)), _dist.run(2, _region_after_an_error)


def _with_replayed_masks(kind: str) -> dict:
    """One training forward/backward at TP 2 with every dropout drawing (its masks recorded), and the
    unsharded model's with those masks put back where they belong (a split mask's heads side by side):
    the largest output difference and gradient difference relative to the model's largest gradient entry."""
    import torch.nn.functional as F

    from lightning_tp.lightning.precision import all_reduce_partial_grads
    from lightning_tp.policy import apply_policy

    m = _dist.mesh(2)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(_hf(kind).base_model.double())
    dense, model = models
    policy = "auto" if kind == "gpt2" else _BERT
    apply_policy(model, m.tp_group, policy, example_input=x, rng_tracker=model_parallel_seed(9, m.tp_rank, m.dp_rank))
    masks, dropout = [], F.dropout

    def recorded(t, p=0.5, training=True, inplace=False):  # draws as F.dropout(t) does; t may hold zeros
        noise = dropout(torch.ones_like(t), p, training)
        masks.append(noise == 0)
        return t * noise

    def replayed(t, p=0.5, training=True, inplace=False):
        return t.masked_fill(masks.pop(0), 0.0) / (1 - p)

    model.train(), dense.train()
    torch.manual_seed(42)
    with mock.patch.object(F, "dropout", recorded):
        out = _output(model(x))
    out.square().sum().backward()
    for i, mask in enumerate(masks):
        both = [torch.empty_like(mask) for _ in range(2)]
        dist.all_gather(both, mask.contiguous(), group=m.tp_group)
        split = mask.dim() == 4  # (batch, this rank's heads, query, key): rank 0's heads, then rank 1's
        assert split or torch.equal(both[0], both[1])
        masks[i] = torch.cat(both, dim=1) if split else mask
    assert any(mask.dim() == 4 for mask in masks)
    with mock.patch.object(F, "dropout", replayed):
        ref = _output(dense(x))
    ref.square().sum().backward()
    assert not masks  # every mask put back
    all_reduce_partial_grads(list(model.parameters()), m.tp_group)
    errors, scale = [], 0.0
    for name, p in model.named_parameters():
        g, got = dense.get_parameter(name).grad, _dist.gathered(p, p.grad, m.tp_group)
        if type(dense.get_submodule(name.rpartition(".")[0])).__name__ == "Conv1D" and name.endswith("weight"):
            g = g.t()  # GPT-2's Conv1D holds (in, out): rewritten, an nn.Linear
        errors.append(float((got - g).abs().max()))
        scale = max(scale, float(g.abs().max()))
    grad = max(errors) / scale  # (relative to the largest gradient: a key bias's is zero, analytically)
    return {"out": float((out - ref).detach().abs().max()), "grad": grad}


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_per_rank_masks_train_as_the_unsharded_model_with_the_same_masks(kind):
    """Per-rank masks are still dropout of the one model: the unsharded model given the masks the TP ranks
    drew (each rank's heads in their place) has the same outputs and gradients."""
    for r in _dist.run(2, _with_replayed_masks, kind):
        assert r["out"] < 1e-12 and r["grad"] < 1e-10, r


def _cut_stretch(target: str) -> dict:
    """Two training steps of BERT at TP 2 with the strategy's activation checkpointing of ``target``, a
    module holding a row layer but not its column layers (``output``: dense row, dropout, LayerNorm) or the
    reverse (``intermediate``), against the same steps without: the largest gradient difference, and
    the largest difference between the two ranks' gradients of replicated parameters."""
    from lightning_tp.engine.recompute import apply_activation_checkpointing
    from lightning_tp.engine.sharding import shard_spec

    m = _dist.mesh(2)
    runs = []
    for checkpointed in (False, True):
        model, x = _split_model("bert", m)
        if checkpointed:
            assert len(apply_activation_checkpointing(model, target, attached_tracker(model))) == 2
        model.train()
        torch.manual_seed(42)
        steps = []
        for _ in range(2):
            model.zero_grad()
            _output(model(x)).square().sum().backward()
            steps.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert not attached_tracker(model).region_open
        runs.append(steps)
    grad = max(float((a[n] - b[n]).abs().max()) for a, b in zip(*runs, strict=True) for n in a)
    spread = 0.0
    for p in model.parameters():
        if shard_spec(p) is None:
            both = [torch.empty_like(p.grad) for _ in range(2)]
            dist.all_gather(both, p.grad.contiguous(), group=m.tp_group)
            spread = max(spread, float((both[0] - both[1]).abs().max()))
    return {"grad": grad, "replicated_spread": spread}


@pytest.mark.parametrize("target", ["encoder.layer.?.output", "encoder.layer.?.intermediate"])
def test_checkpointing_a_module_that_cuts_a_split_stretch(target):
    """torch.utils.checkpoint restores the generators for a recompute, not whether a split region was open.
    A checkpointed module holding a row layer but not its columns recomputed its replicated dropout on the
    per-rank stream (the two ranks' replicated gradients apart, 8.2); one holding the columns but not the row
    left the region open after its recompute, and the next step rewound the generator. The recompute now
    starts with the region as the forward found it and drops what it leaves open."""
    for r in _dist.run(2, _cut_stretch, target):
        assert r["grad"] == 0.0 and r["replicated_spread"] < 1e-12, r


def _under_fake_tensors() -> bool:
    """A training forward of a split MLP (a dropout between its column and row layers) and a TPDropout on
    fake tensors, as tracers and memory estimators run them: no value is read (the stream's draw is skipped)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    m = _dist.mesh(2)
    model, x = _split_model("timm-mlp", m)
    model.train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = model(torch.randn(2, 8, 32, dtype=torch.float64))
        drop = TPDropout(0.5, tracker=attached_tracker(model))(torch.ones(4))
    return tuple(out.shape) == (2, 8, 32) and tuple(drop.shape) == (4,) and not attached_tracker(model).region_open


def test_a_split_model_runs_on_fake_tensors():
    assert all(_dist.run(2, _under_fake_tensors))


class _RetryingModule(nn.Module):
    """A replicated dropout and LayerNorm before a split MLP: a per-rank draw there shows in the norm's
    gradient (replicated weights would drift apart)."""

    def __init__(self, d=32):
        super().__init__()
        self.drop, self.norm, self.mlp = nn.Dropout(0.5), nn.LayerNorm(d), _TimmMlp(d)

    def forward(self, x):
        return self.mlp(self.norm(self.drop(x)))


def _fit_with_a_caught_error() -> dict:
    """A training_step that calls its model (not the LightningModule's forward), catches an error raised
    mid-stretch at the first step (an out-of-memory retry) and runs again; then a second Trainer on the
    sharded model."""
    import lightning as L
    import lit
    import torch.nn.functional as F

    from lightning_tp import MegatronTPStrategy

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = _RetryingModule()
            self.example_input_array = torch.randn(2, 8, 32)

        def forward(self, x):  # (the self-check runs it; training_step calls the model itself)
            return self.model(x)

        def training_step(self, batch, i):
            x = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(i))
            if i == 0:
                with mock.patch.object(F, "gelu", side_effect=_Raises):
                    try:
                        self.model(x)
                    except _Raises:
                        pass
            return self.model(x).square().mean()

        def train_dataloader(self):
            return torch.utils.data.DataLoader(range(4))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    module = Module()
    strategies = []
    with lit.external_launch(2):
        for steps in (3, 4):
            strategies.append(MegatronTPStrategy(tensor_parallel_size=2))
            L.Trainer(**lit.trainer_kwargs(max_steps=steps, devices=2, strategy=strategies[-1])).fit(module)
    group = strategies[0].tp_group
    spread = 0.0
    for name, p in module.named_parameters():
        if "norm" in name or name.endswith("fc2.bias"):  # replicated
            both = [torch.empty_like(p) for _ in range(2)]
            dist.all_gather(both, p.detach().contiguous(), group=group)
            spread = max(spread, float((both[0] - both[1]).abs().max()))
    return {"spread": spread, "same_tracker": strategies[1].rng_tracker is strategies[0].rng_tracker is not None}


def test_a_caught_error_mid_stretch_leaves_replicated_weights_identical():
    """A split region left open by an error that training_step caught drew the next step's replicated
    dropout per rank (the LightningModule's own forward, whose hooks would close it, is not what
    training_step calls): replicated weights drifted apart with no error. The strategy closes the region
    around every step, and every module above a block closes it before its forward. A second Trainer on the
    sharded model keeps the tracker its dropouts were built with."""
    for r in _dist.run(2, _fit_with_a_caught_error):
        assert r["spread"] == 0.0 and r["same_tracker"], r
