"""The module-rewriting policy: which ``nn.Linear`` / ``nn.Embedding`` becomes which parallel layer.

A policy maps fnmatch patterns on fully qualified module names to a style (first matching pattern
wins)::

    {"blocks.*.attn.qkv": "qkv", "blocks.*.attn.proj": "row",
     "blocks.*.mlp.fc1": "column", "blocks.*.mlp.fc2": "row",
     "tok_emb": "vocab", "head": {"style": "vocab", "gather_output": False}}

Styles: ``column`` (split output features, output stays sharded), ``row`` (split input features,
output all-reduced, bias once), ``qkv`` (fused projection, each chunk split so ranks hold whole
heads), ``vocab`` (embedding rows / LM-head outputs split by vocabulary, padded), ``replicate``.

:func:`plan_policy` resolves and validates a policy against a model without any process group (a
dry run; :class:`Plan` prints as a table). :func:`apply_plan` then rewrites the model in place.
Every check raises before the first module is touched.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn
from torch.distributed import ProcessGroup

from lightning_tp.errors import LightningTPError, ShardingError
from lightning_tp.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    _check_heads,
    _chunk_sizes,
)
from lightning_tp.sharding import ShardSpec

Style = Literal["column", "row", "qkv", "vocab", "replicate"]
STYLES: tuple[str, ...] = ("column", "row", "qkv", "vocab", "replicate")
_OPTIONS: dict[str, set[str]] = {
    "column": {"gather_output"},
    "row": {"input_is_parallel"},
    "qkv": {"chunks", "head_dim", "gather_output"},
    "vocab": {"gather_output"},
    "replicate": set(),
}
HEAD_ATTRS = ("n_head", "n_heads", "num_heads", "num_attention_heads", "num_key_value_heads", "n_kv_heads")
KV_HEAD_ATTRS = ("num_key_value_heads", "n_kv_heads")
# Width attributes: divided only when equal to the size of a split chunk of a child projection,
# i.e. when the attribute describes the sharded activation (GPT-2's ``split_size``).
WIDTH_ATTRS = ("split_size", "n_embd", "embed_dim", "all_head_size", "inner_dim", "hidden_size", "d_model")


class PolicyError(LightningTPError, ValueError):
    """A policy that cannot be applied to this model (bad pattern, style, option or tie)."""


class PolicyWarning(UserWarning):
    """A policy that applies but probably not as meant (unmatched modules, unused patterns)."""


@dataclass(frozen=True)
class Rule:
    """A style and its options, e.g. ``Rule("vocab", {"gather_output": False})``."""

    style: str
    options: Mapping[str, Any] = field(default_factory=dict)

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
        unknown = set(options) - _OPTIONS[style]
        if unknown:
            raise PolicyError(
                f"policy entry {pattern!r}: options {sorted(unknown)} do not apply to style {style!r} "
                f"(allowed: {sorted(_OPTIONS[style]) or 'none'})."
            )
        return cls(style, options)


# ------------------------------------------------------------------------------------------------
# Policy sources: dict, YAML, registered names, Hugging Face plans, auto rules.
# ------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, dict[str, Any]] = {}


def register_policy(name: str, policy: Mapping[str, Any]) -> None:
    """Register a named policy usable as ``policy="<name>"``."""
    if name == "auto":
        raise PolicyError("'auto' is reserved for the built-in rules.")
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
    "replicated_with_grad_allreduce": Rule("replicate"),
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


def translate_hf_plan(plan: Mapping[str, str]) -> dict[str, Rule]:
    """Translate a Hugging Face ``tp_plan`` into our rules (an LM head's gathered column -> vocab)."""
    rules: dict[str, Rule] = {}
    for pattern, hf_style in plan.items():
        if hf_style not in _HF_STYLES or _HF_STYLES[hf_style] is None:
            raise PolicyError(
                f"Hugging Face tp_plan entry {pattern!r}: style {hf_style!r} has no module-rewrite equivalent "
                "in lightning_tp (expert/packed-expert styles need expert parallelism). Pass an explicit policy "
                f"dict mapping {pattern!r} to one of {list(STYLES)}."
            )
        rules[pattern] = _HF_STYLES[hf_style]
    return rules


_AUTO_QKV = {"c_attn", "qkv", "wqkv", "qkv_proj", "to_qkv"}
_AUTO_PACKED = {"gate_up_proj"}
_AUTO_COLUMN = {
    "q_proj", "k_proj", "v_proj", "q", "k", "v", "query", "key", "value", "wq", "wk", "wv",
    "to_q", "to_k", "to_v", "fc", "c_fc", "fc1", "fc_in", "up_proj", "gate_proj", "w1", "w3",
    "dense_h_to_4h",
}  # fmt: skip
_AUTO_ROW = {"o_proj", "out_proj", "c_proj", "wo", "o", "proj", "down_proj", "w2", "fc2", "fc_out", "dense_4h_to_h"}
_TOKEN_EMBEDDING_HINTS = ("wte", "tok", "token", "word", "embed_tokens", "embedding")


def infer_vocab_size(model: nn.Module) -> int | None:
    """The vocabulary size: ``config.vocab_size``, else the token embedding's rows."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int):
        return vocab
    embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        return None
    hinted = [m for n, m in embeddings if any(h in n.rsplit(".", 1)[-1].lower() for h in _TOKEN_EMBEDDING_HINTS)]
    return max(m.num_embeddings for m in (hinted or [m for _, m in embeddings]))


def auto_rules(model: nn.Module) -> dict[str, Rule]:
    """Built-in rules for common transformer naming, resolved to one rule per module name.

    Column/qkv projections are split only when a row projection shares their parent (the pair that
    makes a TP region); token embeddings and LM heads (by vocabulary size) are vocab-parallel; other
    embeddings are replicated.
    """
    vocab = infer_vocab_size(model)
    linears = {n: m for n, m in model.named_modules() if _as_linear(m) is not None}
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
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            rules[name] = Rule("vocab" if module.num_embeddings == vocab else "replicate")
        elif name not in rules and vocab is not None and (lin := _as_linear(module)) is not None:
            if lin[1] == vocab:
                rules[name] = Rule("vocab")
    return rules


def resolve_rules(model: nn.Module, policy: str | Mapping[str, Any] | None) -> tuple[str, dict[str, Rule]]:
    """Turn any accepted policy form into ``(source, {pattern: Rule})``."""
    if policy is None or policy == "auto":
        plan = hf_plan(model)
        if plan:
            return "huggingface tp_plan", translate_hf_plan(plan)
        return "auto", auto_rules(model)
    if isinstance(policy, str):
        if policy in _REGISTRY:
            return f"registered '{policy}'", {p: Rule.parse(p, v) for p, v in _REGISTRY[policy].items()}
        policy = _load_yaml(policy)
    if not isinstance(policy, Mapping):
        raise PolicyError(
            f"policy must be 'auto', a registered name {registered_policies()}, a YAML mapping or a dict; got {policy!r}."
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
            f"policy {text!r} is neither 'auto', a registered name {registered_policies()}, a YAML file nor a "
            "YAML mapping."
        )
    return yaml.safe_load(text)


# ------------------------------------------------------------------------------------------------
# Planning (no process group) and applying.
# ------------------------------------------------------------------------------------------------


def _as_linear(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (weight
    ``(in, out)``), else ``None``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return module.weight.shape[0], module.weight.shape[1]
    return None


def dense_linear(module: nn.Module) -> nn.Linear:
    """``module`` as an ``nn.Linear`` sharing its parameters (a ``Conv1D`` is transposed)."""
    if isinstance(module, nn.Linear):
        return module
    nx, nf = _as_linear(module)
    lin = nn.Linear(nx, nf, bias=module.bias is not None, device="meta")
    lin.weight = nn.Parameter(module.weight.detach().t(), requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        lin.bias = module.bias
    return lin


@dataclass
class PlannedModule:
    """One module's entry in a plan."""

    name: str
    module_type: str
    style: str
    options: dict[str, Any]
    pattern: str | None
    full_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    full_params: int
    local_params: int
    spec: ShardSpec | None = None
    tied_to: str | None = None


@dataclass
class Plan:
    """A validated policy for one model and TP size: what :func:`apply_plan` will do."""

    tp_size: int
    source: str
    modules: list[PlannedModule]
    unmatched: list[str]
    unused_patterns: list[str]
    attribute_changes: list[tuple[str, str, int, int]]
    full_params: int
    local_params: int

    def rows(self) -> list[PlannedModule]:
        return self.modules

    def __str__(self) -> str:
        from lightning_tp.report import render_plan

        return render_plan(self)

    def __rich__(self):
        from lightning_tp.report import plan_table

        return plan_table(self)


def _weight_key(spec: ShardSpec | None) -> tuple | None:
    return None if spec is None else (spec.dim % 2, spec.sizes, spec.padded_sizes)


def _planned(name: str, module: nn.Module, rule: Rule, pattern: str | None, tp: int) -> PlannedModule:
    style, opts = rule.style, dict(rule.options)
    is_linear = _as_linear(module) is not None
    is_embedding = isinstance(module, nn.Embedding)
    fits = {
        "column": is_linear,
        "row": is_linear,
        "qkv": is_linear,
        "vocab": is_linear or is_embedding,
        "replicate": True,
    }[style]
    if not fits:
        need = "nn.Linear or nn.Embedding" if style == "vocab" else "nn.Linear"
        raise TypeError(
            f"policy style {style!r} (pattern {pattern!r}) does not fit module {name!r} of type "
            f"{type(module).__name__}: {style!r} needs an {need}. Narrow the pattern or use 'replicate'."
        )
    full_params = sum(p.numel() for p in module.parameters(recurse=False))
    shape = tuple(module.weight.shape) if getattr(module, "weight", None) is not None else ()
    if is_linear:
        shape = (_as_linear(module)[1], _as_linear(module)[0])  # (out, in) as nn.Linear
    spec = None
    if style in ("column", "qkv") or (style == "vocab" and is_linear):
        out, inp = shape
        chunks = opts.get("chunks", 3 if style == "qkv" else 1)
        sizes = _chunk_sizes(out, chunks, name)
        if style == "qkv" and opts.get("head_dim"):
            _check_heads(sizes, opts["head_dim"], tp, name)
        label = f"out_features of {name!r}"
        spec = ShardSpec(dim=0, sizes=sizes, tp_size=tp, pad=style == "vocab", name=label)
        if style == "qkv":
            opts["chunks"] = sizes
    elif style == "row":
        spec = ShardSpec(dim=1, sizes=(shape[1],), tp_size=tp, name=f"in_features of {name!r}")
    elif style == "vocab":
        spec = ShardSpec(dim=0, sizes=(shape[0],), tp_size=tp, pad=True, name=f"num_embeddings of {name!r}")
    local = shape if spec is None else tuple(spec.local_size if d == spec.dim else s for d, s in enumerate(shape))
    local_params = full_params
    if spec is not None:
        local_w = 1
        for s in local:
            local_w *= s
        bias = getattr(module, "bias", None)
        bias_local = 0 if bias is None else (bias.numel() if style == "row" else spec.local_size)
        local_params = local_w + bias_local
    return PlannedModule(
        name, type(module).__name__, style, opts, pattern, shape, local, full_params, local_params, spec
    )


def plan_policy(
    model: nn.Module, tp_size: int, policy: str | Mapping[str, Any] | None = "auto", strict: bool = False
) -> Plan:
    """Resolve and validate ``policy`` for ``model`` at ``tp_size``, without touching the model.

    Raises:
        PolicyError: bad policy entries, a tie the policy would break, unmatched modules (``strict``).
        TypeError: a style on a module it does not fit.
        ShardingError: sizes or head counts not divisible by ``tp_size``.
    """
    source, rules = resolve_rules(model, policy)
    modules = dict(model.named_modules())
    used: set[str] = set()
    planned: dict[str, PlannedModule] = {}
    unmatched: list[str] = []
    for name, module in modules.items():
        if not name:
            continue
        pattern = next((p for p in rules if fnmatch.fnmatchcase(name, p)), None)
        candidate = _as_linear(module) is not None or isinstance(module, nn.Embedding)
        if pattern is None:
            if candidate:
                unmatched.append(name)
            continue
        used.add(pattern)
        rule = rules[pattern]
        if not candidate and rule.style == "replicate":
            continue
        if not candidate and _is_container_match(name, pattern, modules):
            continue  # a broad pattern that also covers the parents of the modules it targets
        if source.startswith("huggingface") and rule.style == "column" and rule.options.get("gather_output"):
            lin = _as_linear(module)
            if lin is not None and lin[1] == infer_vocab_size(model):
                rule = Rule("vocab")  # an LM head: vocab-parallel (pads the vocabulary, ties with the embedding)
        if rule.style == "qkv" and "chunks" not in rule.options:
            rule = Rule("qkv", {**rule.options, "chunks": _gqa_chunks(modules, name, module) or 3})
        planned[name] = _planned(name, module, rule, None if source == "auto" else pattern, tp_size)

    _check_ties(model, planned)
    changes = _attribute_changes(modules, planned, tp_size)
    unused = [p for p in rules if p not in used]
    if unmatched and strict:
        raise PolicyError(
            f"strict policy: {len(unmatched)} nn.Linear/nn.Embedding modules match no pattern: {unmatched}. "
            "Add patterns for them (style 'replicate' keeps a module whole)."
        )
    local_numel: dict[int, int] = {}
    for entry in planned.values():
        module = modules[entry.name]
        if entry.spec is None:
            continue
        local_numel[id(module.weight)] = math.prod(entry.local_shape)
        if getattr(module, "bias", None) is not None and entry.style != "row":
            local_numel[id(module.bias)] = entry.spec.local_size
    params = list(model.parameters())  # each shared parameter once
    full = sum(p.numel() for p in params)
    local = sum(local_numel.get(id(p), p.numel()) for p in params)
    ordered = [planned[n] for n in modules if n in planned]
    return Plan(tp_size, source, ordered, unmatched, unused, changes, full, local)


def _is_container_match(name: str, pattern: str, modules: dict[str, nn.Module]) -> bool:
    prefix = name + "."
    return any(n.startswith(prefix) and fnmatch.fnmatchcase(n, pattern) for n in modules)


def _gqa_chunks(modules: dict[str, nn.Module], name: str, module: nn.Module) -> tuple[int, ...] | None:
    lin = _as_linear(module)
    parent = modules.get(name.rpartition(".")[0])
    if lin is None or parent is None:
        return None
    heads = next((getattr(parent, a) for a in HEAD_ATTRS[:4] if isinstance(getattr(parent, a, None), int)), None)
    kv = next((getattr(parent, a) for a in KV_HEAD_ATTRS if isinstance(getattr(parent, a, None), int)), None)
    head_dim = getattr(parent, "head_dim", None)
    if heads and kv and isinstance(head_dim, int) and (heads + 2 * kv) * head_dim == lin[1] and kv != heads:
        return (heads * head_dim, kv * head_dim, kv * head_dim)
    return None


def _check_ties(model: nn.Module, planned: dict[str, PlannedModule]) -> None:
    owners: dict[int, list[tuple[str, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append((mod_name, p_name))
    for group in owners.values():
        if len({m for m, _ in group}) < 2:
            continue
        layouts = {}
        for mod_name, p_name in group:
            entry = planned.get(mod_name)
            if entry is not None and p_name == "bias" and entry.style == "row":
                layouts[mod_name] = None
            else:
                layouts[mod_name] = _weight_key(entry.spec) if entry is not None else None
        if len(set(layouts.values())) > 1:
            desc = ", ".join(f"{m!r} ({planned[m].style if m in planned else 'unmatched/replicate'})" for m in layouts)
            raise PolicyError(
                f"the policy would break a tied parameter shared by {desc}: each side would be split differently. "
                "Give all modules that share a weight the same style (e.g. 'vocab' for both a tied embedding and "
                "LM head), or 'replicate' for all of them."
            )
        first = group[0][0]
        for mod_name, _ in group[1:]:
            if mod_name in planned and planned[mod_name].tied_to is None and mod_name != first:
                planned[mod_name].tied_to = first


def _attribute_changes(
    modules: dict[str, nn.Module], planned: dict[str, PlannedModule], tp: int
) -> list[tuple[str, str, int, int]]:
    changes: list[tuple[str, str, int, int]] = []
    if tp == 1:
        return changes
    split_children: dict[str, list[PlannedModule]] = {}
    for entry in planned.values():
        if entry.style in ("column", "qkv"):
            split_children.setdefault(entry.name.rpartition(".")[0], []).append(entry)
    for parent_name, children in split_children.items():
        parent = modules[parent_name]
        label = parent_name or type(parent).__name__
        for attr in HEAD_ATTRS:
            value = getattr(parent, attr, None)
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            if value % tp != 0:
                kind = "key/value heads" if attr in KV_HEAD_ATTRS else "heads"
                hint = (
                    " Grouped-query attention needs num_key_value_heads divisible by the TP size "
                    "(key/value heads are not replicated across ranks)."
                    if attr in KV_HEAD_ATTRS
                    else ""
                )
                raise ShardingError(
                    f"module {label!r}: {attr}={value} {kind} cannot be split over tensor_parallel_size={tp}: "
                    f"{value} is not divisible by {tp}.{hint} Use a tensor_parallel_size that divides {value}, "
                    "or map this block's projections to 'replicate'."
                )
            changes.append((parent_name, attr, value, value // tp))
        head_dim = getattr(parent, "head_dim", None)
        if isinstance(head_dim, int) and not isinstance(head_dim, bool) and head_dim > 0:
            for child in children:
                if child.style in ("column", "qkv"):
                    _check_heads(child.spec.sizes, head_dim, tp, child.name)
        chunk_sizes = {s for c in children for s in c.spec.sizes}
        for attr in WIDTH_ATTRS:
            value = getattr(parent, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value in chunk_sizes:
                changes.append((parent_name, attr, value, value // tp))
    return changes


def apply_plan(model: nn.Module, plan: Plan, group: ProcessGroup) -> nn.Module:
    """Rewrite ``model`` in place as ``plan`` says, with layers on ``group``. Returns ``model``."""
    from lightning_tp.comm import group_size

    if group_size(group) != plan.tp_size:
        raise PolicyError(
            f"plan was made for tensor_parallel_size={plan.tp_size}, group has {group_size(group)} ranks."
        )
    shared: dict[int, nn.Parameter] = {}
    for entry in plan.modules:
        if entry.style == "replicate":
            continue
        parent_name, _, leaf = entry.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        dense = getattr(parent, leaf)
        original_weight = dense.weight
        new = _build(entry, dense, group)
        if id(original_weight) in shared:
            new.weight = shared[id(original_weight)]
        else:
            shared[id(original_weight)] = new.weight
        setattr(parent, leaf, new)
    for parent_name, attr, _, new_value in plan.attribute_changes:
        setattr(model.get_submodule(parent_name), attr, new_value)
    return model


def _build(entry: PlannedModule, dense: nn.Module, group: ProcessGroup) -> nn.Module:
    opts, name = entry.options, entry.name
    if entry.style == "vocab":
        if isinstance(dense, nn.Embedding):
            return VocabParallelEmbedding.from_dense(dense, group, name=name)
        return VocabParallelLMHead.from_dense(
            dense_linear(dense), group, gather_output=opts.get("gather_output", True), name=name
        )
    if entry.style == "row":
        return RowParallelLinear.from_dense(
            dense_linear(dense), group, input_is_parallel=opts.get("input_is_parallel", True), name=name
        )
    return ColumnParallelLinear.from_dense(
        dense_linear(dense),
        group,
        gather_output=opts.get("gather_output", False),
        chunks=opts.get("chunks", 1),
        head_dim=opts.get("head_dim"),
        name=name,
    )


def warn_plan(plan: Plan) -> None:
    """Warn about unmatched modules and patterns that match nothing."""
    if plan.unmatched:
        warnings.warn(
            f"{len(plan.unmatched)} nn.Linear/nn.Embedding modules are not matched by the policy ({plan.source}) and "
            f"stay replicated: {plan.unmatched}. Map them explicitly (style 'replicate' silences this), or pass "
            "strict=True to make this an error.",
            PolicyWarning,
            stacklevel=3,
        )
    if plan.unused_patterns:
        warnings.warn(
            f"policy patterns match no module: {plan.unused_patterns}. Patterns are fnmatch patterns on fully "
            "qualified module names (see `lightning-tp plan`).",
            PolicyWarning,
            stacklevel=3,
        )


def apply_policy(
    model: nn.Module,
    group: ProcessGroup | Any,
    policy: str | Mapping[str, Any] | None = "auto",
    *,
    strict: bool = False,
    verify: bool = True,
    example_input: Any = None,
) -> Plan:
    """Plan, validate, rewrite ``model`` in place and (``verify``) check it against itself unsharded.

    Args:
        model: the user's model (plain ``nn.Linear`` / ``nn.Embedding`` layers).
        group: the tensor-parallel process group, or a :class:`~lightning_tp.mesh.TPMesh`.
        policy: ``"auto"``, a registered name, a dict, or a YAML mapping / file.
        strict: unmatched ``nn.Linear`` / ``nn.Embedding`` modules are an error instead of a warning.
        verify: run the parity self-check (one forward before and after on a fixed random batch).
        example_input: the batch for ``verify`` (default: random token ids, or floats for models
            without embeddings); a tensor, a tuple of positional args or a dict of keyword args.

    Returns:
        The applied :class:`Plan` (prints as a table).

    Raises:
        PolicyError, TypeError, ShardingError: before any module is touched.
        PolicyMismatchError: the rewritten model does not compute what the unsharded one did.
    """
    from lightning_tp.comm import group_size
    from lightning_tp.verify import capture, check_parity, make_example_input

    group = getattr(group, "tp_group", group)
    plan = plan_policy(model, group_size(group), policy, strict=strict)
    warn_plan(plan)
    if verify:
        inputs = example_input if example_input is not None else make_example_input(model)
        reference = capture(model, inputs)
    apply_plan(model, plan, group)
    if verify:
        check_parity(model, inputs, reference, plan, group)
    return plan
