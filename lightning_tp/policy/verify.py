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

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.overrides import TorchFunctionMode

from lightning_tp.engine.comm import all_gather_dim, all_reduce, all_reduce_coalesced
from lightning_tp.engine.layers import gather_sharded
from lightning_tp.engine.loss import VocabShardedLogits
from lightning_tp.engine.sharding import ShardSpec, has_partial_grad, shard_spec
from lightning_tp.errors import PolicyMismatchError, VerifyInputError
from lightning_tp.policy.plan import Plan
from lightning_tp.policy.rules import HEAD_ATTRS, infer_vocab_size
from lightning_tp.policy.styles import Qkv, as_linear

# (atol, rtol relative to the reference's max magnitude), by the output dtype
TOLERANCES = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 3e-2), torch.float16: (1e-3, 1e-2)}  # fmt: skip

_LOOSENESS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]  # TOLERANCES from tight to loose

Records = dict[tuple[str, int], Any]


def make_example_input(model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> Tensor:
    """A fixed random batch, identical on every rank: token ids for a model with embeddings (below
    the smallest embedding size), else floats of the first linear layer's input width."""
    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if embeddings:
        vocab = infer_vocab_size(model)
        high = vocab if vocab is not None else min(m.num_embeddings for m in embeddings)
        ids = torch.randint(0, high, (batch, seq), generator=gen).to(device)
        try:
            takes_decoder_ids = "decoder_input_ids" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            takes_decoder_ids = False
        if takes_decoder_ids:  # an encoder-decoder (T5, BART): the decoder needs its own ids
            return {
                "input_ids": ids,
                "decoder_input_ids": torch.randint(0, high, (batch, seq), generator=gen).to(device),
            }
        return ids
    for module in model.modules():
        if (lin := as_linear(module)) is not None:
            return torch.randn(batch, seq, lin[0], generator=gen, dtype=module.weight.dtype).to(device)
    raise VerifyInputError(
        "cannot build an example input for a model with no nn.Linear/nn.Embedding: set example_input_array on the "
        "LightningModule (or pass example_input= to apply_policy), or verify=False."
    )


def _leaves(tree: Any) -> Iterator[Tensor | None]:
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, list | tuple):
        for v in tree:
            yield from _leaves(v)
    # other objects (caches, None) carry no comparable tensor


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


def _run(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


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


def interleaved_groups(plan: Plan, model: nn.Module, reshaped: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Fused projections that the model reads per head, not as ``[Q | K | V]`` chunks:
    ``{module name: n}`` where the first reshape of the output is ``(..., n, F/n)`` or
    ``(..., n, c, F/(n c))`` with ``n`` a head (or key/value-head) count of the block and each group
    holding more than one head's slice (GPT-BigCode / GPT-NeoX ``view(..., heads, 3 * head_dim)``,
    BLOOM ``(heads, 3, head_dim)``, Falcon ``(kv_heads, q_per_kv + 2, head_dim)``). A plain column
    split then gives every rank whole groups."""
    found: dict[str, int] = {}
    for entry in plan.modules:
        shape = reshaped.get(entry.name)
        if not isinstance(entry.kind, Qkv) or not shape or len(shape) < 2:
            continue
        parent = model.get_submodule(entry.name.rpartition(".")[0])
        heads = {getattr(parent, a) for a in HEAD_ATTRS if isinstance(getattr(parent, a, None), int)}
        n, rest = shape[0], math.prod(shape[1:])
        if n == len(entry.spec.sizes) and len(set(entry.spec.sizes)) == 1 and rest == entry.spec.sizes[0]:
            continue  # (3, heads, head_dim): [Q | K | V] chunks, even when the head count is 3
        per_head = entry.full_shape[0] // max(heads) if heads else 0
        if n in heads and rest > per_head // len(entry.spec.sizes) and n * rest == entry.full_shape[0]:
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
    loosest = max(watch.seen, key=lambda d: _LOOSENESS.index(d) if d in _LOOSENESS else -1, default=None)
    return out, records, error, where, got_grads, loosest, watch.reshaped


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
    model: nn.Module, inputs: Any, reference: tuple, plan: Plan, group: ProcessGroup, run: nn.Module | None = None
) -> float:
    """Run the rewritten model (``run``, as in :func:`capture`) on ``inputs`` (forward and backward)
    and compare with ``reference`` (from :func:`capture` on the unsharded model). Returns the max
    abs difference of the outputs.

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
        ) from error
    specs = {m.name: spec for m in plan.modules if (spec := m.kind.output_spec(m)) is not None}
    worst, bad = 0.0, None
    if len(out) != len(ref_out):
        bad = (float("inf"), 0.0)
    for got, ref in zip(out, ref_out, strict=False):
        d = _diff(_dense(got, None, group), ref, loosest) or (float("inf"), 0.0)
        worst = max(worst, d[0])
        if d[0] > d[1] and bad is None:
            bad = d
    device = _device(model)
    flag = all_reduce(torch.tensor([1.0 if bad else 0.0], device=device), group, dist.ReduceOp.MAX)
    if float(flag) == 0.0:
        _check_grads(model, grads, ref_grads, plan, group, loosest)
        return worst
    first = _first_mismatch(records, ref_records, specs, group, loosest)
    diff, allowed = bad if bad is not None else (float("nan"), float("nan"))
    raise PolicyMismatchError(
        f"the rewritten model's output differs from the unsharded model's: max abs difference {diff:.3e} "
        f"> tolerance {allowed:.3e} (atol + rtol * max|reference|, {_tolerance(ref_out[0].dtype if ref_out else None, loosest)}). "
        f"First module whose output differs: {first!r}.{_fused_hint(first, plan)} The policy does not fit this "
        "model's forward; check that module's style and the head/width attributes it reads (`lightning-tp plan` "
        "shows the plan)."
    )


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
    model: nn.Module,
    grads: dict[str, Tensor | None],
    ref_grads: dict[str, Tensor | None],
    plan: Plan,
    group: ProcessGroup,
    loosest: torch.dtype | None,
) -> None:
    """Every parameter's gradient (sharded ones gathered, marked-partial ones summed over TP) against
    the unsharded model's; raises :class:`PolicyMismatchError` naming the first that differs."""
    if not ref_grads:
        return
    transposed = {f"{m.name}.weight" for m in plan.modules if m.module_type == "Conv1D" and m.spec is not None}
    whole = [(n, p) for n, p in model.named_parameters() if shard_spec(p) is None and grads.get(n) is not None]
    summed = all_reduce_coalesced([grads[n] for n, _ in whole], group)  # one flat all-reduce
    totals = dict(zip([n for n, _ in whole], summed, strict=True))
    first, detail = len(ref_grads) + 1, ""
    for index, (name, param) in enumerate(model.named_parameters()):
        got, ref = grads.get(name), ref_grads.get(name)
        spec = shard_spec(param)
        if spec is not None and got is not None:
            got = gather_sharded(got, spec, group)
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
    worst = all_reduce(torch.tensor([float(first)], device=_device(model)), group, dist.ReduceOp.MIN)
    if int(worst) > len(ref_grads):
        return
    if int(worst) != first:
        detail = f"parameter #{int(worst)} differs on another tensor-parallel rank"
    raise PolicyMismatchError(
        f"the rewritten model's outputs match, but its gradients do not: first parameter whose gradient differs "
        f"from the unsharded model's: {detail}. The policy does not fit this model's backward "
        "(`lightning-tp plan` shows the plan)."
    )


def _device(model: nn.Module) -> torch.device:
    """Where the flags of the check's collectives live (CPU for gloo, the GPU for NCCL)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


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
