"""Parity self-check: does the rewritten model compute what the unsharded model computed?

Before the rewrite, one forward and one backward of the unsharded model on a fixed random batch
record every module's output and every parameter's gradient (forward hooks, eval mode, RNG
untouched, existing ``.grad`` restored afterwards). The backward is of a fixed random projection
of the outputs, ``sum_i <out_i, R_i>``. After the rewrite the same batch runs again. The model
outputs are compared (vocab-sharded logits gathered first); if they differ beyond the tolerance,
the module outputs are compared in execution order (outputs of column-parallel layers gathered
into the dense layout; activations that are sharded inside a TP region are skipped) and
:class:`PolicyMismatchError` names the first module that differs. Then every parameter's gradient
(sharded ones gathered, partial ones summed over TP) is compared with the unsharded one and the
first that differs is named. A forward that raises is reported with the module it raised in.

Tolerances follow the least precise floating dtype the unsharded forward computed in (a float64
model whose norms compute in float32 is compared at float32 tolerance). The reference forward also
records how each fused q/k/v output is first reshaped (:func:`interleaved_groups`), so that
:func:`~lightning_tp.policy.apply.apply_policy` splits per-head layouts as plain columns.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.overrides import TorchFunctionMode

from lightning_tp._compat import tree_map
from lightning_tp.engine.comm import (
    all_gather_dim,
    all_reduce,
    all_reduce_coalesced,
    collective_device,
    group_rank,
    group_size,
    sum_shared_pieces_,
)
from lightning_tp.engine.layers import gather_sharded, gather_sharded_into
from lightning_tp.engine.loss import VocabShardedLogits
from lightning_tp.engine.sharding import ShardSpec, has_partial_grad, shard_spec
from lightning_tp.errors import PolicyMismatchError, VerifyInputError
from lightning_tp.policy.inputs import META_SCALARS, model_device
from lightning_tp.policy.inputs import call as _run
from lightning_tp.policy.inputs import leaves as _leaves
from lightning_tp.policy.plan import Plan
from lightning_tp.policy.rules import HEAD_ATTRS, PolicyWarning, config_objects, read_attr
from lightning_tp.policy.styles import KV_REPLICATE, Qkv, SequenceGatherStyle

# (atol, rtol relative to the reference's max magnitude), by the output dtype
TOLERANCES = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 3e-2), torch.float16: (1e-3, 1e-2)}  # fmt: skip

_LOOSENESS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]  # TOLERANCES from tight to loose

Records = dict[tuple[str, int], Any]


@contextmanager
def _recording(model: nn.Module, records: Records, stack: list[str]) -> Iterator[None]:
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():

        def pre(mod, args, name=name):
            stack.append(name)

        def post(mod, args, out, name=name):
            stack.pop()
            idx = counts.get(name, 0)
            counts[name] = idx + 1
            records[(name, idx)] = [t.detach() if t is not None else None for t in _leaves(out)]

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _DtypeWatch(TorchFunctionMode):
    """Records the floating dtypes of every op's output (a float64 model may compute in float32)
    and, for the outputs of fused projections (``watched``: ``id(tensor) -> module name``), the
    shape the first reshape of each gives them (how the model reads the fused layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()
        self.watched: dict[int, str] = {}
        self.reshaped: dict[str, tuple[int, ...]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in META_SCALARS and args and isinstance(args[0], Tensor) and args[0].is_meta:
            # a forward on meta tensors (shapes only, for a meta-device model): data-dependent
            # values (mask checks) are taken as zero / False; only reshapes are read from it
            return META_SCALARS[func]
        out = func(*args, **(kwargs or {}))
        if isinstance(out, Tensor) and out.is_floating_point():
            self.seen.add(out.dtype)
        if self.watched and args and isinstance(args[0], Tensor) and id(args[0]) in self.watched:
            name, op = self.watched[id(args[0])], getattr(func, "__name__", "")
            if op in ("view", "reshape", "unflatten") and isinstance(out, Tensor):
                self.reshaped.setdefault(name, tuple(out.shape[args[0].dim() - 1 :]))
            elif op in ("split", "chunk", "split_with_sizes", "tensor_split", "unbind", "narrow", "__getitem__"):
                self.reshaped.setdefault(name, ())  # read as [Q | K | V] chunks (or slices)
        return out


def fused_rows(plan: Plan) -> list[str]:
    """Names of the plan's fused q/k/v projections: ``qkv`` rows, and ``kv_replicate`` rows of a fused
    projection (``chunks``: each rank holds its query heads' rows and one key/value head's)."""
    return [
        m.name for m in plan.modules if isinstance(m.kind, Qkv) or (m.kind is KV_REPLICATE and m.options.get("chunks"))
    ]


def chunk_sizes(row: Any) -> tuple[int, ...]:
    """The ``[Q | K | V]`` chunk sizes a fused row is split as (a ``kv_replicate`` row may have no spec)."""
    return tuple(row.spec.sizes) if row.spec is not None else tuple(row.options["chunks"])


def interleaved_groups(plan: Plan, model: nn.Module, reshaped: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Fused projections that the model reads per head, not as ``[Q | K | V]`` chunks:
    ``{module name: n}`` where the first reshape of the output is ``(..., n, F/n)`` or
    ``(..., n, c, F/(n c))`` with ``n`` a head (or key/value-head) count of the block and each group
    holding more than one head's slice (GPT-BigCode / GPT-NeoX ``view(..., heads, 3 * head_dim)``,
    BLOOM ``(heads, 3, head_dim)``, Falcon ``(kv_heads, q_per_kv + 2, head_dim)``). A plain column
    split then gives every rank whole groups."""
    found: dict[str, int] = {}
    fused = set(fused_rows(plan))
    for entry in plan.modules:
        shape = reshaped.get(entry.name)
        if entry.name not in fused or not shape or len(shape) < 2:
            continue
        parent = model.get_submodule(entry.name.rpartition(".")[0])
        heads = {  # the block's own head counts and its configs' (GPT-NeoX's keeps head_size itself, the counts there)
            value
            for source in (parent, *(obj for _, obj in config_objects(parent)))
            for a in HEAD_ATTRS
            if isinstance(value := read_attr(source, a), int)
        }
        n, rest = shape[0], math.prod(shape[1:])
        sizes = chunk_sizes(entry)
        if n == len(sizes) and len(set(sizes)) == 1 and rest == sizes[0]:
            continue  # (3, heads, head_dim): [Q | K | V] chunks, even when the head count is 3
        per_head = entry.full_shape[0] // max(heads) if heads else 0
        if n in heads and rest > per_head // len(sizes) and n * rest == entry.full_shape[0]:
            found[entry.name] = n
    return found


def _probe_loss(outputs: list[Tensor], group: ProcessGroup | None) -> Tensor | None:
    """``sum_i <out_i, R_i>`` with fixed random ``R_i`` (float64): a scalar whose gradient reaches
    every parameter that any output depends on. Vocab-sharded logits are gathered (differentiably)."""
    gen = torch.Generator().manual_seed(1234)
    total = None
    for out in outputs:
        if isinstance(out, VocabShardedLogits):
            out = out.gathered()  # (..., V)
        if not (out.is_floating_point() and out.requires_grad):
            continue
        r = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
        term = (out.double() * r).sum() / max(1, out.numel()) ** 0.5
        total = term if total is None else total + term
    return total


def capture(
    model: nn.Module,
    inputs: Any,
    group: ProcessGroup | None = None,
    grads: bool = True,
    fused: tuple[str, ...] = (),
    run: nn.Module | None = None,
) -> tuple[list[Tensor], Records, BaseException | None, str | None, dict[str, Tensor | None], torch.dtype | None, dict]:
    """Run one forward (eval mode) of ``run`` (default ``model``; a submodule of it) and, with
    ``grads``, one backward of :func:`_probe_loss`, leaving RNG, training flags and every
    parameter's ``.grad`` as they were. Modules and parameters are named as in ``model``.

    Returns:
        (output leaves, module records, exception, module it was raised in, ``{parameter name:
        gradient}``, the least precise floating dtype the forward computed in, ``{fused module:
        shape of its output's first reshape}`` for the modules named in ``fused``).
    """
    records: Records = {}
    stack: list[str] = []
    training = {m: m.training for m in model.modules()}
    named = list(model.named_parameters())
    saved = {id(p): p.grad for _, p in named}
    error, where, out, got_grads, watch = None, None, [], {}, _DtypeWatch()
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: watch.watched.__setitem__(id(o), n))
        for n in fused
    ]
    with torch.random.fork_rng(devices=[]), torch.set_grad_enabled(grads), _recording(model, records, stack):
        model.eval()
        try:
            for _, p in named:
                p.grad = None
            with watch:
                leaves = [t for t in _leaves(_run(model if run is None else run, inputs)) if t is not None]
            out = [t.detach() for t in leaves]
            loss = _probe_loss(leaves, group) if grads else None
            if loss is not None:
                loss.backward()
                got_grads = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in named}
        except Exception as exc:  # noqa: BLE001 - reported as a policy mismatch
            error, where = exc, (stack[-1] if stack else "")
        finally:
            for m, flag in training.items():
                m.train(flag)
            for _, p in named:
                p.grad = saved[id(p)]
            for h in hooks:
                h.remove()
    return out, records, error, where, got_grads, watch_loosest(watch), watch.reshaped


def inference_outputs(
    model: nn.Module, inputs: Any, run: nn.Module | None = None
) -> tuple[list[Tensor], Exception | None]:
    """The output leaves of one forward of ``run`` (default ``model``) in eval mode without gradients,
    as Lightning's evaluation loops run it (a module may take another path there: a fused inference
    kernel), or the exception it raised; RNG and training flags are left as they were. No hooks are
    added (unlike :func:`capture`'s recording): a module with forward hooks leaves torch's fast path."""
    training = {m: m.training for m in model.modules()}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model.eval()
        try:
            return [t.detach() for t in _leaves(_run(model if run is None else run, inputs)) if t is not None], None
        except Exception as exc:  # noqa: BLE001 - reported as a policy mismatch
            return [], exc
        finally:
            for m, flag in training.items():
                m.train(flag)


def _check_inference(
    model: nn.Module,
    inputs: Any,
    reference: tuple,
    group: ProcessGroup,
    loosest: torch.dtype | None,
    run: nn.Module | None,
) -> None:
    """Compare the rewritten model's :func:`inference_outputs` with the unsharded model's (``reference``)."""
    ref_out, ref_error = reference
    out, error = inference_outputs(model, inputs, run)
    device = model_device(model)
    flags = torch.tensor([float(ref_error is not None), float(error is not None)], device=device)
    skip, failed = all_reduce(flags, group, dist.ReduceOp.MAX)  # agreed on by every rank
    if float(skip):
        return  # the unsharded model does not run that way on this input (on some rank): nothing to compare
    bad = None
    if float(failed) == 0.0:  # every rank gathers the same outputs
        for got, ref in zip(out, ref_out, strict=False):
            d = _diff(_dense(got, None, group), ref, loosest) or (float("inf"), 0.0)
            bad = d if bad is None and d[0] > d[1] else bad
        flag = float(bad is not None or len(out) != len(ref_out))
        failed = all_reduce(torch.tensor([flag], device=device), group, dist.ReduceOp.MAX)
    if float(failed) == 0.0:
        return
    raise PolicyMismatchError(_inference_mismatch("model", error, bad)) from error


def _inference_mismatch(what: str, error: BaseException | None, bad: tuple[float, float] | None) -> str:
    """The message for ``what`` (the model, a block) whose eval-mode, no-gradient output raised
    ``error`` or differs from the unsharded one's (``bad``: difference and tolerance)."""
    how = (
        f"raised {type(error).__name__}: {error}"
        if error is not None
        else "differs from the unsharded model's"
        + (f" (max abs difference {bad[0]:.3e} > tolerance {bad[1]:.3e})" if bad is not None else "")
    )
    return (
        f"in eval mode without gradients (how Lightning's validation, test and predict loops run it) the rewritten "
        f"{what}'s output {how}, although it matches with gradients enabled: a module takes another path there "
        "that reads a split layer's weights itself instead of calling the layer (a fused inference kernel). Map "
        "that block's layers to 'replicate', or turn that path off in the model; pass verify=False to skip this "
        "check."
    )


def check_reference(reference: tuple, inputs: Any) -> None:
    """Raise :class:`VerifyInputError` when the unsharded model failed on the verification input
    (called before the model is rewritten)."""
    error = reference[2]
    if error is None:
        return
    shown = type(inputs).__name__ if not isinstance(inputs, Tensor) else f"a {tuple(inputs.shape)} tensor"
    raise VerifyInputError(
        f"verify=True: the unsharded model's forward/backward failed on the verification input ({shown}) in "
        f"module {reference[3] or '<root>'!r}: {type(error).__name__}: {error}. Nothing was rewritten. Give the "
        "self-check a batch the model accepts: set `self.example_input_array` in the LightningModule (a tensor, "
        "a tuple of positional args or a dict of keyword args, e.g. {'input_ids': ..., 'decoder_input_ids': ...}), "
        "or pass example_input= to apply_policy; or pass verify=False."
    ) from error


def _tolerance(dtype: torch.dtype | None, loosest: torch.dtype | None) -> tuple[float, float]:
    dtypes = [d for d in (dtype, loosest) if d in _LOOSENESS]
    if not dtypes:
        return TOLERANCES[torch.float32]
    return TOLERANCES[max(dtypes, key=_LOOSENESS.index)]


def _dense(t: Tensor | None, spec: ShardSpec | None, group: ProcessGroup) -> Tensor | None:
    if t is None:
        return None
    if isinstance(t, VocabShardedLogits):
        spec = ShardSpec(dim=-1, sizes=(t.vocab_size,), tp_size=dist.get_world_size(group), pad=True)
        t = t.as_subclass(Tensor)
    if spec is None:
        return t
    gathered = all_gather_dim(t.contiguous(), group, -1)  # (..., p * local) in rank order
    index = spec.gather_index()
    return gathered if index is None else gathered.index_select(-1, index.to(gathered.device))


def _diff(got: Tensor | None, ref: Tensor | None, loosest: torch.dtype | None = None) -> tuple[float, float] | None:
    """(max abs difference, allowed) or None when not comparable (shape/dtype differ)."""
    if got is None or ref is None or got.shape != ref.shape:
        return None
    if not ref.is_floating_point():
        return (0.0 if torch.equal(got, ref) else float("inf"), 0.0)
    atol, rtol = _tolerance(ref.dtype, loosest)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return float((got.to(ref.dtype) - ref).abs().max()) if ref.numel() else 0.0, atol + rtol * scale


def check_parity(
    model: nn.Module,
    inputs: Any,
    reference: tuple,
    plan: Plan,
    group: ProcessGroup,
    run: nn.Module | None = None,
    inference: tuple | None = None,
) -> float:
    """Run the rewritten model (``run``, as in :func:`capture`) on ``inputs`` (forward and backward)
    and compare with ``reference`` (from :func:`capture` on the unsharded model); with ``inference``
    (the unsharded model's :func:`inference_outputs`) its outputs in eval mode without gradients too.
    Returns the max abs difference of the outputs.

    Raises:
        PolicyMismatchError: outputs or gradients differ beyond the tolerance, or the forward raised.
    """
    check_reference(reference, inputs)
    ref_out, ref_records, _, _, ref_grads, loosest, _ = reference
    out, records, error, where, grads, _, _ = capture(model, inputs, group, grads=bool(ref_grads), run=run)
    if error is not None:
        raise PolicyMismatchError(
            f"the rewritten model's forward/backward failed in module {where or '<root>'!r}: {type(error).__name__}: "
            f"{error}. Its forward does not fit the policy (for example it reshapes with a full hidden size "
            "or head count read from the input or the config). Fix the policy (map that block to 'replicate') "
            "or make the forward use local sizes (view(..., -1, head_dim)); pass verify=False to skip this check."
            f"{_sequence_hint(plan)}"
        ) from error
    specs = {m.name: spec for m in plan.modules if (spec := m.kind.output_spec(m)) is not None}
    worst, bad, shapes = 0.0, None, None
    if len(out) != len(ref_out):
        bad = (float("inf"), 0.0)
    for got, ref in zip(out, ref_out, strict=False):
        dense = _dense(got, None, group)
        d = _diff(dense, ref, loosest)
        if d is None:  # not comparable: shapes (or presence) differ
            d, shapes = (float("inf"), 0.0), shapes or (_shape(dense), _shape(ref))
        worst = max(worst, d[0])
        if d[0] > d[1] and bad is None:
            bad = d
    device = model_device(model)
    flag = all_reduce(torch.tensor([1.0 if bad else 0.0], device=device), group, dist.ReduceOp.MAX)
    if float(flag) == 0.0:
        transposed = frozenset(f"{m.name}.weight" for m in plan.modules if m.module_type == "Conv1D" and m.splits)
        _check_grads(list(model.named_parameters()), grads, ref_grads, transposed, group, loosest)
        if inference is not None:
            _check_inference(model, inputs, inference, group, loosest, run)
        return worst
    first = _first_mismatch(records, ref_records, specs, group, loosest)
    diff, allowed = bad if bad is not None else (float("nan"), float("nan"))
    what = (
        f"an output of shape {shapes[0]} where the unsharded model's is {shapes[1]}"
        if shapes is not None
        else f"max abs difference {diff:.3e} > tolerance {allowed:.3e} (atol + rtol * max|reference|, "
        f"{_tolerance(ref_out[0].dtype if ref_out else None, loosest)})"
    )
    raise PolicyMismatchError(
        f"the rewritten model's output differs from the unsharded model's: {what}. "
        f"First module whose output differs: {first!r}.{_fused_hint(first, plan)} The policy does not fit this "
        "model's forward; check that module's style and the head/width attributes it reads (`lightning-tp plan` "
        f"shows the plan).{_sequence_hint(plan)}"
    )


def _sequence_hint(plan: Plan) -> str:
    """What to try first when a sequence-parallel plan fails its check."""
    if not plan.sequence_parallel:
        return ""
    if any(row.style == "sequence_stack" for row in plan.modules):
        return (
            f" Under sequence parallelism the activations inside the layer stack hold 1/{plan.tp_size} of the "
            "sequence (split at its first layer's input): a layer that reads the sequence length from them, or "
            "combines them with a per-position input outside its attention and MLP blocks, does not fit it; "
            "check the model with sequence_parallel=False."
        )
    return (
        f" Under sequence parallelism the activations between the blocks hold 1/{plan.tp_size} of the sequence, "
        "from the embeddings on: a model that derives positions, masks or rotary tables from their length does "
        "not fit it unless it hands them to its layers (then only the layer stack is split); check the model "
        "with sequence_parallel=False."
    )


def _shape(t: Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def _fused_hint(first: str, plan: Plan) -> str:
    """Name the fused projections inside the module that differs first: the usual cause is a fused
    layout that is not ``[Q | K | V]``."""
    fused = [m.name for m in plan.modules if isinstance(m.kind, Qkv) and (not first or m.name.startswith(first + "."))]
    if not fused:
        return ""
    return (
        f" It holds fused projections {fused} split as [Q | K | V] chunks: if its forward reads them per head "
        "(view(..., heads, 3 * head_dim), as GPT-BigCode, GPT-NeoX and BLOOM do), map them to 'column' instead of "
        "'qkv'."
    )


def _check_grads(
    named: list[tuple[str, nn.Parameter]],
    grads: dict[str, Tensor | None],
    ref_grads: dict[str, Tensor | None],
    transposed: frozenset[str],
    group: ProcessGroup,
    loosest: torch.dtype | None,
) -> None:
    """Every parameter's gradient (sharded ones gathered, marked-partial ones summed over TP;
    ``transposed``: Conv1D weights, stored ``(in, out)`` in the unsharded model) against the
    unsharded model's; raises :class:`PolicyMismatchError` naming the first that differs."""
    if not ref_grads:
        return
    whole = [(n, p) for n, p in named if shard_spec(p) is None and grads.get(n) is not None]
    summed = all_reduce_coalesced([grads[n] for n, _ in whole], group)  # one flat all-reduce
    totals = dict(zip([n for n, _ in whole], summed, strict=True))
    specs = {n: s for n, p in named if (s := shard_spec(p)) is not None and s.is_shared and grads.get(n) is not None}
    shared = {n: grads[n].clone() for n in specs}  # replicated key/value heads: summed over their ranks
    sum_shared_pieces_([(g, specs[n], 0) for n, g in shared.items()], group)  # as the strategy does
    first, detail = len(ref_grads) + 1, ""
    for index, (name, param) in enumerate(named):
        got, ref = grads.get(name), ref_grads.get(name)
        spec = shard_spec(param)
        if spec is not None and got is not None:
            got = gather_sharded(shared.get(name, got), spec, group)
        elif has_partial_grad(param) and got is not None:
            got = totals[name]
        if got is not None and name in transposed:
            got = got.t()  # a Conv1D stores (in, out); the parallel layer (out, in)
        if got is None and ref is None:
            continue
        if got is None or ref is None:
            d = (float("inf"), 0.0)
        else:
            d = _diff(got, ref, loosest) or (float("inf"), 0.0)
        if d[0] > d[1] and index < first:
            first = index
            partial = name in totals and (t := _diff(totals[name], ref, loosest)) is not None and t[0] <= t[1]
            detail = f"parameter {name!r}: max abs difference {d[0]:.3e} > tolerance {d[1]:.3e}" + (
                ". Summed over the TP ranks it is right: each rank's gradient covers only its heads/features. "
                "Mark it partial: policy entry {'style': 'replicate', 'partial_grad': True} for its module, or "
                "lightning_tp.mark_partial_grad(param) before the rewrite"
                if partial
                else ""
            )
    device = named[0][1].device if named else collective_device(group)
    worst = all_reduce(torch.tensor([float(first)], device=device), group, dist.ReduceOp.MIN)
    if int(worst) > len(ref_grads):
        return
    if int(worst) != first:
        name = named[int(worst)][0] if int(worst) < len(named) else f"#{int(worst)}"
        detail = f"parameter {name!r} differs on another tensor-parallel rank"
    raise PolicyMismatchError(
        f"the rewritten model's outputs match, but its gradients do not: first parameter whose gradient differs "
        f"from the unsharded model's: {detail}. The policy does not fit this model's backward "
        "(`lightning-tp plan` shows the plan)."
    )


def _first_mismatch(
    records: Records,
    ref_records: Records,
    specs: dict[str, ShardSpec],
    group: ProcessGroup,
    loosest: torch.dtype | None,
) -> str:
    first = "<model output>"
    for key, ref_leaves in ref_records.items():  # completion order of the unsharded forward
        got_leaves = records.get(key)
        if got_leaves is None:
            continue
        spec = specs.get(key[0])
        for got, ref in zip(got_leaves, ref_leaves, strict=False):
            if spec is not None or isinstance(got, VocabShardedLogits):
                got = _dense(got, spec, group)  # collective: same modules on every rank
            d = _diff(got, ref, loosest)
            if d is not None and d[0] > d[1] and first == "<model output>":
                first = key[0] or "<root>"
    return first


# --- Block by block (deferred init, pretrained): the dense model is never built ------------------


@dataclasses.dataclass
class BlockCheck:
    """One unit (a layer with its children, or one module) holding rewritten modules, kept as a
    meta-device copy of its dense form from before the rewrite (no memory)."""

    name: str
    template: nn.Module
    gathers: frozenset[int]  # input widths its sequence gathers all-gather (sequence parallelism)
    spec: ShardSpec | None  # its output's layout when the unit is one split layer
    transposed: frozenset[str]  # Conv1D weights (relative names): stored (in, out) in the dense form
    whole_input: bool = False  # the layer stack's first layer: it takes the whole sequence and splits it


def block_templates(model: nn.Module, plan: Plan, units: list[tuple[str, nn.Module, bool]]) -> list[BlockCheck]:
    """Before the rewrite of a meta-device ``model``: a meta copy of every unit (``(name, module,
    with children)``, as :meth:`~lightning_tp.engine.init.Materializer.units` gives them) that holds
    a row the rewrite replaces, for :func:`check_blocks`."""
    checks = []
    for name, unit, recurse in units:

        def inside(row_name: str, name=name, recurse=recurse) -> bool:
            return row_name == name or (recurse and (not name or row_name.startswith(name + ".")))

        rows = [row for row in plan.modules if inside(row.name)]
        if not any(row.kind.replaces for row in rows):
            continue
        template = copy.deepcopy(unit if recurse else _alone(unit))
        gathers = frozenset(w for row in rows if isinstance(row.kind, SequenceGatherStyle) for w in row.options["in_features"])  # fmt: skip
        own = next((row for row in rows if row.name == name), None)
        spec = own.kind.output_spec(own) if own is not None and own.kind.replaces else None
        prefix = f"{name}." if name else ""
        transposed = frozenset(
            f"{row.name}.weight".removeprefix(prefix) for row in rows if row.module_type == "Conv1D" and row.splits
        )
        whole_input = any(r.name == name and r.options.get("split_input") for r in rows)  # a sequence_stack row
        checks.append(
            BlockCheck(name, template, frozenset() if whole_input else gathers, spec, transposed, whole_input)
        )
    return checks


def _alone(module: nn.Module) -> nn.Module:
    """A copy of ``module`` without its children (a unit that comes alone)."""
    shell = copy.copy(module)
    shell._modules = {}
    return shell


def _detached(tree: Any) -> Any:
    """``tree`` with its tensors detached copies and other objects copied (a layer may update a cache
    it is given, or its input in place); modules, and objects that cannot be copied, pass as they are."""

    def leaf(x: Any) -> Any:
        if isinstance(x, Tensor):
            return x.detach().clone()
        if x is None or isinstance(x, nn.Module | int | float | str | bool):
            return x
        try:
            return copy.deepcopy(x)
        except Exception:  # noqa: BLE001
            return x

    return tree_map(leaf, tree)


class _Discard(dict):
    """Records nothing (only the module stack of :func:`_recording` is wanted)."""

    def __setitem__(self, key, value) -> None:
        pass


def _unit_inputs(
    run: nn.Module, model: nn.Module, inputs: Any, names: list[str]
) -> tuple[dict, BaseException | None, str]:
    """``{unit name: (args, kwargs)}`` of each unit's first call in one forward (no grad, eval mode,
    RNG untouched) of the rewritten model, as the unit receives them (before its own hooks)."""
    seen: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name in names:

        def pre(mod, args, kwargs, name=name):
            if name not in seen:
                seen[name] = _detached((args, kwargs))

        handles.append(model.get_submodule(name).register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
    training = {m: m.training for m in model.modules()}
    stack: list[str] = []
    error, where = None, ""
    with torch.random.fork_rng(devices=[]), torch.no_grad(), _recording(model, _Discard(), stack):
        model.eval()
        try:
            _run(run, inputs)
        except Exception as exc:  # noqa: BLE001 - reported as a policy mismatch
            error, where = exc, (stack[-1] if stack else "")
        finally:
            for h in handles:
                h.remove()
            for m, flag in training.items():
                m.train(flag)
    return seen, error, where


@torch.no_grad()
def _dense_unit(check: BlockCheck, unit: nn.Module, group: ProcessGroup, device: torch.device) -> nn.Module:
    """The dense unit, materialized from the rewritten one's weights (sharded ones gathered). Collective."""
    dense = copy.deepcopy(check.template).to_empty(device=device)  # the template stays on meta
    local = dict(unit.named_parameters(remove_duplicate=False))
    for name, param in dense.named_parameters(remove_duplicate=False):
        got = local.get(name)
        if got is None:
            raise PolicyMismatchError(f"verify: the rewritten {check.name!r} has no parameter {name!r}.")
        spec, target = shard_spec(got), (param.t() if name in check.transposed else param)
        if spec is None:
            target.copy_(got.detach())
        else:  # straight into the dense copy: one gather buffer beside it, no second copy
            gather_sharded_into(target, got.detach(), spec, group)
    buffers = dict(unit.named_buffers(remove_duplicate=False))
    for name, buf in dense.named_buffers(remove_duplicate=False):
        if name in buffers:
            buf.copy_(buffers[name])
    return dense


def _layout(
    got: Tensor, ref: Tensor, spec: ShardSpec | None, tp: int, rows: tuple[Tensor, Tensor] | None = None
) -> tuple[str, ShardSpec | None] | None:
    """How this rank's output ``got`` lies in the dense ``ref``: ``("full", None)``, ``("split",
    spec)`` on the last dim, ``("rows", None)`` (``rows``: the dense features it holds, some on several
    ranks), ``("sequence", None)`` on dim -2; ``None``: not comparable."""
    if isinstance(got, VocabShardedLogits):
        return "split", ShardSpec(dim=-1, sizes=(got.vocab_size,), tp_size=tp, pad=True)
    if rows is not None and got.shape[:-1] == ref.shape[:-1] and got.shape[-1] == rows[0].numel():
        return "rows", None  # before "full": one key/value head of one is the whole width, held by every rank
    if got.shape == ref.shape:
        return "full", None
    if spec is not None and got.shape[:-1] == ref.shape[:-1] and spec.full_size == ref.shape[-1]:
        return "split", spec
    if got.dim() >= 2 and got.shape[-2] * tp == ref.shape[-2] and got.shape[-1] == ref.shape[-1]:
        return "sequence", None
    return None


def _block_probes(
    outs: list[Tensor],
    refs: list[Tensor],
    spec: ShardSpec | None,
    group: ProcessGroup,
    loosest,
    rows: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor | None, Tensor | None, tuple[float, float] | None]:
    """For the rewritten block's outputs ``outs`` and the dense block's ``refs`` (both still in the
    graph): ``(sum_i <out_i, R_i>`` on this rank's part of each output, ``sum_i <ref_i, R_i>``, the
    first output difference beyond tolerance``)``, with fixed random ``R_i`` (this rank's slice of
    it for ``out_i``; for a unit whose output holds ``rows`` of the dense one, those features of it,
    scaled by their share). Outputs split on a dim other than the last or the sequence (a per-head
    tensor) are left out of all three; at least one output must be compared."""
    tp, rank = group_size(group), group_rank(group)
    local_total, dense_total, bad, compared = None, None, None, 0
    if len(outs) != len(refs):
        bad = (float("inf"), 0.0)
    for i, (got, ref) in enumerate(zip(outs, refs, strict=False)):
        layout = _layout(got, ref, spec, tp, rows)
        if layout is None:  # split on another dim (a per-head tensor, e.g. T5's position bias): not compared
            continue
        compared += 1
        kind, out_spec = layout
        plain = got.as_subclass(Tensor) if isinstance(got, VocabShardedLogits) else got
        expected = ref.detach()
        if kind == "split":
            dense = _dense(plain.detach(), out_spec, group)
        elif kind == "rows":  # compared where it lies: this rank's features of the dense output
            dense, expected = plain.detach(), expected.index_select(-1, rows[0])
        elif kind == "sequence":
            dense = all_gather_dim(plain.detach().contiguous(), group, -2)
        else:
            dense = plain.detach()
        d = _diff(dense, expected, loosest) or (float("inf"), 0.0)
        if d[0] > d[1] and bad is None:
            bad = d
        if not ref.is_floating_point():
            continue
        r = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1234 + i), dtype=torch.float64)
        r, scale = r.to(ref.device), max(1, ref.numel()) ** 0.5
        if ref.requires_grad:
            term = (ref.double() * r).sum() / scale
            dense_total = term if dense_total is None else dense_total + term
        if kind == "split":
            r = out_spec.shard(r, rank)
        elif kind == "rows":
            r = r.index_select(-1, rows[0]) * rows[1].to(r.dtype)
        elif kind == "sequence":
            r = r.chunk(tp, dim=-2)[rank]
        if plain.requires_grad:
            term = (plain.double() * r).sum() / scale
            local_total = term if local_total is None else local_total + term
    if refs and not compared:
        bad = bad or (float("inf"), 0.0)  # nothing of this block's output could be matched with the dense one
    return local_total, dense_total, bad


def _run_unit(module: nn.Module, args: tuple, kwargs: dict, watch: _DtypeWatch | None = None) -> list[Tensor]:
    args, kwargs = _detached((args, kwargs))
    with torch.random.fork_rng(devices=[]):
        module.eval()
        if watch is None:
            out = module(*args, **kwargs)
        else:
            with watch:
                out = module(*args, **kwargs)
    return [t for t in _leaves(out) if t is not None]


def _unit_inference(
    dense: nn.Module,
    dense_inputs: tuple[tuple, dict],
    unit: nn.Module,
    inputs: tuple[tuple, dict],
    check: BlockCheck,
    group: ProcessGroup,
    loosest: torch.dtype | None,
    rows: tuple[Tensor, Tensor] | None,
) -> tuple[BaseException | None, tuple[float, float] | None] | None:
    """Both forms of a unit once more in eval mode without gradients (a fused inference kernel may
    take over there): ``None`` when they agree, or when the dense one cannot run so (on some rank);
    else ``(the rewritten unit's exception, output difference)``. Collective; every rank decides alike."""
    device = model_device(unit)
    refs, outs, ref_error, error = [], [], None, None
    with torch.no_grad():
        try:
            refs = _run_unit(dense, *dense_inputs)
        except Exception as exc:  # noqa: BLE001 - agreed on below
            ref_error = exc
        try:
            outs = _run_unit(unit, *inputs)
        except Exception as exc:  # noqa: BLE001 - reported as a policy mismatch
            error = exc
        flags = torch.tensor([float(ref_error is not None), float(error is not None)], device=device)
        skip, failed = all_reduce(flags, group, dist.ReduceOp.MAX)
        if float(skip):
            return None
        bad = None
        if not float(failed):  # every rank compares (the comparison gathers split outputs)
            bad = _block_probes(outs, refs, check.spec, group, loosest, rows)[2]
            failed = all_reduce(torch.tensor([float(bad is not None)], device=device), group, dist.ReduceOp.MAX)
    return (error, bad) if float(failed) else None


def _gather_inputs(tree: Any, widths: frozenset[int], group: ProcessGroup) -> Any:
    """The block's inputs as the dense unit takes them: sequence-sharded ones (what its sequence
    gathers all-gather: floating, ``(..., T/p, w)`` with ``w`` in ``widths``) gathered on dim -2."""
    if not widths:
        return tree

    def gather(x):
        if isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 2 and x.shape[-1] in widths:
            return all_gather_dim(x.contiguous(), group, -2).contiguous()  # (the layer may view() it)
        return x

    return tree_map(gather, tree)


def check_blocks(
    model: nn.Module,
    checks: list[BlockCheck],
    inputs: Any,
    plan: Plan,
    group: ProcessGroup,
    run: nn.Module | None = None,
) -> int:
    """Verify a rewritten model that was never dense (deferred init, pretrained) block by block.

    One forward of the rewritten model on ``inputs`` records what each checked unit receives; then,
    unit by unit, a dense copy of the unit is materialized from the rewritten unit's weights (sharded
    ones gathered; one unit at a time), both run forward and backward (of a fixed random projection
    of the outputs) on those inputs, and outputs and every parameter's gradient are compared as
    :func:`check_parity` does. What runs outside the checked units (e.g. a loss in the model's own
    forward) is not compared. Returns the number of units checked.

    Raises:
        PolicyMismatchError: naming the first unit (in execution order) that differs.
    """
    run = model if run is None else run
    units = {c.name: c for c in checks}
    seen, error, where = _unit_inputs(run, model, inputs, list(units))
    if error is not None:
        raise PolicyMismatchError(
            f"verify (block by block): the rewritten model's forward failed in module {where or '<root>'!r}: "
            f"{type(error).__name__}: {error}. Its forward does not fit the policy (for example it reshapes with a "
            "full hidden size or head count); map that block to 'replicate', or pass verify=False to skip this check."
            f"{_sequence_hint(plan)}"
        ) from error
    device = model_device(model)
    checked, skipped = 0, []
    for name, (args, kwargs) in seen.items():  # execution order: the same on every rank
        check, unit = units[name], model.get_submodule(name)
        dense = _dense_unit(check, unit, group, device)
        watch = _DtypeWatch()
        # sequence parallelism: inputs the block's sequence gathers, or its layers themselves, all-gather
        own = (
            {
                m.in_features
                for m in unit.modules()
                if getattr(m, "sequence_parallel", False) is True and isinstance(getattr(m, "in_features", None), int)
            }
            if not check.whole_input
            else set()
        )
        dense_args, dense_kwargs = _gather_inputs((args, kwargs), check.gathers | own, group)
        failure = None
        try:
            refs = _run_unit(dense, dense_args, dense_kwargs, watch)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - decided together below
            # it receives an activation in a sharded layout only the rewritten block takes (T5's
            # head-split position bias, passed from block to block)
            failure = f"{name} ({type(exc).__name__}: {str(exc)[:120]})"
        if float(all_reduce(torch.tensor([float(failure is not None)], device=device), group, dist.ReduceOp.MAX)):
            skipped.append(failure or f"{name} (failed on another rank)")  # every rank skips it
            del dense
            continue
        named = list(unit.named_parameters())
        saved = {id(p): p.grad for _, p in named}
        training = {m: m.training for m in unit.modules()}
        try:
            for _, p in named:
                p.grad = None
            outs = _run_unit(unit, args, kwargs)
            held = getattr(unit, "dense_output_rows", None)  # a unit holding some dense features (replicated k/v)
            rows = held() if callable(held) else None
            loss, dense_loss, bad = _block_probes(outs, refs, check.spec, group, watch_loosest(watch), rows)
            for probe in (dense_loss, loss):
                if probe is not None:
                    probe.backward()
            grads = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in named}
            ref_grads = {n: (None if p.grad is None else p.grad.detach()) for n, p in dense.named_parameters()}
            loosest = watch_loosest(watch)
            inference = _unit_inference(dense, (dense_args, dense_kwargs), unit, (args, kwargs), check, group,
                                        loosest, rows)  # fmt: skip
        finally:
            for _, p in named:
                p.grad = saved[id(p)]
            for m, flag in training.items():
                m.train(flag)
        del dense, refs, outs, loss, dense_loss
        flag = all_reduce(torch.tensor([1.0 if bad else 0.0], device=device), group, dist.ReduceOp.MAX)
        if float(flag):
            diff, allowed = bad if bad is not None else (float("nan"), float("nan"))
            raise PolicyMismatchError(
                f"verify (block by block): the output of {name or '<root>'!r} differs from the same block built dense "
                f"from the same weights: max abs difference {diff:.3e} > tolerance {allowed:.3e}.{_fused_hint(name, plan)} "
                "The policy does not fit this block's forward; check its modules' styles and the head/width "
                "attributes it reads (`lightning-tp plan` shows the plan)."
            )
        try:
            _check_grads(named, grads, ref_grads, check.transposed, group, watch_loosest(watch))
        except PolicyMismatchError as exc:
            raise PolicyMismatchError(f"verify (block by block), in {name or '<root>'!r}: {exc}") from None
        if inference is not None:
            message = _inference_mismatch(f"block {name or '<root>'!r}", *inference)
            raise PolicyMismatchError(f"verify (block by block): {message}") from inference[0]
        del grads, ref_grads  # one dense layer (and its gradient) at a time
        checked += 1
    if skipped:
        warnings.warn(
            f"verify (block by block): {len(skipped)} of {len(seen)} blocks were not checked: the same block built "
            f"dense cannot take the inputs it receives in the rewritten model: {skipped}. The {checked} others matched.",
            PolicyWarning,
            stacklevel=3,
        )
    return checked


def watch_loosest(watch: _DtypeWatch) -> torch.dtype | None:
    """The least precise floating dtype a watched forward computed in."""
    return max(watch.seen, key=lambda d: _LOOSENESS.index(d) if d in _LOOSENESS else -1, default=None)
