"""Tiny Hugging Face models built from configs (no downloads), one per architecture, for TP parity tests.

Every builder returns a float64 model in train mode with every dropout probability 0 and eager
attention. Vocabulary sizes are chosen so that some are not divisible by 2 or 4 (padding at TP 2 / 4)
and none equals the width of any other linear layer or embedding (so "auto" cannot take a projection
or a position table for an LM head). Head layouts vary on purpose: grouped-query, multi-query,
fused per-chunk and per-head-interleaved q/k/v, explicit ``head_dim`` different from hidden/heads.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch import nn

L, T_DEC = 2, 7  # layers; decoder length for encoder-decoder models
COMMON = {"attn_implementation": "eager", "use_cache": False}


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=130, hidden_size=64, intermediate_size=64, num_hidden_layers=L, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, attention_dropout=0.0, **COMMON,
    ))  # fmt: skip


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(
        vocab_size=98, hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, sliding_window=5, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, attention_dropout=0.0, **COMMON,
    ))  # fmt: skip


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=101,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=L,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            attention_dropout=0.0,
            **COMMON,
        )
    )  # (q/k/v carry biases)


def _apertus():
    from transformers import ApertusConfig, ApertusForCausalLM

    model = ApertusForCausalLM(
        ApertusConfig(
            vocab_size=126,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=L,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=8,
            max_position_embeddings=8192,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            attention_dropout=0.0,
            **COMMON,
        )
    )  # fmt: skip (max_position_embeddings: Apertus's default rope scaling reads 8192 original positions)
    with torch.no_grad():  # xIELU's learned alpha_p / alpha_n, drawn away from their init
        for name, param in model.named_parameters():
            if name.endswith(("alpha_p", "alpha_n")):
                param.add_(torch.randn_like(param) * 0.3)
    return model


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=126,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=L,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=16,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            attention_dropout=0.0,
            **COMMON,
        )
    )  # (q_norm/k_norm over head_dim; q_proj 32 -> 128)


def _cohere():
    from transformers import CohereConfig, CohereForCausalLM

    return CohereForCausalLM(
        CohereConfig(
            vocab_size=122,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=L,
            num_attention_heads=8,
            num_key_value_heads=2,
            use_qk_norm=True,
            logit_scale=0.5,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            attention_dropout=0.0,
            **COMMON,
        )
    )  # (a LayerNorm per head: q_norm (8, 8), k_norm (2, 8); tied head)


def _gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(
        GemmaConfig(
            vocab_size=102,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=L,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=1,
            attention_dropout=0.0,
            **COMMON,
        )
    )  # (multi-query, as Gemma-2B: one k/v head, replicated at TP 2 and 4; tied head; embedding scaled
    # by sqrt(hidden) inside the embedding module)


def _gemma4():
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING["gemma4_text"](
        vocab_size=130, hidden_size=64, intermediate_size=128, num_hidden_layers=L, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=64, sliding_window=6, num_kv_shared_layers=0,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=130, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attention_dropout=0.0, **COMMON,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)  # (a config of per-layer values: config.head_dim raises)


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(
        Phi3Config(
            vocab_size=110,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=L,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=64,
            original_max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attention_dropout=0.0,
            **COMMON,
        )
    )  # (fused qkv_proj (q, k, v) and gate_up_proj (gate, up))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=97,
            n_embd=32,
            n_layer=L,
            n_head=4,
            n_inner=64,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
            **COMMON,
        )
    )  # (Conv1D weights (in, out); c_attn chunks (q, k, v))


def _gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=106,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=L,
            num_attention_heads=4,
            max_position_embeddings=64,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            **COMMON,
        )
    )  # (query_key_value interleaved per head: (heads, 3, head_dim))


def _gptj():
    from transformers import GPTJConfig, GPTJForCausalLM

    return GPTJForCausalLM(
        GPTJConfig(
            vocab_size=114,
            n_embd=32,
            n_layer=L,
            n_head=4,
            rotary_dim=4,
            n_inner=64,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **COMMON,
        )
    )  # (lm_head has a bias; parallel attention + MLP)


def _gpt_bigcode(multi_query: bool):
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    return GPTBigCodeForCausalLM(
        GPTBigCodeConfig(
            vocab_size=99 if multi_query else 118,
            n_embd=32,
            n_layer=L,
            n_head=4,
            n_inner=64,
            n_positions=64,
            multi_query=multi_query,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
            **COMMON,
        )
    )  # (MQA: c_attn (q 32, k 8, v 8); MHA: c_attn interleaved per head (heads, 3 * head_dim))


def _falcon(new_arch: bool):
    from transformers import FalconConfig, FalconForCausalLM

    extra = {"new_decoder_architecture": True, "num_kv_heads": 4, "num_attention_heads": 8, "hidden_size": 64}
    base = {"multi_query": True, "num_attention_heads": 4, "hidden_size": 32}  # Falcon-7B style
    return FalconForCausalLM(FalconConfig(
        vocab_size=127 if new_arch else 122, num_hidden_layers=L, ffn_hidden_size=64 if not new_arch else 128,
        max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=1, eos_token_id=2,
        **(extra if new_arch else base), **COMMON,
    ))  # fmt: skip


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM(
        BloomConfig(
            vocab_size=100,
            hidden_size=32,
            n_layer=L,
            n_head=4,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **COMMON,
        )
    )  # (ALiBi built in BloomModel from all heads; query_key_value interleaved per head)


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(
        OPTConfig(
            vocab_size=103,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=L,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            layerdrop=0.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **COMMON,
        )
    )  # (fc1/fc2 sit in the decoder layer next to self_attn; positions offset by 2)


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(
        T5Config(
            vocab_size=105,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=L,
            num_decoder_layers=L,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            dropout_rate=0.0,
            feed_forward_proj="relu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            **COMMON,
        )
    )  # (relative_attention_bias: Embedding(num_buckets, n_heads) in block 0 of each stack)


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(
        BertConfig(
            vocab_size=111,
            hidden_size=32,
            num_hidden_layers=L,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            type_vocab_size=2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
            attn_implementation="eager",
        )
    )  # (decoder tied to word_embeddings, decoder.bias tied to cls.predictions.bias)


# Mixtures of experts kept as 3-D parameters (Hugging Face's tp_plan: "moe_tp_experts"): four experts of
# 16 hidden units, two per token, so every expert is split at TP 2 and 4 and some get no token.
MOE = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": L,
       "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
       "attention_dropout": 0.0, "num_experts_per_tok": 2, "experts_implementation": "eager", **COMMON}  # fmt: skip


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(
        MixtralConfig(vocab_size=97, intermediate_size=16, num_local_experts=4, router_jitter_noise=0.0, **MOE)
    )  # (gate_up_proj (E, 2I, H) packed gate | up, down_proj (E, H, I); router MixtralTopKRouter)


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            vocab_size=103,
            intermediate_size=40,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=4,
            mlp_only_layers=[1],
            **MOE,
        )
    )  # fmt: skip  (a shared expert gated by a sigmoid beside the routed ones; layer 1 a dense MLP)


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            vocab_size=107,
            intermediate_size=40,
            moe_intermediate_size=16,
            num_experts=4,
            head_dim=16,
            norm_topk_prob=True,
            **MOE,
        )
    )  # fmt: skip  (q/k norms over head_dim; top-k probabilities renormalized)


def _olmoe():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    return OlmoeForCausalLM(OlmoeConfig(vocab_size=109, intermediate_size=16, num_experts=4, **MOE))
    # (q/k norms over all heads: gather_input)


def _llama4():
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    return Llama4ForCausalLM(
        Llama4TextConfig(
            vocab_size=115,
            intermediate_size=16,
            intermediate_size_mlp=40,
            num_local_experts=4,
            head_dim=8,
            interleave_moe_layer_step=2,
            attn_temperature_tuning=False,
            **{**MOE, "num_experts_per_tok": 1},
        )
    )  # fmt: skip  (transposed experts: gate_up_proj (E, H, 2I) "packed_rowwise", down_proj (E, I, H) "colwise")


def _deepseek_v2():
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    return DeepseekV2ForCausalLM(
        DeepseekV2Config(
            vocab_size=117,
            intermediate_size=40,
            moe_intermediate_size=16,
            n_routed_experts=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=12,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=8,
            v_head_dim=8,
            head_dim=4,
            n_group=1,
            topk_group=1,
            **MOE,
        )
    )  # fmt: skip  (multi-head latent attention: kv_a_proj_with_mqa "mla_kv_a_proj"; layer 0 dense)


def gpt_oss(**overrides) -> nn.Module:
    """A tiny GPT-OSS: experts (E, H, 2I) with gate/up interleaved and biases, a down_proj_bias added
    after the sum over hidden units, attention sinks. Hugging Face zero-initializes the biases and
    sinks: here they are drawn, so that a bias added on the wrong ranks or sliced wrongly shows."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = {"vocab_size": 119, "intermediate_size": 16, "num_local_experts": 4, "head_dim": 8,
              "sliding_window": 5, **{**MOE, "num_key_value_heads": 2}, **overrides}  # fmt: skip
    model = GptOssForCausalLM(GptOssConfig(**config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("_bias", "sinks")):
                param.normal_(0.0, 0.1)
    return model


def _granite_swa():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    config = CONFIG_MAPPING["granite_swa"](
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=L, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=64, sliding_window=5, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False, embedding_multiplier=2.0, attention_multiplier=0.2,
        residual_multiplier=0.5, logits_scaling=4.0, attention_dropout=0.0, **COMMON,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # sinks start at zero: made distinct per head, so a wrong split shows
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_()
    return model  # (per-head attention sinks: tp_plan "self_attn.sinks": colwise, "self_attn": local_params)


BUILDERS = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "apertus": _apertus,
    "gemma": _gemma,
    "phi3": _phi3,
    "cohere": _cohere,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "gpt_neox_names": _gpt_neox,  # under the name rules (POLICY), not its Hugging Face plan
    "gptj": _gptj,
    "gpt_bigcode_mq": lambda: _gpt_bigcode(True),
    "gpt_bigcode_mha": lambda: _gpt_bigcode(False),
    "falcon": lambda: _falcon(False),
    "falcon_new_arch": lambda: _falcon(True),
    "bloom": _bloom,
    "opt": _opt,
    "t5": _t5,
    "bert": _bert,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "llama4": _llama4,
    "deepseek_v2": _deepseek_v2,
    "gemma4": _gemma4,
    "gpt_oss": gpt_oss,
    "granite_swa": _granite_swa,
    # default configs shrunk (tests/scripts/hf_sweep.py's): modules a plan leaves whole that mix the sequence
    "deepseek_v3": lambda: shrunk("deepseek_v3"),  # latent attention left whole by its Hugging Face plan
    "qwen3_next": lambda: shrunk("qwen3_next"),  # gated delta nets whose split layers gather their output
    "jamba": lambda: shrunk("jamba"),  # Mamba mixers; its plan splits only the experts
}
# The policy each architecture is rewritten with in the tests ("auto" unless named): GPT-OSS's tp_plan
# splits only the token embedding; the name rules split its attention and experts. GPT-NeoX under the
# name rules: its query_key_value is read per head (head counts in its config, head_size on the block).
POLICY = {"gpt_oss": "names", "gpt_neox_names": "names"}
ARCHS = list(BUILDERS)


def build(arch: str, seed: int | None = None) -> nn.Module:
    """The float64 model for ``arch``; the same weights on every call with the same seed."""
    torch.manual_seed(ARCHS.index(arch) + 1000 if seed is None else seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = BUILDERS[arch]()
    model = model.to(torch.float64)
    model.train()
    return model


def vocab_size(model: nn.Module) -> int:
    return model.config.vocab_size


def inputs(arch: str, model: nn.Module, batch: int = 2, seq: int = 12, seed: int = 0) -> dict:
    """Keyword inputs for ``model(**inputs)``: token ids (some of them the pad id 0), plus decoder ids
    for encoder-decoder models. Identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    v = vocab_size(model)
    ids = torch.randint(0, v, (batch, seq), generator=g)
    ids[0, 3] = 0  # a padding_idx row is looked up (its gradient must stay zero where HF sets padding_idx)
    ids[1, -1] = v - 1  # the last real vocabulary row (next to the padding rows at TP 4)
    kwargs = {"input_ids": ids}
    if arch == "t5":
        dec = torch.randint(0, v, (batch, T_DEC), generator=g)
        dec[:, 0] = 0
        kwargs["decoder_input_ids"] = dec
    if arch != "bert":
        kwargs["use_cache"] = False
    return kwargs


def targets(arch: str, model: nn.Module, kwargs: dict, seed: int = 1) -> torch.Tensor:
    """Fixed targets with the shape of the logits' leading dims (a few ignored with -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = kwargs.get("decoder_input_ids", kwargs["input_ids"])
    tgt = torch.randint(0, vocab_size(model), tuple(ids.shape), generator=g)
    tgt[0, :2] = -100
    return tgt


# ------------------------------------------------------------------------------------------------
# Any registered architecture, from its default config shrunk (tests/scripts/hf_sweep.py sweeps them all).

SHRINK = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=4, head_dim=8, max_position_embeddings=64, n_embd=64, n_head=8, n_layer=2,
    n_positions=64, d_model=64, num_layers=2, num_heads=8, ffn_hidden_size=128, n_inner=128,
    num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1,
    kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, rotary_dim=4,
    sliding_window=6, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, use_cache=False,
    tie_word_embeddings=False, encoder_layers=2, decoder_layers=2, encoder_attention_heads=8,
    decoder_attention_heads=8, encoder_ffn_dim=128, decoder_ffn_dim=128, num_decoder_layers=2, d_ff=128, d_kv=8,
)  # fmt: skip
# retried without these when the shrunk config does not build or run: a layout it contradicts
RETRY_WITHOUT = ((), ("head_dim",), ("head_dim", "layer_types"), ("head_dim", "layer_types", "num_key_value_heads"))


def from_config(config):
    """The causal LM of ``config`` with eager attention (and eager experts where the model has the option)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager", experts_implementation="eager")
    except TypeError:  # a model without the experts option
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def shrunk_configs(arch: str) -> Iterator:
    """The default config of model type ``arch`` shrunk (:data:`SHRINK`: 2 layers, hidden 64, 8 heads,
    4 key/value heads, 4 experts; every dropout and router jitter 0), then again without each set of
    :data:`RETRY_WITHOUT` in turn (the first that builds and runs is the one to use). Raises for a
    composite config (its sub-models are not shrunk)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[arch]
    base = cls()
    if not hasattr(base, "hidden_size") and any(hasattr(base, k) for k in ("text_config", "vision_config")):
        raise RuntimeError("a composite config")
    kw = {k: v for k, v in SHRINK.items() if hasattr(base, k)}
    for k, v in vars(base).items():  # every dropout and jitter off: the dense and the split model draw differently
        if type(v) is float and any(w in k for w in ("dropout", "jitter", "pdrop", "_drop")):
            kw[k] = 0.0
    if getattr(base, "layer_types", None):
        kw["layer_types"] = (list(base.layer_types) * 2)[:2]
    if hasattr(base, "kv_lora_rank"):  # multi-head latent attention: a key/value head per query head
        kw["num_key_value_heads"] = kw["num_attention_heads"]
        kw.pop("head_dim", None)
    for drop in RETRY_WITHOUT:
        try:
            config = cls(**{k: v for k, v in kw.items() if k not in drop})
        except Exception:  # noqa: BLE001 - the next, smaller set of overrides
            continue
        yield config


def shrunk(arch: str, seed: int = 0) -> nn.Module:
    """The causal LM registered as ``arch`` (a model type) from its default config shrunk
    (:func:`shrunk_configs`), float64, in train mode; the same weights for the same seed. Raises where
    the shrunk config does not build or run (composite, audio or vision configs, layouts the shrinking
    contradicts)."""
    error: Exception = RuntimeError(f"no shrunk config of {arch} builds")
    for config in shrunk_configs(arch):
        try:
            torch.manual_seed(seed)
            model = from_config(config).to(torch.float64)
            with torch.no_grad():
                model(input_ids=torch.randint(3, 100, (2, 12)))
            torch.manual_seed(seed)  # the same weights on every rank
            return from_config(config).to(torch.float64).train()
        except Exception as exc:  # noqa: BLE001 - the next, smaller set of overrides
            error = exc
    raise error
