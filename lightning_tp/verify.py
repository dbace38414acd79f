"""Parity self-check: does the rewritten model compute what the unsharded model computed?

Before the rewrite, one forward of the unsharded model on a fixed random batch records every
module's output (forward hooks, eval mode, no grad, RNG untouched). After the rewrite the same
batch runs again. The model outputs are compared (vocab-sharded logits gathered first); if they
differ beyond the tolerance, the module outputs are compared in execution order (outputs of
column-parallel layers gathered into the dense layout; activations that are sharded inside a TP
region are skipped) and :class:`PolicyMismatchError` names the first module that differs. A forward
that raises is reported with the module it raised in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lightning_tp.comm import all_gather_dim, all_reduce
from lightning_tp.errors import PolicyMismatchError
from lightning_tp.loss import VocabShardedLogits
from lightning_tp.sharding import ShardSpec

if TYPE_CHECKING:
    from lightning_tp.policy import Plan

# (atol, rtol relative to the reference's max magnitude), by the output dtype
TOLERANCES = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 3e-2), torch.float16: (1e-3, 1e-2)}  # fmt: skip

Records = dict[tuple[str, int], Any]


def make_example_input(model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> Tensor:
    """A fixed random batch, identical on every rank: token ids for a model with embeddings (below
    the smallest embedding size), else floats of the first linear layer's input width."""
    from lightning_tp.policy import _as_linear

    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if embeddings:
        high = min(m.num_embeddings for m in embeddings)
        return torch.randint(0, high, (batch, seq), generator=gen).to(device)
    for module in model.modules():
        if (lin := _as_linear(module)) is not None:
            return torch.randn(batch, seq, lin[0], generator=gen, dtype=module.weight.dtype).to(device)
    raise ValueError("cannot build an example input for a model with no nn.Linear/nn.Embedding; pass one.")


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


def capture(model: nn.Module, inputs: Any) -> tuple[list[Tensor], Records, BaseException | None, str | None]:
    """Run one forward in eval mode without grad, leaving RNG and training flags as they were.
    Returns (output leaves, module records, exception, module it was raised in)."""
    records: Records = {}
    stack: list[str] = []
    training = {m: m.training for m in model.modules()}
    error, where, out = None, None, []
    with torch.random.fork_rng(devices=[]), torch.no_grad(), _recording(model, records, stack):
        model.eval()
        try:
            out = [t.detach() for t in _leaves(_run(model, inputs))]
        except Exception as exc:  # noqa: BLE001 - reported as a policy mismatch
            error, where = exc, (stack[-1] if stack else "")
        finally:
            for m, flag in training.items():
                m.train(flag)
    return out, records, error, where


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


def _diff(got: Tensor | None, ref: Tensor | None) -> tuple[float, float] | None:
    """(max abs difference, allowed) or None when not comparable (shape/dtype differ)."""
    if got is None or ref is None or got.shape != ref.shape:
        return None
    if not ref.is_floating_point():
        return (0.0 if torch.equal(got, ref) else float("inf"), 0.0)
    atol, rtol = TOLERANCES.get(ref.dtype, (1e-5, 1e-4))
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return float((got.to(ref.dtype) - ref).abs().max()) if ref.numel() else 0.0, atol + rtol * scale


def check_parity(
    model: nn.Module, inputs: Any, reference: tuple[list[Tensor], Records, Any, Any], plan: Plan, group: ProcessGroup
) -> float:
    """Run the rewritten model on ``inputs`` and compare with ``reference`` (from :func:`capture` on
    the unsharded model). Returns the max abs difference of the outputs.

    Raises:
        PolicyMismatchError: outputs differ beyond the tolerance, or the forward raised.
    """
    ref_out, ref_records, ref_error, _ = reference
    if ref_error is not None:
        raise ValueError(f"the unsharded model's forward failed on the verification input: {ref_error!r}")
    out, records, error, where = capture(model, inputs)
    if error is not None:
        raise PolicyMismatchError(
            f"the rewritten model's forward failed in module {where or '<root>'!r}: {type(error).__name__}: "
            f"{error}. Its forward does not fit the policy (for example it reshapes with a full hidden size "
            "or head count read from the input or the config). Fix the policy (map that block to 'replicate') "
            "or make the forward use local sizes (view(..., -1, head_dim)); pass verify=False to skip this check."
        ) from error
    specs = {
        m.name: ShardSpec(dim=-1, sizes=m.spec.sizes, tp_size=plan.tp_size, pad=m.spec.pad)
        for m in plan.modules
        if m.style in ("column", "qkv") and not m.options.get("gather_output", False)
    }
    worst, bad = 0.0, None
    if len(out) != len(ref_out):
        bad = (float("inf"), 0.0)
    for got, ref in zip(out, ref_out, strict=False):
        d = _diff(_dense(got, None, group), ref) or (float("inf"), 0.0)
        worst = max(worst, d[0])
        if d[0] > d[1] and bad is None:
            bad = d
    flag = all_reduce(torch.tensor([1.0 if bad else 0.0]), group, dist.ReduceOp.MAX)
    if float(flag) == 0.0:
        return worst
    first = _first_mismatch(records, ref_records, specs, group)
    diff, allowed = bad if bad is not None else (float("nan"), float("nan"))
    raise PolicyMismatchError(
        f"the rewritten model's output differs from the unsharded model's: max abs difference {diff:.3e} "
        f"> tolerance {allowed:.3e} (atol + rtol * max|reference|, by dtype: {TOLERANCES.get(ref_out[0].dtype) if ref_out else None}). "
        f"First module whose output differs: {first!r}. The policy does not fit this model's forward; "
        "check that module's style and the head/width attributes it reads (`lightning-tp plan` shows the plan)."
    )


def _first_mismatch(records: Records, ref_records: Records, specs: dict[str, ShardSpec], group: ProcessGroup) -> str:
    first = "<model output>"
    for key, ref_leaves in ref_records.items():  # completion order of the unsharded forward
        got_leaves = records.get(key)
        if got_leaves is None:
            continue
        spec = specs.get(key[0])
        for got, ref in zip(got_leaves, ref_leaves, strict=False):
            if spec is not None or isinstance(got, VocabShardedLogits):
                got = _dense(got, spec, group)  # collective: same modules on every rank
            d = _diff(got, ref)
            if d is not None and d[0] > d[1] and first == "<model output>":
                first = key[0] or "<root>"
    return first
