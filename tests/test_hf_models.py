"""Hugging Face architectures under policy="auto" (GPT-OSS: "names"): exact parity (logits and every gradient) or a typed refusal.

Each architecture (tests/hf_zoo.py: tiny float64 models built from configs, no downloads) is rewritten
with ``apply_policy(model, tp_group, "auto")`` at TP 2 and TP 4 and compared with its dense copy:
logits (vocab-sharded logits gathered) and, after a backward of the same cross entropy, every
parameter's gradient (sharded ones gathered, partial ones summed over TP first, GPT-2 ``Conv1D``
weights transposed). ``verify=True`` must then pass too. Where a module rewrite cannot do it, the
expected outcome is instead a lightning_tp-typed refusal from ``apply_policy`` that names the module.

All architectures run in one call per TP size on one spawned world of 4 ranks (TP 2 runs as DP 2 x
TP 2); the per-architecture tests only read those results. ``python tests/test_hf_models.py``
prints the table of current outcomes.
"""

from __future__ import annotations

import copy
import importlib.util
import traceback
import warnings

import pytest
import torch
import torch.nn.functional as F

import _dist

HAS_HF = importlib.util.find_spec("transformers") is not None
pytestmark = pytest.mark.skipif(not HAS_HF, reason="transformers (extra 'hf') not installed")

WORLD = 4
TP_SIZES = (2, 4)
LOGIT_RTOL = 1e-10  # max abs error allowed, relative to max(1, max |dense logits|)
GRAD_RTOL = 1e-10  # max abs error allowed, relative to max(1e-4, max |dense grad|) of the same parameter
HF_LOSS_RTOL = 1e-5  # the model's own labels= loss: Hugging Face casts the logits to float32 first
# GPT-J's eager attention computes q.k and the softmax in float32 (`query.to(torch.float32)`) even in
# a float64 model: its float32 backward depends on the batch layout (4 vs 1 head per rank), so q/k
# gradients agree to ~1e-7 only (exact to 1e-15 with that upcast removed).
# Float32 inside float64 models: Mixtral's, OLMoE's and DeepSeek-V2's routers take the softmax in float32
# (`router_logits.float()`, `softmax(dtype=torch.float32)`), Llama 4's router sigmoid, RMSNorms and rotary
# too, OLMoE's RMSNorms (`.to(torch.float32)`). The last bits of the outputs summed over TP then move what
# follows by float32 rounding. Checked by hand: with those casts made no-ops, all four are exact to 1e-15
# at TP 2 and 4. Gemma 4's RMSNorms (`hidden_states.float()`): its q/k norms' gradients are 9e-8 off at
# TP 2 and exact at TP 4; with the cast made a no-op, exact to 4e-15 at both. Cohere's per-head LayerNorms and
# its rotary (`q.float()`): gradients 1.3e-7 off at TP 2 and 1.9e-7 at TP 4; with both casts removed, exact
# to 1.6e-15 at both. Granite-SWA's sink scale (`(lse - sinks).to(torch.float32).sigmoid()`): where the
# float32 sigmoid rounds depends on the CPU's vector kernels (exact to 1e-10 on one machine, logits 5e-10 off
# at TP 4 on another); with the cast kept float64 (`hf_sweep.py --no-float32`), exact to 1.6e-15.
# DeepSeek-V3's router and Qwen3-Next's norms and gated delta rule compute in float32 too: under sequence
# parallelism gradients 1e-7 to 2e-7 off at TP 2 and 4, exact to 2e-14 with the casts kept float64.
FLOAT32_INSIDE = {
    "mixtral": 1e-6,
    "olmoe": 1e-6,
    "llama4": 1e-6,
    "deepseek_v2": 1e-6,
    "gemma4": 1e-6,
    "cohere": 1e-6,
    "granite_swa": 1e-6,
    "deepseek_v3": 1e-6,
    "qwen3_next": 1e-6,
}
GRAD_RTOL_BY_ARCH = {"gptj": 1e-6, **FLOAT32_INSIDE}
LOGIT_RTOL_BY_ARCH = FLOAT32_INSIDE
# the no-grad forward of 11 tokens under sequence parallelism (on the whole sequence): GPT-J's float32
# attention moves its logits by float32 rounding there too (1.6e-10 at TP 4)
WHOLE_RTOL_BY_ARCH = {**LOGIT_RTOL_BY_ARCH, "gptj": 1e-6}
CALL_TIMEOUT_S = 400

# The target outcome per architecture, at every TP size in TP_SIZES:
#   "exact": logits and all gradients equal the dense model's, and verify=True does not raise;
#   (error type name, [substrings]): apply_policy(verify=True) raises that lightning_tp error (a
#   LightningTPError subclass) whose message contains every substring (the module and the reason).
EXACT = "exact"
EXPECTED: dict[str, object] = {
    "llama": EXACT,  # GQA 8 q / 4 kv heads, untied head, padding_idx 0
    "mistral": EXACT,  # sliding window 5 < sequence 12
    "qwen2": EXACT,  # q/k/v biases, tied head
    "qwen3": EXACT,  # q_norm/k_norm (RMSNorm over head_dim) see only this rank's heads: partial grads
    # xIELU activation between up_proj and down_proj with learned one-element alpha_p / alpha_n: each rank's
    # gradient covers only its hidden units (planned partial)
    "apertus": EXACT,
    # multi-query (as Gemma-2B): the one k/v head replicated on every rank; embedding scaled by sqrt(hidden)
    # inside GemmaTextScaledWordEmbedding.forward, tied head
    "gemma": EXACT,
    # layers of two kinds (sliding / full attention) in a config whose model-wide head_dim read raises;
    # per-layer inputs from a second embedding table
    "gemma4": EXACT,
    "phi3": EXACT,  # fused qkv_proj / gate_up_proj; HF plan gathers their outputs (colwise_gather_output)
    # a LayerNorm per head (q_norm (8 heads, 8), k_norm (2 kv heads, 8)): their rows split with the heads
    # (head_params; at TP 4 the 2 key/value heads are replicated, each rank holds its head's k_norm row)
    "cohere": EXACT,
    "gpt2": EXACT,  # Conv1D (in, out) weights, fused c_attn (q | k | v)
    "gpt_neox": EXACT,  # query_key_value interleaved per head, partial rotary
    "gpt_neox_names": EXACT,  # the same under policy="names": verify reads the per-head layout (-> column)
    "gptj": EXACT,  # lm_head with bias, partial rotary (rotary_dim)
    # multi-query: c_attn (q 32 | k 8 | v 8), one k/v head for all q heads: c_attn stays whole on every rank,
    # each rank computes its query heads and the k/v head (kv_replicate); Megatron refuses this case
    "gpt_bigcode_mq": EXACT,
    "gpt_bigcode_mha": EXACT,  # c_attn read per head, (heads, 3 * head_dim): verify's forward finds it -> column
    "falcon": EXACT,  # Falcon-7B style: multi-query, parallel attention, query_key_value (q heads | k | v)
    "falcon_new_arch": EXACT,  # Falcon-40B style: query_key_value grouped per kv head (q * g | k | v)
    "bloom": EXACT,  # ALiBi from all heads, built in BloomModel; query_key_value interleaved per head
    "opt": EXACT,  # fc1/fc2 in the decoder layer; learned positions with offset 2
    "t5": EXACT,  # relative_attention_bias Embedding(buckets, n_heads), tied head scaled by d_model**-0.5
    "bert": EXACT,  # decoder tied to word_embeddings, decoder.bias tied to cls.predictions.bias
    # experts kept as 3-D parameters (tp_plan "moe_tp_experts"): each expert split on its hidden units
    "mixtral": EXACT,  # gate_up_proj packed (gate | up), down_proj; float32 router softmax (FLOAT32_INSIDE)
    "qwen2_moe": EXACT,  # a sigmoid-gated shared expert (replicated) beside the routed ones; a dense layer
    "qwen3_moe": EXACT,  # q/k norms over head_dim, renormalized top-k probabilities
    "olmoe": EXACT,  # q/k norms over all heads (gather_input); float32 router and norms (FLOAT32_INSIDE)
    "llama4": EXACT,  # transposed experts (E, H, 2I) / (E, I, H), every token through its expert pre-scaled
    # multi-head latent attention: kv_a_proj_with_mqa's [c_kv | k_rope] ("mla_kv_a_proj") is whole, the
    # gradient of k_rope (it reaches this rank's heads only) summed over TP; q_a_proj whole; shared experts
    "deepseek_v2": EXACT,
    # under policy="names" (its tp_plan splits only the embedding): attention split, the sinks with the heads
    # (head_params); experts as their declared layout says (use_experts_implementation flags): gate/up
    # interleaved element by element, down_proj_bias kept whole and added on one rank ("once")
    "gpt_oss": EXACT,
    # per-head attention sinks in its HF plan ("self_attn.sinks": colwise beside "self_attn": local_params): split
    # with the heads (head_params); embedding, attention, residual and logit multipliers
    "granite_swa": EXACT,
}

# Under sequence parallelism (test_hf_architecture_sequence_parallel). Refused: a row layer whose input is
# not a column layer's output (Phi-3's and OLMoE's HF plans gather the column outputs), a replicated layer
# whose output is partly per head (multi-head latent attention), and models whose forward does not fit a
# sequence-sharded layer (the self-check names it and sequence parallelism as the cause): BLOOM's attention
# adds the residual stream it is given after its row layer; OPT's layer holds its MLP's linears itself (the
# whole layer would gather the sequence); T5's decoder length 7; Llama 4's experts read their tokens
# expert-major (E * N), which gathering tokens over TP mixes; Gemma 4's per-layer inputs are per position.
_SP_MISMATCH = ("PolicyMismatchError", ["of the sequence", "sequence_parallel=False"])
SP_EXPECTED: dict[str, object] = {
    **{a: EXACT for a in ("llama", "mistral", "qwen2", "qwen3", "apertus", "gemma", "cohere", "gpt2", "gpt_neox")},
    **{a: EXACT for a in ("gptj", "gpt_bigcode_mq", "gpt_bigcode_mha", "mixtral", "qwen2_moe", "qwen3_moe")},
    "falcon": EXACT,  # ALiBi (new_arch: none): built outside the stack for the whole sequence, cut to the heads
    "falcon_new_arch": EXACT,
    "gpt_oss": EXACT,
    "granite_swa": EXACT,
    "phi3": ("PolicyError", ["self_attn.o_proj", "input_is_parallel=False"]),
    "olmoe": ("PolicyError", ["self_attn.o_proj", "input_is_parallel=False", "policy='names'"]),
    # latent attention: the block gathers the hidden states for q_a_proj / kv_a_proj_with_mqa too
    "deepseek_v2": EXACT,
    # OPT's layer holds its attention block and its MLP's fc1/fc2 itself (and flattens the tokens to
    # (B*T, H) for them): the layer carries the residual stream, so fc1 gathers its own input
    "opt": EXACT,
    **{a: _SP_MISMATCH for a in ("bloom", "t5", "llama4", "gemma4")},
    "bert": ("PolicyError", ["splits no layer of the model"]),  # "auto" leaves BERT's layers whole
    # modules their plans leave whole that mix the sequence run on the whole sequence (sequence_whole): DeepSeek-V3's
    # latent attention, Qwen3-Next's gated delta nets (their split layers gather their output), Jamba's Mamba mixers
    **{a: EXACT for a in ("deepseek_v3", "qwen3_next", "jamba")},
}
SP_WHOLE = ("deepseek_v3", "qwen3_next", "jamba")
# Gemma's RMSNorm computes in float32 (`x.float()`): its weight's gradient, summed over the sequence
# chunks, agrees to float32 rounding (exact to 1.5e-15 at TP 2 and 4 with the cast made a no-op).
SP_GRAD_RTOL_BY_ARCH = {**GRAD_RTOL_BY_ARCH, "gemma": 1e-6}

# Layers that must be split (their weights sharded) where the name rules once kept them whole: Falcon's,
# BLOOM's and GPT-NeoX's attention (query_key_value / dense; BLOOM's ALiBi biases cut to each rank's heads).
SPLIT = {
    "falcon": ["self_attention.query_key_value", "self_attention.dense"],
    "falcon_new_arch": ["self_attention.query_key_value", "self_attention.dense"],
    "bloom": ["self_attention.query_key_value", "self_attention.dense"],
    "gpt_neox_names": ["attention.query_key_value", "attention.dense"],
}


# ------------------------------------------------------------------------------------------------
# Worker side (every rank of the 4-rank world).


def _error_info(exc: BaseException) -> dict:
    from lightning_tp.errors import LightningTPError

    return {
        "type": type(exc).__name__,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "typed": isinstance(exc, LightningTPError),
        "message": str(exc),
    }


def _gather_grad(param, grad, group):
    """The dense gradient of ``param`` (collective for sharded parameters)."""
    from lightning_tp.engine.comm import all_gather_dim
    from lightning_tp.engine.sharding import shard_spec

    spec = shard_spec(param)
    if spec is None:
        return grad
    gathered = all_gather_dim(grad.contiguous(), group, spec.dim)
    return spec.unshard(list(gathered.chunk(spec.tp_size, dim=spec.dim)))


def _is_conv1d(model, pname: str) -> bool:
    owner = pname.rpartition(".")[0]
    return type(model.get_submodule(owner)).__name__ == "Conv1D"


def _exactness(arch, dense, mesh, kwargs, tgt, sequence_parallel=False, rewrite=None) -> dict:
    """``rewrite(group) -> (model, plan)``: the split model to compare (default: a copy of ``dense``
    rewritten with the architecture's policy, ``verify=True``)."""
    import hf_zoo

    from lightning_tp.engine.loss import gather_logits
    from lightning_tp.engine.sharding import has_partial_grad, shard_spec
    from lightning_tp.errors import LightningTPError
    from lightning_tp.lightning.precision import all_reduce_partial_grads
    from lightning_tp.policy import apply_policy

    group = mesh.tp_group

    def copy_and_rewrite(group):
        model = copy.deepcopy(dense)
        # verify=True: the self-check (forward and backward vs dense) passes, and its reference forward
        # reads how fused projections are consumed (per-head interleaved layouts become plain columns)
        plan = apply_policy(
            model, group, hf_zoo.POLICY.get(arch, "auto"), verify=True, example_input=kwargs,
            sequence_parallel=sequence_parallel,
        )  # fmt: skip
        return model, plan

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, plan = (rewrite or copy_and_rewrite)(group)
    except LightningTPError as exc:
        return {"status": "refused", **_error_info(exc), "verify": _error_info(exc)}
    info = {
        "source": plan.source,
        "unmatched": list(plan.unmatched),
        "local_params": plan.local_params,
        "full_params": plan.full_params,
        "n_sharded": sum(shard_spec(p) is not None for p in model.parameters()),
        "whole": [n for n, p in model.named_parameters() if shard_spec(p) is None],
        "partial": [n for n, p in model.named_parameters() if has_partial_grad(p)],
        "stack": sorted({r.name.rpartition(".")[0] for r in plan.modules if r.style == "sequence_stack"}),
        "styles": sorted({r.style for r in plan.modules}),
    }
    ld = dense(**kwargs).logits
    lt_raw = model(**kwargs).logits
    info["sharded_logits"] = type(lt_raw).__name__ == "VocabShardedLogits"
    with torch.no_grad():
        lt = gather_logits(lt_raw.detach())
    if lt.shape != ld.shape:
        return {"status": "wrong", "what": "logits", "detail": f"shape {tuple(lt.shape)} != {tuple(ld.shape)}", **info}
    logit_err = float((lt.detach() - ld.detach()).abs().max())
    logit_scale = max(1.0, float(ld.detach().abs().max()))
    info["logit_err"] = logit_err / logit_scale

    def loss(logits):
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1))

    loss(ld).backward()
    loss(lt_raw).backward()
    all_reduce_partial_grads(list(model.parameters()), group)

    dense_params, tp_params = dict(dense.named_parameters()), dict(model.named_parameters())
    if set(dense_params) != set(tp_params):
        missing, extra = sorted(set(dense_params) - set(tp_params)), sorted(set(tp_params) - set(dense_params))
        return {"status": "wrong", "what": "parameter names", "detail": f"missing {missing}, new {extra}", **info}
    wrong, worst = [], 0.0
    for name, param in tp_params.items():  # same order on every rank: collectives match
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        got = _gather_grad(param, grad.detach(), group)
        ref_param = dense_params[name]
        ref = ref_param.grad if ref_param.grad is not None else torch.zeros_like(ref_param)
        if _is_conv1d(dense, name) and name.endswith("weight") and not _is_conv1d(model, name):
            ref = ref.t()  # Conv1D stores (in, out); the rewritten layer (out, in)
        if got.shape != ref.shape:
            wrong.append((name, f"grad shape {tuple(got.shape)} != {tuple(ref.shape)}"))
            continue
        scale = max(1e-4, float(ref.abs().max()))
        err = float((got - ref).abs().max()) / scale
        worst = max(worst, err)
        if err > (SP_GRAD_RTOL_BY_ARCH if sequence_parallel else GRAD_RTOL_BY_ARCH).get(arch, GRAD_RTOL):
            wrong.append((name, f"grad error {err:.2e} (relative to {scale:.2e})"))
    info["grad_err"] = worst
    with torch.no_grad():  # the model's own loss (labels=): HF reshapes the logits with config.vocab_size
        hd = dense(**kwargs, labels=tgt).loss
        ht = model(**kwargs, labels=tgt).loss
    info["hf_loss_err"] = float((ht - hd).abs()) / max(1.0, float(hd.abs()))
    if info["hf_loss_err"] > HF_LOSS_RTOL:
        wrong.insert(0, ("labels= loss", f"{float(ht):.8f} != dense {float(hd):.8f}"))
    if hasattr(dense.config, "output_router_logits"):  # a mixture of experts: its load-balancing loss
        info["aux_err"] = aux_err = _aux_loss_errors(dense, model, kwargs, group)
        tol = (SP_GRAD_RTOL_BY_ARCH if sequence_parallel else GRAD_RTOL_BY_ARCH).get(arch, GRAD_RTOL)
        if aux_err is not None and max(aux_err) > tol:
            wrong.insert(0, ("load-balancing loss (output_router_logits=True)", f"value, grad error {aux_err}"))
    if sequence_parallel:  # without gradients, a length that does not divide by TP: run on the whole sequence
        odd = {**kwargs, "input_ids": kwargs["input_ids"][:, :-1]}
        with torch.no_grad():
            whole_err = float((gather_logits(model(**odd).logits) - dense(**odd).logits).abs().max())
        if whole_err > WHOLE_RTOL_BY_ARCH.get(arch, LOGIT_RTOL) * logit_scale:
            wrong.insert(0, ("no-grad forward of an odd length", f"logit error {whole_err:.2e}"))
    if logit_err > LOGIT_RTOL_BY_ARCH.get(arch, LOGIT_RTOL) * logit_scale:
        return {
            "status": "wrong",
            "what": "logits",
            "detail": f"error {info['logit_err']:.2e}",
            "params": wrong,
            **info,
        }
    if wrong:
        return {"status": "wrong", "what": wrong[0][0], "detail": wrong[0][1], "params": wrong, **info}
    return {"status": "exact", **info}


def _aux_loss_errors(dense, model, kwargs, group) -> tuple[float, float] | None:
    """A mixture of experts' auxiliary load-balancing loss (``output_router_logits=True``, with a padded
    row in the attention mask): its relative error and its gradients' (the routers') against dense; None
    where the model computes none (Llama 4, DeepSeek-V2)."""
    from lightning_tp.lightning.precision import all_reduce_partial_grads

    mask = torch.ones_like(kwargs["input_ids"])
    mask[0, -2:] = 0
    aux = []
    for net in (dense, model):
        net.zero_grad(set_to_none=True)
        out = net(**{**kwargs, "attention_mask": mask}, output_router_logits=True)
        if out.aux_loss is None:
            return None
        out.aux_loss.backward()
        aux.append(out.aux_loss.detach())
    all_reduce_partial_grads(list(model.parameters()), group)
    grad = 0.0
    for name, param in model.named_parameters():  # same order on every rank: collectives match
        ref = dense.get_parameter(name).grad
        if ref is None or param.grad is None:  # (alike on every rank)
            grad = grad if (ref is None) == (param.grad is None) else float("inf")
            continue
        got = _gather_grad(param, param.grad, group)
        grad = max(grad, float((got - ref).abs().max()) / max(1e-4, float(ref.abs().max())))
    return float((aux[1] - aux[0]).abs()) / max(1.0, float(aux[0].abs())), grad


def _case(arch: str, tp: int, sequence_parallel: bool = False) -> dict:
    import hf_zoo

    mesh = _dist.mesh(tp)
    try:
        dense = hf_zoo.build(arch)  # same seed on every rank: the same dense model everywhere
        kwargs = hf_zoo.inputs(arch, dense)
        tgt = hf_zoo.targets(arch, dense, kwargs)
        result = _exactness(arch, dense, mesh, kwargs, tgt, sequence_parallel)
    except Exception as exc:  # noqa: BLE001 - reported per architecture
        return {"status": "error", **_error_info(exc), "traceback": traceback.format_exc()}
    return {"verify": None, **result}


def _run_archs(archs: list[str], tp: int, sequence_parallel: bool = False) -> dict[str, dict]:
    return {arch: _case(arch, tp, sequence_parallel) for arch in archs}


# ------------------------------------------------------------------------------------------------
# Driver side.

_RESULTS: dict[tuple[int, bool], object] = {}


def _results(tp: int, sequence_parallel: bool = False) -> list[dict[str, dict]]:
    """Per-rank results of every architecture at ``tp``, computed once (one world call)."""
    key = (tp, sequence_parallel)
    if key not in _RESULTS:
        archs = list(SP_EXPECTED if sequence_parallel else EXPECTED)
        try:
            _RESULTS[key] = _dist.run(WORLD, _run_archs, archs, tp, sequence_parallel, timeout=CALL_TIMEOUT_S)
        except BaseException as exc:  # noqa: BLE001 - every test of this TP size reports it
            _RESULTS[key] = exc
    value = _RESULTS[key]
    if isinstance(value, BaseException):
        raise AssertionError(f"the TP {tp} world run failed: {value}") from value
    return value


def _describe(res: dict) -> str:
    status = res["status"]
    if status == "exact":
        return f"exact (logits {res['logit_err']:.1e}, grads {res['grad_err']:.1e})"
    if status == "wrong":
        more = res.get("params") or []
        return f"wrong: {res['what']}: {res['detail']}" + (
            f" ({len(more)} params wrong: {[n for n, _ in more][:6]})" if len(more) > 1 else ""
        )
    if status == "refused":
        return f"refused: {res['type']}: {res['message']}"
    return f"error: {res['type']}: {res['message']}\n{res.get('traceback', '')[-2500:]}"


@pytest.mark.parametrize("tp", TP_SIZES, ids=[f"tp{t}" for t in TP_SIZES])
@pytest.mark.parametrize("arch", list(EXPECTED))
def test_hf_architecture(arch, tp):
    per_rank = _results(tp)
    expected = EXPECTED[arch]
    for rank, results in enumerate(per_rank):
        res = results[arch]
        where = f"{arch} at TP {tp}, rank {rank}"
        verify = res.get("verify")
        if expected == EXACT:
            assert res["status"] == "exact", f"{where}: {_describe(res)}"
            assert res["n_sharded"] > 0, f"{where}: nothing was sharded"
            whole_experts = [n for n in res["whole"] if ".experts." in n and n not in res["partial"]]  # not "once"
            assert not whole_experts, f"{where}: experts kept whole: {whole_experts}"
            assert verify is None, f"{where}: verify=True raised {verify['type']}: {verify['message']}"
            whole = [n for n in res["whole"] if any(n.endswith(f".{layer}.weight") for layer in SPLIT.get(arch, ()))]
            assert not whole, f"{where}: kept whole: {whole}"
        else:
            err_type, needles = expected
            assert verify is not None, f"{where}: expected a refusal ({err_type}), verify=True passed: {_describe(res)}"
            assert verify["typed"] and err_type in verify["mro"], f"{where}: {verify['type']}: {verify['message']}"
            for needle in needles:
                assert needle in verify["message"], f"{where}: {needle!r} not in {verify['message']!r}"


@pytest.mark.parametrize("tp", TP_SIZES, ids=[f"tp{t}" for t in TP_SIZES])
@pytest.mark.parametrize("arch", list(SP_EXPECTED))
def test_hf_architecture_sequence_parallel(arch, tp):
    """Sequence parallelism (sequence_parallel=True). Hugging Face models compute their layers'
    positions, causal mask and rotary tables from the embeddings' output (and GPT-2 reshapes the
    stack's output to the input's length), so the sequence-sharded region is their layer stack: split
    at the first layer's input, gathered at the last one's output; the embeddings, the final norm and
    the head run as without it. Logits and every gradient equal the dense model's; the layers' norms
    have partial gradients (summed over TP), nothing outside the stack has. Models whose forward does
    not fit are refused by the self-check or the plan with a typed error naming the module."""
    per_rank = _results(tp, sequence_parallel=True)
    expected = SP_EXPECTED[arch]
    for rank, results in enumerate(per_rank):
        res = results[arch]
        where = f"{arch} at TP {tp} with sequence parallelism, rank {rank}"
        if expected == EXACT:
            assert res["status"] == "exact", f"{where}: {_describe(res)}"
            assert res["stack"] and len(res["stack"]) == 1, f"{where}: {res['styles']}"
            runs = "sequence_whole" if arch in SP_WHOLE else "sequence_gather"  # (Jamba's plan splits only experts)
            assert runs in res["styles"], f"{where}: {res['styles']}"
            stack = res["stack"][0] + "."
            assert res["partial"] and all(n.startswith(stack) for n in res["partial"]), f"{where}: {res['partial']}"
        else:
            err_type, needles = expected
            verify = res.get("verify")
            assert verify is not None, f"{where}: expected a refusal ({err_type}): {_describe(res)}"
            assert verify["typed"] and err_type in verify["mro"], f"{where}: {verify['type']}: {verify['message']}"
            for needle in needles:
                assert needle in verify["message"], f"{where}: {needle!r} not in {verify['message']!r}"


def _falcon_groups_over_more_ranks() -> str:
    from transformers import FalconConfig, FalconForCausalLM

    from lightning_tp.errors import ShardingError
    from lightning_tp.policy import apply_policy

    torch.manual_seed(0)
    config = FalconConfig(
        vocab_size=64, num_hidden_layers=1, hidden_size=64, num_attention_heads=8, num_kv_heads=2,
        new_decoder_architecture=True, ffn_hidden_size=128, attn_implementation="eager", use_cache=False,
    )  # fmt: skip
    model = FalconForCausalLM(config).double()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_policy(
                model, _dist.mesh(4).tp_group, "auto", example_input={"input_ids": torch.randint(0, 64, (2, 6))}
            )
    except ShardingError as exc:
        return str(exc) + f" | still dense: {type(model.transformer.h[0].self_attention.query_key_value).__name__}"
    return "no error"


def test_a_projection_read_per_key_value_group_over_more_ranks_than_groups_is_refused():
    """Falcon-40B's query_key_value holds (q * g | k | v) per key/value head; with fewer key/value heads
    than ranks no rank can hold a whole group: a typed refusal before any rewrite (before: a parity error)."""
    message = _dist.run(WORLD, _falcon_groups_over_more_ranks)[0]
    assert "'transformer.h.0.self_attention.query_key_value': its output is read in 2 groups" in message, message
    assert "tensor_parallel_size=4" in message and message.endswith("still dense: FalconLinear"), message


def test_every_architecture_builds_and_runs_dense():
    """The zoo itself: every model builds, runs forward and backward in float64 (single process)."""
    import hf_zoo

    for arch in EXPECTED:
        model = hf_zoo.build(arch)
        kwargs = hf_zoo.inputs(arch, model)
        logits = model(**kwargs).logits
        assert logits.dtype == torch.float64 and logits.shape[-1] == model.config.vocab_size, arch
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), hf_zoo.targets(arch, model, kwargs).reshape(-1)).backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if "relative_attention_bias" not in n), arch


if __name__ == "__main__":  # print the current outcome table
    import time

    start = time.time()
    try:
        for tp in TP_SIZES:
            for arch in EXPECTED:
                ranks = [r[arch] for r in _results(tp)]
                same = all(_describe(r) == _describe(ranks[0]) for r in ranks)
                v = ranks[0].get("verify")
                vtxt = "verify ok" if v is None else f"verify: {v['type']}: {v['message'][:300]}"
                print(f"TP{tp} {arch:17s} {_describe(ranks[0])[:600]}{'' if same else ' (ranks differ)'} | {vtxt}")
    finally:
        _dist.close_all()
    print(f"{time.time() - start:.1f}s")
