"""The Plan: the complete, executable description of a model's rewrite for one TP size.

:func:`plan_policy` resolves a policy against a model without any process group (a dry run) and
finds everything the rewrite will change, once: which module gets which style (a row each, with
its shard spec and local shape), the head-count/width attributes divided by TP, ties, partial
gradients, and under sequence parallelism the blocks that gather the sequence, the position
embeddings that keep this rank's chunk and the dropouts that draw per-rank masks.
:func:`~lightning_tp.policy.apply.apply_plan` executes it; ``lightning-tp plan`` prints it.
Every check raises before the first module is touched.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_tp.engine.features import forward_parameters, gathered_width
from lightning_tp.engine.init import module_aliases
from lightning_tp.engine.layers import check_heads
from lightning_tp.engine.sharding import ShardSpec, has_partial_grad_mark
from lightning_tp.errors import ShardingError, few
from lightning_tp.policy.report import plan_table, render_plan
from lightning_tp.policy.rules import (
    ATTENTION_INPUT_NAMES,
    HEAD_ATTRS,
    HEAD_DIM_ATTRS,
    HEAD_INPUTS,
    KV_GROUP_ATTRS,
    KV_HEAD_ATTRS,
    NAMES_SOURCE,
    WIDTH_ATTRS,
    PolicyError,
    PolicyWarning,
    Rule,
    auto_rules,
    config_objects,
    expert_routers,
    head_sources,
    head_value,
    hf_experts_rule,
    infer_vocab_size,
    positive_int,
    read_attr,
    resolve_rules,
)
from lightning_tp.policy.stack import StackSplit, stack_split
from lightning_tp.policy.styles import ALL_STYLES, KV_REPLICATE, STYLES, Column, Qkv, Style, Vocab, as_linear
from lightning_tp.policy.ties import check_ties

PLAN_ATTR = "_lightning_tp_plan"  # where apply_plan leaves the applied plan on the rewritten model


@dataclass
class PlannedModule:
    """One row of a plan: a module, the style that rewrites it and what that gives."""

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

    @property
    def splits(self) -> bool:
        """Whether the row splits the module's weight over TP."""
        return self.spec is not None

    @property
    def kind(self) -> Style:
        """The style object that builds this row."""
        return ALL_STYLES[self.style]


@dataclass
class Plan:
    """A validated policy for one model and TP size: what :func:`~lightning_tp.policy.apply.apply_plan` will do."""

    tp_size: int
    source: str
    modules: list[PlannedModule]
    unmatched: list[str]
    unused_patterns: list[str]
    attribute_changes: list[tuple[str, str, int, int]]
    full_params: int
    local_params: int
    sequence_parallel: bool = False
    # modules a Hugging Face plan leaves whole that the name rules (policy="names") would split
    names_would_split: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return render_plan(self)

    def __rich__(self):
        return plan_table(self)


def attach_plan(model: nn.Module, plan: Plan) -> None:
    """Record on ``model`` the plan it was rewritten with (not a submodule, not in its state_dict)."""
    object.__setattr__(model, PLAN_ATTR, plan)


def applied_plan(model: nn.Module) -> Plan | None:
    """The plan ``model`` was rewritten with, ``None`` for a model not rewritten."""
    plan = getattr(model, PLAN_ATTR, None)
    return plan if isinstance(plan, Plan) else None


def planned_row(
    name: str, module: nn.Module, rule: Rule, pattern: str | None, tp: int, note: str | None = None
) -> PlannedModule:
    """The plan row of ``module`` under ``rule``: its style's fit, shard spec and local shapes.

    Raises:
        TypeError: the style does not fit the module.
        ShardingError: the rewrite would drop parameters or buffers the module holds.
    """
    style, opts = ALL_STYLES[rule.style], dict(rule.options)
    if not style.fits(module):
        raise TypeError(
            f"policy style {style.name!r} (pattern {pattern!r}) does not fit module {name!r} of type "
            f"{type(module).__name__}: {style.name!r} needs {style.need}. Narrow the pattern or use 'replicate'."
        )
    dropped = style.dropped_state(module)
    if dropped:
        where = f" (pattern {pattern!r})" if pattern else ""
        base = "nn.Linear" if as_linear(module) is not None else "nn.Embedding"
        raise ShardingError(
            f"module {name!r} ({type(module).__name__}) holds {dropped}, which the {style.name!r} rewrite{where} "
            f"would drop: the parallel layer keeps only a weight and a bias, and runs {base}'s computation on "
            "them. Map this module to 'replicate' in the policy (it stays whole on every rank), or move that "
            "state out of it."
        )
    reason = style.refusal(module)
    if reason:
        where = f" (pattern {pattern!r})" if pattern else ""
        raise ShardingError(f"module {name!r} ({type(module).__name__}){where}: {reason}")
    full_params = sum(p.numel() for p in module.parameters(recurse=False))
    shape = style.shape(module)
    spec = style.spec(name, module, shape, opts, tp)
    local = style.local_shape(shape, spec, opts, tp)
    row = PlannedModule(
        name, type(module).__name__, style.name, opts, pattern, shape, local, full_params, full_params, spec,
        note=note,
    )  # fmt: skip
    numels = style.local_numels(module, row)
    row.local_params = sum(numels.get(n, p.numel()) for n, p in module.named_parameters(recurse=False))
    return row


def plan_policy(
    model: nn.Module,
    tp_size: int,
    policy: str | Mapping[str, Any] | None = "auto",
    strict: bool = False,
    sequence_parallel: bool = False,
    example_input: Any = None,
    forward_module: nn.Module | None = None,
) -> Plan:
    """Resolve and validate ``policy`` for ``model`` at ``tp_size``, without touching the model.

    With ``sequence_parallel`` the plan also makes the activations between the parallel layers
    (norms, dropouts, residual adds) sequence-sharded, Megatron's sequence parallelism: see
    :func:`apply_plan`. Where the sequence is split (at the embeddings, or only inside the layer stack
    for a model whose layers take per-position inputs: :mod:`lightning_tp.policy.stack`) is read from
    a forward of the dense model up to its first layer (no gradients) on ``example_input`` (default:
    random token ids) through ``forward_module`` (default ``model``).

    Raises:
        PolicyError: bad policy entries, a tie the policy would break, unmatched modules (``strict``).
        TypeError: a style on a module it does not fit.
        ShardingError: sizes or head counts not divisible by ``tp_size``.
    """
    source, rules = resolve_rules(model, policy)
    modules = dict(model.named_modules())
    aliases = module_aliases(model)  # a module registered under several names is inside what any name is inside
    planned, unmatched, used, failed = _match(model, modules, aliases, source, rules, tp_size)
    replicated_kv = _plan_kv_replicas(modules, planned, tp_size)
    for name, error in failed.items():  # in module order: the first one that still fails
        if name in planned and planned[name].kind is KV_REPLICATE:
            continue  # a key/value projection whose heads are replicated
        if source in ("auto", NAMES_SOURCE) and _unsized_fused(modules, name, rules.get(name)):
            why = (
                f"the name rules take {name!r} for a fused [Q | K | V] projection, but its sizes cannot be read: its "
                "block (or the config it holds) has no key/value head count and out_features is not three equal parts."
            )
            fix = (
                f"To split them give a policy of your own, {{{name!r}: {{'style': 'qkv', 'chunks': [q, k, v]}}, ...}} "
                "with its row layer as 'row'."
            )
            _keep_pair_whole(name, planned, unmatched, rules, failed, why, fix)
            continue
        if source in ("auto", NAMES_SOURCE) and getattr(rules.get(name), "inferred", False):
            why = f"the auto rules pair {name!r} in an nn.Sequential MLP, and it cannot be split: {error}"
            fix = "Map them in a policy of your own ('replicate' keeps them whole without this warning)."
            _keep_pair_whole(name, planned, unmatched, rules, failed, why, fix)
            continue
        raise error  # the split is refused
    _plan_head_local(modules, planned, tp_size)
    check_ties(model, planned)
    changes = _attribute_changes(modules, planned, tp_size, replicated_kv)
    for name, row in planned.items():
        if (why := row.kind.companion_error(name, planned)) is not None:
            raise PolicyError(f"module {name!r} (style {row.style!r}): {why}")
    if unmatched and strict:
        raise PolicyError(
            f"strict policy: {len(unmatched)} nn.Linear/nn.Embedding modules match no pattern: {unmatched}. "
            "Add patterns for them (style 'replicate' keeps a module whole)."
        )
    full, local = _param_counts(model, modules, planned)
    split = None
    if sequence_parallel:
        owners = _whole_sequence_owners(modules, planned)
        split = _stack_split(model, modules, planned, owners, example_input, forward_module)
        _check_sequence_parallel(modules, list(planned.values()), owners, split, source)
        mixers = _whole_mixers(modules, planned, owners, split)
        _plan_sequence_parallel(modules, planned, tp_size, owners, aliases, stack=split, mixers=mixers)
    _plan_dropouts(modules, planned, tp_size, sequence_parallel, aliases, stack=split)
    ordered = [planned[n] for n in modules if n in planned]
    unused = [p for p in rules if p not in used]
    _check_relative_names(model, modules, unused, ordered)
    names = []
    experts_left = [n for n, m in modules.items() if n not in planned and hf_experts_rule(m) is not None]
    if source.startswith("huggingface") and (unmatched or experts_left):  # what policy="names" would split of it
        names = [
            n for n, r in auto_rules(model).items() if r.style != "replicate" and (n in unmatched or n in experts_left)
        ]
    return Plan(tp_size, source, ordered, unmatched, unused, changes, full, local, sequence_parallel, names)


def _check_relative_names(
    model: nn.Module, modules: dict[str, nn.Module], unused: list[str], rows: list[PlannedModule]
) -> None:
    """A policy written relative to a wrapped model (``blocks.*`` for a LightningModule's
    ``self.model.blocks``) splits nothing: say so with the names that would match."""
    if not unused or any(r.splits for r in rows):
        return
    hints = {
        p: f"{child}.{p}"
        for p in unused
        for child, _ in model.named_children()
        if any(fnmatch.fnmatchcase(n, f"{child}.{p}") for n in modules)
    }
    if hints:
        raise PolicyError(
            f"policy patterns {list(hints)} match no module of this {type(model).__name__}, so nothing would be "
            f"split; they match inside its child module: {hints}. Patterns name modules relative to the module "
            "that is rewritten (the LightningModule under the strategy; `lightning-tp plan` prints the names)."
        )


def _match(
    model: nn.Module,
    modules: dict[str, nn.Module],
    aliases: dict[str, tuple[str, ...]],
    source: str,
    rules: dict[str, Rule],
    tp: int,
) -> tuple[dict[str, PlannedModule], list[str], set[str], dict[str, Exception]]:
    """``(rows by module name, unmatched linear/embedding names, patterns used, failed)``: the first
    matching pattern of each module (matching any of its names, ``aliases``). ``failed`` holds, in module order, the error of each module whose
    row could not be planned; a ``column``/``qkv`` row whose widths do not divide by ``tp`` is planned
    all the same, unvalidated, for :func:`_plan_kv_replicas` to make it a ``kv_replicate`` row
    (key/value heads fewer than ranks need no split of their width). The caller raises the first
    error whose module did not become one, so a model that fails still fails on its first module."""
    used: set[str] = set()
    failed: dict[str, Exception] = {}
    planned: dict[str, PlannedModule] = {}
    unmatched: list[str] = []
    for name, module in modules.items():
        if not name:
            continue
        names = aliases.get(name, (name,))
        pattern = next((p for p in rules if any(fnmatch.fnmatchcase(n, p) for n in names)), None)
        candidate = as_linear(module) is not None or isinstance(module, nn.Embedding)
        if pattern is None:
            if candidate:
                unmatched.append(name)
            continue
        used.add(pattern)
        rule, shown = rules[pattern], (None if source in ("auto", NAMES_SOURCE) else pattern)
        if not STYLES[rule.style].replaces and not STYLES[rule.style].acts_on(module, rule.options):
            try:
                if candidate:
                    planned[name] = planned_row(name, module, rule, shown, tp)
            except (ShardingError, TypeError) as error:
                failed[name] = error
            continue
        if not candidate and _is_container_match(name, pattern, modules):
            continue  # a broad pattern that also covers the parents of the modules it targets
        if source.startswith("huggingface") and rule.style == "column" and rule.options.get("gather_output"):
            lin = as_linear(module)
            if lin is not None and lin[1] == infer_vocab_size(model):
                rule = Rule("vocab")  # an LM head: vocab-parallel (pads the vocabulary, ties with the embedding)
        if isinstance(rule.options.get("partial_output"), str):  # an attribute of the block (config) names it
            attr = rule.options["partial_output"]
            value = head_value(modules[name.rpartition(".")[0]], (attr,))
            if value is None:
                failed[name] = PolicyError(
                    f"module {name!r}: partial_output={attr!r} names an attribute that its parent module (or the "
                    "config it holds) does not have. Give the number of output features instead."
                )
                continue
            rule = Rule(rule.style, {**rule.options, "partial_output": value})
        if rule.style == "qkv" and "chunks" not in rule.options:
            rule = Rule("qkv", {**rule.options, "chunks": _gqa_chunks(modules, name, module) or 3})
        try:
            planned[name] = planned_row(name, module, rule, shown, tp)
        except (ShardingError, TypeError) as error:
            row = _unsplit_row(name, module, rule, shown, tp) if isinstance(error, ShardingError) else None
            if row is not None:
                planned[name] = row
            failed[name] = error
    return planned, unmatched, used, failed


def _unsized_fused(modules: dict[str, nn.Module], name: str, rule: Rule | None) -> bool:
    """Whether the name rules took ``name`` for a fused ``[Q | K | V]`` projection whose sizes nothing
    gives: no key/value head count on its block (or its config) and no three equal parts."""
    lin = as_linear(modules[name])
    return (
        rule is not None
        and rule.style == "qkv"
        and "chunks" not in rule.options
        and lin is not None
        and lin[1] % 3 != 0
        and _gqa_chunks(modules, name, modules[name]) is None
    )


def _keep_pair_whole(
    name: str,
    planned: dict[str, PlannedModule],
    unmatched: list[str],
    rules: dict,
    failed: dict[str, Exception],
    why: str,
    fix: str,
) -> None:
    """Leave the rules' guessed split of ``name`` and the layers they paired with it (its parent's) whole
    on every rank, with a warning saying ``why`` and how to split them (``fix``): the built-in rules
    guess, and a guess that cannot be sized stays exact."""
    if name in unmatched:
        return  # the layer it was paired with failed first: left whole with it
    parent = name.rpartition(".")[0]
    paired = [n for n in rules if n.rpartition(".")[0] == parent and n != name and (n in planned or n in failed)]
    for n in [name, *paired]:
        planned.pop(n, None)
    unmatched.extend(sorted({name, *paired} - set(unmatched)))
    warnings.warn(
        f"{why} It and {paired or 'nothing else'} stay whole on every rank. {fix}", PolicyWarning, stacklevel=3
    )


def _unsplit_row(name: str, module: nn.Module, rule: Rule, pattern: str | None, tp: int) -> PlannedModule | None:
    """A ``column`` row, or a ``qkv`` row with ``(q, k, v)`` chunk sizes, planned with its widths
    unvalidated (a spec that pads): a candidate for key/value head replication only."""
    lin = as_linear(module)
    chunks = rule.options.get("chunks")
    if lin is None or rule.style not in ("column", "qkv") or set(rule.options) - {"chunks"}:
        return None
    if ALL_STYLES[rule.style].dropped_state(module):
        return None  # refused for what it holds, whatever its widths
    try:
        sizes = (lin[1],) if rule.style == "column" else tuple(int(s) for s in chunks)
    except (TypeError, ValueError):
        return None  # an int count of equal chunks: never (q, k, v) of fewer key/value heads
    if sum(sizes) != lin[1]:
        return None
    shape = (lin[1], lin[0])
    spec = ShardSpec(dim=0, sizes=sizes, tp_size=tp, pad=True, name=f"out_features of {name!r}")
    params = sum(p.numel() for p in module.parameters(recurse=False))
    return PlannedModule(name, type(module).__name__, rule.style, dict(rule.options), pattern, shape, shape, params,
                         params, spec)  # fmt: skip


def _param_counts(
    model: nn.Module, modules: dict[str, nn.Module], planned: dict[str, PlannedModule]
) -> tuple[int, int]:
    """(unsharded parameters, parameters per rank), each shared parameter once."""
    local_numel: dict[int, int] = {}
    for entry in planned.values():
        module = modules[entry.name]
        for p_name, numel in entry.kind.local_numels(module, entry).items():
            local_numel[id(getattr(module, p_name))] = numel
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(local_numel.get(id(p), p.numel()) for p in params)


def _stack_split(
    model: nn.Module,
    modules: dict[str, nn.Module],
    planned: dict[str, PlannedModule],
    owners: dict[str, _Owner],
    example_input: Any,
    forward_module: nn.Module | None,
) -> StackSplit | None:
    """The layer stack as the sequence-sharded region (:func:`~lightning_tp.policy.stack.stack_split`),
    unless the policy gives the stack's first or last layer a style of its own (then Megatron's split).
    A plan that splits only experts finds the stack through the modules holding them, at the token
    embeddings' width (a hybrid model's mixers, run whole, take the masks of the whole sequence)."""
    blocks = {b: w for b, w in _column_blocks(planned.values()).items() if not _inside(b, owners)}
    gathering = _innermost(blocks)
    if not blocks:  # the experts (3-D parameters, or the layers holding block experts) at the hidden widths
        hidden = {w for *_, ws in owners.values() for w in ws} | {
            modules[r.name].embedding_dim
            for r in planned.values()
            if isinstance(r.kind, Vocab) and isinstance(modules[r.name], nn.Embedding)
        }
        experts = [*owners, *(r.name for r in planned.values() if r.style == "experts")]
        blocks = dict.fromkeys(experts, hidden) if hidden else {}
    split = stack_split(model, modules, blocks, example_input, forward_module, gathering)
    for given in (planned.get(split.first), planned.get(split.last)) if split is not None else ():
        if given is not None and (given.style != "replicate" or set(given.options) - {"partial_grad"}):
            return None
    return split


def _split_row(
    name: str,
    module: nn.Module,
    planned: dict[str, PlannedModule],
    stack: StackSplit,
    split: set[int],
    tp: int,
) -> PlannedModule:
    """The ``sequence_stack`` row of the stack's first or last layer (one row where they are one layer).
    Its own whole parameters (if any) get partial gradients, as every layer's."""
    given = planned.get(name)
    options: dict[str, Any] = {
        "in_features": sorted(stack.widths), "split_input": name == stack.first, "gather_output": name == stack.last,
        "arg": stack.arg, "ndim": stack.ndim,
    }  # fmt: skip
    if given is not None and "partial_grad" in given.options:
        options["partial_grad"] = given.options["partial_grad"]
    elif any(id(p) not in split for p in _own_params(module)):
        options["partial_grad"] = True
    ends = [what for what, on in (("splits", name == stack.first), ("gathers", name == stack.last)) if on]
    note = f"{' and '.join(ends)} the sequence: the layer stack is sequence parallel, what runs outside it is not"
    row = planned_row(name, module, Rule("sequence_stack", options), None, tp, note)
    row.pattern = given.pattern if given is not None else None
    return row


def _check_sequence_parallel(
    modules: dict[str, nn.Module],
    entries: list[PlannedModule],
    owners: dict[str, _Owner],
    split: StackSplit | None = None,
    source: str = "",
) -> None:
    if not any(not _inside(b, owners) for b in _column_blocks(entries)):
        # experts gather their tokens (and a mixture of block experts runs on the whole sequence), but nothing else
        # does: an attention left whole (found by its projections' names) would run on this rank's chunk of the
        # sequence with Megatron's split, and runs whole, replicated, where the layer stack is the region
        # (_whole_mixers: said in a warning); a model of experts alone, position-wise, fits
        experts = sorted(owners) + [e.name for e in entries if e.style == "experts" and not _inside(e.name, owners)]
        given = {e.name for e in entries if e.splits or (e.pattern is not None and not source.startswith("hugging"))}
        attention = [  # left whole by the plan, not by the user's own entry (a position-wise layer so named)
            n
            for n, m in modules.items()
            if n.rpartition(".")[2].lower() in ATTENTION_INPUT_NAMES
            and as_linear(m) is not None
            and n not in given
            and not _inside(n, owners)
            and (split is None or split.inside(n))
        ]
        if experts and attention and split is not None:  # the layer stack is the region: they run whole there
            hint = " The model's own Hugging Face plan splits only its experts: policy='names' splits its attention."
            warnings.warn(
                f"sequence_parallel=True: the policy ({source}) splits only the experts ({few(experts)}) into "
                f"parallel layers; the attention ({few(attention)}) stays whole and runs on the whole sequence on "
                f"every rank, so its compute and activations do not divide by TP."
                f"{hint if source.startswith('huggingface') else ''}",
                PolicyWarning,
                stacklevel=4,
            )
        elif not experts or attention:
            what = f"only the experts ({few(experts)})" if experts else "no layer"
            whole = f" (the attention's {few(attention)})" if experts else ""
            hint = (
                f" The model's own Hugging Face plan splits {'only its experts' if experts else 'no layer of it'}: "
                "policy='names' uses lightning_tp's name rules instead."
                if source.startswith("huggingface")
                else ""
            )
            raise PolicyError(
                f"sequence_parallel=True, but the policy ({source}) splits {what} of the model into column and row "
                f"layers (no attention or MLP block gathers the sequence): every {'other ' if experts else ''}layer "
                f"would run whole on 1/TP of the sequence{whole} and compute another function. Split the layers, or use "
                f"sequence_parallel=False.{hint}"
            )
    root = _split_root({e.name: e for e in entries})
    gathering = _gathering_blocks(entries, owners)
    for entry in entries:
        if _inside(entry.name, owners) or (split is not None and not split.inside(entry.name)):
            continue  # plain tensor parallelism: in a layer on the whole sequence, or outside the sequence-split stack
        if (why := entry.kind.sequence_parallel_error(entry.options, _inside(entry.name, gathering))) is not None:
            hint = (
                " The model's own Hugging Face plan gives it that layout: policy='names' uses lightning_tp's name "
                "rules instead (sequence parallel for OLMo-2, OLMoE, GLM, MiniMax-M2, ...)."
                if source.startswith("huggingface")
                else ""
            )
            raise PolicyError(
                f"module {entry.name!r} (style {entry.style!r}): {why} Use sequence_parallel=False.{hint}"
            )
        if isinstance(entry.kind, Column) and entry.name.rpartition(".")[0] in ("", root):
            raise PolicyError(
                f"module {entry.name!r}: sequence parallelism gathers the sequence at the input of the block that "
                "holds a column layer, and this one sits directly in the model. Put it in a submodule (a block), "
                "or use sequence_parallel=False."
            )
    _check_experts_placement(modules, entries, owners, root)
    if (
        split is None
        and not any(isinstance(e.kind, Vocab) and as_linear(modules[e.name]) is not None for e in entries)
        and not any(isinstance(e.kind, Column) and e.options.get("gather_output") for e in entries)
    ):
        raise PolicyError(
            "sequence_parallel=True needs the model's output to leave through a vocab-parallel LM head (or a "
            "column layer with gather_output): otherwise the output stays sequence-sharded. Add the head to the "
            "policy as 'vocab', or use sequence_parallel=False."
        )


def _check_experts_placement(
    modules: dict[str, nn.Module], entries: list[PlannedModule], owners: dict[str, _Owner], root: str
) -> None:
    """Under sequence parallelism a mixture of experts whose experts are blocks runs on the whole
    sequence, and experts kept as parameters gather every rank's tokens: neither may hold the whole
    split model (nothing would be sequence-sharded) or sit in a block that already gathers the
    sequence at its input (the tokens would be gathered twice)."""
    for owner, (list_name, n, router, _) in owners.items():
        if owner == "" or owner == root or root.startswith(owner + "."):
            raise PolicyError(
                f"module {owner or type(modules[owner]).__name__!r} routes tokens to {n} experts ({list_name}.*, "
                f"router {router!r}) and holds the whole split model: under sequence parallelism a mixture of "
                "experts runs on the whole sequence, so nothing would be sequence-sharded. Put the experts and their "
                "router in a submodule of their own (a layer), or use sequence_parallel=False."
            )
    blocks = list(_gathering_blocks(entries, owners))
    gathering = [(o, "a mixture of experts") for o in owners]
    gathering += [(e.name, "experts") for e in entries if e.style == "experts" and not _inside(e.name, owners)]
    for name, kind in gathering:
        for block in blocks:
            if name.startswith(block + "."):
                raise PolicyError(
                    f"module {name!r} ({kind}) sits in block {block!r}, which holds column layers and so gathers the "
                    "sequence at its input under sequence parallelism; the experts would gather every rank's tokens "
                    f"again. Move {block!r}'s column and row layers into a submodule of their own (an MLP), or use "
                    "sequence_parallel=False."
                )


# owner -> (its experts' container, the number of experts, the first router, the hidden widths it reads)
_Owner = tuple[str, int, str, set[int]]


def _whole_sequence_owners(modules: dict[str, nn.Module], planned: dict[str, PlannedModule]) -> dict[str, _Owner]:
    """Mixtures of experts whose experts are blocks of column and row layers
    (:func:`~lightning_tp.policy.rules.expert_routers`), by owner name. Each calls its experts on the
    tokens routed to them, which under sequence parallelism would differ per rank; such a layer runs
    on the whole sequence instead (style ``sequence_whole``)."""
    blocks = _column_blocks(planned.values())
    split = {r.name for r in planned.values() if r.splits}
    owners: dict[str, _Owner] = {}
    for owner, list_name, n, hidden, routers in expert_routers(modules, blocks, split):
        owners.setdefault(owner, (list_name, n, routers[0], set()))[3].update(hidden)
    return owners


def _whole_mixers(
    modules: dict[str, nn.Module],
    planned: dict[str, PlannedModule],
    owners: dict[str, _Owner],
    stack: StackSplit | None,
) -> list[str]:
    """The modules that run on the whole sequence under sequence parallelism besides the mixtures of
    experts (style ``sequence_whole``: the hidden-states input all-gathered, the output split back to
    this rank's chunk), by name. On the chunk alone each would compute another function:

    * a module the plan leaves whole that mixes the sequence, run replicated: an attention a Hugging
      Face plan leaves whole (DeepSeek-V3's latent attention), a Mamba or linear-attention mixer. It
      holds whole linear layers, one of them back to a hidden width (its output projection), and is
      told by one named (or held by a module named) as an attention's input projection
      (:data:`~lightning_tp.policy.rules.ATTENTION_INPUT_NAMES`), a head count of its own or an
      ``nn.Conv1d`` of its own (a convolution over the sequence). A cross-attention so found runs
      whole too (its queries gathered, its memory as given): correct, at the cost of a gather. A
      position-wise module so told runs whole too, at that cost; one named otherwise runs on the
      chunk, as before; one that mixes the sequence and is told by none of these is found by ``verify``;
    * a block whose split layers are all column layers that gather their output (``gather_output``,
      Qwen3-Next's gated delta net under its Hugging Face plan): nothing splits its output back, so it
      runs as plain tensor parallelism inside.

    The outermost such module inside the layer stack when it is the sequence-sharded region (not a
    layer where it splits or gathers the sequence, nor inside a block that gathers it: the whole
    sequence is there already) that holds no other split layer and no partial gradient; none with
    Megatron's split at the embeddings."""
    if stack is None:  # Megatron's split: the model sizes what it computes per position for the chunk, not the
        return []  # gathered sequence such a module would see (a hybrid model's mask): ``verify`` refuses it
    gathered = {
        r.name for r in planned.values() if isinstance(r.kind, Column) and r.options.get("gather_output")
    }  # column layers whose output is whole
    busy = [
        r.name
        for r in planned.values()
        if ((r.splits or r.kind.replaces) and r.name not in gathered) or r.options.get("partial_grad")
    ]
    ends = (stack.first, stack.last)
    whole = [*owners, *_gathering_blocks(planned.values(), owners)]  # modules on the whole sequence already
    found: list[str] = []
    for name, module in modules.items():  # (module order: a module before those inside it)
        if not stack.inside(name) or name in ends or name in owners or _inside(name, [*whole, *found]):
            continue
        if any(_within(b, name) for b in busy):
            continue
        inner = {n: m for n, m in module.named_modules() if n}
        linears = [n.lower() for n, m in inner.items() if as_linear(m) is not None and f"{name}.{n}" not in gathered]
        columns = [n for n in inner if f"{name}.{n}" in gathered]
        named = {part for n in linears for part in n.split(".")[-2:]}
        children = dict(module.named_children())
        writes = any((w := as_linear(m)) is not None and w[1] in stack.widths for m in inner.values())
        if writes and (
            named & ATTENTION_INPUT_NAMES
            or any(positive_int(read_attr(module, a)) for a in HEAD_ATTRS)
            or any(isinstance(c, nn.Conv1d) for c in children.values())
            or any(c in children for c in columns)  # (its own column layers gather their output)
        ):
            found.append(name)
    return found


def _inside(name: str, owners: Iterable[str]) -> bool:
    return any(name != o and _within(name, o) for o in owners)


def _column_blocks(rows: Iterable[PlannedModule]) -> dict[str, set[int]]:
    """The blocks holding column layers: block name -> input widths of its column layers."""
    blocks: dict[str, set[int]] = {}
    for row in rows:
        if isinstance(row.kind, Column):
            blocks.setdefault(row.name.rpartition(".")[0], set()).add(row.full_shape[1])
    return blocks


def _gathering_blocks(rows: Iterable[PlannedModule], owners: dict[str, _Owner]) -> dict[str, set[int]]:
    """The blocks that gather the sequence at their input under sequence parallelism: those holding
    column layers (outside a mixture of experts run on the whole sequence) that hold no other such
    block. A block holding another (OPT's, BART's, Whisper's decoder layer: its attention block, and
    its MLP's linears itself) carries the residual stream, which must stay sharded: its own column
    layers gather their input themselves, as Megatron's do."""
    return _innermost({b: w for b, w in _column_blocks(rows).items() if not _inside(b, owners)})


def _innermost(blocks: dict[str, set[int]]) -> dict[str, set[int]]:
    """The blocks of ``blocks`` that hold none of the others."""
    return {b: w for b, w in blocks.items() if not any(_inside(other, (b,)) for other in blocks)}


def _split_root(planned: dict[str, PlannedModule]) -> str:
    """The innermost module holding every split layer (the model the TP regions belong to)."""
    parents = [row.name.split(".")[:-1] for row in planned.values() if row.splits]
    common: list[str] = []
    for parts in zip(*parents, strict=False) if parents else ():
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _within(name: str, root: str) -> bool:
    return not root or name == root or name.startswith(root + ".")


def _plan_sequence_parallel(
    modules: dict[str, nn.Module],
    planned: dict[str, PlannedModule],
    tp: int,
    owners: dict[str, _Owner],
    aliases: dict[str, tuple[str, ...]],
    stack: StackSplit | None = None,
    mixers: Iterable[str] = (),
) -> None:
    """Megatron sequence parallelism outside the parallel layers, as plan rows:

    * with a ``stack`` split (a model whose layers take per-position inputs) only the layer stack is
      sequence parallel: its first layer splits the sequence, its last gathers it (``sequence_stack``),
      and what runs outside the stack is planned as without sequence parallelism;

    * each block holding column layers gathers the sequence at its input (``sequence_gather``; a block
      with per-head parameters of its own, a ``head_params`` row, gets them split by that same row),
      unless it holds another such block: then its own column layers gather their input themselves
      (:func:`_gathering_blocks`);
    * replicated ``nn.Embedding``s (positions, token types) give this rank's chunk (``sequence_embedding``);
    * a mixture of experts whose experts are blocks runs on the whole sequence (``sequence_whole``:
      gathered at its input, its output split back), plain tensor parallelism inside; so does each
      module in ``mixers`` (:func:`_whole_mixers`: left whole, mixing the sequence), replicated;
    * every other module of the split model that holds whole parameters (norms, gains) gets a
      partial gradient (``replicate`` with ``partial_grad``): outside the blocks it runs on this
      rank's sequence chunk; inside a block it runs on the gathered sequence, but the gather's
      backward (a reduce-scatter) is where the column layers' partial input grads are summed, so
      what runs before them sees partial grads too. A policy entry with an explicit ``partial_grad``
      stands; a row whose style takes the option (``replicate``, ``gather_input``) keeps its style
      and gets it.
    """
    columns = {b: w for b, w in _column_blocks(planned.values()).items() if not _inside(b, owners)}
    blocks = _innermost(columns)
    outer = columns.keys() - blocks.keys()  # blocks holding other blocks: they gather nothing
    root = _split_root(planned)
    layers = {r.name for r in planned.values() if r.splits or r.kind.replaces}  # TP layers (replicated k/v too)
    split = {id(p) for n in layers for p in modules[n].parameters(recurse=False)}
    mixers = set(mixers)
    whole_ones = [*owners, *mixers]
    for name, module in modules.items():
        if _inside(name, whole_ones):
            continue  # runs as plain tensor parallelism on the whole sequence: nothing sequence-sharded inside
        if stack is not None and name in (stack.first, stack.last):
            planned[name] = _split_row(name, module, planned, stack, split, tp)
            continue
        if stack is not None and not stack.inside(name):
            continue  # runs on the whole sequence, replicated, as without sequence parallelism
        if name in owners or name in mixers:
            given = planned.get(name)
            what = "routes tokens to experts" if name in owners else "mixes the sequence and is left whole"
            if given is not None and (given.style != "replicate" or given.options):
                raise PolicyError(
                    f"module {name!r} {what}, so sequence parallelism runs it on the whole sequence "
                    f"(style 'sequence_whole'), and the policy gives it {given.style!r} {dict(given.options)}. Leave it "
                    "out of the policy (or 'replicate' without options), or use sequence_parallel=False."
                )
            if name in owners:
                note = "a mixture of experts: runs on the whole sequence (gathered at its input, its output split)"
                options: dict[str, Any] = {"in_features": sorted(owners[name][3])}
            else:
                note = "mixes the sequence, left whole: runs on the whole sequence, replicated (gathered, split back)"
                options = {"in_features": sorted(stack.widths), "hidden_only": True, "ndim": stack.ndim}
            planned[name] = planned_row(name, module, Rule("sequence_whole", options), None, tp, note)
            continue
        if name in blocks:
            note = "all-gathers the sequence at the block input"
            # the widths its column layers read, and its whole linear layers (multi-head latent attention's
            # q_a_proj / kv_a_proj_with_mqa read the hidden states, its column layers the compressed ones)
            whole = {w[0] for n, m in module.named_modules() if f"{name}.{n}" not in layers and (w := as_linear(m))}
            options = {"in_features": sorted(blocks[name] | whole)}
            given = planned.get(name)  # the policy may mark its parameters, or split its per-head ones
            if given is not None and given.style == "head_inputs":
                if stack is None:
                    raise ShardingError(
                        f"sequence parallelism: block {name!r} takes inputs of all the model's heads "
                        f"{sorted(given.options['inputs'])} (style 'head_inputs', e.g. ALiBi biases), which are "
                        "built for the sequence the model sees, not for the gathered one this block would run on. "
                        "Use sequence_parallel=False for this model."
                    )
                # the model builds them outside the layer stack, for the whole sequence the block gathers
                options["inputs"] = dict(given.options["inputs"])
                note += "; its per-head inputs cut to this rank's heads"
            heads = dict(given.options["params"]) if given is not None and given.style == "head_params" else {}
            if heads:
                options["params"] = heads
                note += "; its per-head parameters split with its heads"
            whole = [  # (with per-head parameters the block is itself a split row: its others are in `split` too)
                p for n, p in module.named_parameters(recurse=False) if n not in heads and (heads or id(p) not in split)
            ]
            if given is not None and "partial_grad" in given.options:
                options["partial_grad"] = given.options["partial_grad"]
            elif whole and name != root:
                options["partial_grad"] = True  # the block's own whole parameters, as below
            row = planned_row(name, module, Rule("sequence_gather", options), None, tp, note)
            row.pattern = given.pattern if given is not None else None
            planned[name] = row
        elif name in layers or name == root or not any(_within(n, root) for n in aliases.get(name, (name,))):
            row = planned.get(name)
            if row is not None and row.style == "head_params" and name in outer:
                raise PolicyError(  # (a gathering block carries such a split in its own row)
                    f"module {name!r} holds per-head parameters (style 'head_params'), column layers and blocks that "
                    "gather the sequence: under sequence parallelism it carries the residual stream and gathers "
                    "nothing, so its whole parameters would get no partial gradients. Move the per-head parameters "
                    "into its attention block, or use sequence_parallel=False."
                )
            if row is not None and isinstance(row.kind, Column) and name.rpartition(".")[0] in outer:
                own = "gathers the sequence at its own input (its block holds other blocks)"
                row.note = f"{row.note}; {own}" if row.note else own
            continue  # the split model's root: its own parameters may act on gathered outputs (a logit scale)
        elif type(module) is nn.Embedding:
            planned[name] = planned_row(
                name, module, Rule("sequence_embedding"), None, tp, "this rank's sequence chunk"
            )
        elif (
            any(id(p) not in split for p in _own_params(module))  # not only a holder of a split layer's parameter
            and "partial_grad" not in (planned[name].options if name in planned else {})
        ):
            note = "partial under sequence parallelism"
            given = planned.get(name)
            if given is not None and "partial_grad" in given.kind.options:  # its style takes the option: kept
                if given.options.pop("partial_output", None) is not None:  # (in a gathering block: checked)
                    note = "its whole output's gradient partial in the block that gathers the sequence"
                given.options["partial_grad"], given.note = True, given.note or note
            else:
                planned[name] = planned_row(name, module, Rule("replicate", {"partial_grad": True}), None, tp, note)


_ATTN_DROPOUT_HINTS = ("attn_drop", "attention_drop", "attn_dropout", "attention_dropout")


def _plan_dropouts(
    modules: dict[str, nn.Module],
    planned: dict[str, PlannedModule],
    tp: int,
    sequence_parallel: bool,
    aliases: dict[str, tuple[str, ...]],
    stack: StackSplit | None = None,
) -> None:
    """Dropouts on activations split over TP draw per-rank masks (``tp_dropout``): attention-probability
    dropouts (named like ``attn_drop``) of blocks with split projections, and under sequence
    parallelism every ``nn.Dropout`` of the split model (each acts on this rank's chunk or heads) but
    those inside a layer that runs on the whole sequence and, with a ``stack`` split, those outside the
    layer stack. Those planned for sequence parallelism alone are ``sequence_only``: a forward on the
    whole sequence (no gradients, a length that does not divide by TP) drops them as without it.
    Other dropouts act on replicated activations and keep the shared default stream."""

    def names(n: str) -> tuple[str, ...]:
        return aliases.get(n, (n,))

    parents = {  # (a block whose column layers gather their output runs its attention on every head)
        a.rpartition(".")[0]
        for row in planned.values()
        if isinstance(row.kind, Column) and not row.options.get("gather_output")
        for a in names(row.name)
    }
    heads = [
        n
        for n, m in modules.items()
        if type(m) is nn.Dropout
        and any(
            a.rpartition(".")[0] in parents and any(h in a.rpartition(".")[2].lower() for h in _ATTN_DROPOUT_HINTS)
            for a in names(n)
        )
    ]
    found = dict.fromkeys(heads, "on this rank's heads")
    sequence_only: set[str] = set()
    if sequence_parallel:  # every dropout but those inside a layer that runs on the whole sequence
        root = _split_root(planned)
        owners = [r.name for r in planned.values() if r.style == "sequence_whole"]
        for n, m in modules.items():
            if (
                type(m) is nn.Dropout
                and (stack is None or stack.inside(n))
                and any(_within(a, root) and not _inside(a, owners) for a in names(n))
            ):
                if n not in found:  # per rank only while the sequence is sharded
                    sequence_only.add(n)
                found[n] = "on sequence-sharded activations"
    for name, note in found.items():
        options = {"sequence_only": True} if name in sequence_only else {}
        planned[name] = planned_row(name, modules[name], Rule("tp_dropout", options), None, tp, note)


def _plan_head_local(modules: dict[str, nn.Module], planned: dict[str, PlannedModule], tp: int) -> None:
    """What else a block with head-split projections holds, planned from its attributes:

    * an ``nn.Embedding`` child as wide as the block's head count (a per-head table such as T5's
      relative-position bias) is split by heads (style ``heads``), like the projections;
    * a replicated child whose parameters are ``(head_dim,)`` vectors (Qwen3/Gemma3 ``q_norm`` /
      ``k_norm``) runs on this rank's heads only: its gradient is partial and summed over TP;
    * a child whose parameters are vectors as wide as a whole split chunk, ``(n_head * head_dim,)``
      or ``(n_kv_heads * head_dim,)`` (OLMo-2's ``q_norm`` / ``k_norm`` over all heads), reads the
      whole width: style ``gather_input`` (its input gathered over TP, this rank's part of its output);
    * a child whose parameters have one row per head, ``(n_head, ...)`` or ``(n_kv_heads, ...)``
      (Cohere's ``q_norm`` / ``k_norm``: a LayerNorm per head), gets them split with the heads (style
      ``head_params``; replicated key/value heads: each rank holds the row of the head it computes);
    * the block's own per-head parameters are split with the heads (:func:`_plan_head_params`).

    Entries the policy gave (a pattern of the user's or a Hugging Face plan, or a split) are kept; auto's
    default ``replicate`` of a small embedding yields to the head split.
    """
    if tp == 1:
        return
    widths: dict[str, set[int]] = {}  # block -> full widths of its head-split chunks
    replicated: dict[str, set[int]] = {}  # block -> full widths of its replicated key/value projections
    for e in planned.values():
        if e.kind.splits_heads(e.options):
            widths.setdefault(e.name.rpartition(".")[0], set()).update(_chunks(e))
            if e.spec is None:
                replicated.setdefault(e.name.rpartition(".")[0], set()).add(_query_key_value(e)[1])
    for parent_name, chunk_widths in widths.items():
        parent = modules[parent_name]
        heads = _first(_block_sources(parent), HEAD_ATTRS[:4])
        kv_heads = _first(_block_sources(parent), KV_HEAD_ATTRS)
        head_dim = head_value(parent, HEAD_DIM_ATTRS)
        for leaf, child in parent.named_children():
            name = f"{parent_name}.{leaf}" if parent_name else leaf
            if name in planned and (planned[name].pattern is not None or planned[name].splits):
                continue  # the policy's own entry (auto's default 'replicate' for small embeddings yields)
            if type(child) is nn.Embedding and heads and child.embedding_dim == heads:
                planned[name] = planned_row(name, child, Rule("heads"), None, tp)
                continue
            if as_linear(child) is not None or isinstance(child, nn.Embedding) or any(True for _ in child.children()):
                continue
            per_head = _per_head_rows(child, heads, kv_heads)
            if per_head:
                note = "per-head parameters split with the block's heads"
                planned[name] = planned_row(name, child, Rule("head_params", {"params": per_head}), None, tp, note)
                continue
            own = _own_params(child)
            if own and all(p.numel() == 1 for p in own) and not any(has_partial_grad_mark(p) for p in own):
                # one-element parameters of a module beside split projections (a learned activation's, Apertus's
                # xIELU alpha_p / alpha_n) act on this rank's features: each rank's gradient is partial
                note = "one-element parameters on this rank's features: gradients summed over TP"
                planned[name] = planned_row(name, child, Rule("replicate", {"partial_grad": True}), None, tp, note)
                continue
            width = gathered_width(child)  # the size of its 1-D parameters (a norm's weight and bias)
            if head_dim and width == head_dim:
                planned[name] = planned_row(name, child, Rule("replicate", {"partial_grad": True}), None, tp)
            elif width in replicated.get(parent_name, ()):
                raise ShardingError(
                    f"module {name!r} reads all {width} features of the block's key/value heads, which are "
                    f"replicated at tensor_parallel_size={tp} (fewer key/value heads than ranks: each rank computes "
                    "one head). Use a tensor_parallel_size that divides the key/value head count, or map "
                    f"{parent_name!r}'s projections to 'replicate'."
                )
            elif width in chunk_widths:
                note = "inputs of this rank's width gathered over TP"
                planned[name] = planned_row(name, child, Rule("gather_input", {"width": width}), None, tp, note)
        _plan_head_params(planned, parent_name, parent, heads, tp)
        _plan_head_inputs(planned, parent_name, parent, heads, tp)


def _plan_head_params(
    planned: dict[str, PlannedModule], name: str, block: nn.Module, heads: int | None, tp: int
) -> None:
    """A block with head-split projections that holds parameters of its own with one entry per query
    head (``heads``) on dim 0 (GPT-OSS's attention sinks, ``(n_head,)``): they are split with the heads
    (style ``head_params``), unless the policy gave the block an entry of its own."""
    own = [n for n, p in block.named_parameters(recurse=False) if heads and p.dim() >= 1 and p.shape[0] == heads]
    given = planned.get(name)
    if own and (given is None or (given.pattern is None and not given.splits)):
        rule, note = Rule("head_params", {"params": dict.fromkeys(own, 0)}), "per-head parameters split with the heads"
        planned[name] = planned_row(name, block, rule, None, tp, note)


def _plan_head_inputs(
    planned: dict[str, PlannedModule], name: str, block: nn.Module, heads: int | None, tp: int
) -> None:
    """A block with head-split projections whose ``forward`` takes an argument made from all the
    model's heads outside it (:data:`~lightning_tp.policy.rules.HEAD_INPUTS`: BLOOM's ALiBi biases)
    gets it cut to this rank's heads (style ``head_inputs``), unless the block has a row already (the
    policy's, or its own per-head parameters'; then its forward meets all heads and fails on the shapes)."""
    takes = [a for a in HEAD_INPUTS if a in forward_parameters(block)]
    if takes and heads and name not in planned:
        note = "the model's all-heads inputs cut to this rank's heads"
        planned[name] = planned_row(
            name, block, Rule("head_inputs", {"inputs": dict.fromkeys(takes, heads)}), None, tp, note
        )


def _per_head_rows(child: nn.Module, heads: int | None, kv_heads: int | None) -> dict[str, Any]:
    """The ``head_params`` split of a leaf module whose own parameters all hold one row per query head
    (dim 0 of size ``heads``) or per key/value head (``kv_heads``), e.g. a per-head LayerNorm's
    ``(n_head, head_dim)`` weight; ``{}`` for any other module."""
    own = dict(child.named_parameters(recurse=False))
    params: dict[str, Any] = {}
    for p_name, p in own.items():
        if p.dim() < 2:
            return {}
        if p.shape[0] == heads:
            params[p_name] = 0
        elif p.shape[0] == kv_heads:
            params[p_name] = {"dim": 0, "kv_heads": kv_heads}
        else:
            return {}
    return params


def _own_params(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters(recurse=False))


def _is_container_match(name: str, pattern: str, modules: dict[str, nn.Module]) -> bool:
    prefix = name + "."
    return any(n.startswith(prefix) and fnmatch.fnmatchcase(n, pattern) for n in modules)


def _gqa_chunks(modules: dict[str, nn.Module], name: str, module: nn.Module) -> tuple[int, ...] | None:
    lin = as_linear(module)
    parent = modules.get(name.rpartition(".")[0])
    if lin is None or parent is None:
        return None
    heads, kv = head_value(parent, HEAD_ATTRS[:4]), head_value(parent, KV_HEAD_ATTRS)
    head_dim = head_value(parent, HEAD_DIM_ATTRS)
    if head_dim is None and heads and kv and lin[1] % (heads + 2 * kv) == 0:  # no readable head width: the layout's
        head_dim = lin[1] // (heads + 2 * kv)
    if heads and kv and head_dim and (heads + 2 * kv) * head_dim == lin[1] and kv != heads:
        return (heads * head_dim, kv * head_dim, kv * head_dim)
    return None


def _attribute_changes(
    modules: dict[str, nn.Module], planned: dict[str, PlannedModule], tp: int, replicated_kv: dict[str, tuple[int, int]]
) -> list[tuple[str, str, int, int]]:
    """``(block, attribute, full value, local value)`` for the head counts and widths a block with
    head-split projections reads: its own attributes or, when it has no head attribute of its own,
    those of a config object it holds (the attribute is then ``"config.n_head"``;
    :func:`~lightning_tp.policy.apply.apply_plan` gives the block its own copy of the config, so the
    model's and other modules' configs keep full values). In a block with replicated key/value
    heads (``replicated_kv``: block -> (query heads, key/value heads)) the key/value head count
    becomes 1 and the query heads per key/value head (``num_key_value_groups``) ``heads / tp``."""
    changes: list[tuple[str, str, int, int]] = []
    if tp == 1:
        return changes
    split_children: dict[str, list[PlannedModule]] = {}
    for entry in planned.values():
        if entry.kind.splits_heads(entry.options):  # a gathered output (Phi-3's colwise_gather_output) keeps every head
            split_children.setdefault(entry.name.rpartition(".")[0], []).append(entry)
    for parent_name, children in split_children.items():
        parent = modules[parent_name]
        label = parent_name or type(parent).__name__
        chunk_sizes = {s for c in children for s in _chunks(c)}
        split_sizes = {s for c in children for s in _split_chunks(c)}
        sources = [(p, obj) for p, obj in head_sources(parent) if not p or _reads_heads(obj, chunk_sizes)]
        heads, kv = replicated_kv.get(parent_name, (None, None))
        for prefix, source in sources:
            counts = set()  # the head counts this source gives
            for attr in HEAD_ATTRS:
                value = read_attr(source, attr)
                if not isinstance(value, int) or isinstance(value, bool):
                    continue
                counts.add(value)
                if attr in KV_HEAD_ATTRS and value == kv:
                    changes.append((parent_name, prefix + attr, value, 1))  # one replicated head per rank
                    continue
                if value % tp != 0:
                    kind = "key/value heads" if attr in KV_HEAD_ATTRS else "heads"
                    hint = (
                        " Grouped-query attention needs num_key_value_heads divisible by the TP size, or a TP "
                        "size that is a multiple of it (each rank then computes the key/value head its query "
                        "heads read)."
                        if attr in KV_HEAD_ATTRS
                        else ""
                    )
                    raise ShardingError(
                        f"module {label!r}: {prefix}{attr}={value} {kind} cannot be split over tensor_parallel_size="
                        f"{tp}: {value} is not divisible by {tp}.{hint} Use a tensor_parallel_size that divides "
                        f"{value}, or map this block's projections to 'replicate'."
                    )
                changes.append((parent_name, prefix + attr, value, value // tp))
            head_dim = head_value(source, HEAD_DIM_ATTRS) if prefix else read_attr(parent, "head_dim")
            if positive_int(head_dim):
                for child in children:
                    if child.spec is None or set(child.spec.sizes) <= counts:
                        continue  # one value per head (a per-head gate): whole heads, as the counts divide by TP
                    check_heads(child.spec.sizes, head_dim, tp, child.name)
            for attr in WIDTH_ATTRS:
                value = read_attr(source, attr)
                if isinstance(value, int) and not isinstance(value, bool) and value in split_sizes:
                    changes.append((parent_name, prefix + attr, value, value // tp))
            for attr in KV_GROUP_ATTRS if kv else ():
                if read_attr(source, attr) == heads // kv:
                    changes.append((parent_name, prefix + attr, heads // kv, heads // tp))
    return changes


def _chunks(row: PlannedModule) -> tuple[int, ...]:
    """The full widths of a head-split row's chunks (a replicated key/value projection: all its heads; a
    fused one: its ``(q, k, v)``)."""
    return row.spec.sizes if row.spec is not None else tuple(row.options.get("chunks") or (row.full_shape[0],))


def _split_chunks(row: PlannedModule) -> tuple[int, ...]:
    """The full widths of the chunks of a head-split row that are split over TP (not replicated key/value heads)."""
    return row.spec.sizes if row.spec is not None else tuple(q for q in _query_key_value(row)[:1] if q)


def _plan_kv_replicas(
    modules: dict[str, nn.Module], planned: dict[str, PlannedModule], tp: int
) -> dict[str, tuple[int, int]]:
    """Grouped-query attention with fewer key/value heads than TP ranks (multi-query included): the
    block's key and value projections (plain ``column`` rows of ``n`` heads beside a query projection
    of ``H`` heads, ``H`` divisible by ``tp``, ``tp`` a multiple of ``n``) become ``kv_replicate`` rows:
    each rank holding and computing the head its query heads read. Only where the block
    says so: a key/value head count ``n`` (on the block or its config) or ``H / n`` query heads per
    key/value head (``num_key_value_groups``). A policy's own ``kv_replicate`` rows count too.
    Returns block -> ``(H, n)``."""
    found: dict[str, tuple[int, int]] = {}
    if tp == 1:
        return found
    blocks: dict[str, list[PlannedModule]] = {}
    for row in planned.values():  # plain columns (q, k, v) and fused (q, k, v) projections
        if type(row.kind) in (Column, Qkv) and row.kind.splits_heads(row.options) and len(row.spec.sizes) in (1, 3):
            blocks.setdefault(row.name.rpartition(".")[0], []).append(row)
    for row in planned.values():  # the policy's own kv_replicate rows: the query heads are the widest split
        if row.kind is KV_REPLICATE:
            n, block_name = row.options["kv_heads"], row.name.rpartition(".")[0]
            q, kv = _query_key_value(row)
            widest = max((r.full_shape[0] for r in blocks.get(block_name, ())), default=q)
            found[block_name] = (widest * n // kv, n)
    for block_name, rows in blocks.items():
        sources = _block_sources(modules[block_name])
        head_dim, heads = _first(sources, HEAD_DIM_ATTRS), _first(sources, HEAD_ATTRS[:4])
        widest = max(r.spec.sizes[0] for r in rows)  # the query heads (first chunk of a fused projection)
        if head_dim is None and heads and widest % heads == 0:
            head_dim = widest // heads
        if head_dim is None or widest % head_dim:
            continue
        if not heads or widest % (heads * head_dim):
            heads = widest // head_dim  # no query head count that fits the widest projection: its own
        widest = heads * head_dim  # (a gated query projection is a multiple of it: Qwen3-Next's q | gate)
        kv_attr, groups_attr = _first(sources, KV_HEAD_ATTRS), _first(sources, KV_GROUP_ATTRS)
        for row in rows:
            sizes = row.spec.sizes
            if len(sizes) == 3 and (sizes[0] != widest or sizes[1] != sizes[2]):
                continue  # not [Q | K | V] with the block's query heads
            n, rest = divmod(sizes[-1], head_dim)
            if rest or n >= heads or n % tp == 0 or tp % n or heads % tp or heads % n:
                continue
            says = [value == want for value, want in ((kv_attr, n), (groups_attr, heads // n)) if value is not None]
            if not says or not all(says):
                continue  # nothing says these are the key/value heads, or not all of it does
            module = modules[row.name]
            if not KV_REPLICATE.fits(module):
                continue
            options: dict[str, Any] = {"kv_heads": n, **({"chunks": sizes} if len(sizes) == 3 else {})}
            note = f"{n} key/value head{'s' if n > 1 else ''} replicated: {tp // n} ranks share each"
            planned[row.name] = planned_row(row.name, module, Rule("kv_replicate", options), row.pattern, tp, note)
            found[block_name] = (heads, n)
    return found


def _query_key_value(row: PlannedModule) -> tuple[int, int]:
    """``(query features, key/value features)`` of a ``kv_replicate`` row (a key or value projection: no query)."""
    chunks = row.options.get("chunks")
    return (0, row.full_shape[0]) if not chunks else (chunks[0], chunks[1])


def _block_sources(block: nn.Module) -> list[Any]:
    """Where a block's head counts may live: the block, then each config object it holds (a Hugging
    Face attention keeps ``head_dim`` itself and the head counts in its config)."""
    return [block] + [obj for _, obj in config_objects(block)]


def _first(sources: list[Any], names: tuple[str, ...]) -> int | None:
    """The first of ``names`` set to a positive int on one of ``sources`` (a block, then its configs)."""
    return next(filter(None, (head_value(s, names) for s in sources)), None)


def _reads_heads(config: Any, chunk_sizes: set[int]) -> bool:
    """Whether a block's config object describes its split projections: split chunks as wide as the
    config's query heads and as its key/value heads (an MLP holding the same config is left alone,
    even when its hidden width happens to equal the query heads')."""
    heads, kv = head_value(config, HEAD_ATTRS[:4]), head_value(config, KV_HEAD_ATTRS)
    head_dim = head_value(config, HEAD_DIM_ATTRS)
    if head_dim is None and heads:
        width = next((w for a in WIDTH_ATTRS if positive_int(w := read_attr(config, a))), None)
        head_dim = width // heads if width and width % heads == 0 else None
    widths = [n * head_dim for n in (heads, kv) if n and head_dim]
    return bool(widths) and all(w in chunk_sizes for w in widths)
