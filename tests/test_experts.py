"""Experts kept as parameters, each split over TP on its hidden units (style ``experts``, engine/experts.py).

Hugging Face's mixtures of experts are covered in test_hf_models (Mixtral, Qwen2/3-MoE, OLMoE, Llama 4,
translated from their tp_plan). The layers here are written differently on purpose: one runs every
token through every expert with einsums over ``(E, in, out)`` weights (gate | up packed on the last
dim) and weights them with a dense softmax over the experts, a floating input whose gradient must be
summed over TP; the second routes each token to one expert by an integer index, loops over the experts
and has three separate weights and a per-hidden-unit bias; the third (GPT-OSS's layout, run as Hugging
Face's batched kernel runs it: each token's expert weights gathered) holds gate and up interleaved
element by element and adds a bias after the down projection, which acts on one rank (``once``). At
TP 2 and 4 (float64) each gives the dense model's output, gradients and weights after AdamW steps.
"""

from __future__ import annotations

import copy
import warnings

import models
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _dist
from lightning_tp import apply_policy, plan_policy
from lightning_tp.errors import ShardingError
from lightning_tp.policy.rules import PolicyError, PolicyWarning, Rule, translate_hf_plan

E, H, U = 4, 16, 12  # experts, hidden width, hidden units per expert (U / 4 = 3: split at TP 4)


class EinsumExperts(nn.Module):
    """Every token through every expert, ``(E, in, out)`` weights, weighted by dense probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(E, H, 2 * U) / H**0.5)  # gate | up on the last dim
        self.w_out = nn.Parameter(torch.randn(E, U, H) / U**0.5)

    def forward(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:  # (T, H), (T, E)
        gate, up = torch.einsum("th,ehk->etk", x, self.w_in).chunk(2, dim=-1)
        y = torch.einsum("eti,eih->eth", F.silu(gate) * up, self.w_out)
        return torch.einsum("te,eth->th", probs, y)


class LoopExperts(nn.Module):
    """Top-1 routing by an index; ``w1``/``w3`` ``(E, U, H)``, ``w2`` ``(E, H, U)``, a bias ``b1`` ``(E, U)``."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(E, U, H) / H**0.5)
        self.w3 = nn.Parameter(torch.randn(E, U, H) / H**0.5)
        self.w2 = nn.Parameter(torch.randn(E, H, U) / U**0.5)
        self.b1 = nn.Parameter(torch.randn(E, U) * 0.1)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            rows = (index == e).nonzero().squeeze(-1)
            xe = x[rows]
            h = F.gelu(xe @ self.w1[e].t() + self.b1[e]) * (xe @ self.w3[e].t())
            out = out.index_add(0, rows, (h @ self.w2[e].t()) * weight[rows])
        return out


class InterleavedExperts(nn.Module):
    """Top-1 routing; ``w_in (E, H, 2U)`` with gate and up interleaved (``[..., ::2]``, ``[..., 1::2]``)
    and its bias, ``w_out (E, U, H)`` and a bias ``b_out (E, H)`` added after it; batched per token."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(E, H, 2 * U) / H**0.5)
        self.b_in = nn.Parameter(torch.randn(E, 2 * U) * 0.1)
        self.w_out = nn.Parameter(torch.randn(E, U, H) / U**0.5)
        self.b_out = nn.Parameter(torch.randn(E, H) * 0.1)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = torch.bmm(x.unsqueeze(1), self.w_in[index]).squeeze(1) + self.b_in[index]
        h = F.silu(h[..., ::2]) * h[..., 1::2]
        y = torch.bmm(h.unsqueeze(1), self.w_out[index]).squeeze(1) + self.b_out[index]
        return y * weight


class MoE(nn.Module):
    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.router = nn.Linear(H, E, bias=False)
        self.experts = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.norm(x).reshape(-1, H)
        probs = self.router(flat).softmax(-1)
        if isinstance(self.experts, EinsumExperts):
            y = self.experts(flat, probs)
        else:
            weight, index = probs.max(-1)
            y = self.experts(flat, index, weight.unsqueeze(-1))
        return x + y.view_as(x)


SPLITS = {
    "einsum": {"w_in": "packed_row", "w_out": "column"},
    "loop": {"w1": "column", "w3": 1, "w2": "row", "b1": {"dim": -1}},
    "interleaved": {"w_in": {"dim": 2, "interleave": 2}, "b_in": {"dim": -1, "interleave": 2}, "w_out": 1,
                    "b_out": "once"},
}  # fmt: skip
KINDS = {"einsum": EinsumExperts, "loop": LoopExperts, "interleaved": InterleavedExperts}


def _model(kind: str, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(MoE(KINDS[kind]()), MoE(KINDS[kind]())).double()


def _policy(kind: str) -> dict:
    return {"*.router": "replicate", "*.experts": {"style": "experts", "params": SPLITS[kind]}}


def test_plan_lists_each_expert_split_and_counts_local_parameters():
    plan = plan_policy(_model("loop"), 4, _policy("loop"), strict=True)
    rows = {m.name: m for m in plan.modules}
    row = rows["0.experts"]
    assert row.style == "experts" and row.full_shape == (E, U, H) and row.local_shape == (E, U // 4, H)
    expert_params = 3 * E * U * H + E * U
    assert row.full_params == expert_params and row.local_params == expert_params // 4
    assert plan.full_params - plan.local_params == 2 * (expert_params - expert_params // 4)
    assert "experts" in str(plan)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (None, r"params=None; give the split of each of its parameters.*\['b1', 'w1', 'w2', 'w3'\]"),
        ({"w1": "column", "w3": 1, "w2": "row"}, r"no split for its parameters \['b1'\].*once per rank"),
        ({**SPLITS["loop"], "w4": 0}, r"names \['w4'\] that are not its own parameters"),
        ({**SPLITS["loop"], "w2": "diagonal"}, r"params\['w2'\]='diagonal' is not a split of a 3-D parameter"),
        ({**SPLITS["loop"], "w2": 3}, r"params\['w2'\]=3 is not a split of a 3-D parameter"),
        ({**SPLITS["loop"], "w1": "packed_column"}, r"0.experts.w1 \(chunk sizes \[6, 6\]\) of size 6 .*=4"),
        ({**SPLITS["loop"], "w2": 0}, r"params\['w2'\]=0 splits dim 0, the experts"),
        ({**SPLITS["loop"], "b1": {"dim": -2}}, r"params\['b1'\]=\{'dim': -2\} splits dim 0, the experts"),
    ],
)
def test_bad_expert_splits_are_refused_by_name(params, match):
    entry = {"style": "experts"} if params is None else {"style": "experts", "params": params}
    with pytest.raises(ShardingError, match=match):
        plan_policy(_model("loop"), 4, {"*.experts": entry})


def test_a_column_split_of_a_bias_takes_its_last_dim_and_ties_keep_one_layout():
    plan = plan_policy(
        _model("loop"), 2, {"*.experts": {"style": "experts", "params": {**SPLITS["loop"], "b1": "column"}}}
    )
    assert plan.local_params == plan_policy(_model("loop"), 2, _policy("loop")).local_params  # b1 (E, U) split on U
    tied = _model("loop")
    tied[1].experts.w3 = tied[0].experts.w3  # one parameter in two experts modules
    split_w3 = {"*.experts": {"style": "experts", "params": SPLITS["loop"]}}
    assert plan_policy(tied, 2, split_w3)  # split the same way by both: fine
    other = {
        "0.experts": split_w3["*.experts"],
        "1.experts": {"style": "experts", "params": {**SPLITS["loop"], "w3": 2}},
    }
    with pytest.raises(PolicyError, match=r"would break a tied parameter shared by '0.experts.w3' .*'1.experts.w3'"):
        plan_policy(tied, 2, other)
    biased = nn.ModuleDict({k: nn.Module() for k in ("a", "b")})  # a parameter named 'bias' is no linear bias here
    for m in biased.values():
        m.w = nn.Parameter(torch.zeros(E, U, H))
    biased.a.bias = biased.b.bias = nn.Parameter(torch.zeros(E, U))
    split = {"a": {"style": "experts", "params": {"w": "column", "bias": "column"}},
             "b": {"style": "experts", "params": {"w": "column", "bias": {"dim": 1, "chunks": 2}}}}  # fmt: skip
    with pytest.raises(PolicyError, match=r"would break a tied parameter shared by 'a.bias'"):
        plan_policy(biased, 2, split)


def test_indivisible_and_misplaced_experts_are_refused():
    with pytest.raises(ShardingError, match=r"dim 1 of 0.experts.w1 of size 12 .*tensor_parallel_size=5"):
        plan_policy(_model("loop"), 5, _policy("loop"))
    with pytest.raises(TypeError, match=r"style 'experts' .* does not fit module '0.router'"):
        plan_policy(_model("loop"), 2, {"*.router": {"style": "experts", "params": {"weight": "row"}}})
    nested = nn.ModuleDict({"experts": nn.Module()})
    nested.experts.w = nn.Parameter(torch.zeros(E, 4, H))
    nested.experts.post_norm = nn.LayerNorm(H)  # a child with parameters: summed once per rank
    with pytest.raises(ShardingError, match=r"no split for its parameters \['post_norm.weight', 'post_norm.bias'\]"):
        plan_policy(nested, 2, {"experts": {"style": "experts", "params": {"w": "column"}}})


def test_interleaved_chunks_and_a_bias_acting_once_are_planned_and_checked():
    plan = plan_policy(_model("interleaved"), 4, _policy("interleaved"), strict=True)
    row = next(m for m in plan.modules if m.name == "0.experts")
    whole = E * H  # b_out stays whole on every rank
    assert row.full_params == E * H * 2 * U + E * 2 * U + E * U * H + whole
    assert row.local_params == (row.full_params - whole) // 4 + whole
    with pytest.raises(
        ShardingError, match=r"dim 2 of size 24 interleaves 2 chunks.*divisible by 2 x tensor_parallel_size=8"
    ):
        plan_policy(_model("interleaved"), 8, _policy("interleaved"))
    with pytest.raises(ShardingError, match=r"params=\{'w': 'once'\} splits none of its parameters"):
        plan_policy(nn.ModuleDict({"e": _one_param()}), 2, {"e": {"style": "experts", "params": {"w": "once"}}})
    both = {**SPLITS["interleaved"], "w_in": {"dim": 2, "chunks": 2, "interleave": 2}}
    with pytest.raises(ShardingError, match=r"params\['w_in'\]=.* gives both 'chunks' .* and 'interleave'"):
        plan_policy(_model("interleaved"), 2, {"*.experts": {"style": "experts", "params": both}})
    missing = {k: v for k, v in SPLITS["interleaved"].items() if k != "b_out"}
    with pytest.raises(ShardingError, match=r"no split for its parameters \['b_out'\].*takes 'once'"):
        plan_policy(_model("interleaved"), 2, {"*.experts": {"style": "experts", "params": missing}})


def _one_param() -> nn.Module:
    module = nn.Module()
    module.w = nn.Parameter(torch.zeros(E, U, H))
    return module


def test_hugging_face_expert_entries_become_one_experts_rule():
    rules = translate_hf_plan({
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.feed_forward.experts.gate_up_proj": "packed_rowwise",  # Llama 4: transposed
        "layers.*.feed_forward.experts.down_proj": "colwise",
        "layers.*.feed_forward.experts": "moe_tp_experts",
    })  # fmt: skip
    assert list(rules) == ["layers.*.self_attn.q_proj", "layers.*.mlp.experts", "layers.*.feed_forward.experts"]
    assert rules["layers.*.mlp.experts"] == Rule(
        "experts", {"params": {"gate_up_proj": "packed_column", "down_proj": "row"}}
    )
    assert rules["layers.*.feed_forward.experts"].options["params"] == {
        "gate_up_proj": "packed_row",
        "down_proj": "column",
    }
    identity = {"layers.*.experts": "moe_tp_experts", "layers.*.experts.identity_expert": "moe_identity_expert"}
    with pytest.raises(
        PolicyError, match=r"style 'moe_identity_expert' inside the experts .*identity experts.*'replicate'"
    ):
        translate_hf_plan(identity)  # LongCat-Flash: parameter-free experts would be summed once per rank


@pytest.mark.parametrize(
    ("pattern", "key", "index"),
    [
        (".experts.*.w1.weight", "model.layers.0.mlp.experts.12.w1.weight", 12),
        (r"\.experts.*.w1.weight", "model.layers.0.mlp.experts.3.w1.weight", 3),  # written as a regex (DeepSeek-V4)
        (r"\.experts.*.w1.weight", "model.layers.0.mlp.experts.3.w2.weight", None),
        ("mlp.experts.*.gate_proj.weight", "model.layers.1.mlp.experts.0.gate_proj.weight", 0),
    ],
)
def test_expert_number_is_read_where_the_pattern_has_its_star(pattern, key, index):
    from lightning_tp.lightning.pretrained import expert_index

    assert expert_index(pattern, key) == index


def _parity(kind: str, tp: int, recompute: bool = False) -> dict:
    from lightning_tp.engine.recompute import checkpoint_module
    from lightning_tp.engine.sharding import shard_spec

    group = _dist.mesh(tp).tp_group
    dense = _model(kind)
    model = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unmatched, no pattern unused
        plan = apply_policy(model, group, _policy(kind))  # verify=True: outputs and gradients checked too
    if recompute:  # the experts' forward runs again in backward, outside their hooks
        for block in model:
            checkpoint_module(block.experts)
    res = {
        "sharded": sorted(n for n, p in model.named_parameters() if shard_spec(p) is not None),
        "local_params": sum(p.numel() for p in model.parameters()) == plan.local_params,
        # a parameter acting once is the Parameter outside the forward (FSDP2 and loaders read it there)
        "once_is_param": all(
            getattr(e, n) is p for e in (model[0].experts, model[1].experts) for n, p in e.named_parameters()
        ),
    }
    g = torch.Generator().manual_seed(1)
    res.update(
        _dist.train_parity(
            dense, model, group, [torch.randn(2, 6, H, dtype=torch.float64, generator=g) for _ in range(2)]
        )
    )
    return res


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("kind", list(SPLITS))
def test_user_experts_match_dense(kind, tp):
    split = [p for p, how in SPLITS[kind].items() if how != "once"]
    for rank, r in enumerate(_dist.run(4, _parity, kind, tp)):
        assert r["sharded"] == sorted(f"{b}.experts.{p}" for b in "01" for p in split), r["sharded"]
        assert r["local_params"], "the plan's parameters per rank differ from the model's"
        assert r["once_is_param"]
        assert r["out"] <= 1e-12 and r["grad"] <= 1e-11 and r["weight"] <= 1e-12, (kind, tp, rank, r)


V = 37  # vocabulary of the sequence-parallel model (padded at TP 2 and 4)


class _Tokens(nn.Module):
    """Token embedding, two mixture-of-experts blocks, a final norm and an LM head: sequence parallelism
    needs the model to leave through a vocab-parallel head."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.blocks = nn.Sequential(MoE(KINDS[kind]()), MoE(KINDS[kind]()))
        self.norm = nn.LayerNorm(H)
        self.head = nn.Linear(H, V, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(ids))))


def _sequence_parallel_parity(kind: str, tp: int) -> dict:
    from lightning_tp.engine.sharding import has_partial_grad

    group = _dist.mesh(tp).tp_group
    torch.manual_seed(0)
    dense = _Tokens(kind).double()
    model = copy.deepcopy(dense)
    policy = {"embed": "vocab", "head": {"style": "vocab", "gather_output": True}, "*.router": "replicate",
              "*.experts": {"style": "experts", "params": SPLITS[kind]}}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = apply_policy(model, group, policy, sequence_parallel=True)  # verify=True: outputs and grads
    g = torch.Generator().manual_seed(3)
    res = _dist.train_parity(dense, model, group, [torch.randint(0, V, (2, 8), generator=g) for _ in range(2)])
    with torch.no_grad():  # a length that does not divide by TP, without gradients: every token on every rank
        ids = torch.randint(0, V, (2, 7), generator=g)
        res["whole_err"] = float((model(ids) - dense(ids)).abs().max())
    res["partial"] = sorted(n for n, p in model.named_parameters() if has_partial_grad(p))
    res["rows"] = {r.name: r.style for r in plan.modules}
    return res


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("kind", list(SPLITS))
def test_experts_under_sequence_parallelism_match_dense(kind, tp):
    """Sequence parallelism: each rank's MoE block gets its chunk of the tokens, routes them with the
    whole router (its gradient partial, summed over TP), and the experts gather every rank's tokens,
    run their part of every expert and reduce-scatter the output back to each rank's tokens."""
    for r in _dist.run(4, _sequence_parallel_parity, kind, tp):
        assert "blocks.0.router.weight" in r["partial"] and "blocks.0.norm.weight" in r["partial"], r["partial"]
        assert r["rows"]["blocks.0.experts"] == "experts" and "blocks.0" not in r["rows"], r["rows"]
        assert r["out"] <= 1e-12 and r["grad"] <= 1e-11 and r["weight"] <= 1e-12, (kind, tp, r)
        assert r["whole_err"] <= 1e-12, (kind, tp, r)  # 7 tokens without gradients: on the whole sequence


class _SharedBlock(nn.Module):
    """Experts beside a shared MLP whose column and row layers are the block's own children."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(H, 2 * H), nn.Linear(2 * H, H)
        self.router, self.experts = nn.Linear(H, E, bias=False), LoopExperts()


def test_experts_in_a_block_that_gathers_the_sequence_are_refused_under_sequence_parallelism():
    model = _Tokens("loop")
    model.blocks[0] = _SharedBlock()
    policy = {"embed": "vocab", "head": "vocab", "*.up": "column", "*.down": "row", "*.router": "replicate",
              "*.experts": {"style": "experts", "params": SPLITS["loop"]}}  # fmt: skip
    plan_policy(model, 2, policy)  # tensor parallelism alone: fine
    with pytest.raises(PolicyError, match=r"'blocks.0.experts' \(experts\) sits in block 'blocks.0', which holds"):
        plan_policy(model, 2, policy, sequence_parallel=True)


def test_a_bias_acting_once_is_added_once_in_an_activation_recompute_too():
    """The experts module checkpointed on its own: its forward, run again in backward, reads the bias
    as the forward did (once over TP), so the saved values it rebuilds, and the gradients, are right."""
    for r in _dist.run(2, _parity, "interleaved", 2, True):
        assert r["out"] <= 1e-12 and r["grad"] <= 1e-11 and r["weight"] <= 1e-12, r


def _trained(kind: str, tp: int, seed: int, steps: int):
    from lightning_tp.lightning.precision import all_reduce_partial_grads

    mesh = _dist.mesh(tp)
    model = _model(kind, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_policy(model, mesh.tp_group, _policy(kind), verify=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(2, 6, H, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(x).square().sum().backward()
        all_reduce_partial_grads(list(model.parameters()), mesh.tp_group)  # as the strategy does ("once" biases)
        opt.step()
        opt.zero_grad()
    return mesh, model, opt


def _reshard(kind: str, path: str) -> tuple[dict, dict, dict, dict]:
    """Saved at TP 2 (x DP 2), loaded at TP 4 into a model of other weights: the same dense weights
    and AdamW moments."""
    from lightning_tp.lightning.checkpoint import full_state_dict, load, save

    def moments(mesh, model, opt):
        return {n: _dist.gathered(p, opt.state[p]["exp_avg"], mesh.tp_group) for n, p in model.named_parameters()}

    mesh, model, opt = _trained(kind, 2, 0, 2)
    save(path, model, [opt], mesh, {"step": 2})
    saved = full_state_dict(model, mesh.tp_group), moments(mesh, model, opt)
    mesh, model, opt = _trained(kind, 4, 99, 1)  # other weights and moments: all must come from the checkpoint
    state, _ = load(path, model, [opt], mesh)
    assert state == {"step": 2}, state
    return (*saved, full_state_dict(model, mesh.tp_group), moments(mesh, model, opt))


@pytest.mark.parametrize("kind", ["loop", "interleaved"])
def test_experts_checkpoint_reshards_from_tp2_to_tp4(kind, tmp_path):
    from lightning_tp import consolidate

    path = str(tmp_path / "ckpt")
    for weights, moments, loaded, loaded_moments in _dist.run(4, _reshard, kind, path):
        assert loaded.keys() == weights.keys() and any(f".experts.{p}" in k for k in loaded for p in SPLITS[kind])
        for k in weights:
            assert torch.equal(loaded[k], weights[k]), k
        for k in moments:
            assert torch.equal(loaded_moments[k], moments[k]), k
    offline = consolidate(path)  # without a process group: the dense model's state_dict
    assert all(torch.equal(offline[k], weights[k]) for k in weights)
    _model(kind).load_state_dict(offline, strict=True)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "olmoe", "llama4", "deepseek_v2", "gpt_oss"])
def test_hugging_face_experts_declare_their_layout_and_the_name_rules_read_it(arch):
    """Hugging Face's experts classes declare their layout (``is_transposed``, ``is_concatenated``,
    ``has_bias``: the flags its own kernels read). The name rules split them from it, as the model's
    tp_plan does where it has experts entries (the same shard of every parameter); GPT-OSS's plan has
    none: the rules alone split its interleaved gate/up and keep its down_proj_bias whole ("once").
    Llama 4's experts class declares nothing: the rules leave it whole (its tp_plan splits it)."""
    pytest.importorskip("transformers")
    import hf_zoo

    from lightning_tp.policy.rules import hf_experts_rule
    from lightning_tp.policy.styles import Experts

    model = hf_zoo.build(arch)

    def experts(policy):
        rows = [m for m in plan_policy(model, 4, policy).modules if m.style == "experts"]
        module = dict(model.named_modules())
        return {m.name: (m.local_params, Experts().param_specs(m.name, module[m.name], m.options, 4)) for m in rows}

    names = experts("names")
    if arch == "llama4":
        assert names == {} and experts("auto")
        return
    assert names and all(hf_experts_rule(model.get_submodule(n)) is not None for n in names)
    if arch == "gpt_oss":
        assert experts("auto") == {}  # its tp_plan leaves the experts whole; the plan's hint names them
        assert set(names) <= set(plan_policy(model, 4).names_would_split)
        rule = hf_experts_rule(model.get_submodule(next(iter(names))))
        assert rule.options["params"] == {
            "gate_up_proj": {"dim": -1, "interleave": 2},
            "gate_up_proj_bias": {"dim": -1, "interleave": 2},
            "down_proj": -2,
            "down_proj_bias": "once",
        }
    else:
        assert names == experts("auto")
    plain = nn.Module()  # the flags alone, on a module whose parameters are not the declared ones: no rule
    plain.is_transposed, plain.is_concatenated, plain.has_gate, plain.has_bias = False, True, True, False
    plain.gate_up_proj, plain.w2 = nn.Parameter(torch.zeros(E, 2 * U, H)), nn.Parameter(torch.zeros(E, H, U))
    assert hf_experts_rule(plain) is None


class _TwoSequences(nn.Module):
    """Two sequences embedded first, then each through mixture-of-experts layers of its own."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.a, self.b = (nn.Sequential(MoE(KINDS[kind]()), MoE(KINDS[kind]())) for _ in range(2))
        self.norm, self.head = nn.LayerNorm(H), nn.Linear(H, V, bias=False)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e, x = self.embed(src), self.embed(tgt)
        return self.head(self.norm(self.a(e))), self.head(self.norm(self.b(x)))


def _two_sequences(tp: int) -> dict:
    group = _dist.mesh(tp).tp_group
    torch.manual_seed(0)
    dense = _TwoSequences("einsum").double()
    model = copy.deepcopy(dense)
    policy = {"embed": "vocab", "head": {"style": "vocab", "gather_output": True}, "*.router": "replicate",
              "*.experts": {"style": "experts", "params": SPLITS["einsum"]}}  # fmt: skip
    apply_policy(model, group, policy, sequence_parallel=True, verify=False)
    g, out = torch.Generator().manual_seed(3), {}
    for S, T in ((8, 8), (7, 7)):
        src, tgt = torch.randint(0, V, (2, S), generator=g), torch.randint(0, V, (2, T), generator=g)
        with torch.no_grad():
            (a, b), (ad, bd) = model(src, tgt), dense(src, tgt)
        out[(S, T)] = max(float((a - ad).abs().max()), float((b - bd).abs().max()))
    with torch.no_grad(), pytest.raises(ShardingError, match="mixture of experts takes flattened tokens"):
        model(torch.randint(0, V, (2, 8)), torch.randint(0, V, (2, 7)))  # one split, one whole: tokens unreadable
    return out


def test_experts_of_two_sequences_one_whole_one_split_are_refused():
    """Fused experts take flattened tokens, which cannot be told to belong to a sequence that runs whole or
    to one that is split: a forward without gradients mixing the two is refused, never summed wrong (it
    was 1.1 off); both split or both whole are exact."""
    for r in _dist.run(2, _two_sequences, 2):
        assert all(err < 1e-12 for err in r.values()), r


class _ScoredLayer(nn.Module):
    """An attention that takes the rotary tables it is handed (a per-position input: the layer stack is the
    sequence-sharded region, as in Hugging Face models), then a mixture of experts whose linear router
    scores ``(B, T, H)`` hidden states; returns the router's scores beside its output, as Hugging Face's
    routers do."""

    def __init__(self) -> None:
        super().__init__()
        self.attn, self.norm1 = models.RopeAttention(H, 4), nn.LayerNorm(H)
        self.norm, self.router, self.experts = nn.LayerNorm(H), nn.Linear(H, E, bias=False), EinsumExperts()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.norm1(x), cos, sin)
        h = self.norm(x)
        scores = self.router(h)  # (B, T, E)
        return x + self.experts(h.reshape(-1, H), scores.softmax(-1).reshape(-1, E)).view_as(x), scores


class _Scored(nn.Module):
    """Returns its logits and every layer's router scores; the caller adds a load-balancing loss."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.layers = nn.ModuleList(_ScoredLayer() for _ in range(2))
        self.norm, self.head = nn.LayerNorm(H), nn.Linear(H, V, bias=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.embed(ids)
        pos = torch.arange(x.size(1), dtype=x.dtype)  # from the embeddings' output
        angles = torch.outer(pos, 1.0 / 10000 ** (torch.arange(0, 2, dtype=x.dtype) / 2)).repeat(1, 2)
        scores = []
        for layer in self.layers:
            x, s = layer(x, angles.cos(), angles.sin())
            scores.append(s)
        return self.head(self.norm(x)), scores


class _ScoredBlock(nn.Module):
    """A mixture of experts that routes flattened tokens and returns its router's scores beside its output
    (with ``view``, viewed as ``(B, T, E)``)."""

    def __init__(self, view: bool = False) -> None:
        super().__init__()
        self.norm, self.router, self.experts = nn.LayerNorm(H), nn.Linear(H, E, bias=False), EinsumExperts()
        self.view = view

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.norm(x).reshape(-1, H)
        scores = self.router(flat)  # (B*T, E)
        out = x + self.experts(flat, scores.softmax(-1)).view_as(x)
        return out, scores.view(*x.shape[:-1], E) if self.view else scores


class _WholeMoE(nn.Module):
    """Experts that are blocks beside a router: the layer runs on the whole sequence (``sequence_whole``)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.gate = nn.LayerNorm(H), nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(models.SwiGLU(H, 8) for _ in range(E))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        flat = self.norm(x).reshape(-1, H)
        probs = self.gate(flat).softmax(-1)
        return x + sum(probs[:, e : e + 1] * expert(flat) for e, expert in enumerate(self.experts)).view_as(x), None


class _ParamRouted(nn.Module):
    """Fused experts scored by a parameter of the layer itself (``w_gate``)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.experts = nn.LayerNorm(H), EinsumExperts()
        self.w_gate = nn.Parameter(torch.randn(E, H) / H**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.norm(x).reshape(-1, H)
        return x + self.experts(flat, (flat @ self.w_gate.t()).softmax(-1)).view_as(x)


class _ScoredTokens(nn.Module):
    """Layers that take the hidden states alone (Megatron's split: the sequence is split at the
    embeddings); returns its logits, every layer's router scores and every layer's output. With ``held``
    the layers sit in a module without a forward of its own, and the last one runs on the whole sequence
    (experts that are blocks: it gathers the sequence at its input, returns no scores); the first
    returns its scores viewed as ``(B, T, E)``."""

    def __init__(self, held: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, H)
        layers = nn.ModuleList([_ScoredBlock(view=True), _WholeMoE()] if held else [_ScoredBlock(), _ScoredBlock()])
        self.body = nn.Module()
        self.body.layers = layers
        self.norm, self.head = nn.LayerNorm(H), nn.Linear(H, V, bias=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        x, scores, states = self.embed(ids), [], []
        for layer in self.body.layers:
            x, s = layer(x)
            scores += [] if s is None else [s]
            states.append(x)
        return self.head(self.norm(x)), scores, states


class _Balanced(nn.Module):
    """A model's logits, then a Switch-style load-balancing loss over every token's router scores and the
    mean square of the hidden states it returns (a loss on intermediate states)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits, scores, *states = self.lm(ids)
        probs = torch.cat([s.reshape(-1, E) for s in scores]).softmax(-1)
        share = F.one_hot(probs.argmax(-1), E).to(probs.dtype).mean(0)
        parts = [logits.flatten(), (E * (share * probs.mean(0)).sum()).reshape(1)]
        return torch.cat(parts + [h.square().mean().reshape(1) for h in (states[0] if states else [])])


def _router_scores(tp: int, layout: str) -> dict:
    group = _dist.mesh(tp).tp_group
    torch.manual_seed(0)
    dense = _Balanced(_ScoredTokens(held=layout == "held") if layout != "stack" else _Scored()).double()
    model = copy.deepcopy(dense)
    policy = {"embed": "vocab", "head": {"style": "vocab", "gather_output": True}, "*.router": "replicate",
              "*.layers.0.experts" if layout == "held" else "*.experts": {"style": "experts", "params": SPLITS["einsum"]},
              **({"*.[qkv]_proj": "column", "*.o_proj": "row"} if layout == "stack" else {}),
              **({"*.gate_proj": "column", "*.up_proj": "column", "*.down_proj": "row"} if layout == "held" else {})}  # fmt: skip
    plan = apply_policy(model.lm, group, policy, sequence_parallel=True, verify=False)
    g = torch.Generator().manual_seed(3)
    res = _dist.train_parity(dense, model, group, [torch.randint(0, V, (2, 8), generator=g) for _ in range(2)])
    res["stack"] = sorted({r.name.rpartition(".")[0] for r in plan.modules if r.style == "sequence_stack"})
    with torch.no_grad():
        got = model.lm(torch.randint(0, V, (2, 8), generator=g))
        res["shapes"] = [tuple(t.shape) for part in got[1:] for t in part]
        res["whole"] = [tuple(t.shape) for part in model.lm(torch.randint(0, V, (2, 7), generator=g))[1:] for t in part]
    res["styles"] = sorted(r.style for r in plan.modules if r.style in ("experts", "sequence_whole"))
    if layout == "held":  # a router that is a parameter of the layer: nothing to hook, said
        tokens = _ScoredTokens()
        tokens.body.layers = nn.ModuleList(_ParamRouted() for _ in range(2))
        params = {**policy, "*.experts": policy["*.layers.0.experts"]}
        with pytest.warns(PolicyWarning, match=r"routers \['body.layers.0.w_gate', 'body.layers.1.w_gate'\] are param"):
            apply_policy(tokens.double(), group, params, sequence_parallel=True, verify=False)
    return res


@pytest.mark.parametrize("layout", ["stack", "megatron", "held"])
def test_router_scores_and_states_returned_from_inside_the_layers_are_every_token(layout):
    """Under sequence parallelism each rank's routers score its own tokens; the router scores and hidden
    states a model returns from inside its layer stack are all-gathered where the module that calls the
    stack returns them, whether the stack is the sequence-sharded region (layers that take rotary tables)
    or the sequence is split at the embeddings (Megatron's split): a load-balancing loss and a loss on an
    intermediate state computed from them are the dense model's on every rank, and so are the gradients
    and the weights after AdamW steps (before: each rank's losses were over its own tokens). Also where
    the layers sit in a module without a forward (the caller is its parent), the scores are returned as a
    view, and the last layer runs on the whole sequence (it gathers its input: the chunk is read first)."""
    for r in _dist.run(2, _router_scores, 2, layout):
        assert r["stack"] == (["layers"] if layout == "stack" else []), r
        if layout == "stack":
            assert r["shapes"] == [(2, 8, E)] * 2 and r["whole"] == [(2, 7, E)] * 2, r
        elif layout == "megatron":  # flattened tokens' scores, batch-major, and each layer's output
            assert r["shapes"] == [(16, E)] * 2 + [(2, 8, H)] * 2, r
            assert r["whole"] == [(14, E)] * 2 + [(2, 7, H)] * 2, r  # 7 tokens without gradients: whole
        else:
            assert r["styles"] == ["experts", "sequence_whole"], r
            assert r["shapes"] == [(2, 8, E)] + [(2, 8, H)] * 2 and r["whole"] == [(2, 7, E)] + [(2, 7, H)] * 2, r
        assert r["out"] <= 1e-12 and r["grad"] <= 1e-11 and r["weight"] <= 1e-12, r
