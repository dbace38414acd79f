"""Deferred (meta-device) init: rewritten on meta, materialized one layer at a time, and the gathered
initial weights do not depend on the TP size."""

from __future__ import annotations

import importlib.util
import warnings

import lightning as L
import lit
import models
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import _dist
from lightning_tp import DeferredInitError, MegatronTPStrategy
from lightning_tp.engine.init import Materializer, is_deferred
from lightning_tp.engine.random import derive_seed
from lightning_tp.lightning.checkpoint import full_state_dict
from lightning_tp.policy import PolicyWarning, apply_policy

HAS_HF = importlib.util.find_spec("transformers") is not None
SEED = 1234


def _meta(name: str) -> nn.Module:
    with torch.device("meta"):
        model = models.BUILDERS[name]()
    return model.double()


def _deferred_weights(name: str) -> list[dict[str, torch.Tensor]]:
    out = []
    for tp in (1, 2, 4):
        m = _dist.mesh(tp)
        model = _meta(name)
        assert is_deferred(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unmatched modules of the HF models
            apply_policy(model, m.tp_group, "auto", verify=False, materializer=Materializer(model, "cpu", SEED))
        assert not is_deferred(model)
        full = full_state_dict(model, m.tp_group)
        out.append(full if dist.get_rank() in (0, 3) else {})
    return out


@pytest.mark.parametrize(
    "name",
    ["plain", "plain_tied", "plain_routed", pytest.param("hf_llama", marks=pytest.mark.skipif(not HAS_HF, reason="hf extra")),
     pytest.param("hf_gpt2", marks=pytest.mark.skipif(not HAS_HF, reason="hf extra"))],
)  # fmt: skip
def test_gathered_initial_weights_do_not_depend_on_tp(name):
    results = _dist.run(4, _deferred_weights, name)
    tp1, tp2, tp4 = results[0]
    assert tp1.keys() == tp2.keys() == tp4.keys() and tp1
    for key, ref in tp1.items():
        assert not ref.is_meta and torch.isfinite(ref).all(), key
        for other in (tp2, tp4, results[3][0], results[3][2]):  # TP sizes, and another data-parallel rank
            assert torch.equal(other[key], ref), key
    weights = [v for k, v in tp1.items() if k.endswith("weight") and v.dim() == 2]
    assert all(w.std() > 0 for w in weights)  # initialized, not left at zeros
    norms = [v for k, v in tp1.items() if ("norm" in k or "ln" in k) and k.endswith("weight")]
    assert norms and all(torch.equal(w, torch.ones_like(w)) for w in norms)  # each module's own initializer ran
    if name == "plain_tied":
        assert torch.equal(tp1["lm_head.weight"], tp1["embed_tokens.weight"])
    if name == "plain_routed":  # set by the initializer of the block holding it (its own module has none)
        routers = [v for k, v in tp1.items() if k.endswith("router.weight")]
        assert len(routers) == 2 and all(0.3 < float(r.std()) < 0.7 for r in routers)
    if name == "hf_llama":  # a buffer the constructor computes is recomputed (not left as empty memory)
        dense = models.BUILDERS[name]().double()
        inv = [k for k in dense.state_dict(keep_vars=True) if k.endswith("inv_freq")]
        assert all(torch.equal(tp1[k], dense.state_dict()[k]) for k in inv)


class _NoInit(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))


def test_module_without_initializer_is_named_before_anything_is_built():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), _NoInit())
    with pytest.raises(DeferredInitError, match=r"modules \['1 \(_NoInit\)'\] hold tensors but have no initializer"):
        Materializer(model, "cpu", 0)
    assert is_deferred(model)  # nothing materialized
    seen = []
    Materializer(model, "cpu", 0, init_fn=seen.append)  # a user hook covers it
    assert not seen  # nothing run yet: only at materialization


class _Scaled(nn.Module):
    """Its reset_parameters sets the weight; the constructor alone gives ``alpha`` and the computed buffer."""

    def __init__(self, fill: float = 0.25):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(4, 4))
        self.alpha = nn.Parameter(torch.full((4,), fill))
        self.register_buffer("table", torch.arange(4.0) * fill, persistent=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.weight)
        self.steps.zero_()


def _materialize(model: nn.Module, **kw) -> None:
    m = Materializer(model, "cpu", 0, **kw)
    for name, unit, recurse in m.units():
        m.materialize(name, unit, recurse)
    m.finish()


def test_a_tensor_no_initializer_sets_is_an_error_not_uninitialized_memory():
    """Initializers that skip a tensor whose value only the constructor gives (the meta device dropped
    it) are named, with the fix: not left as uninitialized memory."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), _Scaled())
    with pytest.raises(DeferredInitError, match=r"no initializer sets _Scaled: \['1.alpha', '1.table'\]"):
        _materialize(model)
    with torch.device("meta"):  # with pretrained weights only the computed buffer (no file has it) is missing
        model = nn.Sequential(nn.Linear(4, 4), _Scaled())
    with pytest.raises(DeferredInitError, match=r"_Scaled: \['1.table'\] .*buffers left out of the state dict"):
        _materialize(model, initialize=False)

    def hook(module):  # the user's init_weights covers them
        if isinstance(module, _Scaled):
            module.alpha.data.fill_(0.25)
            module.table.copy_(torch.arange(4.0) * 0.25)

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), _Scaled())
    _materialize(model, init_fn=hook)
    eager = _Scaled()
    assert torch.equal(model[1].alpha, eager.alpha) and torch.equal(model[1].table, eager.table)
    assert int(model[1].steps) == 0 and torch.isfinite(model[1].weight).all()


class _Masks(nn.Module):
    """A boolean mask only the constructor computes, and unsigned codes its reset_parameters zeroes."""

    def __init__(self, set_mask: bool):
        super().__init__()
        self.set_mask = set_mask
        self.register_buffer("mask", torch.tril(torch.ones(4, 4, dtype=torch.bool)), persistent=False)
        self.register_buffer("codes", torch.zeros(4, dtype=torch.uint8))
        self.reset_parameters()

    def reset_parameters(self):
        self.codes.zero_()
        if self.set_mask:
            self.mask.copy_(torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def test_unset_booleans_are_found_and_set_unsigned_zeros_are_not():
    with torch.device("meta"):
        model = nn.Sequential(_Masks(set_mask=False))
    with pytest.raises(DeferredInitError, match=r"_Masks: \['0.mask'\]"):
        _materialize(model)
    with torch.device("meta"):
        model = nn.Sequential(_Masks(set_mask=True))
    _materialize(model)
    assert torch.equal(model[0].mask, torch.tril(torch.ones(4, 4, dtype=torch.bool))) and not model[0].codes.any()


def test_the_user_hook_runs_after_the_layer_initializers():
    """The LightningModule's init_weights has the last word, also over an enclosing block's _init_weights."""
    with torch.device("meta"):
        model = models.RoutedGPT()

    def hook(module):
        if isinstance(module, models.Router):
            module.weight.zero_()

    _materialize(model.double(), init_fn=hook)
    assert all(not layer.mlp.router.weight.any() for layer in model.layers)


class _CpuBuilt(nn.Module):
    """A block whose own parameter is built off the meta device (an explicit device, as HF DiffLlama's
    ``torch.normal(..., size=...)`` does), so only its children are deferred."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.randn(4, device="cpu"))


class _Owner(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_CpuBuilt(), _CpuBuilt()])

    def _init_weights(self, module):
        if isinstance(module, _CpuBuilt):
            nn.init.constant_(module.scale, 0.5)


def test_a_block_with_tensors_built_off_meta_still_gets_its_initializer():
    with torch.device("meta"):
        model = _Owner()
    assert not model.layers[0].scale.is_meta and model.layers[0].lin.weight.is_meta
    _materialize(model)
    assert all(torch.equal(layer.scale, torch.full((4,), 0.5)) for layer in model.layers)


def test_the_library_gpt_gets_its_scaled_residual_init_under_deferred_init():
    """lightning_tp.models.GPT's residual projections (std 0.02 / sqrt(2 n_layer)): set by its
    attention's and MLP's _init_weights, eagerly and under deferred init alike."""
    from lightning_tp.models.gpt import GPT

    torch.manual_seed(0)
    eager = GPT(vocab_size=64, n_layer=8, n_embd=64, n_head=4)
    with torch.device("meta"):
        meta = GPT(vocab_size=64, n_layer=8, n_embd=64, n_head=4)
    _materialize(meta)
    for model in (eager, meta):
        for name, p in model.named_parameters():
            if name.endswith(("c_proj.weight", "c_fc.weight")):
                want = model.residual_std if "c_proj" in name else 0.02
                assert 0.85 * want < float(p.detach().std()) < 1.15 * want, name


class _HalfSet(nn.Linear):
    """Its reset_parameters sets only the first half of the weight's rows."""

    def reset_parameters(self):
        with torch.no_grad():
            self.weight[: self.out_features // 2].normal_()
            self.bias.zero_()


def _half_set_error() -> str:
    m = _dist.mesh(2)
    with torch.device("meta"):
        model = nn.Sequential()
        model.layers = nn.ModuleList([nn.Sequential(_HalfSet(8, 16), nn.Linear(16, 8))])
    try:
        apply_policy(model, m.tp_group, {"layers.*.0": "column", "layers.*.1": "row"}, verify=False,
                     materializer=Materializer(model, "cpu", 0))  # fmt: skip
    except DeferredInitError as exc:
        return str(exc)
    return "no error"


def test_a_tensor_left_partly_unset_is_an_error_on_every_rank():
    """Checked on the dense layer before it is split: the rank whose slice was set raises too."""
    for message in _dist.run(2, _half_set_error):
        assert "no initializer sets _HalfSet: ['layers.0.0.weight']" in message


@pytest.mark.skipif(not HAS_HF, reason="hf extra")
def test_hugging_face_initializers_of_enclosing_models_and_their_gaps():
    """Falcon-H1's base model writes every layer's mup_vector (a computed buffer) in its _init_weights,
    outside any layer: run as Hugging Face initializes missing weights, it is the eager value, with and
    without pretrained weights, and nothing else changes. Apertus's xIELU constants (constructor only)
    are a DeferredInitError naming them."""
    import hf_zoo
    import transformers

    config = transformers.FalconH1Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8,
        mamba_chunk_size=8, mamba_n_groups=1, max_position_embeddings=64, ssm_multipliers=[0.5, 2.0, 0.25, 3.0, 1.5],
    )  # fmt: skip
    torch.manual_seed(0)
    eager = transformers.FalconH1ForCausalLM(config)
    mup = {k: v for k, v in eager.named_buffers() if k.endswith("mup_vector")}
    assert len(mup) == 2 and all(not torch.equal(v, torch.ones_like(v)) for v in mup.values())
    for initialize in (True, False):
        with torch.device("meta"):
            model = transformers.FalconH1ForCausalLM(config)
        _materialize(model, initialize=initialize)
        buffers = dict(model.named_buffers())
        assert all(torch.equal(buffers[k], v) for k, v in mup.items())
        if initialize:
            assert all(torch.isfinite(p).all() for p in model.parameters())
        assert not any(getattr(t, "_is_hf_initialized", False) for t in (*model.parameters(), *model.buffers()))
    with torch.device("meta"):
        model = hf_zoo.BUILDERS["apertus"]()
    with pytest.raises(DeferredInitError, match=r"no initializer sets XIELUActivation: \['model.layers.0.mlp.act_fn"):
        _materialize(model)


@pytest.mark.skipif(not HAS_HF, reason="hf extra")
def test_hugging_face_models_enclosing_a_unit_write_into_it_as_when_built_eagerly():
    """Hugging Face initializes a module after its children, and some models write into them from outside
    every layer: Whisper's encoder copies sinusoids into its (frozen) position embedding, T5's question
    answering model draws its head with std d_model ** -0.5 (a linear layer's own init gives about 1
    here). Under deferred init they do so too; the user's hook still has the last word."""
    import transformers

    config = transformers.WhisperConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
        max_target_positions=16, num_mel_bins=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )  # fmt: skip
    eager = transformers.WhisperModel(config)
    for hook in (None, lambda m: nn.init.zeros_(m.weight) if isinstance(m, nn.Embedding) else None):
        with torch.device("meta"):
            model = transformers.WhisperModel(config)
        _materialize(model, init_fn=hook)
        positions = model.encoder.embed_positions.weight
        assert not positions.any() if hook else torch.equal(positions, eager.encoder.embed_positions.weight)
        assert not any(getattr(t, "_is_hf_initialized", False) for t in (*model.parameters(), *model.buffers()))
    config = transformers.T5Config(vocab_size=64, d_model=256, d_ff=64, num_layers=1, num_heads=4, d_kv=16)
    with torch.device("meta"):
        model = transformers.T5ForQuestionAnswering(config)
    _materialize(model)
    assert 0.85 < model.qa_outputs.weight.std() * 256**0.5 < 1.15 and not model.qa_outputs.bias.any()


@pytest.mark.skipif(not HAS_HF, reason="hf extra")
def test_enclosing_initializers_leave_other_units_alone_and_the_hook_last():
    """nn.MultiheadAttention's own init (torch's nn.init, run by Hugging Face's _init_weights) writes its
    in_proj_weight and its out_proj's bias, a unit of its own: run again for that unit, it must not
    redraw the in_proj_weight the hook zeroed (torch's init functions are guarded as Hugging Face guards
    them), and the out_proj's bias is zero as when built eagerly."""
    import transformers

    class WithAttention(transformers.PreTrainedModel):
        config_class = transformers.PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.attn = nn.MultiheadAttention(8, 2)
            self.post_init()

    def hook(module):
        if isinstance(module, nn.MultiheadAttention):
            module.in_proj_weight.zero_()
        elif isinstance(module, nn.Linear):
            module.weight.fill_(0.5)

    with torch.device("meta"):
        model = WithAttention(transformers.PretrainedConfig())
    _materialize(model, init_fn=hook)
    assert not model.attn.in_proj_weight.any() and not model.attn.out_proj.bias.any()
    assert (model.attn.out_proj.weight == 0.5).all()


class _SelfInit(nn.Module):
    """A block whose _init_weights initializes itself (takes no module): not an initializer of others."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self._init_weights()

    def _init_weights(self):
        nn.init.eye_(self.fc.weight)


def test_an_init_weights_that_takes_no_module_is_not_called_with_one():
    with torch.device("meta"):
        model = nn.Sequential(_SelfInit())
    _materialize(model)  # (it was called as _init_weights(module): a TypeError)
    assert torch.isfinite(model[0].fc.weight).all()


def _raw_writer_on_meta():
    import transformers

    class RawModel(transformers.PreTrainedModel):
        config_class = transformers.PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.blocks = nn.ModuleList(_NormedMLP() for _ in range(2))
            self.post_init()

        def _init_weights(self, module):
            if isinstance(module, nn.Linear):
                module.reset_parameters()
            elif isinstance(module, RawModel):
                nn.init.zeros_(module.blocks[1].fc2.bias)  # (so it runs for blocks.1)
                module.blocks[0].fc1.weight.data.normal_()  # unguarded: a split unit's slices

    with torch.device("meta"):
        model = RawModel(transformers.PretrainedConfig())
    policy = {"blocks.*.fc1": "column", "blocks.*.fc2": "row"}
    with pytest.raises(
        DeferredInitError, match=r"'RawModel'\], run for 'blocks.1' .*wrote \['blocks.0.fc1.weight'"
    ) as info:
        apply_policy(model, _dist.mesh(2).tp_group, policy, verify=False, materializer=Materializer(model, "cpu", SEED))
    return str(info.value)


@pytest.mark.skipif(not HAS_HF, reason="hf extra")
def test_an_enclosing_initializer_writing_split_slices_is_an_error():
    """An enclosing model's _init_weights that writes another unit in place, ignoring the
    _is_hf_initialized marks, would write each rank's slice of a layer already split: an error on every
    rank, not values that depend on the TP size."""
    first, second = _dist.run(2, _raw_writer_on_meta)
    assert first == second


class _MetaLit(lit.LitGPT):
    """Builds its model on the meta device in configure_model (Lightning's large-model idiom)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        del self.model
        self.start_weights: dict[str, torch.Tensor] = {}

    def configure_model(self):
        if not hasattr(self, "model"):
            with torch.device("meta"):
                self.model = models.PlainGPT(vocab=lit.VOCAB, d=32, n_layers=2, n_heads=4, tied=True, ctx=lit.SEQ)

    def on_fit_start(self):
        self.start_weights = full_state_dict(self.model, self.trainer.strategy.tp_group)


def _fit_deferred(world, tp):
    with lit.external_launch(world):
        model = _MetaLit(batch_size=8 // (world // tp))
        trainer = L.Trainer(
            **lit.trainer_kwargs(max_steps=3, devices=world, strategy=MegatronTPStrategy(tensor_parallel_size=tp,
                                                                                         seed=SEED))
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("error", PolicyWarning)  # verify runs block by block: nothing skipped
            trainer.fit(model)
        losses = [float(x) for x in trainer.callback_metrics.values()]
        return model.start_weights if dist.get_rank() == 0 else {}, losses, trainer.strategy.deferred_init


def _expected_start():
    holder = nn.Module()  # seeds follow module names: the same names as inside the LightningModule
    with torch.device("meta"):
        holder.model = models.PlainGPT(vocab=lit.VOCAB, d=32, n_layers=2, n_heads=4, tied=True, ctx=lit.SEQ)
    m = _dist.mesh(1)
    apply_policy(holder, m.tp_group, "auto", verify=False,
                 materializer=Materializer(holder, "cpu", derive_seed(SEED, 0x1417)))  # fmt: skip
    return full_state_dict(holder.model, m.tp_group)


def test_trainer_with_a_meta_model_initializes_like_tp1():
    (start, losses, deferred), _ = _dist.run(2, _fit_deferred, 2, 2)
    expected = _dist.run(2, _expected_start)[0]
    assert deferred and losses and all(torch.isfinite(torch.tensor(losses)))
    assert start.keys() == expected.keys()
    for key, ref in expected.items():
        assert torch.equal(start[key], ref), key


def _fit_built_under_init_module(world: int) -> list[dict]:
    """LitGPT sets example_input_array in __init__: under init_module(empty_init=True) it is a meta tensor.
    A fit with the self-check and Lightning's ModelSummary (which runs the model on it), then one without
    the self-check."""
    out = []
    for verify in (True, False):
        with lit.external_launch(world):
            strategy = MegatronTPStrategy(tensor_parallel_size=world, seed=SEED, verify=verify)
            trainer = L.Trainer(**lit.trainer_kwargs(max_steps=2, devices=world, strategy=strategy,
                                                     enable_model_summary=True))  # fmt: skip
            with trainer.init_module(empty_init=True):
                model = lit.LitGPT()
            built_on_meta = model.example_input_array.is_meta
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer.fit(model)
        out.append({
            "built_on_meta": built_on_meta, "deferred": trainer.strategy.deferred_init, "step": trainer.global_step,
            "example": model.example_input_array,
            "warned": any("example_input_array holds tensors on the meta device" in str(w.message) for w in caught),
        })  # fmt: skip
    return out


def test_example_input_built_on_meta_gets_values():
    """An example_input_array built under trainer.init_module(empty_init=True) is a shape without values;
    the self-check copied it to the device (NotImplementedError: Cannot copy out of meta tensor) and so did
    Lightning's ModelSummary. It gets values of its shape and dtype, the same on every rank, with a warning."""
    per_rank = _dist.run(2, _fit_built_under_init_module, 2)
    for rank, runs in enumerate(per_rank):
        for r in runs:
            assert r["built_on_meta"] and r["deferred"] and r["step"] == 2, r
            example = r["example"]
            assert example.device.type == "cpu" and example.shape == (2, lit.SEQ) and example.dtype == torch.long
            assert 0 <= int(example.min()) and int(example.max()) < lit.VOCAB and example.unique().numel() > 1
            assert torch.equal(example, per_rank[0][0]["example"])  # the same batch on every rank
            assert r["warned"] == (rank == 0), (rank, r)


def test_init_module_with_empty_init_builds_on_meta():
    trainer = L.Trainer(**lit.trainer_kwargs(devices=1, strategy=MegatronTPStrategy(tensor_parallel_size=1)))
    with trainer.init_module(empty_init=True):
        layer = nn.Linear(4, 4)
    assert layer.weight.is_meta and is_deferred(layer)
    with trainer.init_module(empty_init=False):
        layer = nn.Linear(4, 4)
    assert not layer.weight.is_meta


@pytest.mark.parametrize(("name", "layers"), [("plain", "layers"), ("nano", "transformer.h")])
def test_units_are_one_layer_each(name, layers):
    """Deferred init materializes one layer at a time: a stack (a ModuleList, also inside a
    ModuleDict as nanoGPT's transformer.h) is never one unit; each of its layers is."""
    model = _meta(name)
    units = list(Materializer(model, "cpu", 0).units())
    deep = [n for n, _, with_children in units if with_children]
    stack = model.get_submodule(layers)
    assert [n for n in deep if n.startswith(layers + ".")] == [f"{layers}.{i}" for i in range(len(stack))]
    for n, unit, with_children in units:
        held = sum(p.numel() for p in (unit.parameters() if with_children else unit.parameters(recurse=False)))
        assert held <= max(sum(p.numel() for p in layer.parameters()) for layer in stack) + 30 * 64, n


def _dense_layers_freed():
    m = _dist.mesh(2)
    model = _meta("plain_tied")
    materializer = Materializer(model, "cpu", SEED)
    apply_policy(model, m.tp_group, "auto", verify=False, materializer=materializer)
    owned = {id(t) for t in (*model.parameters(), *model.buffers())}
    alive = [r() for _, r in materializer._done.values() if r() is not None]
    assert alive and all(id(t) in owned for t in alive)  # only what the model itself keeps (replicated ones)
    assert not materializer._holders  # no reference to a replaced dense module is kept
    return True


def test_dense_layers_are_freed_once_split():
    """Memory: a dense layer built for deferred init lives only until its split modules replace it."""
    assert all(_dist.run(2, _dense_layers_freed))


# --- verify=True without the dense model: block by block ---------------------------------------


def _meta_model(name: str) -> nn.Module:
    if name in models.BUILDERS:
        return _meta(name)
    import hf_zoo

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return hf_zoo.BUILDERS[name]().double()


def _policy_of(name: str) -> str:
    if name in models.BUILDERS:
        return "auto"
    import hf_zoo

    return hf_zoo.POLICY.get(name, "auto")


def _block_verify(cases: list[tuple[str, int, bool]]) -> list[tuple[int, list[str], list[str]]]:
    """apply_policy(verify=True) on meta models: (blocks checked, plan notes, warnings) per case."""
    import lightning_tp.policy.apply as apply_mod

    out = []
    for name, tp, sp in cases:
        m = _dist.mesh(tp)
        model = _meta_model(name)
        example = None
        if name not in models.BUILDERS:
            import hf_zoo

            example = hf_zoo.inputs(name, hf_zoo.build(name))
        checked, real = [], apply_mod.check_blocks
        apply_mod.check_blocks = lambda *a, checked=checked, real=real, **k: (
            checked.append(real(*a, **k)) or checked[-1]
        )
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                plan = apply_policy(model, m.tp_group, _policy_of(name), verify=True, example_input=example,
                                    sequence_parallel=sp, materializer=Materializer(model, "cpu", SEED))  # fmt: skip
        finally:
            apply_mod.check_blocks = real
        assert not is_deferred(model)
        notes = [f"{r.name}: {r.note}" for r in plan.modules if r.note and "per head" in r.note]
        out.append((checked[0], notes, [str(w.message) for w in caught if "block by block" in str(w.message)]))
    return out


HF_BLOCK_CASES = [
    ("llama", 2, False),
    ("gemma", 2, False),  # one k/v head: k_proj/v_proj replicated
    ("gpt_bigcode_mq", 2, False),  # one k/v head in the fused c_attn: replicated whole
    ("gpt2", 2, False),
    ("gpt_bigcode_mha", 2, False),
    ("t5", 2, False),
    ("mixtral", 2, False),
    ("gpt_oss", 2, False),  # policy "names": interleaved gate/up, down_proj_bias added on one rank, sinks
]


@pytest.mark.parametrize("world", [2, 4])
def test_verify_checks_a_meta_model_block_by_block(world):
    """Deferred init with verify=True: every layer holding split modules is checked against the same
    layer built dense from the same weights (the plain GPTs with and without sequence parallelism,
    nanoGPT; at TP 2 also Hugging Face Llama, GPT-2 with Conv1D, GPT-BigCode whose fused c_attn is
    read per head, found from a forward on meta tensors, T5, Mixtral with its experts split and GPT-OSS under policy 'names')."""
    cases = [("plain", world, False), ("plain_tied", world, True), ("nano", world, True)]
    # one k/v head (replicated): under sequence parallelism, and with every module a unit of its own (the
    # k/v projections' outputs are compared as the features of the dense output each rank holds)
    cases += [("plain_mqa", world, True), ("plain_mqa_seq", world, False)]
    if world == 2 and HAS_HF:
        cases += HF_BLOCK_CASES
    results = _dist.run(world, _block_verify, cases)[0]
    by_name = dict(zip([c[0] for c in cases], results, strict=True))
    # every unit holding a rewritten module: embedding, 2 layers, head; under sequence parallelism
    # also the position table (its rows become this rank's sequence chunk)
    assert by_name["plain"][0] == 4 and by_name["plain_tied"][0] == 5 and by_name["nano"][0] >= 3
    for name, (checked, notes, warned) in by_name.items():
        assert checked >= 3, name
        assert bool(notes) == (name == "gpt_bigcode_mha"), (name, notes)  # per-head c_attn -> column
        # T5's blocks receive the head-split position bias; a row layer that is a unit of its own receives this
        # rank's features: the dense copies cannot take them (skipped, and said); the others are checked
        assert bool(warned) == (name in ("t5", "plain_mqa_seq")), (name, warned)
    assert "4 of 16 blocks were not checked" in by_name["plain_mqa_seq"][2][0]  # the 2 o_proj and 2 down_proj
    if "t5" in by_name:  # blocks after the first receive the head-split position bias: said, not hidden
        assert "blocks were not checked" in by_name["t5"][2][0] and "others matched" in by_name["t5"][2][0]


@pytest.mark.skipif(not HAS_HF, reason="transformers (extra 'hf') not installed")
def test_verify_checks_a_meta_hugging_face_model_block_by_block_under_sequence_parallelism():
    """Hugging Face models under sequence parallelism on the meta device: their layer stack is the
    sequence-sharded region, so the first layer takes the whole sequence (its dense copy is given it as
    it is, not gathered) and the last gives it whole; every unit (embedding, the layers, the head) is
    checked, none skipped. Llama (rotary, grouped-query), GPT-2 (Conv1D, learned positions), Mixtral
    (experts split, a view of its input) and Falcon-7B (ALiBi cut to each rank's heads, multi-query)."""
    cases = [("llama", 2, True), ("gpt2", 2, True), ("mixtral", 2, True), ("falcon", 2, True)]
    for (name, _, _), (checked, _, warned) in zip(cases, _dist.run(2, _block_verify, cases)[0], strict=True):
        assert checked == 4 and not warned, (name, checked, warned)


class _NormedMLP(nn.Module):
    """Normalizes its hidden features between fc1 and fc2: a column split of fc1 changes the result."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.fc1(x)
        return x + self.fc2(h / h.norm(dim=-1, keepdim=True))


class _InferencePathMLP(nn.Module):
    """An MLP whose eval-mode, no-gradient forward reads its layers' weights itself (an inference kernel)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        if torch.is_grad_enabled() or self.training:
            return x + self.fc2(torch.tanh(self.fc1(x)))
        return x + F.linear(torch.tanh(F.linear(x, self.fc1.weight, self.fc1.bias)), self.fc2.weight, self.fc2.bias)


class _Stack(nn.Module):
    def __init__(self, block: type[nn.Module] = _NormedMLP) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.blocks = nn.ModuleList(block() for _ in range(3))
        self.head = nn.Linear(16, 40)

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _wrong_policy_on_meta():
    from lightning_tp import PolicyMismatchError

    m = _dist.mesh(2)
    with torch.device("meta"):
        model = _Stack().double()
    policy = {"blocks.*.fc1": "column", "blocks.*.fc2": "row", "emb": "replicate", "head": "replicate"}
    with pytest.raises(PolicyMismatchError, match=r"block by block\): the output of 'blocks.0' differs") as info:
        apply_policy(model, m.tp_group, policy, verify=True, materializer=Materializer(model, "cpu", SEED))
    return str(info.value)


def test_block_verify_names_the_first_layer_that_differs():
    message = _dist.run(2, _wrong_policy_on_meta)[0]
    assert "tolerance" in message


def _inference_path_on_meta():
    from lightning_tp import PolicyMismatchError

    m = _dist.mesh(2)
    with torch.device("meta"):
        model = _Stack(_InferencePathMLP).double()
    policy = {"blocks.*.fc1": "column", "blocks.*.fc2": "row", "emb": "replicate", "head": "replicate"}
    match = r"block by block\): in eval mode without gradients .* block 'blocks.0'.* matches with gradients enabled"
    with pytest.raises(PolicyMismatchError, match=match):
        apply_policy(model, m.tp_group, policy, verify=True, materializer=Materializer(model, "cpu", SEED))
    return True


def test_block_verify_compares_the_inference_path_too():
    """Block by block, as for a dense model: a block whose eval-mode, no-gradient forward reads a split
    layer's weights itself (right with gradients) is refused, naming it."""
    assert all(_dist.run(2, _inference_path_on_meta))
