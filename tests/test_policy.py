"""The module-rewriting policy: auto rules, HF plans, ties, head attributes, errors, verify, report."""

import copy
import functools
import importlib.util
import warnings

import models
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _dist
from lightning_tp import PolicyMismatchError, ShardingError
from lightning_tp.engine.loss import gather_logits
from lightning_tp.engine.sharding import shard_spec
from lightning_tp.policy import (
    PolicyError,
    PolicyWarning,
    apply_policy,
    hf_plan,
    plan_policy,
    register_policy,
    translate_hf_plan,
)
from lightning_tp.policy.rules import Rule

HAS_HF = importlib.util.find_spec("transformers") is not None
hf = pytest.mark.skipif(not HAS_HF, reason="transformers (extra 'hf') not installed")
TOL = {"atol": 1e-10, "rtol": 0.0}


def _forward(model, name, ids):
    return models.HFLogits(model)(ids) if name.startswith("hf_") else model(ids)


def _check_parity(name, tp, policy="auto"):
    m = _dist.mesh(tp)
    dense = models.build(name)
    model = models.build(name)
    wrapped = models.HFLogits(model) if name.startswith("hf_") else model
    with warnings.catch_warnings():
        warnings.simplefilter("error", PolicyWarning)  # auto must cover every linear/embedding
        plan = apply_policy(wrapped, m.tp_group, policy)  # verify=True: the self-check passes
    vocab = 30
    g = torch.Generator().manual_seed(5 + m.dp_rank)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    tgt = torch.randint(0, vocab, (2, 12), generator=g)
    tgt[0, :3] = -100
    ld_logits, lt_logits = _forward(dense, name, ids), _forward(model, name, ids)
    torch.testing.assert_close(gather_logits(lt_logits), ld_logits, **TOL)  # logits stay vocab-sharded
    models.loss_parity_backward(ld_logits, lt_logits, tgt, vocab, TOL)
    n_sharded = 0
    for pname, param in model.named_parameters():
        ref = dense.get_parameter(pname).grad
        spec = shard_spec(param)
        if spec is not None:
            n_sharded += 1
            owner = dense.get_submodule(pname.rpartition(".")[0])
            if type(owner).__name__ == "Conv1D" and pname.endswith("weight"):
                ref = ref.t()  # Conv1D stores (in, out)
            ref = spec.shard(ref, m.tp_rank)
        torch.testing.assert_close(param.grad, ref, **TOL, msg=lambda s, n=pname: f"{n}: {s}")
    ties = {}
    for a, b in [("lm_head", "embed_tokens"), ("lm_head", "transformer.wte"), ("lm_head", "model.embed_tokens")]:
        try:
            ties[(a, b)] = model.get_submodule(a).weight is model.get_submodule(b).weight
        except AttributeError:
            pass
    return n_sharded, plan.tp_size, ties


PARITY = ["plain", "plain_gqa", "plain_tied", "nano"]
HF_PARITY = ["hf_llama", "hf_llama_tied", "hf_gpt2"]


@pytest.mark.parametrize(("world", "tp"), [(2, 2), (4, 4)], ids=["tp2", "tp4"])
@pytest.mark.parametrize("name", PARITY + [pytest.param(n, marks=hf) for n in HF_PARITY])
def test_auto_policy_parity(world, tp, name):
    for n_sharded, plan_tp, ties in _dist.run(world, _check_parity, name, tp):
        assert n_sharded > 0 and plan_tp == tp
        if name.endswith("tied") or name in ("nano", "hf_gpt2"):
            assert any(ties.values()), ties  # the tie survived the rewrite on every rank


def test_parity_dp2_tp2():
    for n_sharded, _, _ in _dist.run(4, _check_parity, "plain_gqa", 2):
        assert n_sharded > 0


def _check_mismatch_caught(name):
    m = _dist.mesh(2)
    model = models.build(name)
    with pytest.raises(PolicyMismatchError) as info:
        apply_policy(model, m.tp_group, "auto")
    return str(info.value)


def test_verify_catches_full_width_reshape():
    for msg in _dist.run(2, _check_mismatch_caught, "nano_full_width"):
        assert "transformer.h.0.attn" in msg and "does not fit the policy" in msg


class SilentlyWrong(nn.Module):
    """Reads its head count from a config dict the policy cannot see: runs at TP 2, computes garbage."""

    def __init__(self):
        super().__init__()
        self.cfg = {"heads": 2}
        self.emb = nn.Embedding(16, 8)
        self.attn = nn.Module()
        self.attn.q = nn.Linear(8, 8)
        self.attn.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16)

    def forward(self, idx):
        x = self.emb(idx)
        B, T, _ = x.shape
        q = self.attn.q(x).view(B, T, self.cfg["heads"], -1).transpose(1, 2)  # (B, heads, T, hd): wrong hd at TP
        att = torch.softmax(q @ q.transpose(-1, -2), -1) @ q
        return self.head(self.attn.proj(att.transpose(1, 2).reshape(B, T, -1)))


def _check_silent_mismatch():
    m = _dist.mesh(2)
    torch.manual_seed(0)
    model = SilentlyWrong().double()
    with pytest.raises(
        PolicyMismatchError,
        match=r"max abs difference .* > tolerance .* First module whose output differs: 'attn.proj'",
    ):
        apply_policy(model, m.tp_group, {"emb": "vocab", "attn.q": "column", "attn.proj": "row", "head": "vocab"})
    return True


def test_verify_catches_silent_mismatch_and_names_module():
    assert all(_dist.run(2, _check_silent_mismatch))


# ------------------------------------------------------------------------------------------------
# Planning (single process, no process group).


def test_auto_rules_and_attributes_nano():
    plan = plan_policy(models.build("nano"), 2)
    styles = {m.name: m.style for m in plan.modules}
    assert styles["transformer.h.0.attn.c_attn"] == "qkv"
    assert styles["transformer.h.0.attn.c_proj"] == "row"
    assert styles["transformer.h.0.mlp.c_fc"] == "column"
    assert styles["transformer.wte"] == styles["lm_head"] == "vocab"
    assert styles["transformer.wpe"] == "replicate"
    assert ("transformer.h.1.attn", "n_head", 4, 2) in plan.attribute_changes
    assert ("transformer.h.1.attn", "n_embd", 16, 8) in plan.attribute_changes
    assert plan.unmatched == [] and plan.unused_patterns == []


class _UnsizedFused(nn.Module):
    """A fused q/k/v of 3 query heads and 1 key/value head (24 + 8 + 8) whose block names the key/value
    head count in a way no rule knows (``groups``)."""

    def __init__(self) -> None:
        super().__init__()
        self.n_heads, self.groups, self.head_dim = 3, 1, 8
        self.query_key_value = nn.Linear(24, 40)
        self.dense = nn.Linear(24, 24)


def test_a_fused_projection_the_name_rules_cannot_size_stays_whole_with_its_row():
    model = nn.ModuleDict({"attn": _UnsizedFused(), "mlp": models.PlainGPT(d=16, n_heads=2).layers[0].mlp})
    with pytest.warns(PolicyWarning, match=r"'attn.query_key_value' for a fused .* cannot be read.*\['attn.dense'\]"):
        plan = plan_policy(model, 2)
    assert {m.name: m.style for m in plan.modules if m.name.startswith("attn")} == {}
    assert {"attn.query_key_value", "attn.dense"} <= set(plan.unmatched)
    assert plan.attribute_changes == [] and {m.style for m in plan.modules} == {"column", "row"}  # the MLP split
    with pytest.raises(ShardingError, match=r"cannot be divided into 3 equal fused chunks"):
        plan_policy(model, 2, {"attn.query_key_value": "qkv", "attn.dense": "row"})  # a policy's own entry


def test_verify_false_warns_that_fused_layouts_were_not_read():
    from lightning_tp.policy.apply import _warn_unread_layouts

    model = models.build("nano")
    with pytest.warns(
        PolicyWarning, match=r"verify=False: 2 fused q/k/v projections .*\[Q \| K \| V\] chunks \(16, 16, 16\)"
    ):
        _warn_unread_layouts(plan_policy(model, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the layout a policy of one's own gives is not second-guessed
        _warn_unread_layouts(plan_policy(model, 2, {"*.c_attn": "qkv", "*.attn.c_proj": "row"}))


def test_plan_report_table():
    plan = plan_policy(models.build("plain_tied"), 4)
    text = str(plan)
    for col in ("module", "style", "full shape", "local shape", "params / rank"):
        assert col in text
    assert "layers.0.mlp.gate_proj" in text and "64 x 16" in text and "16 x 16" in text
    assert "tied to embed_tokens" in text
    assert "parameters per rank" in text and "layers.0.attn.n_heads: 4 -> 1" in text
    assert plan.local_params < plan.full_params


def test_gqa_kv_heads_not_divisible_is_refused():
    with pytest.raises(
        ShardingError, match=r"n_kv_heads=3 key/value heads cannot be split over tensor_parallel_size=2.*Grouped-query"
    ):  # nor replicated: a rank's 3 query heads would read two k/v heads in unequal groups
        plan_policy(models.PlainGPT(d=24, n_heads=6, n_kv_heads=3), 2)


def test_heads_not_divisible():
    with pytest.raises(
        ShardingError, match=r"module 'layers.0.attn': n_heads=3 heads cannot be split over tensor_parallel_size=2"
    ):
        plan_policy(models.PlainGPT(d=12, n_heads=3), 2)


@hf
def test_hf_gqa_whole_heads_from_head_dim():
    # Llama attention keeps head counts in its config only: whole heads are checked through head_dim.
    with pytest.raises(
        ShardingError, match=r"'model.model.layers.0.self_attn.q_proj': 8 heads .* tensor_parallel_size=16"
    ):
        plan_policy(models.HFLogits(models.hf_llama(n_kv_heads=2)), 16)
    # 2 k/v heads at TP 4: replicated, 2 ranks computing each (the config names them; the block has
    # num_key_value_groups, 8 / 2 query heads per k/v head, which becomes 8 / 4)
    plan = plan_policy(models.HFLogits(models.hf_llama(n_kv_heads=2)), 4)
    rows = {m.name.removeprefix("model.model.layers.0.self_attn."): m for m in plan.modules}
    assert rows["k_proj"].style == rows["v_proj"].style == "kv_replicate" and rows["q_proj"].style == "column"
    assert ("model.model.layers.0.self_attn", "num_key_value_groups", 4, 2) in plan.attribute_changes


@hf
def test_hf_plan_translation():
    model = models.HFLogits(models.hf_llama())
    plan = hf_plan(model)
    assert plan["model.model.layers.*.self_attn.q_proj"] == "colwise"
    assert plan["model.lm_head"] == "colwise_gather_output"
    p = plan_policy(model, 2)
    styles = {m.name: m.style for m in p.modules}
    assert p.source == "huggingface tp_plan"
    assert styles["model.lm_head"] == "vocab" and styles["model.model.embed_tokens"] == "vocab"
    assert styles["model.model.layers.1.mlp.down_proj"] == "row"
    with pytest.raises(
        PolicyError, match=r"'layers.\*.zero_experts': style 'moe_identity_expert' has no module-rewrite"
    ):
        translate_hf_plan({"layers.*.zero_experts": "moe_identity_expert"})


class _LocalParamsBlock(nn.Module):
    def __init__(self, sinks: bool):
        super().__init__()
        self.q_proj, self.o_proj = nn.Linear(16, 16), nn.Linear(16, 16)
        self.sinks = nn.Parameter(torch.randn(4)) if sinks else None
        self.scale = nn.Parameter(torch.ones(4, 2))  # no plan entry: whole


def test_hf_local_params_split_each_module_own_parameters_as_its_entries_shard_them():
    """Hugging Face's ``local_params`` on a block (Granite-SWA, MiMo-V2-Flash, Beam): the block's own
    parameters that have plan entries are split as those shard them (``colwise``: ``Shard(ndim - 2)``),
    read per module (MiMo's sinks exist on its sliding-window layers only), and their entries are not
    module rules; a parameter style with no equivalent is refused by name."""
    model = nn.Module()
    model.layers = nn.ModuleList([_LocalParamsBlock(True), _LocalParamsBlock(False)])
    plan = {
        "layers.*.q_proj": "colwise", "layers.*.o_proj": "rowwise", "layers.*.sinks": "colwise",
        "layers.*": "local_params",
    }  # fmt: skip
    rules = translate_hf_plan(plan, model)
    assert rules == {
        "layers.*.q_proj": Rule("column"), "layers.*.o_proj": Rule("row"),
        "layers.0": Rule("head_params", {"params": {"sinks": 0}}),
    }  # fmt: skip
    assert translate_hf_plan({**plan, "layers.*.scale": "rowwise"}, model)["layers.0"].options == {
        "params": {"sinks": 0, "scale": 1}
    }
    with pytest.raises(PolicyError, match=r"'layers.\*.sinks'.*'embedding_rowwise'.*'layers.0'.*'head_params'"):
        translate_hf_plan({**plan, "layers.*.sinks": "embedding_rowwise"}, model)
    with pytest.raises(PolicyError, match=r"'layers.\*.scale'.*'replicated_with_grad_allreduce'"):  # partial: unsummed
        translate_hf_plan({**plan, "layers.*.scale": "replicated_with_grad_allreduce"}, model)
    with pytest.raises(PolicyError, match=r"\['layers.\*'\]: style 'local_params' is read on the model"):
        translate_hf_plan(plan)
    model.layers[1].sinks = nn.Linear(16, 16)  # a child module of that name in another layer keeps its own entry
    assert translate_hf_plan(plan, model)["layers.*.sinks"] == Rule("column")


def test_style_on_wrong_module_type():
    with pytest.raises(
        TypeError,
        match=r"style 'column' \(pattern 'embed_tokens'\) does not fit module 'embed_tokens' of type Embedding",
    ):
        plan_policy(models.build("plain"), 2, {"embed_tokens": "column"})
    with pytest.raises(TypeError, match=r"style 'row' .* module 'norm' of type LayerNorm"):
        plan_policy(models.build("plain"), 2, {"norm": "row"})


class _ScaledHead(nn.Linear):
    """An LM head that multiplies its logits by a learned per-vocabulary scale (Hugging Face's Dory)."""

    def __init__(self, d: int, vocab: int):
        super().__init__(d, vocab, bias=False)
        self.logit_scale = nn.Parameter(torch.ones(vocab))

    def forward(self, x):
        return super().forward(x) * self.logit_scale


class _HeadModel(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 16):
        super().__init__()
        self.embed, self.up, self.down, self.lm_head = (
            nn.Embedding(vocab, d),
            nn.Linear(d, 32),
            nn.Linear(32, d),
            _ScaledHead(d, vocab),
        )
        self.up.register_buffer("mask", torch.ones(32))  # a buffer of a layer's own, also lost in a rewrite

    def forward(self, ids):
        h = self.embed(ids)
        return self.lm_head(h + self.down(torch.relu(self.up(h) * self.up.mask)))


def test_a_layer_whose_state_the_rewrite_would_drop_is_refused_before_any_change():
    """A parallel layer keeps a weight and a bias: an nn.Linear subclass with a parameter of its own, or a
    layer holding a buffer, is refused by name (not rewritten without it), and left as it was."""
    model = _HeadModel()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(
        ShardingError,
        match=r"module 'lm_head' \(_ScaledHead\) holds \['logit_scale'\], which the 'vocab' rewrite \(pattern 'lm_head'\) would drop",
    ):
        plan_policy(model, 2, {"lm_head": "vocab", "embed": "vocab"})
    with pytest.raises(
        ShardingError, match=r"module 'up' \(Linear\) holds \['mask'\], which the 'column' rewrite \(pattern 'up'\)"
    ):
        plan_policy(model, 2, {"up": "column", "down": "row"})  # apply_policy plans before it changes anything
    assert type(model.lm_head) is _ScaledHead and {n: t for n, t in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())
    plan = plan_policy(model, 2, {"lm_head": "replicate", "embed": "vocab", "up": "replicate", "down": "replicate"})
    assert {m.name: m.style for m in plan.modules}["lm_head"] == "replicate"


class _GatedHeadsAttention(nn.Module):
    """Attention whose heads' outputs are each scaled by a gate computed per head (Laguna's g_proj:
    hidden -> one value per head)."""

    def __init__(self, d: int = 32, n_heads: int = 4):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d // n_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))  # (k's bias has no gradient)
        self.g_proj = nn.Linear(d, n_heads)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (m(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, heads, t, head_dim)
        y = y * torch.sigmoid(self.g_proj(x)).transpose(1, 2).unsqueeze(-1)
        return self.o(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


_GATED_POLICY = {"q": "column", "k": "column", "v": "column", "g_proj": "column", "o": "row"}


def _block_parity(make, tp: int, policy="auto", perturb: bool = False) -> tuple[nn.Module, dict]:
    """Worker side: the block ``make()`` (float64; ``perturb``: every parameter moved off its init, so
    that norms' ones and zero biases cannot hide a gradient left unsummed) rewritten with ``policy``
    under ``verify=True``, and ``_dist.train_parity`` of it against its dense copy."""
    import copy

    torch.manual_seed(0)
    dense = make().double()
    for p in dense.parameters() if perturb else ():
        p.data.add_(0.1 * torch.randn_like(p))
    model = copy.deepcopy(dense)
    group = _dist.mesh(tp).tp_group
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    apply_policy(model, group, policy, verify=True, example_input=x)
    return model, _dist.train_parity(dense, model, group, [x, x.flip(1), 2 * x])


def _gated_heads_parity(tp: int) -> dict:
    return _block_parity(_GatedHeadsAttention, tp, _GATED_POLICY)[1]


@pytest.mark.parametrize("tp", [2, 4])
def test_a_per_head_gate_is_split_with_the_heads(tp):
    """A layer with one output per head is split like the heads (whole heads on every rank), not refused
    for being narrower than one head."""
    plan = plan_policy(_GatedHeadsAttention(), tp, _GATED_POLICY)
    assert {m.name: m.local_shape for m in plan.modules}["g_proj"] == (4 // tp, 32)
    for errs in _dist.run(tp, _gated_heads_parity, tp):
        assert errs["out"] < 1e-12 and errs["grad"] < 1e-12 and errs["weight"] < 1e-12, errs


class _PReLUMLP(nn.Module):
    """An MLP written with torch's own learned activation: ``nn.PReLU()`` holds one slope shared by every
    hidden unit (a one-element parameter), between the column and the row layer."""

    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.fc_in, self.act, self.fc_out = nn.Linear(d, hidden), nn.PReLU(init=0.1), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))


def _prelu_parity(tp: int) -> dict:
    return _block_parity(_PReLUMLP, tp, {"fc_in": "column", "fc_out": "row"}, perturb=True)[1]


@pytest.mark.parametrize("tp", [2, 4])
def test_one_element_parameters_beside_split_layers_are_partial(tp):
    """A learned activation's one-element parameters (nn.PReLU's slope; Apertus's xIELU alpha_p/alpha_n)
    act on this rank's hidden units: planned partial (gradient summed over TP), with a note; outputs,
    gradients and weights after AdamW steps as the dense MLP's (float64)."""
    rows = {m.name: m for m in plan_policy(_PReLUMLP(), tp, {"fc_in": "column", "fc_out": "row"}).modules}
    assert rows["act"].style == "replicate" and rows["act"].options == {"partial_grad": True}
    assert "one-element parameters" in rows["act"].note
    for errs in _dist.run(tp, _prelu_parity, tp):
        assert errs["out"] < 1e-12 and errs["grad"] < 1e-12 and errs["weight"] < 1e-12, errs


class _RepeatKVAttention(nn.Module):
    """Grouped-query attention as Meta's reference Llama writes it (wq/wk/wv/wo, ``n_kv_heads`` and
    ``n_rep`` attributes, keys and values expanded by ``n_rep`` before attention), with biased k/v
    projections and a per-head RMS norm of q and k (Qwen3's); ``fused``: one biased ``wqkv``
    projection ``[q | k | v]`` instead of wq/wk/wv."""

    def __init__(self, d=32, n_heads=8, n_kv_heads=1, kv_norm_width: int | None = None, fused=False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.n_rep = n_heads, n_kv_heads, n_heads // n_kv_heads
        self.head_dim = d // n_heads
        self.wo = nn.Linear(d, d, bias=False)
        if fused:
            self.wqkv = nn.Linear(d, d + 2 * n_kv_heads * self.head_dim)
        else:
            self.wq = nn.Linear(d, d, bias=False)
            self.wk, self.wv = (nn.Linear(d, n_kv_heads * self.head_dim) for _ in range(2))
        self.q_norm = nn.RMSNorm(self.head_dim)
        self.k_norm = nn.RMSNorm(kv_norm_width or self.head_dim)  # OLMo-2's: over all k/v heads at once

    def _repeat(self, x):  # (b, t, kv, hd) -> (b, t, kv * n_rep, hd), each k/v head n_rep times in a row
        b, t, kv, hd = x.shape
        return x[:, :, :, None, :].expand(b, t, kv, self.n_rep, hd).reshape(b, t, kv * self.n_rep, hd)

    def forward(self, x):
        b, t, _ = x.shape
        kv = self.n_kv_heads * self.head_dim
        if hasattr(self, "wqkv"):
            q, k, v = self.wqkv(x).split((self.n_heads * self.head_dim, kv, kv), dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = self.q_norm(q.view(b, t, self.n_heads, self.head_dim))
        k = self.k_norm(k).view(b, t, self.n_kv_heads, -1) if self.k_norm.weight.numel() != self.head_dim else (
            self.k_norm(k.view(b, t, self.n_kv_heads, self.head_dim)))  # fmt: skip
        v = v.view(b, t, self.n_kv_heads, self.head_dim)
        q, k, v = (y.transpose(1, 2) for y in (q, self._repeat(k), self._repeat(v)))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


def _replicated_kv_parity(tp: int, kv: int, fused: bool) -> dict:
    return _block_parity(functools.partial(_RepeatKVAttention, n_kv_heads=kv, fused=fused), tp, perturb=True)[1]


@pytest.mark.parametrize(
    ("tp", "kv", "fused"), [(2, 1, False), (4, 1, False), (4, 2, False), (2, 1, True), (4, 2, True)],
    ids=["tp2-mqa", "tp4-mqa", "tp4-kv2", "tp2-mqa-fused", "tp4-kv2-fused"],
)  # fmt: skip
def test_key_value_heads_fewer_than_ranks_are_replicated(tp, kv, fused):
    """Fewer key/value heads than ranks (multi-query included): each rank holds and computes its query
    heads and the one k/v head they read (a fused q/k/v projection too), the gradients of the k/v rows
    are summed over the ranks that hold the head, the per-head k norm's over TP; outputs, gradients and
    weights after AdamW steps as the dense block's (float64)."""
    plan = plan_policy(_RepeatKVAttention(n_kv_heads=kv, fused=fused), tp, "auto")
    rows = {m.name: m for m in plan.modules}
    assert rows["wo"].style == "row"
    if fused:  # each rank holds its query heads' rows and one key/value head's
        assert rows["wqkv"].style == "kv_replicate"
        assert rows["wqkv"].options == {"kv_heads": kv, "chunks": (32, kv * 4, kv * 4)}
        assert rows["wqkv"].local_shape == (32 // tp + 8, 32) and rows["wqkv"].local_params == (32 // tp + 8) * 33
    else:
        assert rows["wq"].style == "column"
        for name in ("wk", "wv"):
            assert rows[name].style == "kv_replicate" and rows[name].options == {"kv_heads": kv}
            assert rows[name].full_shape == (kv * 4, 32) and rows[name].local_shape == (4, 32)
    changes = {attr: (old, new) for _, attr, old, new in plan.attribute_changes}
    assert changes == {"n_heads": (8, 8 // tp), "n_kv_heads": (kv, 1), "n_rep": (8 // kv, 8 // tp)}
    for errs in _dist.run(tp, _replicated_kv_parity, tp, kv, fused):
        assert errs["out"] < 1e-12 and errs["grad"] < 1e-12 and errs["weight"] < 1e-12, errs


def _narrow_kv_parity(tp: int, fused: bool) -> dict:
    make = functools.partial(_RepeatKVAttention, n_heads=16, n_kv_heads=1, fused=fused)
    return _block_parity(make, tp, perturb=True)[1]


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_key_value_heads_narrower_than_the_ranks_are_replicated(fused):
    """One key/value head of head_dim 2 at TP 4: its width (2) does not divide by the TP size, which a
    column split would refuse; replicated, each rank holds the whole head, so it is planned as
    kv_replicate all the same (float64 parity of outputs, gradients and AdamW steps). A width that is
    not a key/value head still refuses with the split's own error."""
    rows = {
        m.name: m for m in plan_policy(_RepeatKVAttention(n_heads=16, n_kv_heads=1, fused=fused), 4, "auto").modules
    }
    for name in ("wqkv",) if fused else ("wk", "wv"):
        assert rows[name].style == "kv_replicate", rows[name]
    for errs in _dist.run(4, _narrow_kv_parity, 4, fused):
        assert errs["out"] < 1e-12 and errs["grad"] < 1e-12 and errs["weight"] < 1e-12, errs
    mlp = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 8))
    with pytest.raises(ShardingError, match=r"cannot split out_features of '0' of size 6 over tensor_parallel_size=4"):
        plan_policy(mlp, 4, {"0": "column", "2": "replicate"})
    # replicated k/v heads before a module that still cannot be split: that module's own error
    block = nn.ModuleDict({"attn": _RepeatKVAttention(n_heads=16, n_kv_heads=1, fused=fused), "fc": nn.Linear(32, 6)})
    policy = {"attn.wo": "row", "attn.w*": "column", "fc": "column"} if not fused else {
        "attn.wqkv": {"style": "qkv", "chunks": [32, 2, 2]}, "attn.wo": "row", "fc": "column"}  # fmt: skip
    with pytest.raises(ShardingError, match=r"cannot split out_features of 'fc' of size 6 over tensor_parallel_size=4"):
        plan_policy(block, 4, policy)


class _GatedQueryAttention(nn.Module):
    """Qwen3-Next's attention layout, Hugging Face style: the head counts in a config, ``head_dim`` and
    ``num_key_value_groups`` on the block, a query projection twice as wide as the heads (each head's
    query and its output gate side by side)."""

    def __init__(self, heads: int = 8, kv: int = 2, head_dim: int = 4, d: int = 32):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv, hidden_size=d)
        self.head_dim, self.num_key_value_groups = head_dim, heads // kv
        self.q_proj = nn.Linear(d, 2 * heads * head_dim)
        self.k_proj, self.v_proj = nn.Linear(d, kv * head_dim), nn.Linear(d, kv * head_dim)
        self.o_proj = nn.Linear(heads * head_dim, d)


def test_replicated_key_value_heads_beside_a_gated_query_projection():
    """The query head count comes from the config, not from the widest projection (twice the heads here):
    the query heads per key/value head become 8 / 4 = 2, not 16 / 4."""
    plan = plan_policy(_GatedQueryAttention(), 4, "auto")
    assert {m.name: m.style for m in plan.modules if m.name.endswith("_proj")} == {
        "q_proj": "column", "k_proj": "kv_replicate", "v_proj": "kv_replicate", "o_proj": "row",
    }  # fmt: skip
    assert ("", "num_key_value_groups", 4, 2) in plan.attribute_changes, plan.attribute_changes


def test_key_value_heads_that_cannot_be_replicated_are_refused_before_any_change():
    # (a TP size that is not a multiple of the k/v head count: test_gqa_kv_heads_not_divisible_is_refused)
    # a norm over all k/v heads at once (OLMo-2's k_norm) needs them all: not on replicated heads
    model = _RepeatKVAttention(d=48, n_kv_heads=2, kv_norm_width=12)
    with pytest.raises(ShardingError, match=r"'k_norm' reads all 12 features of the block's key/value heads"):
        plan_policy(model, 4, "auto")
    # nothing says which projections hold the key/value heads (no count, no n_rep): refused as before
    del model.n_kv_heads, model.n_rep
    with pytest.raises(ShardingError, match=r"'wk': 2 heads .* cannot be split over tensor_parallel_size=4"):
        plan_policy(model, 4, "auto")
    # a replicated k/v projection gets a parameter of its own (partial gradients): a tie to it is refused
    tied = _RepeatKVAttention(n_kv_heads=1)
    tied.probe = nn.Linear(32, 4)
    tied.probe.weight = tied.wk.weight
    with pytest.raises(PolicyError, match=r"break a tied parameter shared by 'wk.weight' \(kv_replicate\)"):
        plan_policy(tied, 2, "auto")
    with pytest.raises(ShardingError, match=r"'wk': kv_heads=4 key/value heads of out_features=8 cannot be replicated"):
        plan_policy(_RepeatKVAttention(n_kv_heads=2), 4, {"wk": {"style": "kv_replicate", "kv_heads": 4}})


class _SinkAttention(nn.Module):
    """Attention with a learned sink logit per head (GPT-OSS): each head's softmax also covers a column
    holding its ``sinks`` entry, dropped after the softmax."""

    def __init__(self, d: int = 32, n_heads: int = 8, n_kv_heads: int = 2):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d // n_heads
        self.q_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.k_proj, self.v_proj = (nn.Linear(d, n_kv_heads * self.head_dim) for _ in range(2))
        self.sinks = nn.Parameter(torch.randn(n_heads))

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (b, heads, t, hd): local heads
        k, v = (m(x).view(b, t, -1, self.head_dim).transpose(1, 2) for m in (self.k_proj, self.v_proj))
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = q @ k.transpose(-1, -2) / self.head_dim**0.5
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        sink = self.sinks.view(1, -1, 1, 1).expand(b, -1, t, 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
        return self.o_proj((probs @ v).transpose(1, 2).reshape(b, t, -1))


def _sink_parity(tp: int) -> dict:
    model, errs = _block_parity(_SinkAttention, tp)
    return {**errs, "local": tuple(model.sinks.shape)}


@pytest.mark.parametrize("tp", [2, 4])
def test_per_head_parameters_of_a_block_are_split_with_its_heads(tp):
    """A parameter the attention block holds itself with one entry per head (GPT-OSS's sinks) is split
    with the heads (2 k/v heads: split at TP 2, replicated at TP 4); float64 outputs, gradients and
    weights after AdamW as the dense block's."""
    plan = plan_policy(_SinkAttention(), tp, "auto")
    row = {m.name: m for m in plan.modules}[""]
    assert row.style == "head_params" and row.options == {"params": {"sinks": 0}} and row.local_params == 8 // tp
    for errs in _dist.run(tp, _sink_parity, tp):
        assert errs["local"] == (8 // tp,)
        assert errs["out"] < 1e-12 and errs["grad"] < 1e-12 and errs["weight"] < 1e-12, errs


class _HeadScale(nn.Module):
    """A learned scale and shift per head and feature, ``(heads, head_dim)`` each, applied to
    ``(b, heads, t, head_dim)`` activations (a user's per-head norm, as Cohere's q_norm / k_norm)."""

    def __init__(self, heads: int, head_dim: int, shift: bool = True):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(heads, head_dim))
        self.shift = nn.Parameter(torch.randn(heads, head_dim)) if shift else None

    def forward(self, x):
        x = torch.einsum("bhtd,hd->bhtd", x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), self.scale)
        return x if self.shift is None else x + self.shift[:, None, :]


class _HeadNormAttention(nn.Module):
    """Attention with a learned per-head norm on its queries (8 heads), keys and values (2 key/value
    heads; the keys' without a shift, which the softmax would cancel), heads read from the projections'
    local widths."""

    def __init__(self, d: int = 32, n_heads: int = 8, n_kv_heads: int = 2):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d // n_heads
        self.q_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.k_proj, self.v_proj = (nn.Linear(d, n_kv_heads * self.head_dim) for _ in range(2))
        self.q_norm, self.v_norm = _HeadScale(n_heads, self.head_dim), _HeadScale(n_kv_heads, self.head_dim)
        self.k_norm = _HeadScale(n_kv_heads, self.head_dim, shift=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (
            m(x).unflatten(-1, (-1, self.head_dim)).transpose(1, 2) for m in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k, v = self.q_norm(q), self.k_norm(k), self.v_norm(v)
        rep = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True
        )
        return self.o_proj(out.transpose(1, 2).flatten(2))


def _head_norm_parity(tp: int) -> dict:
    model, errs = _block_parity(_HeadNormAttention, tp)
    return {**errs, "local": (tuple(model.q_norm.scale.shape), tuple(model.k_norm.scale.shape))}


@pytest.mark.parametrize("tp", [2, 4])
def test_per_head_parameters_of_a_child_are_split_with_the_heads(tp):
    """A module inside the attention block whose parameters hold one row per query head or per key/value
    head (a per-head norm) is split with the heads (2 key/value heads: split at TP 2; at TP 4 replicated,
    each rank holding its head's row); float64 outputs, gradients and weights after AdamW as dense."""
    rows = {m.name: m for m in plan_policy(_HeadNormAttention(), tp, "auto").modules}
    assert rows["q_norm"].style == rows["k_norm"].style == rows["v_norm"].style == "head_params"
    assert rows["q_norm"].options == {"params": {"scale": 0, "shift": 0}}
    assert rows["k_norm"].options == {"params": {"scale": {"dim": 0, "kv_heads": 2}}}
    assert rows["v_norm"].options == {"params": dict.fromkeys(("scale", "shift"), {"dim": 0, "kv_heads": 2})}
    for errs in _dist.run(tp, _head_norm_parity, tp):
        assert errs["local"] == ((8 // tp, 4), (2 // tp or 1, 4))
        assert errs["out"] < 1e-12 and errs["grad"] < 1e-12 and errs["weight"] < 1e-12, errs


def test_per_head_split_of_key_value_heads_is_checked():
    """``{'dim': d, 'kv_heads': n}`` names key/value heads: a size other than n at a TP size they are
    replicated at, or a value of another form, is refused naming the parameter."""
    policy = {"q_proj": "column", "k_proj": "column", "v_proj": "column", "o_proj": "row"}
    bad = {"k_norm": {"style": "head_params", "params": {"scale": {"dim": 0, "kv_heads": 3}}}}
    with pytest.raises(ShardingError, match=r"params\['scale'\] has 2 entries on dim 0.*key/value head of 3"):
        plan_policy(_HeadNormAttention(), 4, {**policy, **bad})
    bad = {"k_norm": {"style": "head_params", "params": {"scale": {"dim": 0, "heads": 2}}}}
    with pytest.raises(ShardingError, match=r"params\['scale'\]=\{'dim': 0, 'heads': 2\} is not a dim"):
        plan_policy(_HeadNormAttention(), 2, {**policy, **bad})


class _SinkLM(nn.Module):
    """Token embedding, two sink-attention blocks with residuals (one with a learned output scale of its
    own), an LM head: a model sequence parallelism can run."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.lm_head = nn.Embedding(50, 32), nn.Linear(32, 50)
        self.layers = nn.ModuleList([_SinkAttention(), _SinkAttention()])
        self.layers[1].gain = nn.Parameter(torch.ones(1))  # a whole parameter of a block with sinks

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x) * getattr(layer, "gain", 1.0)
        return self.lm_head(x)


def _sink_sequence_parallel(tp: int) -> dict:
    import copy

    from lightning_tp.engine.sharding import has_partial_grad

    torch.manual_seed(0)
    dense = _SinkLM().double()
    model = copy.deepcopy(dense)
    group = _dist.mesh(tp).tp_group
    policy = {**{r.name: {"style": r.style, **r.options} for r in plan_policy(_SinkLM(), tp, "auto").modules},
              "lm_head": {"style": "vocab", "gather_output": True}}  # fmt: skip
    plan = apply_policy(model, group, policy, sequence_parallel=True)  # verify=True: outputs and gradients
    g = torch.Generator().manual_seed(2)
    errs = _dist.train_parity(dense, model, group, [torch.randint(0, 50, (2, 8), generator=g) for _ in range(2)])
    rows = {r.name: (r.style, r.options.get("params"), r.options.get("partial_grad")) for r in plan.modules}
    return {**errs, "rows": rows, "partial": [n for n, p in model.named_parameters() if has_partial_grad(p)]}


@pytest.mark.parametrize("tp", [2, 4])
def test_per_head_parameters_are_split_under_sequence_parallelism(tp):
    """Under sequence parallelism the block's one row gathers the sequence and splits its sinks; its other
    whole parameter (a gain) gets a partial gradient. Float64 outputs, gradients and weights after AdamW."""
    for r in _dist.run(tp, _sink_sequence_parallel, tp):
        assert r["rows"]["layers.0"] == ("sequence_gather", {"sinks": 0}, None), r["rows"]
        assert r["rows"]["layers.1"] == ("sequence_gather", {"sinks": 0}, True), r["rows"]
        assert "layers.1.gain" in r["partial"] and not any("sinks" in n for n in r["partial"]), r["partial"]
        assert r["out"] < 1e-12 and r["grad"] < 1e-11 and r["weight"] < 1e-12, r


def test_tie_the_policy_would_break():
    with pytest.raises(
        PolicyError,
        match=r"break a tied parameter shared by 'embed_tokens.weight' \(vocab, pattern 'embed_tokens'\), "
        r"'lm_head.weight' \(replicate, pattern 'lm_head'\)",
    ):
        plan_policy(models.build("plain_tied"), 2, {"embed_tokens": "vocab", "lm_head": "replicate"})


def test_unmatched_and_unused_warn_and_strict_raises():
    policy = {"layers.*.attn.[qkv]_proj": "column", "layers.*.attn.o_proj": "row", "nothing.here": "row"}
    with pytest.warns(PolicyWarning) as record:
        from lightning_tp.policy import warn_plan

        warn_plan(plan_policy(models.build("plain"), 2, policy))
    messages = " ".join(str(w.message) for w in record)
    assert "layers.0.mlp.gate_proj" in messages and "embed_tokens" in messages
    assert "patterns match no module: ['nothing.here']" in messages
    with pytest.raises(PolicyError, match=r"strict policy: \d+ nn.Linear/nn.Embedding modules match no pattern"):
        plan_policy(models.build("plain"), 2, policy, strict=True)


def test_bad_policy_entries():
    with pytest.raises(PolicyError, match=r"entry 'x': unknown style 'colwise'"):
        plan_policy(models.build("plain"), 2, {"x": "colwise"})
    with pytest.raises(PolicyError, match=r"options \['chunks'\] do not apply to style 'row'"):
        plan_policy(models.build("plain"), 2, {"x": {"style": "row", "chunks": 3}})
    with pytest.raises(PolicyError, match=r"neither 'auto', 'names', a registered name"):
        plan_policy(models.build("plain"), 2, "no-such-policy")


def test_yaml_registered_and_file_policies(tmp_path):
    text = "embed_tokens: vocab\nlm_head: {style: vocab, gather_output: false}\n'*': replicate\n"
    a = plan_policy(models.build("plain"), 2, text)
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    b = plan_policy(models.build("plain"), 2, str(path))
    register_policy(
        "test-embeddings-only",
        {"embed_tokens": "vocab", "lm_head": {"style": "vocab", "gather_output": False}, "*": "replicate"},
    )
    c = plan_policy(models.build("plain"), 2, "test-embeddings-only")
    for plan in (a, b, c):
        styles = {m.name: (m.style, m.options) for m in plan.modules if m.style != "replicate"}
        assert styles == {"embed_tokens": ("vocab", {}), "lm_head": ("vocab", {"gather_output": False})}


def _hunyuan():
    """A tiny Hugging Face HunYuan-Dense: its tp_plan (transformers 5.24) splits only the token embedding."""
    from transformers import HunYuanDenseV1Config, HunYuanDenseV1ForCausalLM

    torch.manual_seed(0)
    config = HunYuanDenseV1Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, attn_implementation="eager", use_cache=False,
    )  # fmt: skip
    return HunYuanDenseV1ForCausalLM(config).double()


def _names_policy_parity() -> dict:
    import copy

    model = _hunyuan()
    dense = copy.deepcopy(model)
    group = _dist.mesh(2).tp_group
    ids = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    plan = apply_policy(model, group, "names", verify=True, example_input={"input_ids": ids})  # outputs and grads
    with torch.no_grad():
        loss, ref = model(input_ids=ids, labels=ids).loss, dense(input_ids=ids, labels=ids).loss
    return {"source": plan.source, "local": plan.local_params, "full": plan.full_params, "err": float(loss - ref)}


@hf
def test_a_hugging_face_plan_that_splits_little_names_the_name_rules_which_split_the_rest():
    """A model whose Hugging Face plan leaves attention and MLP whole: the warning names policy='names',
    whose rules split them (exact under verify=True: outputs and every gradient against the dense model)."""
    from lightning_tp.policy import warn_plan

    plan = plan_policy(_hunyuan(), 2)
    assert plan.source == "huggingface tp_plan" and "model.layers.0.self_attn.q_proj" in plan.unmatched
    assert {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"} <= set(plan.names_would_split)
    with pytest.warns(PolicyWarning, match=r"leaves whole 14 modules that lightning_tp's name rules would split"):
        warn_plan(plan)
    assert "the name rules would split 14 modules this plan leaves whole: policy 'names' uses them" in str(plan)
    names = {m.name: m.style for m in plan_policy(_hunyuan(), 2, "names").modules}
    assert names["model.layers.0.self_attn.q_proj"] == "column" and names["model.layers.0.mlp.down_proj"] == "row"
    for r in _dist.run(2, _names_policy_parity):
        assert r["source"] == "auto, name rules (policy='names')" and r["local"] < 0.6 * r["full"], r
        assert abs(r["err"]) < 1e-12, r
    with pytest.raises(PolicyError, match=r"'names' is reserved for the built-in rules"):
        register_policy("names", {"*": "replicate"})


def test_uneven_features_named():
    with pytest.raises(
        ShardingError, match=r"out_features of 'layers.0.attn.q_proj' of size 16 over tensor_parallel_size=3"
    ):
        plan_policy(models.PlainGPT(d=16, n_heads=4), 3)


def _check_precomputed_plan():
    m = _dist.mesh(2)
    model, dense = models.build("plain_tied"), models.build("plain_tied")
    plan = plan_policy(model, 2, "auto")
    assert apply_policy(model, m.tp_group, plan) is plan  # applied as planned, not planned again
    ids = torch.randint(0, 30, (2, 12), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(gather_logits(model(ids)), dense(ids), **TOL)

    other = models.build("nano")  # a plan made for another model is refused before any rewrite
    before = {n: type(mod) for n, mod in other.named_modules()}
    with pytest.raises(PolicyError, match="plan was made for another model"):
        apply_policy(other, m.tp_group, plan_policy(models.build("plain"), 2, "auto"))
    assert {n: type(mod) for n, mod in other.named_modules()} == before
    return True


def test_apply_policy_takes_a_precomputed_plan_for_this_model_only():
    assert all(_dist.run(2, _check_precomputed_plan))


class _Wrapper(nn.Module):
    """A LightningModule-like holder of the model (what the strategy plans and rewrites)."""

    def __init__(self, model):
        super().__init__()
        self.model = model


def test_patterns_relative_to_a_wrapped_model_are_a_clear_error():
    from lightning_tp.policy import PolicyError

    wrapped = _Wrapper(models.build("plain"))
    child_relative = {"layers.*.attn.q_proj": "column", "layers.*.attn.o_proj": "row"}
    with pytest.raises(PolicyError, match=r"match inside its child module: .*'model\.layers\.\*\.attn\.q_proj'"):
        plan_policy(wrapped, 2, child_relative)
    prefixed = {f"model.{k}": v for k, v in child_relative.items()}
    assert {r.name for r in plan_policy(wrapped, 2, prefixed).modules if r.splits} == {
        f"model.layers.{i}.attn.{p}" for i in (0, 1) for p in ("q_proj", "o_proj")
    }


def test_vocab_size_comes_from_a_nested_config():
    from types import SimpleNamespace

    from lightning_tp.policy.rules import infer_vocab_size

    inner = nn.Module()
    inner.config = SimpleNamespace(vocab_size=100)
    inner.word_embeddings = nn.Embedding(100, 8)
    inner.position_embeddings = nn.Embedding(512, 8)  # also "hinted" by its name, and larger
    assert infer_vocab_size(inner) == infer_vocab_size(_Wrapper(inner)) == 100


class _FlatLM(nn.Module):
    """Column layers directly in the model (no block): sequence parallelism cannot gather for them."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(30, 16)
        self.fc = nn.Linear(16, 64)
        self.proj = nn.Linear(64, 16)
        self.lm_head = nn.Linear(16, 30, bias=False)


def test_sequence_parallel_column_outside_a_block_is_refused_also_when_wrapped():
    from lightning_tp.policy import PolicyError

    policy = {"fc": "column", "proj": "row", "tok": "vocab", "lm_head": "vocab"}
    for model, pol in ((_FlatLM(), policy), (_Wrapper(_FlatLM()), {f"model.{k}": v for k, v in policy.items()})):
        with pytest.raises(PolicyError, match="sits directly in the model"):
            plan_policy(model, 2, pol, sequence_parallel=True)


class _ScaledAttention(models.PlainAttention):
    def __init__(self, d, n_heads):
        super().__init__(d, n_heads)
        self.scale = nn.Parameter(torch.ones(d))


def test_a_policy_entry_on_a_gathering_block_keeps_its_gather():
    model = models.build("plain")
    model.layers[0].attn = _ScaledAttention(16, 4)
    auto = {r.name: {"style": r.style, **r.options} for r in plan_policy(model, 2, "auto").modules}
    plan = plan_policy(model, 2, {"layers.0.attn": {"style": "replicate", "partial_grad": False}, **auto},
                       sequence_parallel=True)  # fmt: skip
    rows = {r.name: r for r in plan.modules}
    assert rows["layers.0.attn"].style == "sequence_gather" and rows["layers.0.attn"].pattern == "layers.0.attn"
    assert rows["layers.0.attn"].options == {"in_features": [16], "partial_grad": False}  # the user's word stands
    assert rows["layers.1.attn"].style == "sequence_gather" and "partial_grad" not in rows["layers.1.attn"].options
    plan = plan_policy(model, 2, "auto", sequence_parallel=True)
    assert {r.name: r for r in plan.modules}["layers.0.attn"].options == {"in_features": [16], "partial_grad": True}


def test_a_column_layer_without_its_blocks_gather_row_is_refused():
    from lightning_tp.policy.styles import BuildContext

    with pytest.raises(ShardingError, match="no 'sequence_gather' row for block 'layers.0.attn'"):
        BuildContext(group=None, sequence_parallel=True).gather("layers.0.attn")


class _ConfigAttn(nn.Module):
    """Attention with no head attributes of its own: it reads them from the config it holds (LitGPT's
    ``self.config.n_head``); fused q/k/v for 4 query and 2 key/value heads of size 8."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(32, (4 + 2 * 2) * 8)
        self.proj = nn.Linear(32, 32)


def test_head_counts_in_a_config_object_are_divided_on_a_copy_the_block_alone_holds():
    """A block without head attributes of its own that reads them from a config it holds (LitGPT's
    self.config.n_head; here a frozen dataclass): the plan divides the config's values, applying it
    gives the block its own copy; the model's config is untouched. A config whose copies share their
    storage (the write would reach every module) is refused by name."""
    import dataclasses

    from lightning_tp.policy.apply import _set_attributes
    from lightning_tp.policy.rules import PolicyError

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        n_head: int = 4
        n_query_groups: int = 2
        head_size: int = 8

    class Mlp(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config, self.fc, self.proj = config, nn.Linear(32, 64), nn.Linear(64, 32)

    class Model(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config
            self.h = nn.ModuleList([nn.ModuleDict({"attn": _ConfigAttn(config), "mlp": Mlp(config)})])

    model = Model(Cfg())
    plan = plan_policy(model, 2, "auto")
    assert [m.options.get("chunks") for m in plan.modules if m.name == "h.0.attn.qkv"] == [(32, 16, 16)]
    changes = sorted(plan.attribute_changes)
    assert changes == [("h.0.attn", "config.n_head", 4, 2), ("h.0.attn", "config.n_query_groups", 2, 1)], changes
    _set_attributes(model, plan.attribute_changes)
    attn = model.h[0]["attn"]
    assert (attn.config.n_head, attn.config.n_query_groups, attn.config.head_size) == (2, 1, 8)
    assert model.config.n_head == 4 and model.h[0]["mlp"].config is model.config

    class Shared:  # copy.copy returns the same object: a write would change every module's config
        def __init__(self):
            self.n_head, self.n_query_groups, self.head_size = 4, 2, 8

        def __copy__(self):
            return self

    model = Model(Shared())
    with pytest.raises(PolicyError, match=r"h.0.attn.config.n_head = 2 .* changed the original too"):
        _set_attributes(model, plan_policy(model, 2, "auto").attribute_changes)


def test_a_config_attribute_that_raises_when_read_is_not_a_head_count():
    """A config with values per layer may raise on a model-wide read (Hugging Face's heterogeneous
    configs raise their own error, not AttributeError, for ``config.head_dim`` in Gemma 4): the plan
    reads such an attribute as absent and takes the head counts from where they are readable."""

    class PerLayerValue(Exception):
        pass

    class Cfg:
        def __init__(self):
            self.n_head, self.n_query_groups, self.n_embd = 4, 2, 32

        def __getattr__(self, name):
            if name in ("head_dim", "head_size", "num_heads"):  # per-layer values: a global read raises
                raise PerLayerValue(f"{name} is a per-layer attribute")
            raise AttributeError(name)

    model = nn.ModuleDict({"attn": _ConfigAttn(Cfg())})
    with pytest.raises(PerLayerValue):
        model["attn"].config.head_dim  # noqa: B018 - what the policy must survive
    plan = plan_policy(model, 2, "auto")
    assert [m.options.get("chunks") for m in plan.modules if m.name == "attn.qkv"] == [(32, 16, 16)]
    assert sorted(plan.attribute_changes) == [
        ("attn", "config.n_embd", 32, 16),  # the query width, as the block's own config gives it
        ("attn", "config.n_head", 4, 2),
        ("attn", "config.n_query_groups", 2, 1),
    ]


class _LatentAttention(nn.Module):
    """Multi-head latent attention's shape: kv_a -> [c_kv (to a column layer) | k_rope (to every head)]."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.qk_rope_head_dim = 4, 2
        self.kv_a = nn.Linear(16, 8 + 2)
        self.kv_b = nn.Linear(8, 4 * 6)
        self.o = nn.Linear(4 * 6, 16)


def test_partial_output_is_resolved_from_the_block_and_checked():
    policy = {"kv_b": "column", "o": "row", "kv_a": {"style": "replicate", "partial_output": "qk_rope_head_dim"}}
    row = {m.name: m for m in plan_policy(_LatentAttention(), 2, policy).modules}["kv_a"]
    assert row.style == "replicate" and row.options == {"partial_output": 2} and not row.splits
    assert translate_hf_plan({"a.kv_a": "mla_kv_a_proj"})["a.kv_a"].options == {"partial_output": "qk_rope_head_dim"}
    with pytest.raises(PolicyError, match=r"'kv_a': partial_output='rope_dim' names an attribute that its parent"):
        plan_policy(_LatentAttention(), 2, {**policy, "kv_a": {"style": "replicate", "partial_output": "rope_dim"}})
    with pytest.raises(ShardingError, match=r"'kv_a' \(style 'replicate'\): partial_output=10 .* out_features=10"):
        plan_policy(_LatentAttention(), 2, {**policy, "kv_a": {"style": "replicate", "partial_output": 10}})
    # under sequence parallelism, in the block that gathers the sequence (the one holding kv_b), the column
    # layers leave their input gradients partial for the gather to sum: kv_a's whole output gradient is
    # partial alike (partial_grad, no sum of its tail alone)
    lm = nn.ModuleDict({"layers": nn.Sequential(_LatentAttention(), _LatentAttention()), "head": nn.Linear(16, 64)})
    sp = {**{f"layers.*.{k}": v for k, v in policy.items()}, "head": "vocab"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (no forward to read the layers' inputs from: Megatron's split)
        rows = {m.name: m for m in plan_policy(lm, 2, sp, sequence_parallel=True).modules}
        assert rows["layers.1.kv_a"].options == {"partial_grad": True}
        assert rows["layers.1"].options == {"in_features": [8, 16]}  # kv_b's width and kv_a's (the hidden states)
        lm["proj"] = nn.Linear(16, 10)  # outside any block: its input would be this rank's chunk
        with pytest.raises(
            PolicyError,
            match=r"'proj' \(style 'replicate'\): with partial_output, .*must sit in the block that gathers",
        ):
            plan_policy(lm, 2, {**sp, "proj": {"style": "replicate", "partial_output": 2}}, sequence_parallel=True)


class _EncoderLM(nn.Module):
    """torch's own nn.TransformerEncoder between a token embedding and a head: in eval mode without
    gradients each layer runs torch's fused kernel, which reads linear1/linear2's weights itself."""

    def __init__(self, vocab=37, d=32):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, ids):
        return self.lm_head(self.enc(self.tok(ids)))


class _InferenceKernelMLP(nn.Module):
    """A user's MLP with its own inference path that reads the layers' weights instead of calling them."""

    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        if torch.is_grad_enabled():
            return self.fc2(F.gelu(self.fc1(x)))
        return F.linear(F.gelu(F.linear(x, self.fc1.weight, self.fc1.bias)), self.fc2.weight, self.fc2.bias)


_ENCODER_POLICY = {"enc.layers.*.linear1": "column", "enc.layers.*.linear2": "row", "tok": "vocab",
                   "lm_head": {"style": "vocab", "gather_output": True}}  # fmt: skip


def _encoder_inference(tp):
    torch.manual_seed(0)
    dense = _EncoderLM().double()
    model = copy.deepcopy(dense)
    ids = torch.randint(0, 37, (2, 10), generator=torch.Generator().manual_seed(1))
    apply_policy(model, _dist.mesh(tp).tp_group, _ENCODER_POLICY, example_input=ids)  # verify: both paths
    dense.eval(), model.eval()
    errs = {}
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            want = dense(ids)
            errs[mode.__name__] = float((gather_logits(model(ids)) - want).abs().max() / want.abs().max())
    errs["fast path restored"] = torch.backends.mha.get_fastpath_enabled()
    return errs


def test_torch_transformer_encoder_layers_run_split_in_inference_too():
    """nn.TransformerEncoderLayer's fused inference kernel (eval mode, no gradients: Lightning's
    evaluation loops) would bypass split linear1/linear2 (no all-reduce: silently wrong logits); it is
    turned off while such a layer runs, so inference is exact as training is."""
    for errs in _dist.run(2, _encoder_inference, 2):
        assert errs.pop("fast path restored")
        assert max(errs.values()) < 1e-12, errs


class _PaddedEncoderLM(_EncoderLM):
    """torch's defaults (nested tensors on) and a padding mask: in eval mode without gradients the fused
    path returns zeros at the padded positions; the unfused path, the one split layers run, does not."""

    def __init__(self):
        super().__init__()
        self.enc.enable_nested_tensor, self.enc.use_nested_tensor = True, True

    def forward(self, ids, pad):
        return self.lm_head(self.enc(self.tok(ids), src_key_padding_mask=pad))


def _padded_encoder(tp):
    torch.manual_seed(0)
    dense = _PaddedEncoderLM().double()
    model = copy.deepcopy(dense)
    ids = torch.randint(0, 37, (2, 10), generator=torch.Generator().manual_seed(1))
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 6:] = True
    apply_policy(model, _dist.mesh(tp).tp_group, _ENCODER_POLICY, example_input=(ids, pad))  # was refused
    dense.eval(), model.eval()
    with torch.no_grad():
        want, got = dense(ids, pad), gather_logits(model(ids, pad))
    return float((got - want)[~pad].abs().max() / want.abs().max())


def test_torch_transformer_encoder_with_a_padding_mask_is_checked_on_the_path_it_takes():
    """The self-check ran the unsharded reference on the fused path (zeros at padded positions) and the
    rewritten model unfused, and refused this default setup naming no module; both run unfused now. The
    tokens that are not padding equal the unsharded model's (its fused path included)."""
    assert max(_dist.run(2, _padded_encoder, 2)) < 1e-12


def _inference_kernel_refused(tp):
    torch.manual_seed(0)
    model = nn.Sequential(_InferenceKernelMLP()).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with pytest.raises(PolicyMismatchError, match="eval mode without gradients.*matches with gradients enabled"):
        apply_policy(model, _dist.mesh(tp).tp_group, {"0.fc1": "column", "0.fc2": "row"}, example_input=x)
    return True


def test_verify_compares_the_inference_path_too():
    """A module whose eval-mode, no-gradient forward reads a split layer's weights itself agrees with
    gradients enabled, so verify also runs both models that way and refuses the policy."""
    assert all(_dist.run(2, _inference_kernel_refused, 2))


class _LateEmbedding(nn.Module):
    """An MLP registered before a token embedding with options a vocab-parallel table cannot honour."""

    def __init__(self, **options):
        super().__init__()
        self.blk = _PReLUMLP()
        self.tok = nn.Embedding(40, 32, **options)


@pytest.mark.parametrize("options", [{"max_norm": 1.0}, {"sparse": True}, {"scale_grad_by_freq": True}])
def test_embedding_options_are_refused_when_planned_naming_the_module(options):
    """Refused by the plan (as `lightning-tp plan` and the main process before launch make it), not
    half-way through the rewrite: the layers before it stay untouched."""
    model = _LateEmbedding(**options)
    policy = {"blk.fc_in": "column", "blk.fc_out": "row", "tok": "vocab"}
    with pytest.raises(ShardingError, match=rf"module 'tok' \(Embedding\).*options \['{next(iter(options))}'\]"):
        plan_policy(model, 2, policy)
    assert type(model.blk.fc_in) is nn.Linear and shard_spec(model.tok.weight) is None


class _PerHeadNorms(nn.Module):
    """One LayerNorm per head in a ModuleList zipped with the heads (StableLM's qk_layernorm): each rank
    pairs its heads with the first norms, equal at init, so outputs agree and gradients do not."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.head_dim = d // heads
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)
        self.norms = nn.ModuleList(nn.LayerNorm(self.head_dim) for _ in range(heads))

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, self.head_dim)
        q = torch.stack([norm(h) for norm, h in zip(self.norms, q.unbind(2), strict=False)], 2)
        return self.o(q.reshape(b, t, -1))


class _MatmulHead(nn.Module):
    """A head that multiplies by the embedding's weight itself (not a tied nn.Linear)."""

    def __init__(self, vocab=40, d=32):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)

    def forward(self, ids):
        return self.tok(ids) @ self.tok.weight.t()


def _mismatch_messages(tp):
    torch.manual_seed(0)
    out = []
    for model, policy, x in (
        (_PerHeadNorms().double(), {"q": "column", "o": "row"}, torch.randn(2, 5, 32, dtype=torch.float64)),
        (_MatmulHead().double(), {"tok": "vocab"}, torch.randint(0, 40, (2, 5))),
    ):
        with pytest.raises(PolicyMismatchError) as info:
            apply_policy(model, _dist.mesh(tp).tp_group, policy, example_input=x)
        out.append(str(info.value))
    return out


def test_mismatch_messages_name_the_parameter_and_the_shapes_on_every_rank():
    for grads, shapes in _dist.run(2, _mismatch_messages, 2):
        assert "parameter 'norms.0.weight'" in grads  # also where another rank found it first
        assert "an output of shape (2, 5, 20) where the unsharded model's is (2, 5, 40)" in shapes


class _AliasBlock(nn.Module):
    """Attention and MLP in one module (no bias on the fused projection: a key bias's gradient is zero
    by the softmax's shift invariance, so AdamW would only amplify rounding noise there)."""

    def __init__(self, d=32, n_head=4):
        super().__init__()
        self.n_head, self.head_dim = n_head, d // n_head
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(x)))


class _SharedEmbeddingLM(nn.Module):
    """T5's layout: the model's ``shared`` embedding is registered again as its encoder's ``embed_tokens``
    (one module under two names), and the LM head's weight is tied to it."""

    def __init__(self, vocab=64, d=32):
        super().__init__()
        self.shared = nn.Embedding(vocab, d)
        self.encoder = nn.Module()
        self.encoder.embed_tokens = self.shared
        self.encoder.blocks = nn.ModuleList([_AliasBlock(d) for _ in range(2)])
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.shared.weight

    def forward(self, ids):
        x = self.encoder.embed_tokens(ids)
        for block in self.encoder.blocks:
            x = block(x)
        return self.lm_head(x)


class _RepeatedBlockLM(nn.Module):
    """A weight-shared depth (ALBERT, Universal Transformers): one block registered three times."""

    def __init__(self, vocab=64, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([_AliasBlock(d)] * 3)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _repeated_gpt2():
    """Hugging Face GPT-2 (Conv1D layers, stored transposed) with one block registered twice."""
    model = models.HFLogits(models.hf_gpt2(64))
    model.model.transformer.h = nn.ModuleList([model.model.transformer.h[0]] * 2)
    return model


_ALIAS_MODELS = {"shared-embedding": _SharedEmbeddingLM, "repeated-block": _RepeatedBlockLM, "gpt2": _repeated_gpt2}
# explicit policies: the shared embedding named by its second name only; the repeated block by its last
_BLOCK_POLICY = {"*.qkv": "qkv", "*.proj": "row", "*.fc1": "column", "*.fc2": "row"}
_ALIAS_POLICIES = {
    "shared-embedding": {"encoder.embed_tokens": "vocab", "lm_head": "vocab", **_BLOCK_POLICY},
    "repeated-block": {"emb": "vocab", "head": "vocab", **{f"blocks.2.{k[2:]}": v for k, v in _BLOCK_POLICY.items()}},
    "gpt2": {"model.transformer.h.1.attn.c_attn": "qkv", "model.transformer.h.1.*.c_proj": "row",
             "model.transformer.h.1.mlp.c_fc": "column", "model.transformer.wte": "vocab", "model.lm_head": "vocab"},
}  # fmt: skip


def _aliased_parity(kind: str, tp: int, policy, path: str) -> dict:
    from lightning_tp.lightning.checkpoint import full_state_dict, save

    torch.manual_seed(0)
    dense = _ALIAS_MODELS[kind]().double()
    model = copy.deepcopy(dense)
    mesh = _dist.mesh(tp)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randint(0, 64, (2, 8), generator=g) for _ in range(3)]
    plan = apply_policy(model, mesh.tp_group, policy, verify=True, example_input=xs[0])
    if kind == "gpt2":  # Conv1D: the gathered weights and gradients are transposed; compared by full_state_dict
        errs = {"out": 0.0, "grad": 0.0}
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (dense, model)]
        for x in xs:
            outs = [m(x) for m in (dense, model)]
            errs["out"] = max(errs["out"], float((outs[0] - outs[1]).detach().abs().max()))
            for out, opt in zip(outs, opts, strict=True):
                out.square().sum().backward()
                opt.step()
                opt.zero_grad()
        full = full_state_dict(model, mesh.tp_group)
        errs["weight"] = max(float((full[k] - v).abs().max()) for k, v in dense.state_dict().items())
    else:
        errs = _dist.train_parity(dense, model, mesh.tp_group, xs)
    places = dict(model.named_modules(remove_duplicate=False))
    names = {"shared-embedding": ("shared", "encoder.embed_tokens"), "repeated-block": ("blocks.0.qkv", "blocks.2.qkv"),
             "gpt2": ("model.transformer.h.0.attn.c_attn", "model.transformer.h.1.attn.c_attn")}[kind]  # fmt: skip
    errs["same_module"] = places[names[0]] is places[names[1]]
    errs["rewritten"] = type(places[names[1]]).__name__
    errs["rows"] = [m.name for m in plan.modules if m.splits]
    save(path, model, [], mesh, {})
    errs["state"] = full_state_dict(model, mesh.tp_group)
    errs["dense"] = dense.state_dict()
    return errs


@pytest.mark.parametrize("policy", ["auto", "explicit"])
@pytest.mark.parametrize("kind", list(_ALIAS_MODELS))
def test_a_module_registered_under_two_names_is_rewritten_at_both(kind, policy, tmp_path):
    """One module object at two places (T5's shared embedding; a weight-shared block list) is one module
    of the plan: a pattern matching either name applies, it is not a tie the policy breaks (it was refused
    as one), and the rewritten module takes each place, so the model still holds one module there. Outputs,
    gradients, weights after AdamW equal the dense model's (float64); its checkpoint consolidates into
    a state dict the dense model loads strictly."""
    from lightning_tp import consolidate

    rule = "auto" if policy == "auto" else _ALIAS_POLICIES[kind]
    for r in _dist.run(2, _aliased_parity, kind, 2, rule, str(tmp_path / "ckpt")):
        # GPT-2's c_attn has a key bias, whose gradient is zero (the softmax cancels it): AdamW turns its
        # rounding noise into steps of ~1e-12
        assert r["out"] < 1e-12 and r["grad"] < 1e-12 and r["weight"] < (1e-10 if kind == "gpt2" else 1e-12), r
        assert r["same_module"], r
        parallel = "VocabParallelEmbedding" if kind == "shared-embedding" else "ColumnParallelLinear"
        assert r["rewritten"] == parallel
        count = {"shared-embedding": 10, "repeated-block": 6, "gpt2": 7 if policy == "auto" else 6}[kind]  # +wpe
        assert len(r["rows"]) == count, r["rows"]
    dense = _ALIAS_MODELS[kind]().double()
    dense.load_state_dict(consolidate(tmp_path / "ckpt"), strict=True)
    for key, value in dense.state_dict().items():  # every name of the trained weights, aliases included
        assert torch.equal(value, r["state"][key]), key  # full_state_dict (GPT-2's Conv1D: transposed back)
        atol = 1e-10 if kind == "gpt2" else 1e-12  # (its key bias, as above)
        torch.testing.assert_close(value, r["dense"][key], rtol=0, atol=atol)  # the dense model's training


class _NormFirst(nn.Module):
    """The final norm and an attention dropout registered first on the outer module, then again inside the
    model (where they act): the planning that asks where a module sits must ask it of every name."""

    def __init__(self):
        super().__init__()
        self.final_norm = nn.LayerNorm(32)
        self.attn_drop = nn.Dropout(0.1)
        self.net = models.NanoGPT(vocab=64, n_embd=32, n_layer=1, n_head=4, block_size=16)
        self.net.transformer.ln_f = self.final_norm
        self.net.transformer.h[0].attn.attn_dropout = self.attn_drop

    def forward(self, ids):
        return self.net(ids)


def test_where_an_aliased_module_sits_is_read_from_every_name():
    from lightning_tp.engine.recompute import apply_activation_checkpointing

    rows = {m.name: m for m in plan_policy(_NormFirst(), 2, "auto", sequence_parallel=True).modules}
    assert rows["final_norm"].style == "replicate" and rows["final_norm"].options == {"partial_grad": True}
    assert rows["attn_drop"].style == "tp_dropout"
    assert (
        rows["attn_drop"].style
        == "tp_dropout"
        == {m.name: m for m in plan_policy(_NormFirst(), 2).modules}["attn_drop"].style
    )  # the attention-probability dropout of a split block, without sequence parallelism too
    assert apply_activation_checkpointing(_RepeatedBlockLM(), "blocks.2") == ["blocks.0"]  # one module, any name


def test_attention_dropout_of_a_block_whose_columns_gather_their_output_keeps_the_shared_stream():
    """A block whose column layers gather their output (a Hugging Face plan's ``colwise_gather_output``) runs
    its attention on every head, on every rank: its attention dropout draws one mask, not one per rank."""
    net = models.NanoGPT(vocab=64, n_embd=32, n_layer=1, n_head=4, block_size=16)
    gathered = {"transformer.h.*.attn.c_attn": {"style": "column", "gather_output": True}}
    split = {"transformer.h.*.attn.c_attn": "qkv", "transformer.h.*.attn.c_proj": "row"}
    styles = [{m.name: m.style for m in plan_policy(net, 2, policy).modules} for policy in (gathered, split)]
    assert "transformer.h.0.attn.attn_dropout" not in styles[0], styles[0]
    assert styles[1]["transformer.h.0.attn.attn_dropout"] == "tp_dropout", styles[1]


def test_meta_example_inputs_get_values_where_the_shape_says_what_they_are():
    from lightning_tp.errors import VerifyInputError
    from lightning_tp.policy.inputs import values_for_meta

    model = nn.Sequential(nn.Embedding(300, 8), nn.Linear(8, 8))
    with torch.device("meta"):
        ids8, ids, mask, x = (torch.zeros(2, 5, dtype=t) for t in (torch.int8, torch.long, torch.bool, torch.float64))
    assert int(values_for_meta(ids8, model).max()) <= 127  # below the vocabulary and the dtype's range
    filled = values_for_meta(ids, model)
    assert filled.device.type == "cpu" and 0 <= int(filled.min()) and int(filled.max()) < 300
    assert torch.equal(filled, values_for_meta(ids, model))  # the same on every rank
    with torch.device("meta"):
        z = torch.zeros(2, 5, dtype=torch.complex64)
    out = values_for_meta({"x": x, "z": z, "mask": mask, "n": 3}, model)
    assert out["x"].dtype == torch.float64 and not out["x"].is_meta and out["mask"].all() and out["n"] == 3
    assert out["z"].dtype == torch.complex64 and not out["z"].is_meta  # not an integer tensor
    with pytest.raises(VerifyInputError, match=r"integer tensors on the meta device .*device='cpu'"):
        values_for_meta({"input_ids": ids, "attention_mask": ids}, model)  # a mask or token ids: not from a shape
