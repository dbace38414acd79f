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

import dataclasses
import fnmatch
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lightning_tp._compat import tensor_version
from lightning_tp.errors import ShardingError
from lightning_tp.layers import (
    ColumnParallelLinear,
    HeadParallelEmbedding,
    RowParallelLinear,
    SequenceShardedEmbedding,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    _check_heads,
    _chunk_sizes,
)
from lightning_tp.rules import (  # noqa: F401  (re-exported: the policy API)
    HEAD_ATTRS,
    KV_HEAD_ATTRS,
    STYLES,
    WIDTH_ATTRS,
    PolicyError,
    PolicyWarning,
    Rule,
    Style,
    _as_linear,
    auto_rules,
    dense_linear,
    hf_plan,
    infer_vocab_size,
    register_policy,
    registered_policies,
    resolve_rules,
    translate_hf_plan,
)
from lightning_tp.sharding import ShardSpec, has_partial_grad_mark, mark_partial_grad, shard_spec

# ------------------------------------------------------------------------------------------------
# Planning (no process group) and applying.
# ------------------------------------------------------------------------------------------------


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
    note: str | None = None


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
    sequence_parallel: bool = False

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
        "heads": is_embedding,
        "row": is_linear,
        "qkv": is_linear,
        "vocab": is_linear or is_embedding,
        "replicate": True,
    }[style]
    if not fits:
        need = {"vocab": "nn.Linear or nn.Embedding", "heads": "nn.Embedding"}.get(style, "nn.Linear")
        raise TypeError(
            f"policy style {style!r} (pattern {pattern!r}) does not fit module {name!r} of type "
            f"{type(module).__name__}: {style!r} needs an {need}. Narrow the pattern or use 'replicate'."
        )
    full_params = sum(p.numel() for p in module.parameters(recurse=False))
    shape = tuple(module.weight.shape) if getattr(module, "weight", None) is not None else ()
    if is_linear:
        shape = (_as_linear(module)[1], _as_linear(module)[0])  # (out, in) as nn.Linear
    spec = None
    if style == "heads":  # a per-head table: embedding_dim split like the attention heads
        spec = ShardSpec(dim=1, sizes=(shape[1],), tp_size=tp, name=f"embedding_dim of {name!r}")
    elif style in ("column", "qkv") or (style == "vocab" and is_linear):
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
    model: nn.Module,
    tp_size: int,
    policy: str | Mapping[str, Any] | None = "auto",
    strict: bool = False,
    sequence_parallel: bool = False,
) -> Plan:
    """Resolve and validate ``policy`` for ``model`` at ``tp_size``, without touching the model.

    With ``sequence_parallel`` the plan also makes the activations between the parallel layers
    (norms, dropouts, residual adds) sequence-sharded, Megatron's sequence parallelism: see
    :func:`apply_plan`.

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
        if rule.style == "replicate" and not ("partial_grad" in rule.options and _own_params(module)):
            if candidate:
                planned[name] = _planned(name, module, rule, None if source == "auto" else pattern, tp_size)
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

    _plan_head_local(modules, planned, tp_size)
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
    if sequence_parallel:
        _check_sequence_parallel(ordered)
    return Plan(tp_size, source, ordered, unmatched, unused, changes, full, local, sequence_parallel)


def _check_sequence_parallel(entries: list[PlannedModule]) -> None:
    for entry in entries:
        if entry.style == "row" and not entry.options.get("input_is_parallel", True):
            raise PolicyError(
                f"module {entry.name!r}: style 'row' with input_is_parallel=False cannot be sequence parallel (its "
                "input would be the sequence-sharded activations). Make its input come from a column layer, or "
                "use sequence_parallel=False."
            )
        if entry.style in ("column", "qkv") and "." not in entry.name:
            raise PolicyError(
                f"module {entry.name!r}: sequence parallelism gathers the sequence at the input of the block that "
                "holds a column layer, and this one sits directly in the model. Put it in a submodule (a block), "
                "or use sequence_parallel=False."
            )
    if not any(e.style == "vocab" and e.module_type != "Embedding" for e in entries) and not any(
        e.style in ("column", "qkv") and e.options.get("gather_output") for e in entries
    ):
        raise PolicyError(
            "sequence_parallel=True needs the model's output to leave through a vocab-parallel LM head (or a "
            "column layer with gather_output): otherwise the output stays sequence-sharded. Add the head to the "
            "policy as 'vocab', or use sequence_parallel=False."
        )


def _own_params(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters(recurse=False))


def _sharded_output(entry: PlannedModule) -> bool:
    """A split projection whose output stays sharded: the block after it sees only this rank's heads."""
    return (
        entry.style in ("column", "qkv")
        and entry.spec is not None
        and entry.spec.dim == 0
        and not (entry.options.get("gather_output", False))
    )


def _plan_head_local(modules: dict[str, nn.Module], planned: dict[str, PlannedModule], tp: int) -> None:
    """What else a block with head-split projections holds, planned from its attributes:

    * an ``nn.Embedding`` child as wide as the block's head count (a per-head table such as T5's
      relative-position bias) is split by heads (style ``heads``), like the projections;
    * a replicated child whose parameters are ``(head_dim,)`` vectors (Qwen3/Gemma3 ``q_norm`` /
      ``k_norm``) runs on this rank's heads only: its gradient is partial and summed over TP.

    Entries the policy gave (a pattern of the user's or a Hugging Face plan, or a split) are kept; auto's
    default ``replicate`` of a small embedding yields to the head split.
    """
    if tp == 1:
        return
    parents = {e.name.rpartition(".")[0] for e in planned.values() if _sharded_output(e)}
    for parent_name in parents:
        parent = modules[parent_name]
        heads = next((getattr(parent, a) for a in HEAD_ATTRS[:4] if _is_int(getattr(parent, a, None))), None)
        head_dim = getattr(parent, "head_dim", None)
        for leaf, child in parent.named_children():
            name = f"{parent_name}.{leaf}" if parent_name else leaf
            if name in planned and (planned[name].pattern is not None or planned[name].style != "replicate"):
                continue  # the policy's own entry (auto's default 'replicate' for small embeddings yields)
            if type(child) is nn.Embedding and heads and child.embedding_dim == heads:
                planned[name] = _planned(name, child, Rule("heads"), None, tp)
            elif (
                _is_int(head_dim)
                and _as_linear(child) is None
                and not isinstance(child, nn.Embedding)
                and (params := _own_params(child))
                and not any(True for _ in child.children())
                and all(tuple(p.shape) == (head_dim,) for p in params)
            ):
                planned[name] = _planned(name, child, Rule("replicate", {"partial_grad": True}), None, tp)


def _per_head_fused(plan: Plan, model: nn.Module, groups: dict[str, int]) -> Plan:
    """The plan with fused projections that the model reads per head (found by verify's reference
    forward) split as plain columns: rank ``r`` holds groups ``[r n/p, (r+1) n/p)``, each with its
    own q, k and v, which is what ``view(..., heads, 3 * head_dim)`` then reads."""
    if not groups:
        return plan
    rows = []
    for entry in plan.modules:
        if entry.name in groups:
            n = groups[entry.name]
            if n % plan.tp_size:
                raise ShardingError(
                    f"module {entry.name!r}: its output is read per head as {n} groups, which cannot be split over "
                    f"tensor_parallel_size={plan.tp_size}. Use a tensor_parallel_size that divides {n}, or map it "
                    "to 'replicate'."
                )
            module = model.get_submodule(entry.name)
            entry = _planned(entry.name, module, Rule("column"), entry.pattern, plan.tp_size)
            entry.note = f"fused, read per head ({n} groups)"
        rows.append(entry)
    return dataclasses.replace(plan, modules=rows)


def _planned_layer(plan: Plan, name: str) -> bool:
    return any(e.name == name and e.style != "replicate" for e in plan.modules)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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


def _param_owners(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """``id(param) -> [(module name, param name), ...]``: every place that holds each parameter."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append((mod_name, p_name))
    return owners


def _check_ties(model: nn.Module, planned: dict[str, PlannedModule]) -> None:
    """Modules that share a parameter must split it the same way. A module that only holds the
    parameter (not an ``nn.Linear``/``nn.Embedding``, e.g. BERT's ``cls.predictions`` holding the
    decoder's bias) follows the layer that uses it: :func:`apply_plan` points it at the new shard."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for group in _param_owners(model).values():
        if len({m for m, _ in group}) < 2:
            continue
        layouts = {}
        for mod_name, p_name in group:
            entry = planned.get(mod_name)
            module = modules[mod_name]
            if entry is None and _as_linear(module) is None and not isinstance(module, nn.Embedding):
                continue  # a holder, not a user of the parameter
            if entry is not None and p_name == "bias" and entry.style == "row":
                layouts[(mod_name, p_name)] = None
            elif entry is not None and p_name == "bias" and entry.spec is not None:
                layouts[(mod_name, p_name)] = ("bias", entry.spec.sizes, entry.spec.padded_sizes)
            else:
                layouts[(mod_name, p_name)] = _weight_key(entry.spec) if entry is not None else None
        if len(set(layouts.values())) > 1:
            desc = ", ".join(
                f"'{m}.{p}' ({planned[m].style if m in planned else 'unmatched/replicate'})" for m, p in layouts
            )
            raise PolicyError(
                f"the policy would break a tied parameter shared by {desc}: each side would be split differently. "
                "Give all modules that share a parameter the same style (e.g. 'vocab' for both a tied embedding "
                "and LM head), or 'replicate' for all of them."
            )
        users = [m for m, _ in layouts]
        for mod_name in users[1:]:
            if mod_name in planned and planned[mod_name].tied_to is None and mod_name != users[0]:
                planned[mod_name].tied_to = users[0]


def _attribute_changes(
    modules: dict[str, nn.Module], planned: dict[str, PlannedModule], tp: int
) -> list[tuple[str, str, int, int]]:
    changes: list[tuple[str, str, int, int]] = []
    if tp == 1:
        return changes
    split_children: dict[str, list[PlannedModule]] = {}
    for entry in planned.values():
        if _sharded_output(entry):  # a gathered output (Phi-3's colwise_gather_output) keeps every head
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
                _check_heads(child.spec.sizes, head_dim, tp, child.name)
        chunk_sizes = {s for c in children for s in c.spec.sizes}
        for attr in WIDTH_ATTRS:
            value = getattr(parent, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value in chunk_sizes:
                changes.append((parent_name, attr, value, value // tp))
    return changes


def _check_plan_fits(model: nn.Module, plan: Plan) -> None:
    """Every planned module exists in ``model`` with the planned full shape (before any rewrite)."""
    modules = dict(model.named_modules())
    for entry in plan.modules:
        module = modules.get(entry.name)
        if module is None:
            raise PolicyError(
                f"plan entry {entry.name!r} names no module of this {type(model).__name__}: the plan was made "
                "for another model. Plan this model with plan_policy(model, tp_size, policy)."
            )
        lin = _as_linear(module)
        shape = (lin[1], lin[0]) if lin is not None else tuple(getattr(getattr(module, "weight", None), "shape", ()))
        if entry.style != "replicate" and shape != tuple(entry.full_shape):
            raise PolicyError(
                f"plan entry {entry.name!r} expects shape {tuple(entry.full_shape)}, the module has {shape}: the plan "
                "was made for another model. Plan this model with plan_policy(model, tp_size, policy)."
            )
    for parent_name, attr, old, _ in plan.attribute_changes:
        value = getattr(modules.get(parent_name), attr, None)
        if value != old:
            raise PolicyError(
                f"plan changes {parent_name}.{attr} from {old}, the module has {value!r}: the plan was made for "
                "another model. Plan this model with plan_policy(model, tp_size, policy)."
            )


def apply_plan(model: nn.Module, plan: Plan, group: ProcessGroup) -> nn.Module:
    """Rewrite ``model`` in place as ``plan`` says, with layers on ``group``. Returns ``model``.

    Parameters of ``replicate`` rows with ``partial_grad`` are marked for a sum of their gradient
    over TP; a module that only holds a replaced parameter (a tie) is pointed at the new one.
    A sequence-parallel plan keeps the activations outside the column-to-row regions sharded on the
    sequence (the dim before the features, ``(B, T/p, H)``): token embeddings reduce-scatter instead
    of all-reducing, column layers and the LM head all-gather their input, row layers
    reduce-scatter their output, other ``nn.Embedding``s (positions) keep this rank's chunk, and
    norm layers' parameters and row biases are marked for a sum of their gradient over TP (the
    strategy's precision plugin does it and checks the marks at the first step; elsewhere call
    ``lightning_tp.precision.all_reduce_partial_grads``). Other whole parameters that see sharded
    activations must be marked by the user (``mark_partial_grad``).
    The sequence length must divide by TP, and the model must not re-derive the sequence length
    from the sharded activations (the parity self-check catches models that do).
    """
    from lightning_tp.comm import group_size

    if group_size(group) != plan.tp_size:
        raise PolicyError(
            f"plan was made for tensor_parallel_size={plan.tp_size}, group has {group_size(group)} ranks."
        )
    _check_plan_fits(model, plan)
    owners = _param_owners(model)
    replaced: dict[int, nn.Parameter] = {}  # id(dense parameter) -> the parameter that replaces it
    for entry in plan.modules:
        if entry.style == "replicate":
            continue
        dense = model.get_submodule(entry.name)
        originals = dict(dense.named_parameters(recurse=False))
        new = _build(entry, dense, group, plan.sequence_parallel)
        for p_name, old in originals.items():
            if id(old) in replaced:  # a tie: the first layer's new parameter serves every user
                setattr(new, p_name, replaced[id(old)])
            elif isinstance(getattr(new, p_name, None), nn.Parameter):
                replaced[id(old)] = getattr(new, p_name)
        if new is not dense:
            model.set_submodule(entry.name, new)
    for old_id, param in replaced.items():  # modules that only hold a replaced parameter follow it
        for mod_name, p_name in owners.get(old_id, []):
            holder = model.get_submodule(mod_name)
            if getattr(holder, p_name, None) is not param and not _planned_layer(plan, mod_name):
                setattr(holder, p_name, param)
    for entry in plan.modules:
        if entry.options.get("partial_grad"):
            for param in model.get_submodule(entry.name).parameters(recurse=False):
                if not has_partial_grad_mark(param):  # a user's mark stands
                    mark_partial_grad(param)
    for parent_name, attr, _, new_value in plan.attribute_changes:
        setattr(model.get_submodule(parent_name), attr, new_value)
    if plan.sequence_parallel:
        _sequence_parallel_rest(model, plan, group)
    return model


class _GatherSequence:
    """Forward pre-hook of a block holding column layers (sequence parallelism): all-gathers the
    sequence of every floating input of shape ``(..., T/p, in)`` (``in`` one of its column layers'
    input sizes), so the block reads the full sequence length and its column layers need no
    collective; backward reduce-scatters the grad (sums the column layers' partial input grads)."""

    def __init__(self, group: ProcessGroup, in_features: set[int]) -> None:
        self.group, self.in_features = group, in_features

    def _gather(self, x: Any) -> Any:
        from lightning_tp.comm import gather_from_sp

        if isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 2 and x.shape[-1] in self.in_features:
            full = gather_from_sp(x, self.group, -2)
            # column layers save this shard and gather it again in backward, unless `full` was modified in place
            full._tp_sequence_shard = (x, tensor_version(full))
            return full
        return x

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tuple(self._gather(a) for a in args), {k: self._gather(v) for k, v in kwargs.items()}


def _sequence_parallel_rest(model: nn.Module, plan: Plan, group: ProcessGroup) -> None:
    """What sequence parallelism changes outside the parallel layers: blocks holding column layers
    gather the sequence at their input, replicated ``nn.Embedding``s (positions, token types) give
    this rank's sequence chunk, and norm layers' parameters (which see the sharded activations or
    this rank's heads) get only this rank's share of their gradient, so they are marked for a sum
    over TP before the step (row biases mark themselves). The strategy checks the marks against the
    first step's gradients (``check_partial_grad_marks``)."""
    blocks: dict[str, set[int]] = {}
    for entry in plan.modules:
        if entry.style in ("column", "qkv"):
            blocks.setdefault(entry.name.rpartition(".")[0], set()).add(entry.full_shape[1])
    for name, in_features in blocks.items():
        model.get_submodule(name).register_forward_pre_hook(_GatherSequence(group, in_features), with_kwargs=True)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Embedding:
            model.set_submodule(name, SequenceShardedEmbedding.from_dense(module, group))
    for module in model.modules():
        if not _is_norm(module):
            continue
        for param in module.parameters(recurse=False):
            if shard_spec(param) is None and not has_partial_grad_mark(param):  # a user's mark stands
                mark_partial_grad(param)


def _is_norm(module: nn.Module) -> bool:
    """Norm layers: under sequence parallelism they run on sequence-sharded activations (or on this
    rank's heads), so their parameters' grads are partial, as Megatron marks them."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def _build(entry: PlannedModule, dense: nn.Module, group: ProcessGroup, sequence_parallel: bool = False) -> nn.Module:
    opts, name = entry.options, entry.name
    sp = {"sequence_parallel": True, "seq_dim": -2} if sequence_parallel else {}
    if entry.style == "vocab":
        if isinstance(dense, nn.Embedding):
            return VocabParallelEmbedding.from_dense(dense, group, name=name, sequence_parallel=sequence_parallel)
        return VocabParallelLMHead.from_dense(
            dense_linear(dense), group, gather_output=opts.get("gather_output", False), name=name, **sp
        )
    if entry.style == "heads":  # a per-head table split by heads
        return HeadParallelEmbedding(dense, group, name=name)
    if entry.style == "row":
        return RowParallelLinear.from_dense(
            dense_linear(dense), group, input_is_parallel=opts.get("input_is_parallel", True), name=name, **sp
        )
    return ColumnParallelLinear.from_dense(
        dense_linear(dense),
        group,
        gather_output=opts.get("gather_output", False),
        chunks=opts.get("chunks", 1),
        head_dim=opts.get("head_dim"),
        gathered_input=sequence_parallel,  # the enclosing block gathers the sequence (see _GatherSequence)
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
    policy: str | Mapping[str, Any] | Plan | None = "auto",
    *,
    strict: bool = False,
    verify: bool = True,
    example_input: Any = None,
    sequence_parallel: bool = False,
) -> Plan:
    """Plan, validate, rewrite ``model`` in place and (``verify``) check it against itself unsharded.

    Args:
        model: the user's model (plain ``nn.Linear`` / ``nn.Embedding`` layers).
        group: the tensor-parallel process group, or a :class:`~lightning_tp.mesh.TPMesh`.
        policy: ``"auto"``, a registered name, a dict, or a YAML mapping / file; or a :class:`Plan`
            already made by :func:`plan_policy` for this model (not planned again).
        strict: unmatched ``nn.Linear`` / ``nn.Embedding`` modules are an error instead of a warning.
        verify: run the parity self-check (one forward before and after on a fixed random batch).
        example_input: the batch for ``verify`` (default: random token ids, or floats for models
            without embeddings); a tensor, a tuple of positional args or a dict of keyword args.
        sequence_parallel: Megatron sequence parallelism (see :func:`apply_plan`); a given
            :class:`Plan` keeps its own setting.

    Returns:
        The applied :class:`Plan` (prints as a table).

    Raises:
        PolicyError, TypeError, ShardingError: before any module is touched.
        PolicyMismatchError: the rewritten model does not compute what the unsharded one did.
    """
    from lightning_tp.comm import group_size
    from lightning_tp.verify import capture, check_parity, check_reference, interleaved_groups, make_example_input

    group = getattr(group, "tp_group", group)
    if isinstance(policy, Plan):
        if sequence_parallel and not policy.sequence_parallel:
            raise PolicyError(
                "sequence_parallel=True with a Plan made without it: plan with "
                "plan_policy(model, tp_size, policy, sequence_parallel=True)."
            )
        plan = policy
    else:
        plan = plan_policy(model, group_size(group), policy, strict=strict, sequence_parallel=sequence_parallel)
    warn_plan(plan)
    if verify:
        inputs = example_input if example_input is not None else make_example_input(model)
        fused = tuple(m.name for m in plan.modules if m.style == "qkv")
        reference = capture(model, inputs, fused=fused)
        check_reference(reference, inputs)  # a batch the model does not take: raised before any rewrite
        plan = _per_head_fused(plan, model, interleaved_groups(plan, model, reference[-1]))
    apply_plan(model, plan, group)
    if verify:
        check_parity(model, inputs, reference, plan, group)
    return plan
