"""LitGPT models (``litgpt.model.GPT``, extra ``litgpt``) under policy="auto".

LitGPT keeps head counts in a ``Config`` object every module references (``self.config.n_head``,
``self.config.n_query_groups``) and fuses q/k/v as ``[q (n_head) | k (groups) | v (groups)] x
head_size``. The policy finds the chunk sizes from that config and gives each attention block its own
copy of it with local head counts; the model's config keeps the full values. Each architecture
below (tiny, float64) is rewritten at TP 2 and TP 4 and compared with its dense copy: logits
(vocab-sharded logits gathered) and every parameter's gradient (sharded ones gathered, partial ones
summed over TP), ``verify=True`` included; then a few generated tokens with LitGPT's KV cache. A
Trainer run at TP 2 gives the single-process losses. LitGPT's own named configs, one per layout
family it ships (shrunk), are compared the same way at TP 2.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import _dist

pytest.importorskip("litgpt")

WORLD = 4
SEQ = 12
RTOL = 1e-10  # max abs error relative to max(1, max |dense|) (logits) or max(1e-4, max |dense grad|)
# LitGPT's RMSNorm computes in float32 even in a float64 model (x.float()): the q/k norms' weight gradients
# are sums over heads, per rank then over TP, in float32, so they agree to float32 rounding only.
GRAD_RTOL = {"qwen3": 1e-6, "olmo2": 1e-6}
# OLMo-2's q/k norms (float32 inside) turn the float64 rounding of TP's sums into float32 rounding
LOGIT_RTOL = {"olmo2": 1e-6}

BASE = dict(block_size=32, n_layer=2, n_embd=32, vocab_size=50, padding_multiple=16)  # padded vocabulary: 64
ARCHS = {
    # Llama-style: RMSNorm, LLaMAMLP (fc_1, fc_2 -> proj), grouped-query attention 8 q / 4 kv heads, untied
    "llama": dict(n_head=8, n_query_groups=4, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
                  intermediate_size=48, bias=False, parallel_residual=False, rotary_percentage=1.0),
    # Qwen3-style: as llama plus RMSNorm over head_size on q and k (partial gradients under TP), tied head
    "qwen3": dict(n_head=8, n_query_groups=4, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
                  intermediate_size=48, bias=False, parallel_residual=False, norm_qk=True, tied=True),
    # OLMo-2-style: RMSNorm over all q heads (and all k heads) before the head split, norms after attention
    # and MLP; the q/k norms read the whole width (style gather_input)
    "olmo2": dict(n_head=8, n_query_groups=4, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
                  intermediate_size=48, bias=False, parallel_residual=False, norm_qk=True, norm_qk_type="olmo2",
                  post_attention_norm=True, post_mlp_norm=True),
    # Pythia / GPT-NeoX: parallel residual, partial rotary (a quarter of each head), biases, tied head
    "pythia": dict(n_head=4, n_query_groups=4, norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP",
                   intermediate_size=64, bias=True, parallel_residual=True, rotary_percentage=0.25, tied=True),
    # multi-query (falcon-7b, Gemma-2b): one k/v head, replicated on every rank (each rank computes its query
    # heads and the k/v head from the whole fused qkv); biases on qkv (partial gradients too)
    "mqa": dict(n_head=8, n_query_groups=1, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
                intermediate_size=48, bias=True, parallel_residual=False, rotary_percentage=1.0),
    # Phi-style: one norm shared by attention and MLP, half rotary, a biased LM head, untied
    "phi": dict(n_head=4, n_query_groups=4, norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP",
                intermediate_size=64, bias=True, parallel_residual=True, shared_attention_norm=True,
                rotary_percentage=0.5, lm_head_bias=True),
}  # fmt: skip


def build(arch: str, dtype=torch.float64, **overrides):
    from litgpt.config import Config
    from litgpt.model import GPT

    kw = {**BASE, **ARCHS[arch], **overrides}
    tied = kw.pop("tied", False)
    torch.manual_seed(0)
    model = GPT(Config(name=arch, **kw)).to(dtype)
    if tied:
        model.lm_head.weight = model.transformer.wte.weight
    return model


def _gather_grad(param, grad, group):
    """The dense gradient of ``param`` (collective for sharded parameters)."""
    from lightning_tp.engine.layers import gather_sharded
    from lightning_tp.engine.sharding import shard_spec

    spec = shard_spec(param)
    return grad if spec is None else gather_sharded(grad.contiguous(), spec, group)


def _generate(model, idx, steps):
    """Greedy tokens with LitGPT's KV cache (prefill, then one token at a time)."""
    from lightning_tp.engine.loss import gather_logits

    model.set_kv_cache(batch_size=idx.size(0), max_seq_length=idx.size(1) + steps)
    pos = torch.arange(idx.size(1))
    out, tokens = [], idx
    for _ in range(steps):
        logits = gather_logits(model(tokens, input_pos=pos))
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        pos, tokens = pos[-1:] + 1, nxt
    model.clear_kv_cache()
    return torch.cat(out, 1)


def _case(arch: str, tp: int) -> dict:
    from lightning_tp.policy import apply_policy

    group = _dist.mesh(tp).tp_group
    dense = build(arch)
    model = copy.deepcopy(dense)
    idx, tgt = _batch()
    plan = apply_policy(model, group, "auto", verify=True, example_input=idx)
    attn = model.transformer.h[0].attn
    out = {
        "styles": sorted({m.style for m in plan.modules if m.splits or m.style == "kv_replicate"}),
        "changes": [(p, a, o, n) for p, a, o, n in plan.attribute_changes if p == "transformer.h.0.attn"],
        "model_heads": (model.config.n_head, model.config.n_query_groups),
        "attn_heads": (attn.config.n_head, attn.config.n_query_groups),
        "mlp_config_shared": model.transformer.h[0].mlp.config is model.config,
        "tied": model.lm_head.weight is model.transformer.wte.weight,
        "gathered": [m.name for m in plan.modules if m.style == "gather_input"],
    }
    out.update(_compare(dense, model, idx, tgt, group))
    out["same_params"] = sorted(n for n, _ in dense.named_parameters()) == sorted(
        n for n, _ in model.named_parameters()
    )
    with torch.no_grad():
        out["generated"] = (_generate(dense, idx, 4).tolist(), _generate(model, idx, 4).tolist())
    return out


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (2, SEQ), generator=g), torch.randint(0, 50, (2, SEQ), generator=g)


def _compare(dense, model, idx, tgt, group) -> dict:
    """The rewritten model's logits and every parameter's gradient (sharded ones gathered, partial
    ones summed over TP) against the dense model's, relative to their size."""
    from lightning_tp.engine.loss import gather_logits
    from lightning_tp.lightning.precision import all_reduce_partial_grads

    ld, lt = dense(idx), model(idx)
    F.cross_entropy(ld.reshape(-1, ld.size(-1)), tgt.reshape(-1)).backward()
    F.cross_entropy(lt.reshape(-1, lt.size(-1)), tgt.reshape(-1)).backward()
    all_reduce_partial_grads(list(model.parameters()), group)
    dense_params = dict(dense.named_parameters())
    grad_err = {}
    for name, param in model.named_parameters():
        g, r = _gather_grad(param, param.grad.detach(), group), dense_params[name].grad
        grad_err[name] = float((g - r).abs().max()) / max(1e-4, float(r.abs().max()))
    logit_err = float((gather_logits(lt.detach()) - ld.detach()).abs().max()) / max(1.0, float(ld.abs().max()))
    return {"logit_err": logit_err, "grad_err": grad_err}


def _run(tp: int) -> dict:
    return {arch: _case(arch, tp) for arch in ARCHS}


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def results(request):
    return request.param, _dist.run(WORLD, _run, request.param)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_litgpt_matches_dense(results, arch):
    tp, per_rank = results
    for rank, res in enumerate(per_rank):
        r = res[arch]
        where = f"{arch} at TP {tp}, rank {rank}"
        full = (ARCHS[arch]["n_head"], ARCHS[arch]["n_query_groups"])
        kv_local = full[1] // tp if full[1] % tp == 0 else 1  # fewer k/v heads than ranks: one, replicated
        fused = "qkv" if full[1] % tp == 0 else "kv_replicate"
        assert {"vocab", "row", fused} <= set(r["styles"]), (where, r["styles"])
        assert r["model_heads"] == full and r["attn_heads"] == (full[0] // tp, kv_local), where
        assert ("transformer.h.0.attn", "config.n_head", full[0], full[0] // tp) in r["changes"], r["changes"]
        assert r["mlp_config_shared"] and r["tied"] == ARCHS[arch].get("tied", False), where
        assert r["same_params"], where
        assert r["logit_err"] <= LOGIT_RTOL.get(arch, RTOL), (where, r["logit_err"])
        gathered = [f"transformer.h.{i}.attn.norm_{x}" for i in range(2) for x in "qk"] if arch == "olmo2" else []
        assert r["gathered"] == gathered, (where, r["gathered"])
        bad = {n: e for n, e in r["grad_err"].items() if e > GRAD_RTOL.get(arch, RTOL)}
        assert not bad, (where, bad)
        dense_tokens, tp_tokens = r["generated"]
        assert tp_tokens == dense_tokens, where


def test_litgpt_key_value_heads_neither_split_nor_replicated_are_refused_by_name():
    from lightning_tp.errors import ShardingError
    from lightning_tp.policy import plan_policy

    # 3 k/v heads at TP 2: not divisible, and a rank's 3 query heads would read two of them in unequal groups
    with pytest.raises(ShardingError, match=r"transformer.h.0.attn.*config.n_query_groups=3.*cannot be split"):
        plan_policy(build("llama", n_head=6, n_query_groups=3, head_size=8), 2, "auto")


def _compiled_step(tp: int) -> dict:
    """LitGPT's training loss (its chunked cross entropy) with the model, compiled as one function (fp32)."""
    from litgpt.utils import chunked_cross_entropy
    from test_compile import _recording

    from lightning_tp.lightning.precision import all_reduce_partial_grads
    from lightning_tp.policy import apply_policy

    group = _dist.mesh(tp).tp_group
    eager, compiled = build("llama", dtype=torch.float32), build("llama", dtype=torch.float32)
    for model in (eager, compiled):
        apply_policy(model, group, "auto", verify=False)
    g = torch.Generator().manual_seed(0)
    idx, tgt = torch.randint(0, 50, (2, SEQ), generator=g), torch.randint(0, 50, (2, SEQ), generator=g)
    torch.compiler.reset()
    graphs: list = []  # fullgraph=True: a graph break is an error
    step = torch.compile(lambda: chunked_cross_entropy(compiled(idx), tgt, chunk_size=8), backend=_recording(graphs),
                         fullgraph=True)  # fmt: skip
    losses = []
    for model, fn in ((eager, lambda: chunked_cross_entropy(eager(idx), tgt, chunk_size=8)), (compiled, step)):
        loss = fn()
        loss.backward()
        all_reduce_partial_grads(list(model.parameters()), group)
        losses.append(float(loss))
    pairs = zip(eager.parameters(), compiled.parameters(), strict=True)
    err = max(float((a.grad - b.grad).abs().max()) / max(1e-6, float(a.grad.abs().max())) for a, b in pairs)
    return {"graphs": len(graphs), "losses": losses, "grad_err": err}


def test_litgpt_training_loss_compiles_in_one_graph():
    for rank, r in enumerate(_dist.run(2, _compiled_step, 2)):
        eager, compiled = r["losses"]
        assert r["graphs"] == 1, (rank, r)  # and no graph break (fullgraph=True)
        assert abs(compiled - eager) <= 1e-6 * abs(eager) and r["grad_err"] <= 1e-6, (rank, r)


def _fit_litgpt(world: int, tp: int, steps: int):
    import lightning as L
    import lit
    from test_strategy import Recorder

    from lightning_tp import MegatronTPStrategy

    with lit.external_launch(world):
        model, rec = lit.LitGPT(batch_size=8, model="litgpt"), Recorder()
        strategy = MegatronTPStrategy(tensor_parallel_size=tp)
        L.Trainer(**lit.trainer_kwargs(max_steps=steps, devices=world, strategy=strategy, gradient_clip_val=0.5,
                                       callbacks=[rec])).fit(model)  # fmt: skip
        return rec.losses


def test_litgpt_trainer_losses_match_single_process():
    import lightning as L
    import lit
    from test_strategy import Recorder

    torch.manual_seed(0)
    model, rec = lit.LitGPT(batch_size=8, model="litgpt", ref_sampler=True), Recorder()
    L.Trainer(**lit.trainer_kwargs(max_steps=6, devices=1, gradient_clip_val=0.5, callbacks=[rec])).fit(model)
    for losses in _dist.run(2, _fit_litgpt, 2, 2, 6):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(rec.losses), rtol=1e-5, atol=0)


def test_litgpt_and_the_project_extras_import_together():
    """LitGPT installed without its pins leaves what the project needs in place (jsonargparse for the
    recipes, transformers 5 with its huggingface-hub): all import in one interpreter."""
    from importlib.metadata import version

    import jsonargparse  # noqa: F401
    import litgpt  # noqa: F401

    pytest.importorskip("transformers")
    import transformers  # noqa: F401

    assert tuple(int(x) for x in version("jsonargparse").split(".")[:2]) >= (4, 53)


def _deferred(tp: int) -> dict:
    return {arch: _deferred_one(arch, tp) for arch in ("llama", "olmo2")}


def _deferred_one(arch: str, tp: int) -> dict:
    import warnings

    from lightning_tp.engine.init import Materializer, is_deferred
    from lightning_tp.policy import apply_policy

    with torch.device("meta"):
        model = build(arch)  # never dense: built on meta, materialized one layer at a time
    idx = torch.randint(0, 50, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_policy(model, _dist.mesh(tp).tp_group, "auto", verify=True, example_input=idx,
                     materializer=Materializer(model, "cpu", 1234))  # fmt: skip
    dense = build(arch)
    return {
        "deferred": is_deferred(model),
        "rope_cache": torch.equal(model.cos, dense.cos) and torch.equal(model.sin, dense.sin),
        "heads": model.transformer.h[0].attn.config.n_head,
        "warnings": [str(w.message) for w in caught if "block" in str(w.message)],
    }


def test_litgpt_built_on_meta_is_materialized_and_verified_block_by_block():
    """Deferred init: LitGPT built on the meta device, materialized layer by layer (its rope cache
    recomputed by GPT.reset_parameters), each block checked against the same block built dense
    (verify=True) with nothing left unchecked; OLMo-2's gathered q/k norms included."""
    for per_arch in _dist.run(WORLD, _deferred, 2):
        for r in per_arch.values():
            assert not r["deferred"] and r["rope_cache"] and r["heads"] == 4 and not r["warnings"], per_arch


def _olmo2_sequence_parallel(tp: int) -> list[str]:
    from lightning_tp.policy import apply_policy

    model = build("olmo2")
    idx = torch.randint(0, 50, (2, SEQ), generator=torch.Generator().manual_seed(1))
    plan = apply_policy(model, _dist.mesh(tp).tp_group, "auto", verify=True, example_input=idx, sequence_parallel=True)
    rows = [f"{m.name}:{m.style}:{m.options.get('partial_grad', False)}" for m in plan.modules if "norm_" in m.name]
    with torch.no_grad():  # a prefill of 5 tokens and each decode step of one token: on the whole sequence
        same = _generate(build("olmo2"), idx[:, :5], 4).tolist() == _generate(model, idx[:, :5], 4).tolist()
    return rows + (["generated as dense"] if same else [])


def test_litgpt_olmo2_under_sequence_parallelism():
    """OLMo-2's whole-width q/k norms under sequence parallelism: verify=True compares outputs and
    gradients (partial ones summed over TP) with the dense model. The norms gather their input and
    their gradients are partial, as are those of the norms that run on this rank's sequence chunk."""
    for rows in _dist.run(2, _olmo2_sequence_parallel, 2):
        assert "transformer.h.0.attn.norm_q:gather_input:True" in rows, rows
        assert "transformer.h.0.norm_1:replicate:True" in rows, rows
        assert "generated as dense" in rows, rows  # greedy with LitGPT's KV cache


# -- LitGPT's own named configs, shrunk: one per layout family it ships ------------------------------------
# Each keeps what makes its family different (MoE, sliding windows, softcapping, post-norms, q/k norms,
# rope scaling, attention biases, head_size apart from n_embd / n_head, the q:kv head ratio) and gets
# 2 layers, width 32, 8 heads, vocabulary 50.
ZOO = [
    "stablelm-base-alpha-3b", "stablelm-3b-4e1t", "Falcon3-1B-Base", "Llama-3.1-8B", "OLMo-1B-hf",
    "OLMo-2-1124-7B", "Gemma-7b", "Gemma-2-2b", "Gemma-3-4b-it", "phi-1_5", "Phi-3-mini-4k-instruct",
    "Mixtral-8x7B-v0.1", "Qwen2.5-0.5B", "Qwen3-0.6B", "Qwen3-30B-A3B",
]  # fmt: skip
ZOO_MULTI_QUERY = ["Gemma-3-1b-it", "falcon-7b"]  # one key/value head: replicated on every rank


def build_named(name: str, dtype=torch.float64):
    from litgpt.config import Config
    from litgpt.model import GPT

    base = Config.from_name(name)
    ratio = min(base.n_head // base.n_query_groups, 4)
    kw: dict = dict(n_layer=2, block_size=32, vocab_size=50, padding_multiple=16, padded_vocab_size=None, n_embd=32,
                    n_head=8, n_query_groups=1 if base.n_query_groups == 1 else 8 // ratio, intermediate_size=48)  # fmt: skip
    if base.head_size * base.n_head != base.n_embd:
        kw["head_size"] = 8  # Gemma: heads wider than n_embd / n_head
    if base.n_expert:
        kw.update(n_expert=4, n_expert_per_token=2, moe_intermediate_size=16)
    if base.sliding_window_size:
        kw["sliding_window_size"] = 4  # shorter than the test sequence
    if base.rope_adjustments and "original_max_seq_len" in base.rope_adjustments:
        kw["rope_adjustments"] = dict(base.rope_adjustments, original_max_seq_len=16)
    torch.manual_seed(0)
    return GPT(Config.from_name(name, **kw)).to(dtype)


def _zoo_case(name: str, tp: int) -> dict:
    from lightning_tp.errors import ShardingError
    from lightning_tp.policy import apply_policy

    group = _dist.mesh(tp).tp_group
    dense = build_named(name)
    model = copy.deepcopy(dense)
    idx, tgt = _batch()
    try:
        apply_policy(model, group, "auto", verify=True, example_input=idx)
    except ShardingError as err:
        return {"refused": str(err)}
    return _compare(dense, model, idx, tgt, group)


def _zoo(tp: int) -> dict:
    return {name: _zoo_case(name, tp) for name in ZOO + ZOO_MULTI_QUERY}


@pytest.fixture(scope="module")
def zoo():
    return _dist.run(2, _zoo, 2)


@pytest.mark.parametrize("name", ZOO + ZOO_MULTI_QUERY)
def test_litgpt_named_config_matches_dense(zoo, name):
    """Float32 rounding where LitGPT computes in float32 inside the float64 model (its RMSNorm)."""
    for rank, per_name in enumerate(zoo):
        r = per_name[name]
        assert "refused" not in r, (name, rank, r)
        assert r["logit_err"] <= 1e-6, (name, rank, r["logit_err"])
        bad = {n: e for n, e in r["grad_err"].items() if e > 1e-6}
        assert not bad, (name, rank, bad)


def _moe_sequence_parallel(name: str, tp: int) -> dict:
    from lightning_tp.engine.sharding import has_partial_grad
    from lightning_tp.policy import apply_policy

    group = _dist.mesh(tp).tp_group
    dense = build_named(name)
    model = copy.deepcopy(dense)
    idx, tgt = _batch()
    plan = apply_policy(model, group, "auto", verify=True, example_input=idx, sequence_parallel=True)
    res = _compare(dense, model, idx, tgt, group)
    res["styles"] = {m.name: m.style for m in plan.modules}
    res["partial"] = sorted(n for n, p in model.named_parameters() if has_partial_grad(p))
    with torch.no_grad():  # a prefill of SEQ tokens sequence parallel, one-token decode steps on the whole sequence
        res["generated"] = (_generate(dense, idx, 4).tolist(), _generate(model, idx, 4).tolist())
    return res


@pytest.mark.parametrize("name", ["Mixtral-8x7B-v0.1", "Qwen3-30B-A3B"])
def test_litgpt_mixture_of_experts_under_sequence_parallelism(name):
    """LitGPT's LLaMAMoE under sequence parallelism: the router stays whole (as without it), and each
    mixture-of-experts layer runs on the whole sequence (gathered at its input, its output split back,
    plain tensor parallelism inside), the attention blocks around it sequence parallel. Logits and every
    gradient equal the dense model's (float32 rounding where LitGPT computes in float32)."""
    from lightning_tp.policy import plan_policy

    plan = plan_policy(build_named(name), 2, "auto", strict=True)  # nothing unmatched
    rows = {m.name: m.style for m in plan.modules}
    assert rows["transformer.h.0.mlp.gate"] == "replicate" and rows["transformer.h.0.mlp.experts.3.proj"] == "row"
    for rank, r in enumerate(_dist.run(2, _moe_sequence_parallel, name, 2)):
        assert r["styles"]["transformer.h.0.mlp"] == "sequence_whole", r["styles"]
        assert r["styles"]["transformer.h.0.attn"] == "sequence_gather", r["styles"]
        assert "transformer.h.0.norm_2.weight" in r["partial"] and not any(".mlp." in n for n in r["partial"])
        assert r["logit_err"] <= 1e-6, (name, rank, r["logit_err"])
        bad = {n: e for n, e in r["grad_err"].items() if e > 1e-6}
        assert not bad, (name, rank, bad)
        assert r["generated"][0] == r["generated"][1], (name, rank, r["generated"])  # greedy, LitGPT's KV cache
