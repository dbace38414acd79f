"""Executing a :class:`~lightning_tp.policy.plan.Plan`: :func:`apply_plan` rewrites a model in
place row by row (each row's style builds its module); :func:`apply_policy` plans, checks the
unsharded model on a fixed batch, applies, and checks the rewritten model against it.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from lightning_tp.engine.attention import TensorParallelMultiheadAttention
from lightning_tp.engine.comm import group_size, leave_sequence_region, reset_sequence_region
from lightning_tp.engine.init import Materializer, is_deferred, module_aliases
from lightning_tp.engine.random import RNGTracker, SplitRegion, attach_tracker
from lightning_tp.engine.sequence import StackOutputs
from lightning_tp.engine.sharding import shard_spec
from lightning_tp.errors import DeferredInitError, ShardingError, few
from lightning_tp.policy.inputs import holds_meta, make_example_input, model_device, to_device, values_for_meta
from lightning_tp.policy.plan import Plan, PlannedModule, attach_plan, plan_policy, planned_row
from lightning_tp.policy.rules import NAMES_SOURCE, PolicyError, PolicyWarning, Rule, routers_of
from lightning_tp.policy.stack import layer_stack
from lightning_tp.policy.styles import (
    BuildContext,
    Column,
    MultiheadAttentionStyle,
    Row,
    SequenceGatherStyle,
    SequenceStackStyle,
    WholeSequenceStyle,
)
from lightning_tp.policy.verify import (
    block_templates,
    capture,
    check_blocks,
    check_parity,
    check_reference,
    chunk_sizes,
    fused_rows,
    inference_outputs,
    interleaved_groups,
)


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
                    f"module {entry.name!r}: its output is read in {n} groups (per head or per key/value head), "
                    f"which cannot be split over tensor_parallel_size={plan.tp_size}. Use a tensor_parallel_size that divides {n}, or map it "
                    "to 'replicate'."
                )
            module = model.get_submodule(entry.name)
            entry = planned_row(entry.name, module, Rule("column"), entry.pattern, plan.tp_size)
            entry.note = f"fused, read per head ({n} groups)"
        rows.append(entry)
    return dataclasses.replace(plan, modules=rows)


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
        built = entry.splits or entry.kind.replaces  # a layer built from the module (replicated k/v heads too)
        shape = entry.kind.shape(module) if built and entry.kind.fits(module) else None
        if built and shape != tuple(entry.full_shape):
            raise PolicyError(
                f"plan entry {entry.name!r} expects shape {tuple(entry.full_shape)}, the module has {shape}: the plan "
                "was made for another model. Plan this model with plan_policy(model, tp_size, policy)."
            )
    for parent_name, attr, old, _ in plan.attribute_changes:
        value = _get_path(modules.get(parent_name), attr)
        if value != old:
            raise PolicyError(
                f"plan changes {parent_name}.{attr} from {old}, the module has {value!r}: the plan was made for "
                "another model. Plan this model with plan_policy(model, tp_size, policy)."
            )


def apply_plan(
    model: nn.Module,
    plan: Plan,
    group: ProcessGroup,
    rng_tracker: RNGTracker | None = None,
    materializer: Materializer | None = None,
) -> nn.Module:
    """Rewrite ``model`` in place as ``plan`` says, with layers on ``group``. Returns ``model``.

    Each row's style builds its module (split layers, sequence-sharded position embeddings,
    per-rank dropouts drawing from ``rng_tracker``'s model-parallel stream; without a tracker they
    stay ``nn.Dropout``), and with a tracker every block's stretch from its column layers to its row
    layer draws from that stream (:class:`~lightning_tp.engine.random.SplitRegion`); a tie stays one
    parameter (the first layer's new parameter serves every user, and modules that only hold it are
    pointed at it); then ``replicate`` rows with
    ``partial_grad`` mark their parameters for a sum of their gradient over TP (the strategy's
    precision plugin does it and checks the marks at the first step; elsewhere call
    ``lightning_tp.lightning.precision.all_reduce_partial_grads``), blocks of a sequence-parallel
    plan get their sequence gathers, and head-count attributes are divided.

    Under sequence parallelism the sequence length must divide by TP, and the model must not
    re-derive the sequence length from the sharded activations (the parity self-check catches
    models that do). The plan is recorded on ``model`` (:func:`~lightning_tp.policy.plan.applied_plan`).

    A model on the meta device (deferred init) needs a ``materializer``
    (:class:`~lightning_tp.engine.init.Materializer`): each layer is materialized and initialized
    dense, then its split modules keep this rank's slices, one layer at a time.
    """
    if group_size(group) != plan.tp_size:
        raise PolicyError(
            f"plan was made for tensor_parallel_size={plan.tp_size}, group has {group_size(group)} ranks."
        )
    _check_plan_fits(model, plan)
    ctx = BuildContext(group, plan.sequence_parallel, rng_tracker)
    for row in plan.modules:
        if isinstance(row.kind, WholeSequenceStyle):  # (a SequenceGatherStyle that gathers and splits back)
            ctx.whole_sequence += (row.name,)
        elif isinstance(row.kind, SequenceStackStyle):  # (a SequenceGatherStyle at an end of the layer stack)
            ctx.stack, ctx.hidden_ndim = row.name.rpartition(".")[0], row.options["ndim"]
        elif isinstance(row.kind, SequenceGatherStyle):
            ctx.in_features[row.name] = set(row.options["in_features"])
    replaced: _Replaced = {}
    rows = [row for row in plan.modules if row.kind.replaces]
    aliases = module_aliases(model)
    if materializer is None:
        if is_deferred(model):
            raise DeferredInitError(
                "the model holds tensors on the meta device: apply_plan needs a materializer "
                "(lightning_tp.engine.init.Materializer(model, device, seed)) to initialize it layer by layer."
            )
        for row in rows:
            _replace(model, row, ctx, replaced, aliases)
    else:
        for name, unit, recurse in list(materializer.units()):
            materializer.materialize(name, unit, recurse)
            for row in rows:
                if row.name == name or (recurse and row.name.startswith(name + ".")):
                    _replace(model, row, ctx, replaced, aliases)
        materializer.finish()
    split = {row.name for row in plan.modules if row.splits}
    for mod_name, holder in model.named_modules(remove_duplicate=False):  # holders of a replaced parameter follow it
        if mod_name in split:
            continue
        for p_name, param in list(holder.named_parameters(recurse=False, remove_duplicate=False)):
            if (new := _replacement(replaced, param)) is not None:
                setattr(holder, p_name, new)
    for row in plan.modules:
        if not row.kind.replaces:
            row.kind.build(row, model.get_submodule(row.name), ctx)
    if ctx.stack_outputs is not None and ctx.stack is not None:  # the layer stack is the sequence-sharded region
        _gather_stack_outputs(model, plan, ctx.stack, ctx.stack_outputs)
    elif ctx.entries and (stack := _megatron_stack(model, plan)) is not None:  # split at the embeddings
        outputs = StackOutputs(ctx.group, _hidden_widths(model, plan, ctx.entries))
        _gather_stack_outputs(model, plan, stack, outputs, read_inputs=True)
    _reset_sequence_decisions(model, ctx.entries)
    if rng_tracker is not None:
        if plan.tp_size > 1:  # a group of one holds every head and unit: its draws need no stream of their own
            _split_regions(model, plan, rng_tracker, aliases)
        attach_tracker(model, rng_tracker)
    _set_attributes(model, plan.attribute_changes)
    _without_fast_paths(model)
    attach_plan(model, plan)
    return model


def _split_regions(model: nn.Module, plan: Plan, tracker: RNGTracker, aliases: dict[str, tuple[str, ...]]) -> None:
    """Random draws between a block's column layers (sharded output) and its row layer (sharded input)
    come from the model-parallel stream (:class:`~lightning_tp.engine.random.SplitRegion`). A column's
    block is its nearest ancestor that holds a row layer (GPT-2's ``attn``; BERT's ``attention``, whose
    ``self.query`` and ``output.dense`` sit in sibling modules), the model itself where nothing nearer is."""
    columns = [r.name for r in plan.modules if isinstance(r.kind, Column) and not r.options.get("gather_output", False)]
    rows = [r.name for r in plan.modules if isinstance(r.kind, Row) and r.options.get("input_is_parallel", True)]
    entries = [r.name for r in plan.modules if isinstance(r.kind, MultiheadAttentionStyle)]  # split from its input on
    if not (columns or entries) or not rows:
        return
    row_names = [a for n in rows for a in aliases.get(n, (n,))]
    blocks: dict[str, None] = {}
    for name in columns:
        parent = name
        while parent:
            parent = parent.rpartition(".")[0]
            if any(not parent or r.startswith(parent + ".") for r in row_names):
                blocks[parent] = None
                break
    SplitRegion(tracker).install(
        model,
        [model.get_submodule(n) for n in [*blocks, *entries]],
        [model.get_submodule(n) for n in columns],
        [model.get_submodule(n) for n in rows],
        [model.get_submodule(n) for n in entries],
    )


# torch modules whose fused inference kernel (eval mode, no gradients: Lightning's evaluation loops) reads
# their linear layers' weights directly instead of calling them: with a split layer inside, no collective runs
_FAST_PATH_MODULES = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.MultiheadAttention)


def _gather_stack_outputs(
    model: nn.Module, plan: Plan, stack: str, outputs: StackOutputs, read_inputs: bool = False
) -> None:
    """Under sequence parallelism: the module that calls the layer stack ``stack`` (modules without a
    forward of their own looked through: containers, a namespace holding the layers, call nothing)
    gathers the chunks it returns from inside it (``outputs``,
    :class:`~lightning_tp.engine.sequence.StackOutputs`): each layer's outputs and the routers'. With
    ``read_inputs`` (the sequence split before the stack) each layer's input tells it the chunk."""
    caller = stack.rpartition(".")[0]
    while caller and type(model.get_submodule(caller)).forward is nn.Module.forward:
        caller = caller.rpartition(".")[0]
    outputs.attach(model.get_submodule(caller))
    for layer in model.get_submodule(stack).children():
        if read_inputs:  # (first: before a whole-sequence layer's own gather)
            layer.register_forward_pre_hook(outputs.layer_input, with_kwargs=True, prepend=True)
        layer.register_forward_hook(outputs.layer_output)  # (after the last layer's gather: whole there)
    _hook_routers(model, plan, stack, outputs)


def _megatron_stack(model: nn.Module, plan: Plan) -> str | None:
    """Where the sequence is split at the embeddings (Megatron's split): the layer stack holding every
    block that gathers the sequence and every mixture of experts, if there is one."""
    blocks = [f"{row.name}." for row in plan.modules if row.style in ("sequence_gather", "sequence_whole", "experts")]
    return layer_stack(dict(model.named_modules()), blocks) if blocks else None  # ("name.": a layer may be one)


def _hidden_widths(model: nn.Module, plan: Plan, entries: list[str]) -> set[int]:
    """The widths of the hidden states under sequence parallelism: the blocks' inputs and the embeddings'."""
    widths = {
        int(w) for row in plan.modules for w in row.options.get("in_features", ()) if row.style.startswith("sequence")
    }
    embeddings = (model.get_submodule(name) for name in entries)
    return widths | {w for e in embeddings if isinstance(w := getattr(e, "embedding_dim", None), int)}


def _hook_routers(model: nn.Module, plan: Plan, stack: str, outputs: StackOutputs) -> None:
    """The routers beside the experts (style ``experts``) in the layer stack score this rank's tokens:
    ``outputs`` gathers their outputs where the stack's caller returns them (Hugging Face's router
    logits, :class:`~lightning_tp.engine.sequence.StackOutputs`). A router that is a parameter of the
    experts' layer scores inside its forward, with nothing to hook: warned."""
    modules = dict(model.named_modules())
    split = {row.name for row in plan.modules if row.splits}
    unhooked = []
    for row in plan.modules:
        if row.style != "experts" or not row.name.startswith(stack + "."):
            continue
        n = next(modules[row.name].parameters(recurse=False)).shape[0]  # (E, ...): the experts, never split
        for name in routers_of(modules, row.name, n, set(outputs.in_features), split)[1]:
            if name in modules:
                outputs.router(modules[name], n)
            else:
                unhooked.append(name)
    if unhooked:
        warnings.warn(
            f"sequence parallelism: the routers {few(unhooked)} are parameters of "
            "the experts' layers and score this rank's tokens inside their forward: router scores the model returns "
            "from them stay this rank's rows, so a load-balancing loss computed from them would be this rank's "
            "tokens' (it would differ across TP ranks). Hold each router in a module of its own (an nn.Linear), whose "
            "outputs are gathered where the model returns them, or use sequence_parallel=False if such a loss counts.",
            PolicyWarning,
            stacklevel=5,
        )


def _reset_sequence_decisions(model: nn.Module, entries: list[str]) -> None:
    """Under sequence parallelism: the outermost module in progress of those that hold an entry of the
    sequence-sharded region (where the sequence is split) forgets, before its forward, which sequences
    earlier forwards ran whole (:func:`~lightning_tp.engine.comm.reset_sequence_region`): each forward of
    the model decides afresh, whichever module its caller calls (a LightningModule's ``training_step``
    calls its model)."""
    holders = {".".join(name.split(".")[:i]) for name in entries for i in range(name.count(".") + 1)}
    for name in sorted(holders):
        module = model.get_submodule(name)
        module.register_forward_pre_hook(reset_sequence_region)
        module.register_forward_hook(leave_sequence_region, always_call=True)


def _without_fast_paths(model: nn.Module) -> None:
    """Turn torch's fused inference path off (``torch.backends.mha``) while a transformer module that
    holds split layers runs, so that they run as their own modules (the path training takes); an
    ``nn.TransformerEncoder`` holding them never takes its nested-tensor path (``use_nested_tensor``)."""
    for module in model.modules():
        if isinstance(module, TensorParallelMultiheadAttention):
            continue  # its own forward, on this rank's heads: no fused path
        if isinstance(module, _FAST_PATH_MODULES) and not getattr(module, "_tp_no_fast_path", False):
            if any(shard_spec(p) is not None for p in module.parameters()):
                # the same two functions on every module (Dynamo guards on each hook: distinct closures would
                # compile identical layers once each)
                module.register_forward_pre_hook(_fast_path_off)
                module.register_forward_hook(_fast_path_back, always_call=True)
                module._tp_no_fast_path = True
                if isinstance(module, nn.TransformerEncoder):  # its nested-tensor path also under the compiler
                    module.use_nested_tensor = False  # (there with mask_check=False), where no flag is set


@contextmanager
def _fast_path_as_rewritten(model: nn.Module, plan: Plan) -> Iterator[None]:
    """Run the unsharded reference on the path the rewritten model takes: torch's fused inference path
    off when a transformer module will hold split layers (:func:`_without_fast_paths`). On it,
    ``nn.TransformerEncoder`` with a padding mask returns zeros at the padded positions (a nested
    tensor), which the unfused path does not."""
    split = [row.name for row in plan.modules if row.splits]
    fused = any(
        isinstance(module, _FAST_PATH_MODULES) and any(not name or s.startswith(name + ".") for s in split)
        for name, module in model.named_modules()
    )
    was = torch.backends.mha.get_fastpath_enabled()
    if fused:
        torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


# the fused path's flag before each running module turned it off, innermost last (the modules nest)
_FAST_PATH_WAS: list[bool] = []


def _fast_path_off(*_: Any) -> None:
    _set_fast_path(False)


def _fast_path_back(*_: Any) -> None:
    _set_fast_path(None)


def _set_fast_path(enabled: bool | None) -> None:
    if torch.compiler.is_compiling():
        # (not traceable; and not needed there: a transformer layer with hooks attached, as these are, takes no
        # fused path, and an encoder holding split layers no nested-tensor one: use_nested_tensor is off)
        return
    if enabled is None:  # after the forward (also one that raised): as it was
        if _FAST_PATH_WAS:
            torch.backends.mha.set_fastpath_enabled(_FAST_PATH_WAS.pop())
    else:
        _FAST_PATH_WAS.append(torch.backends.mha.get_fastpath_enabled())
        torch.backends.mha.set_fastpath_enabled(enabled)


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def _set_attributes(model: nn.Module, changes: list[tuple[str, str, int, int]]) -> None:
    """Set each block's head counts and widths to their local values. An attribute of a config object
    the block holds (``"config.n_head"``) is set on the block's own shallow copy of that config, made
    once per block: the model's config, and every module that is not split, keep the full values."""
    copied: dict[tuple[str, str], Any] = {}  # (block, path) -> the object the copy was made from
    for parent_name, attr, old_value, new_value in changes:
        target = model.get_submodule(parent_name)
        *owners, leaf = attr.split(".")
        original = None
        for i, owner in enumerate(owners):
            key = (parent_name, ".".join(owners[: i + 1]))
            if key not in copied:
                copied[key] = getattr(target, owner)
                setattr(target, owner, copy.copy(copied[key]))
            original, target = copied[key], getattr(target, owner)
        try:
            setattr(target, leaf, new_value)
        except (AttributeError, TypeError, dataclasses.FrozenInstanceError):
            object.__setattr__(target, leaf, new_value)  # a frozen config: its copy is this block's alone
        if original is not None and getattr(original, leaf, None) != old_value:
            raise PolicyError(
                f"setting {parent_name}.{attr} = {new_value} on this block's copy of its "
                f"{type(original).__name__} changed the original too (the copies share their storage): the model's "
                "other modules would see local head counts. Give the block a config of a plain class (a dataclass "
                "or namespace), or map its projections to 'replicate'."
            )


# id(dense parameter) -> (weak reference to it, the parameter that replaces it). Weak, so a dense
# layer is freed once replaced (deferred init); checked by identity, as a freed id may be reused.
_Replaced = dict[int, tuple[weakref.ref, nn.Parameter]]


def _replacement(replaced: _Replaced, old: nn.Parameter) -> nn.Parameter | None:
    entry = replaced.get(id(old))
    return entry[1] if entry is not None and entry[0]() is old else None


def _replace(
    model: nn.Module, row: PlannedModule, ctx: BuildContext, replaced: _Replaced, aliases: dict[str, tuple[str, ...]]
) -> None:
    dense = model.get_submodule(row.name)
    originals = dict(dense.named_parameters(recurse=False))
    new = row.kind.build(row, dense, ctx)
    for p_name, old in originals.items():
        if (tied := _replacement(replaced, old)) is not None:  # a tie: the first layer's new parameter serves all
            setattr(new, p_name, tied)
        elif isinstance(getattr(new, p_name, None), nn.Parameter):
            replaced[id(old)] = (weakref.ref(old), getattr(new, p_name))
    if new is not dense:
        model.set_submodule(row.name, new)
        for alias in aliases.get(row.name, ())[1:]:  # its other places (those under a shared parent follow)
            parent, _, leaf = alias.rpartition(".")
            holder = model.get_submodule(parent)
            if getattr(holder, leaf) is dense:
                setattr(holder, leaf, new)


def _meta_reshapes(model: nn.Module, run: nn.Module, plan: Plan, inputs: Any) -> dict[str, int]:
    """For a meta-device model: how it reads its fused projections (see
    :func:`~lightning_tp.policy.verify.interleaved_groups`), from a forward on meta tensors (shapes
    only, no memory). ``{}`` when the forward cannot run on meta (the block check still catches a
    wrong split)."""
    fused = tuple(fused_rows(plan))
    if not fused:
        return {}
    reference = capture(model, inputs, grads=False, fused=fused, run=run)
    return interleaved_groups(plan, model, reference[-1]) if reference[2] is None else {}


def _warn_unread_layouts(plan: Plan) -> None:
    """Warn that the name rules split fused q/k/v projections as ``[Q | K | V]`` chunks without the
    reference forward that reads how the model consumes them (``verify=False``)."""
    names = set(fused_rows(plan))
    fused = [m for m in plan.modules if m.name in names]
    if not fused or plan.source not in ("auto", NAMES_SOURCE):
        return
    warnings.warn(
        f"verify=False: {len(fused)} fused q/k/v projections ({few([m.name for m in fused])}) are split as "
        f"[Q | K | V] chunks {chunk_sizes(fused[0])}, as the name "
        "rules plan them, without reading how the forward consumes them. A model that reads them per head or per "
        "key/value group (GPT-NeoX, BLOOM, Falcon-40B, multi-head GPT-BigCode) would then compute a different "
        "function without an error: keep verify=True (it reads the layout and splits those as plain columns), or "
        "map them to 'column' (per-head layouts) or 'qkv' (chunks) in a policy of your own.",
        PolicyWarning,
        stacklevel=3,
    )


def warn_plan(plan: Plan) -> None:
    """Warn about unmatched modules, modules a Hugging Face plan leaves whole that the name rules
    would split, and patterns that match nothing."""
    names = plan.names_would_split
    hint = (
        f"The Hugging Face plan leaves whole {len(names)} modules that lightning_tp's name rules would split "
        f"({few(names, 4)}): policy='names' uses those rules instead of the plan "
        "(verify=True checks the result against the unsharded model)."
        if names
        else ""
    )
    if plan.unmatched:
        warnings.warn(
            f"{len(plan.unmatched)} nn.Linear/nn.Embedding modules are not matched by the policy ({plan.source}) and "
            f"stay replicated: {plan.unmatched}. Map them explicitly (style 'replicate' silences this), or pass "
            f"strict=True to make this an error.{' ' + hint if hint else ''}",
            PolicyWarning,
            stacklevel=3,
        )
    elif hint:
        warnings.warn(hint, PolicyWarning, stacklevel=3)
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
    rng_tracker: RNGTracker | None = None,
    forward_module: nn.Module | None = None,
    materializer: Materializer | None = None,
    load_weights: Callable[[nn.Module], Any] | None = None,
) -> Plan:
    """Plan, validate, rewrite ``model`` in place and (``verify``) check it against itself unsharded.

    Args:
        model: the user's model (plain ``nn.Linear`` / ``nn.Embedding`` layers).
        group: the tensor-parallel process group, or a :class:`~lightning_tp.engine.mesh.TPMesh`.
        policy: ``"auto"``, ``"names"`` (the name rules, ignoring a Hugging Face plan), a registered name, a
            dict, or a YAML mapping / file; or a :class:`Plan`
            already made by :func:`plan_policy` for this model (not planned again).
        strict: unmatched ``nn.Linear`` / ``nn.Embedding`` modules are an error instead of a warning.
        verify: run the parity self-check (one forward before and after on a fixed random batch).
        example_input: the batch for ``verify`` (default: random token ids, or floats for models
            without embeddings); a tensor, a tuple of positional args or a dict of keyword args.
            Tensors on the meta device (shapes only) get values (:func:`~lightning_tp.policy.inputs.values_for_meta`).
        sequence_parallel: Megatron sequence parallelism (see :func:`apply_plan`); a given
            :class:`Plan` keeps its own setting.
        rng_tracker: the model-parallel RNG tracker the per-rank dropouts draw from (see
            :func:`apply_plan`).
        forward_module: the module whose forward ``verify`` calls with ``example_input``: ``model``
            (default) or one of its submodules (a wrapper without a forward of its own).
        materializer: for a model on the meta device (see :func:`apply_plan`). ``verify`` then
            checks it block by block (:func:`~lightning_tp.policy.verify.check_blocks`: each layer
            holding rewritten modules against the same layer built dense from the same weights,
            one layer at a time), as the whole dense model is never built.
        load_weights: called with the rewritten model (e.g. to load pretrained weights); for a
            meta-device model before the block-by-block check, otherwise after the check.

    Returns:
        The applied :class:`Plan` (prints as a table).

    Raises:
        PolicyError, TypeError, ShardingError: before any module is touched.
        PolicyMismatchError: the rewritten model does not compute what the unsharded one did.
    """
    group = getattr(group, "tp_group", group)
    if holds_meta(example_input):  # built on the meta device (deferred init): shapes without values
        example_input = values_for_meta(example_input, model)
    if isinstance(policy, Plan):
        if sequence_parallel and not policy.sequence_parallel:
            raise PolicyError(
                "sequence_parallel=True with a Plan made without it: plan with "
                "plan_policy(model, tp_size, policy, sequence_parallel=True)."
            )
        plan = policy
    else:
        plan = plan_policy(
            model, group_size(group), policy, strict=strict, sequence_parallel=sequence_parallel,
            example_input=example_input, forward_module=forward_module,
        )  # fmt: skip
    warn_plan(plan)
    if not verify:
        _warn_unread_layouts(plan)
    run = model if forward_module is None else forward_module
    if verify and is_deferred(model):
        if materializer is None:  # apply_plan says what is missing
            apply_plan(model, plan, group, rng_tracker, materializer)
        device = materializer.device
        inputs = make_example_input(run, device=device) if example_input is None else to_device(example_input, device)
        plan = _per_head_fused(plan, model, _meta_reshapes(model, run, plan, to_device(inputs, "meta")))
        checks = block_templates(model, plan, list(materializer.units()))  # meta copies: no memory
        apply_plan(model, plan, group, rng_tracker, materializer)
        if load_weights is not None:
            load_weights(model)
        check_blocks(model, checks, inputs, plan, group, run=run)
        return plan
    if verify:
        # a LightningModule's example_input_array lives on the CPU (Lightning moves it for its own uses)
        inputs = make_example_input(run) if example_input is None else to_device(example_input, model_device(model))
        fused = tuple(fused_rows(plan))
        reference = capture(model, inputs, fused=fused, run=run)
        check_reference(reference, inputs)  # a batch the model does not take: raised before any rewrite
        with _fast_path_as_rewritten(model, plan):
            inference = inference_outputs(model, inputs, run)
        plan = _per_head_fused(plan, model, interleaved_groups(plan, model, reference[-1]))
    apply_plan(model, plan, group, rng_tracker, materializer)
    if verify:
        check_parity(model, inputs, reference, plan, group, run=run, inference=inference)
    if load_weights is not None:
        load_weights(model)
    return plan
