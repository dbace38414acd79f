"""Where policy rules come from: styles and their options, dict/YAML/registered policies, Hugging
Face ``tp_plan`` translation and the built-in ``auto`` rules for common transformer naming.

:func:`lightning_tp.policy.plan.plan_policy` turns the rules into a validated plan.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lightning_tp.errors import LightningTPError
from lightning_tp.policy.styles import STYLES, as_linear

HEAD_ATTRS = (
    "n_head", "n_heads", "num_heads", "num_attention_heads",  # query heads: the first four
    "num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_heads", "n_query_groups",
)  # fmt: skip
# LitGPT: n_query_groups; Falcon: num_kv_heads
KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_heads", "n_query_groups")
HEAD_DIM_ATTRS = ("head_dim", "head_size")
# Arguments of an attention block's forward that hold one entry per head of the whole model, made outside
# the block (BLOOM's ALiBi biases): cut to this rank's heads when the block's heads are split.
HEAD_INPUTS = ("alibi",)
# Query heads per key/value head (grouped-query attention): constant under a split of the key/value heads,
# divided when they are replicated (fewer than the TP ranks).
KV_GROUP_ATTRS = ("num_key_value_groups", "num_kv_groups", "n_rep", "num_queries_per_kv", "q_per_kv")
# Width attributes: divided only when equal to the size of a split chunk of a child projection,
# i.e. when the attribute describes the sharded activation (GPT-2's ``split_size``).
WIDTH_ATTRS = ("split_size", "n_embd", "embed_dim", "all_head_size", "inner_dim", "hidden_size", "d_model")


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_attr(obj: Any, name: str) -> Any:
    """``getattr(obj, name, None)``, and ``None`` where reading the attribute raises: a Hugging Face
    config whose layers differ raises on a model-wide read of a per-layer value (Gemma 4's ``head_dim``),
    which means "not described here", as a missing attribute does."""
    try:
        return getattr(obj, name, None)
    except Exception:  # noqa: BLE001 - any error of a property or __getattr__ is "not readable here"
        return None


def config_objects(module: nn.Module) -> list[tuple[str, Any]]:
    """``(attribute, object)`` for the plain objects ``module`` holds that carry a head count: a model
    configuration shared by the modules that read it (LitGPT's ``self.config.n_head``, a user's
    dataclass or namespace). Modules, classes, callables and containers are never such objects."""
    found = []
    for key, value in vars(module).items():
        if key.startswith("_") or isinstance(value, (nn.Module, type)) or callable(value):
            continue
        if not hasattr(value, "__dict__") or isinstance(value, (list, tuple, dict, set)):
            continue
        if any(positive_int(read_attr(value, a)) for a in HEAD_ATTRS):
            found.append((key, value))
    return found


def head_sources(module: Any) -> list[tuple[str, Any]]:
    """Where a block's head counts live, as ``(attribute prefix, object)``: the block itself and, when
    it has no head attribute of its own (LitGPT's attention reads ``self.config.n_head``), each
    config object it holds (prefix ``"config."``). A block with its own (Hugging Face's ``head_dim``,
    GPT-2's ``num_heads``) is described by those alone."""
    own = any(positive_int(read_attr(module, a)) for a in (*HEAD_ATTRS, *HEAD_DIM_ATTRS))
    if own or not isinstance(module, nn.Module):
        return [("", module)]
    return [("", module)] + [(f"{key}.", obj) for key, obj in config_objects(module)]


_ROUTER_HINTS = ("gate", "rout", "wg")  # an expert layer's own scoring parameter: w_gate, router, gate_weight


def expert_routers(
    modules: dict[str, nn.Module], blocks: Mapping[str, set[int]], split: set[str] = frozenset()
) -> list[tuple[str, str, int, set[int], list[str]]]:
    """Mixture-of-experts layers: ``(owner, experts, number of experts, hidden widths, routers)`` for each
    ``nn.ModuleList`` / ``nn.ModuleDict`` of two or more blocks holding column layers (``blocks``:
    block name -> input widths of its column layers) beside a router scoring the experts' input
    (width ``hidden``) over the ``n`` experts:

    * a linear child with ``n`` outputs from ``hidden`` inputs (LitGPT's and Mixtral's ``gate``);
    * a child module (not an embedding) holding an ``(n, hidden)`` or ``(hidden, n)`` parameter (a
      top-k router module, DeepSeek's);
    * a parameter of that shape of the layer itself, named like a router (``w_gate``, ``router``).

    A container that holds only the experts (DeepSpeed's ``Experts``) is looked through: the router
    is then its parent's. Modules in ``split`` (split by the policy: an LM head) are not routers, and
    a container (``nn.ModuleList`` / ``nn.ModuleDict``, never called) routes nothing. Blocks called one
    after another have no router."""
    found = []
    for list_name in sorted({b.rpartition(".")[0] for b in blocks}):
        experts = modules.get(list_name)
        if not isinstance(experts, (nn.ModuleList, nn.ModuleDict)) or len(experts) < 2:
            continue
        n = len(experts)
        hidden = {h for b, widths in blocks.items() if b.rpartition(".")[0] == list_name for h in widths}
        owner_name, routers = routers_of(modules, list_name, n, hidden, split)
        if routers and not isinstance(modules[owner_name], (nn.ModuleList, nn.ModuleDict)):  # a container runs nothing
            found.append((owner_name, list_name, n, hidden, routers))
    return found


def routers_of(
    modules: dict[str, nn.Module], experts: str, n: int, hidden: set[int], split: set[str] = frozenset()
) -> tuple[str, list[str]]:
    """``(owner, routers)``: the routers (as in :func:`expert_routers`) beside the module ``experts``
    scoring its ``n`` experts from an input of a width in ``hidden``, and the module holding them; a
    parent holding only the experts is looked through."""
    shapes = {(n, h) for h in hidden} | {(h, n) for h in hidden}
    inner = experts
    while True:
        owner_name = inner.rpartition(".")[0]
        owner = modules[owner_name]
        routers = [
            r for r in _routers(owner, owner_name, inner.rpartition(".")[2], n, hidden, shapes) if r not in split
        ]
        if routers or not owner_name or len(list(owner.children())) > 1 or any(owner.parameters(recurse=False)):
            return owner_name, routers
        inner = owner_name  # a container of the experts alone: look at its parent


def _routers(owner: nn.Module, owner_name: str, skip: str, n: int, hidden: set[int], shapes: set) -> list[str]:
    """The router candidates of :func:`expert_routers` among ``owner``'s children (but ``skip``) and own parameters."""
    prefix = f"{owner_name}." if owner_name else ""
    found = []
    for child_name, child in owner.named_children():
        if child_name == skip or isinstance(child, nn.Embedding):
            continue
        lin = as_linear(child)
        if lin is not None and lin[1] == n and lin[0] in hidden:
            found.append(f"{prefix}{child_name}")
        elif lin is None and any(tuple(p.shape) in shapes for p in child.parameters()):
            found.append(f"{prefix}{child_name}")
    for name, param in owner.named_parameters(recurse=False):
        if tuple(param.shape) in shapes and any(h in name.lower() for h in _ROUTER_HINTS):
            found.append(f"{prefix}{name}")
    return found


def head_value(module: Any, names: tuple[str, ...]) -> int | None:
    """The first of ``names`` set to a positive int on one of :func:`head_sources` of ``module``."""
    for _, source in head_sources(module):
        for name in names:
            if positive_int(value := read_attr(source, name)):
                return value
    return None


class PolicyError(LightningTPError, ValueError):
    """A policy that cannot be applied to this model (bad pattern, style, option or tie)."""


class PolicyWarning(UserWarning):
    """A policy that applies but probably not as meant (unmatched modules, unused patterns)."""


@dataclass(frozen=True)
class Rule:
    """A style and its options, e.g. ``Rule("vocab", {"gather_output": False})``."""

    style: str
    options: Mapping[str, Any] = field(default_factory=dict)
    # inferred from a module's structure by the auto rules (an nn.Sequential MLP's pair): left whole where
    # its sizes do not split, with a warning
    inferred: bool = field(default=False, compare=False)

    @classmethod
    def parse(cls, pattern: str, value: str | Mapping[str, Any] | Rule) -> Rule:
        if isinstance(value, Rule):
            return value
        if isinstance(value, str):
            style, options = value, {}
        elif isinstance(value, Mapping) and "style" in value:
            options = dict(value)
            style = options.pop("style")
        else:
            raise PolicyError(
                f"policy entry {pattern!r}: expected a style name or a mapping with a 'style' key, got {value!r}."
            )
        if style not in STYLES:
            raise PolicyError(f"policy entry {pattern!r}: unknown style {style!r}; use one of {list(STYLES)}.")
        unknown = set(options) - STYLES[style].options
        if unknown:
            raise PolicyError(
                f"policy entry {pattern!r}: options {sorted(unknown)} do not apply to style {style!r} "
                f"(allowed: {sorted(STYLES[style].options) or 'none'})."
            )
        return cls(style, options)


# ------------------------------------------------------------------------------------------------
# Policy sources: dict, YAML, registered names, Hugging Face plans, auto rules.
# ------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, dict[str, Any]] = {}


def register_policy(name: str, policy: Mapping[str, Any]) -> None:
    """Register a named policy usable as ``policy="<name>"``."""
    if name in ("auto", "names"):
        raise PolicyError(f"{name!r} is reserved for the built-in rules.")
    for pattern, value in policy.items():
        Rule.parse(pattern, value)
    _REGISTRY[name] = dict(policy)


def registered_policies() -> list[str]:
    return sorted(_REGISTRY)


# Hugging Face tp_plan styles -> ours. ``None``: not expressible as a module rewrite.
_HF_STYLES: dict[str, Rule | None] = {
    "colwise": Rule("column"),
    "local_colwise": Rule("column"),
    "colwise_rep": Rule("column", {"gather_output": True}),
    "colwise_gather_output": Rule("column", {"gather_output": True}),
    "rowwise": Rule("row"),
    "local_rowwise": Rule("row"),
    "rowwise_rep": Rule("row", {"input_is_parallel": False}),
    "rowwise_split_input": Rule("row", {"input_is_parallel": False}),
    "packed_colwise": Rule("qkv", {"chunks": 2}),
    "packed_rowwise": Rule("row"),
    "embedding_rowwise": Rule("vocab"),
    "replicate": Rule("replicate"),
    # whole on every rank, but each rank's gradient covers only its heads: summed over TP before the step
    "replicated_with_grad_allreduce": Rule("replicate", {"partial_grad": True}),
    # multi-head latent attention's [c_kv | k_rope] projection: k_rope reaches this rank's heads only
    "mla_kv_a_proj": Rule("replicate", {"partial_output": "qk_rope_head_dim"}),
    "sequence_parallel": Rule("replicate"),
    "isolated": Rule("replicate"),
    "gather": Rule("replicate"),
}


def _own_hf_plan(module: nn.Module) -> dict[str, str] | None:
    plan = getattr(module, "_tp_plan", None) or None
    if not plan:
        base = getattr(getattr(module, "config", None), "base_model_tp_plan", None)
        if base and hasattr(module, "base_model_prefix"):
            prefix = module.base_model_prefix
            inner = prefix and isinstance(getattr(module, prefix, None), nn.Module)
            plan = {(f"{prefix}.{k}" if inner else k): v for k, v in base.items()}
    return dict(plan) if isinstance(plan, Mapping) and plan else None


def hf_plan(model: nn.Module) -> dict[str, str] | None:
    """The Hugging Face TP plan(s) of ``model`` or of the outermost HF models inside it (a
    LightningModule holding ``self.model = AutoModelForCausalLM...``), with module-name prefixes."""
    merged: dict[str, str] = {}
    covered: list[str] = []
    for name, module in model.named_modules():
        if any(name == c or name.startswith(c + ".") for c in covered):
            continue
        plan = _own_hf_plan(module)
        if plan:
            covered.append(name)
            merged.update({(f"{name}.{k}" if name else k): v for k, v in plan.items()})
    return merged or None


# Hugging Face styles of the parameters of a ``moe_tp_experts`` module -> the ``experts`` style's splits.
_HF_EXPERT_SPLITS = {
    "colwise": "column",
    "local_colwise": "column",
    "packed_colwise": "packed_column",
    "rowwise": "row",
    "local_rowwise": "row",
    "packed_rowwise": "packed_row",
}


def _local_params(
    model: nn.Module | None, owners: list[str], plan: Mapping[str, str]
) -> tuple[dict[str, dict[str, Rule]], set[str]]:
    """The modules of each ``local_params`` pattern (attention blocks holding bare parameters with no
    forward to hook: sinks, per-head gate biases), by pattern: module name -> a ``head_params`` rule
    that splits its own parameters as their plan entries shard them (``colwise``: ``Shard(ndim - 2)``,
    dim 0 of a vector; ``rowwise``: the last dim, a ``bias`` whole; ``replicate``: whole), and the full
    names of the parameters those entries named. Read on each module, so a layer without the parameter
    (sinks on sliding-window layers only) gets no rule."""
    out: dict[str, dict[str, Rule]] = {o: {} for o in owners}
    named: set[str] = set()
    if owners and model is None:
        raise PolicyError(
            f"Hugging Face tp_plan entries {owners}: style 'local_params' is read on the model (which of the "
            "module's own parameters the plan shards): pass the model, translate_hf_plan(plan, model)."
        )
    for name, module in model.named_modules() if owners else ():
        owner = next((o for o in owners if fnmatch.fnmatchcase(name, o)), None)
        if owner is None:
            continue
        split = {}
        for leaf, param in module.named_parameters(recurse=False):
            hf_style, ndim = plan.get(f"{owner}.{leaf}"), param.dim()
            if hf_style is not None:
                named.add(f"{name}.{leaf}" if name else leaf)
            if hf_style in ("colwise", "local_colwise"):
                split[leaf] = max(ndim - 2, 0)
            elif hf_style in ("rowwise", "local_rowwise") and leaf != "bias":
                split[leaf] = ndim - 1
            elif hf_style not in (None, "rowwise", "local_rowwise", "replicate"):
                # (replicated_with_grad_allreduce too: its gradient, partial, would not be summed over TP)
                raise PolicyError(
                    f"Hugging Face tp_plan entry {owner + '.' + leaf!r}: style {hf_style!r} on a parameter of the "
                    f"'local_params' module {name!r} has no equivalent in lightning_tp (its own parameters take "
                    f"colwise, rowwise or replicate). Pass an explicit policy dict that maps {owner!r} to "
                    "'head_params' with params={<name>: <dim of its heads>}, with the rest of the plan as "
                    "column/row/vocab entries."
                )
        if split:  # else its parameters stay whole (and per-head ones are found as for any attention block)
            out[owner][name] = Rule("head_params", {"params": split})
    return out, named


def translate_hf_plan(plan: Mapping[str, str], model: nn.Module | None = None) -> dict[str, Rule]:
    """Translate a Hugging Face ``tp_plan`` into our rules (an LM head's gathered column -> vocab; a
    ``moe_tp_experts`` module and the entries of its parameters -> one ``experts`` rule; a ``local_params``
    module and the entries of its own parameters, read on ``model``, -> a ``head_params`` rule per module
    that splits them as the plan shards them: attention sinks with the heads)."""
    experts = {p: {} for p, style in plan.items() if style == "moe_tp_experts"}
    local, params = _local_params(model, [p for p, style in plan.items() if style == "local_params"], plan)
    modules = [n for n, _ in model.named_modules()] if params else []
    rules: dict[str, Rule] = {}
    for pattern, hf_style in plan.items():
        owner, _, leaf = pattern.rpartition(".")
        if (
            owner in local
            and any(fnmatch.fnmatchcase(n, pattern) for n in params)
            and not any(fnmatch.fnmatchcase(n, pattern) for n in modules)
        ):
            continue  # a parameter of a local_params module: in its module's rule (a module so named keeps it)
        if hf_style == "local_params":
            rules.update(local[pattern])  # by module name, in the pattern's place
            continue
        if owner in experts:
            if hf_style not in _HF_EXPERT_SPLITS:
                raise PolicyError(
                    f"Hugging Face tp_plan entry {pattern!r}: style {hf_style!r} inside the experts {owner!r} has no "
                    f"equivalent in lightning_tp (the experts' parameters take {sorted(_HF_EXPERT_SPLITS)}; a part "
                    "without parameters, such as identity experts, would be summed once per rank). Pass an explicit "
                    f"policy dict that maps {owner!r} (and its router) to 'replicate', with the rest of the plan as "
                    "column/row/vocab entries."
                )
            experts[owner][leaf] = _HF_EXPERT_SPLITS[hf_style]
            continue
        if hf_style == "moe_tp_experts":
            rules[pattern] = None  # its rule, made below once its parameters' entries are read, keeps this place
            continue
        if hf_style not in _HF_STYLES or _HF_STYLES[hf_style] is None:
            raise PolicyError(
                f"Hugging Face tp_plan entry {pattern!r}: style {hf_style!r} has no module-rewrite equivalent "
                f"in lightning_tp. Pass an explicit policy dict that maps {pattern!r} to one of {list(STYLES)} "
                "('replicate' keeps it whole on every rank), with the rest of the plan as column/row/vocab entries."
            )
        rules[pattern] = _HF_STYLES[hf_style]
    for owner, params in experts.items():
        rules[owner] = Rule("experts", {"params": params})
    return rules


_AUTO_QKV = {"c_attn", "qkv", "wqkv", "qkv_proj", "to_qkv", "query_key_value"}
_AUTO_PACKED = {"gate_up_proj"}
_AUTO_Q_K_V = {
    "q_proj", "k_proj", "v_proj", "q", "k", "v", "query", "key", "value", "wq", "wk", "wv", "to_q", "to_k", "to_v",
}  # fmt: skip
# the attention's input projections by name (lowercased leaf names): fused q/k/v, q, k, v alone, and names
# the column rules do not split by themselves
ATTENTION_INPUT_NAMES = frozenset(_AUTO_QKV | _AUTO_Q_K_V) | {
    "query_proj", "key_proj", "value_proj", "q_lin", "k_lin", "v_lin", "w_pack", "kv_proj",
    "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",  # multi-head latent attention
}  # fmt: skip
_AUTO_COLUMN = _AUTO_Q_K_V | {
    "fc", "c_fc", "fc1", "fc_in", "up_proj", "gate_proj", "w1", "w3",
    "dense_h_to_4h", "fc_1", "fc_2",  # LitGPT's LLaMAMLP: fc_1 (gate) and fc_2 (up) feed proj
}  # fmt: skip
_AUTO_ROW = {
    "o_proj", "out_proj", "c_proj", "wo", "o", "proj", "down_proj", "w2", "fc2", "fc_out", "dense_4h_to_h",
    "dense",  # a row only beside column projections in the same module (Falcon's, BLOOM's, ALBERT's attention)
}  # fmt: skip
_TOKEN_EMBEDDING_HINTS = ("wte", "tok", "token", "word", "embed_tokens", "embedding")


def infer_vocab_size(model: nn.Module) -> int | None:
    """The vocabulary size: ``config.padded_vocab_size`` (LitGPT, Megatron: the rows the embedding and
    the head have) or ``config.vocab_size`` of the outermost module that has one (the model, or a
    Hugging Face model inside a LightningModule), else the token embedding's rows."""
    for _, module in model.named_modules():
        config = getattr(module, "config", None)
        for attr in ("padded_vocab_size", "vocab_size"):
            vocab = read_attr(config, attr)
            if isinstance(vocab, int) and not isinstance(vocab, bool):
                return vocab
    embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        return None
    hinted = [m for n, m in embeddings if any(h in n.rsplit(".", 1)[-1].lower() for h in _TOKEN_EMBEDDING_HINTS)]
    return max(m.num_embeddings for m in (hinted or [m for _, m in embeddings]))


def hf_experts_rule(module: nn.Module) -> Rule | None:
    """The ``experts`` rule of a Hugging Face experts module (``@use_experts_implementation``), read
    from the layout it declares on itself (the flags Hugging Face's own batched and grouped kernels
    read): ``is_transposed`` (``(E, in, out)`` weights instead of ``(E, out, in)``), ``has_gate``
    (``gate_up_proj`` holds gate and up: ``is_concatenated`` back to back, else interleaved element by
    element, GPT-OSS), ``has_bias`` (a bias after the down projection acts ``once``). ``None`` for any
    other module, for experts with a norm after each expert (not a sum over hidden units) or already
    expert-parallel, and for one whose parameters are not exactly the declared ones."""
    flags = {a: read_attr(module, a) for a in ("is_transposed", "is_concatenated", "has_gate", "has_bias")}
    if not all(isinstance(v, bool) for v in flags.values()):
        return None
    if read_attr(module, "has_post_expert_norm") is True or read_attr(module, "_is_expert_parallel") is True:
        return None
    out_dim, in_dim = (-1, -2) if flags["is_transposed"] else (-2, -1)
    up = "gate_up_proj" if flags["has_gate"] else "up_proj"
    if not flags["has_gate"]:
        up_split, bias_split = out_dim, -1
    elif flags["is_concatenated"]:
        up_split, bias_split = {"dim": out_dim, "chunks": 2}, {"dim": -1, "chunks": 2}
    else:
        up_split, bias_split = {"dim": out_dim, "interleave": 2}, {"dim": -1, "interleave": 2}
    params: dict[str, Any] = {up: up_split, "down_proj": in_dim}
    if flags["has_bias"]:
        params.update({f"{up}_bias": bias_split, "down_proj_bias": "once"})
    own = {n for n, _ in module.named_parameters(recurse=False)}
    if own != set(params) or any(True for c in module.children() for _ in c.parameters()):
        return None
    return Rule("experts", {"params": params})


_TORCH_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
# modules that act on each feature alone: between a column and a row layer they run on this rank's features
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Dropout, nn.Identity,
)  # fmt: skip


def _sequential_pairs(model: nn.Module, vocab: int | None, taken: set[str]) -> dict[str, Rule]:
    """Column/row pairs in ``nn.Sequential`` MLPs (``Sequential(Linear(d, 4d), GELU(), Dropout(), Linear(4d,
    d))``, torchvision's ViT ``MLPBlock``): two linear layers with only elementwise modules (exact types, so a
    subclass doing more is not taken) between them, the second taking the first's width. A pair whose
    second layer gives the vocabulary (an LM head) is left to the vocabulary rule, one with a layer in
    ``taken`` (ruled by name) to that rule."""
    rules: dict[str, Rule] = {}
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        first: tuple[str, int] | None = None  # the open column candidate: (name, out_features)
        for child_name, child in seq.named_children():
            full = f"{name}.{child_name}" if name else child_name
            lin = as_linear(child)
            if lin is not None:
                if first is not None and lin[0] == first[1] and lin[1] != vocab and not {first[0], full} & taken:
                    rules[first[0]], rules[full] = Rule("column", inferred=True), Rule("row", inferred=True)
                    first = None
                else:
                    first = (full, lin[1])
            elif type(child) not in _ELEMENTWISE:
                first = None
    return rules


def auto_rules(model: nn.Module) -> dict[str, Rule]:
    """Built-in rules for common transformer naming, resolved to one rule per module name.

    Column/qkv projections are split only when a row projection shares their parent (the pair that
    makes a TP region); token embeddings and LM heads (by vocabulary size) are vocab-parallel; other
    embeddings are replicated; Hugging Face experts modules are split as their declared layout says
    (:func:`hf_experts_rule`). torch's own modules by type: every ``nn.MultiheadAttention`` by heads
    (``mha``, its ``out_proj`` a row layer), ``nn.TransformerEncoderLayer``/``DecoderLayer``'s
    ``linear1``/``linear2`` as a column/row pair, and ``nn.Sequential`` MLPs (:func:`_sequential_pairs`).
    """
    vocab = infer_vocab_size(model)
    linears = {n: m for n, m in model.named_modules() if as_linear(m) is not None}
    by_parent: dict[str, dict[str, str]] = {}
    for name in linears:
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault(parent, {})[name] = leaf.lower()
    rules: dict[str, Rule] = {}
    for leaves in by_parent.values():
        has_row = any(leaf in _AUTO_ROW for leaf in leaves.values())
        has_col = any(leaf in _AUTO_COLUMN | _AUTO_QKV | _AUTO_PACKED for leaf in leaves.values())
        if not (has_row and has_col):
            continue
        for name, leaf in leaves.items():
            if leaf in _AUTO_QKV:
                rules[name] = Rule("qkv")
            elif leaf in _AUTO_PACKED:
                rules[name] = Rule("qkv", {"chunks": 2})
            elif leaf in _AUTO_COLUMN:
                rules[name] = Rule("column")
            elif leaf in _AUTO_ROW:
                rules[name] = Rule("row")
    rules.update(_sequential_pairs(model, vocab, taken=set(rules)))  # (the name rules' pairs stand)
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):  # torch's attention: split by heads, out_proj a row layer
            rules[name], rules[f"{name}.out_proj"] = Rule("mha"), Rule("row")
        elif isinstance(module, _TORCH_LAYERS):  # torch's transformer layers hold their MLP's linears themselves
            if as_linear(getattr(module, "linear1", None)) and as_linear(getattr(module, "linear2", None)):
                rules[f"{name}.linear1"], rules[f"{name}.linear2"] = Rule("column"), Rule("row")
        if (experts := hf_experts_rule(module)) is not None:
            rules[name] = experts
        elif isinstance(module, nn.Embedding):
            rules[name] = Rule("vocab" if module.num_embeddings == vocab else "replicate")
        elif name not in rules and vocab is not None and (lin := as_linear(module)) is not None:
            if lin[1] == vocab:
                rules[name] = Rule("vocab")
    blocks: dict[str, set[int]] = {}
    for name, rule in rules.items():
        if rule.style in ("column", "qkv"):
            blocks.setdefault(name.rpartition(".")[0], set()).add(as_linear(linears[name])[0])
    split = {name for name, rule in rules.items() if rule.style != "replicate"}
    for *_, routers in expert_routers(dict(model.named_modules()), blocks, split):
        for router in routers:  # a mixture of experts: each expert split like an MLP, the router whole
            if router in linears:
                rules.setdefault(router, Rule("replicate"))
    return rules


NAMES_SOURCE = "auto, name rules (policy='names')"


def resolve_rules(model: nn.Module, policy: str | Mapping[str, Any] | None) -> tuple[str, dict[str, Rule]]:
    """Turn any accepted policy form into ``(source, {pattern: Rule})``."""
    if policy is None or policy == "auto":
        plan = hf_plan(model)
        if plan:
            return "huggingface tp_plan", translate_hf_plan(plan, model)
        return "auto", auto_rules(model)
    if policy == "names":  # the name rules, also for a model that has a Hugging Face plan
        return NAMES_SOURCE, auto_rules(model)
    if isinstance(policy, str):
        if policy in _REGISTRY:
            return f"registered '{policy}'", {p: Rule.parse(p, v) for p, v in _REGISTRY[policy].items()}
        policy = _load_yaml(policy)
    if not isinstance(policy, Mapping):
        raise PolicyError(
            f"policy must be 'auto', 'names', a registered name {registered_policies()}, a YAML mapping or a dict; "
            f"got {policy!r}."
        )
    return "dict", {str(p): Rule.parse(str(p), v) for p, v in policy.items()}


def _load_yaml(text: str) -> Any:
    import yaml

    path = Path(text)
    if text.endswith((".yaml", ".yml")) or (len(text) < 4096 and "\n" not in text and path.is_file()):
        if not path.is_file():
            raise PolicyError(f"policy file {text!r} does not exist.")
        text = path.read_text()
    elif ":" not in text:
        raise PolicyError(
            f"policy {text!r} is neither 'auto', 'names', a registered name {registered_policies()}, a YAML file nor a "
            "YAML mapping."
        )
    return yaml.safe_load(text)
