"""Precision plugins that know about tensor parallelism.

Every Lightning precision the strategy supports (``32-true``, ``bf16-mixed``, ``16-mixed``,
``bf16-true``, ``16-true``) is wrapped so that

* gradient clipping by norm uses the norm of the whole unsharded model's gradient: squared norms of
  TP-sharded parameters are summed over the TP group, replicated parameters are counted once, parts
  split over DP by ZeRO are summed over the DP group, so the norm (and the clip coefficient) is
  identical on every rank; the norm is logged as ``grad_norm``;
* replicated parameters whose grads are partial sums (marked by the plan: per-head norms such as
  Qwen3's ``q_norm``, sequence-parallel norms and biases) are all-reduced over TP after backward,
  before clipping and the step; at the first step with gradients the marks are checked against the
  gradients themselves (:func:`check_partial_grad_marks`);
* ``16-mixed`` uses :class:`TPGradScaler`, whose found-inf flag is reduced over all ranks, so every
  rank skips (or takes) the step and changes its loss scale together, on CPU too.

On CPU Lightning itself turns ``precision="16-mixed"`` into ``bf16-mixed`` before any strategy sees
it. To train with fp16 autocast and dynamic loss scaling on CPU, pass the plugin explicitly:
``Trainer(plugins=[TPMixedPrecision("16-mixed", "cpu")], ...)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor
from torch.distributed import ProcessGroup

from lightning_tp._compat import check_inf_per_device, found_inf_per_device
from lightning_tp.engine.comm import all_reduce_coalesced, collective_device, sum_shared_pieces_
from lightning_tp.engine.sharding import ShardSpec, has_partial_grad, shard_spec
from lightning_tp.lightning.zero import dp_rows_start, is_dp_sharded, local


def tp_grad_norm(
    params: list[Tensor], tp_group: ProcessGroup | None, norm_type: float = 2.0, dp_group: ProcessGroup | None = None
) -> Tensor:
    """Norm of the unsharded model's gradient from this rank's parameters (identical on all ranks).

    Sharded parameters contribute ``sum over TP`` of their local squared norms (a shared chunk's
    rows weighted ``1 / shared``: each piece counted once); replicated ones are counted once (their
    grads are equal on every TP rank). Gradients split over data parallelism (ZeRO: DTensors over
    ``dp_group``) contribute ``sum over DP`` of their local parts.
    """
    grads = []  # (this rank's gradient, split over TP, split over DP, the spec of a shared one)
    for p in params:
        if p.grad is not None:
            spec = shard_spec(p)
            shared = spec if spec is not None and spec.is_shared else None
            start = dp_rows_start(p.grad) if shared is not None else 0
            grads.append((local(p.grad), spec is not None, is_dp_sharded(p.grad), shared, start))
    if not grads:
        return torch.tensor(0.0)
    device = grads[0][0].device
    tp_group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    dp_group = dp_group if dp_group is not None and any(d for _, _, d, *_ in grads) else None
    if norm_type == float("inf"):  # a max: any rank's copy of a replicated gradient gives the same
        top = max((g.detach().abs().max().float() for g, *_ in grads if g.numel()), default=None)
        top = torch.zeros((), device=device) if top is None else top.clone()
        for group in (tp_group, dp_group):
            if group is not None:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        return top
    acc = torch.float64 if any(g.dtype == torch.float64 for g, *_ in grads) else torch.float32

    def power(g: Tensor, shared: ShardSpec | None, start: int) -> Tensor:
        """``|g|^p`` summed, a shared chunk's rows divided by the ranks that hold them (counted once)."""
        if shared is None:
            return torch.linalg.vector_norm(g.detach(), norm_type, dtype=acc) ** norm_type
        dim = shared.dim % g.dim()
        rows = (start, start + g.shape[0]) if dim == 0 else None  # ZeRO: this DP rank's rows
        parts = [
            torch.linalg.vector_norm(g.detach().narrow(dim, first, size), norm_type, dtype=acc) ** norm_type
            / shared.shared[c]
            for c, first, size in shared.chunk_ranges(rows)
        ]
        return torch.stack(parts).sum() if parts else torch.zeros((), dtype=acc, device=g.device)

    def total(tp_split: bool, dp_split: bool) -> Tensor:
        parts = [power(g, shared, start) for g, s, d, shared, start in grads if s == tp_split and d == dp_split]
        return torch.stack(parts).sum() if parts else torch.zeros((), dtype=acc, device=device)

    # [split over TP, whole on every TP rank] x [split over DP or not]
    sums = torch.stack([total(True, True), total(False, True), total(True, False), total(False, False)])
    if dp_group is not None:
        dp_part = sums[:2].clone()
        dist.all_reduce(dp_part, group=dp_group)
        sums = torch.cat([dp_part, sums[2:]])
    tp_part = sums[0] + sums[2]
    if tp_group is not None:
        tp_part = tp_part.clone()
        dist.all_reduce(tp_part, group=tp_group)
    return (tp_part + sums[1] + sums[3]) ** (1.0 / norm_type)


def clip_grads_by_norm_(
    params: list[Tensor], max_norm: float, tp_group: ProcessGroup | None, dp_group: ProcessGroup | None = None
) -> Tensor:
    """Scale grads in place so that the unsharded gradient's 2-norm is at most ``max_norm`` (same
    coefficient as ``torch.nn.utils.clip_grad_norm_``). Returns the norm before clipping."""
    norm = tp_grad_norm(params, tp_group, dp_group=dp_group)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            g = local(p.grad)
            g.detach().mul_(coef.to(g.device, g.dtype))
    return norm


def all_reduce_partial_grads(params: list[Tensor], tp_group: ProcessGroup | None) -> None:
    """Sum over TP the grads of replicated parameters that each rank computed only partially
    (one flat all-reduce per dtype and device, not one per parameter), and the grads of shared
    chunks over the ranks that hold each piece (replicated key/value heads)."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return
    dense, shared = [], []
    for p in params:
        spec = shard_spec(p)
        if p.grad is not None and spec is not None and spec.is_shared:
            shared.append((local(p.grad), spec, dp_rows_start(p.grad)))
        if p.grad is None or not has_partial_grad(p):
            continue
        grad = local(p.grad)  # under ZeRO: this DP rank's part, the same part on every TP rank
        if grad.is_sparse:
            dist.all_reduce(grad, group=tp_group)
        else:
            dense.append(grad)
    for grad, total in zip(dense, all_reduce_coalesced(dense, tp_group), strict=True):
        grad.copy_(total)
    sum_shared_pieces_(shared, tp_group)


class TPGradScaler(torch.amp.GradScaler):
    """``GradScaler`` whose found-inf flags are reduced (max) over ``group`` (default: all ranks)
    after unscaling, and after the inf check ``step`` runs itself for a fused optimizer, so an inf
    in one rank's gradient shard makes every rank skip the step and back off its scale identically."""

    group: ProcessGroup | None = None

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        self._reduce_found_inf(optimizer)

    def _check_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict:
        # A fused optimizer (AdamW(fused=True)) unscales inside its step: Lightning skips unscale_ and
        # GradScaler.step looks for infs through this method instead; the flags must agree there too.
        flags = check_inf_per_device(self, optimizer)
        self._reduce_found_inf(optimizer)
        return flags

    def _reduce_found_inf(self, optimizer: torch.optim.Optimizer) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        for found_inf in found_inf_per_device(self, optimizer).values():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=self.group)


# relative tolerance for "the same gradient on every TP rank", by gradient dtype
_SAME_GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def check_partial_grad_marks(
    named_params: list[tuple[str, Tensor]], tp_group: ProcessGroup, sequence_parallel: bool = False
) -> bool:
    """The first-step safety net for partial gradients (one reduction, before any is summed).

    Every replicated parameter's gradient is compared across the TP group (its sum and sum of
    squares, within the dtype's tolerance): one that differs is partial (the parameter sees only
    this rank's heads, features or sequence chunk) and must be marked for a sum over TP; one that
    is identical on every rank is complete and must not be (summing it multiplies it by TP).

    Returns ``False`` (check not done, try at the next step) when some gradient is not finite (a
    ``16-mixed`` step about to be skipped), on every rank alike.

    Raises:
        PartialGradError (``SequenceParallelGradError`` under sequence parallelism): naming the
            parameters, on every rank alike.
    """
    from lightning_tp.errors import PartialGradError, SequenceParallelGradError

    whole = [(n, p) for n, p in named_params if p.grad is not None and shard_spec(p) is None and not p.grad.is_sparse]
    if dist.get_world_size(tp_group) == 1:
        return True
    grads = [local(p.grad).double() for _, p in whole]  # under ZeRO: the same DP part on every TP rank
    device = grads[0].device if grads else collective_device(tp_group)  # nothing to compare here: still reduce
    stats = [torch.stack([g.sum(), g.square().sum()]) for g in grads]
    sums = torch.stack(stats) if stats else torch.zeros((0, 2), dtype=torch.float64, device=device)
    hi, lo = sums.clone(), sums.clone()  # (n, 2)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=tp_group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=tp_group)
    nonfinite = not bool(torch.isfinite(hi).all() and torch.isfinite(lo).all())
    rtol = torch.tensor([_SAME_GRAD_RTOL.get(p.grad.dtype, 1e-5) for _, p in whole], dtype=torch.float64)
    numel = torch.tensor([float(g.numel()) for g in grads], dtype=torch.float64, device=device)
    # scale of each statistic: a sum can cancel, so its scale is sqrt(numel * sum of squares) >= |sum|
    sq = torch.maximum(hi[:, 1].abs(), lo[:, 1].abs())  # (n,)
    scale = torch.stack([(numel * sq).sqrt(), sq], dim=1)  # (n, 2)
    differs = ((hi - lo).abs() > rtol.to(device).unsqueeze(1) * scale + 1e-30).any(dim=1).tolist()
    nonzero = (hi.abs() + lo.abs()).sum(dim=1).gt(0).tolist()
    unmarked = [n for (n, p), d in zip(whole, differs, strict=True) if d and not has_partial_grad(p)]
    wrongly = [n for (n, p), d, z in zip(whole, differs, nonzero, strict=True) if has_partial_grad(p) and z and not d]
    # every rank (all DP groups too) defers, passes or raises together: one tiny reduction over the world
    verdict = torch.tensor([float(nonfinite), float(bool(unmarked or wrongly))], device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
    if verdict[0] > 0:
        return False
    if verdict[1] == 0:
        return True
    parts = (
        [] if (unmarked or wrongly) else ["another tensor-parallel group found partial gradients that are not summed"]
    )
    if unmarked:
        why = "sequence-sharded activations or " if sequence_parallel else ""
        parts.append(
            f"the gradients of {unmarked} differ across the tensor-parallel ranks (each rank's covers only its "
            f"{why}heads/features) but are not summed over TP: mark them with "
            "lightning_tp.mark_partial_grad(param) in configure_model, or give their modules the policy "
            "style {'style': 'replicate', 'partial_grad': True}"
        )
    if wrongly:
        parts.append(
            f"the gradients of {wrongly} are complete and identical on every tensor-parallel rank but are marked "
            "partial and would be summed over TP (multiplied by the TP size): call "
            "lightning_tp.mark_partial_grad(param, False) on them in configure_model, or drop "
            "'partial_grad' from their policy entry"
        )
    error = SequenceParallelGradError if sequence_parallel else PartialGradError
    raise error("; ".join(parts) + ". (lightning_tp checks this once, at the first optimizer step.)")


class PartialGradCheck:
    """The first-step safety net over a model's trainable parameters (see
    :func:`check_partial_grad_marks`): each parameter is checked once, at its first optimizer step
    with a gradient (several optimizers, steps without a backward); done when a step finds none left.

    Args:
        named_params: ``(name, parameter)`` of the parameters to check.
        sequence_parallel: the plan is sequence parallel (names that in the error).
    """

    def __init__(self, named_params: list[tuple[str, Tensor]], sequence_parallel: bool = False) -> None:
        self.names = {id(p): n for n, p in named_params if p.requires_grad}
        self.sequence_parallel = sequence_parallel
        self.done, self._checked_any = not self.names, False

    def __call__(self, params: list[Tensor], tp_group: ProcessGroup) -> None:
        if self.done:
            return
        named = [(self.names[id(p)], p) for p in params if id(p) in self.names]
        if not check_partial_grad_marks(named, tp_group, self.sequence_parallel):
            return  # non-finite gradients (a skipped 16-mixed step): try again at the next step
        checked = [id(p) for _, p in named if p.grad is not None]
        for key in checked:
            self.names.pop(key)
        self.done = not self.names or (not checked and self._checked_any)  # the rest get no gradient
        self._checked_any = self._checked_any or bool(checked)


class _TPPrecisionMixin:
    """TP-aware clipping, partial-grad reduction and ``grad_norm`` logging for a precision plugin.
    The strategy calls :meth:`configure_tp` once the TP group and the rewritten model exist."""

    tp_group: ProcessGroup | None = None
    dp_group: ProcessGroup | None = None
    last_grad_norm: Tensor | None = None
    partial_grad_check: PartialGradCheck | None = None

    def configure_tp(
        self,
        tp_group: ProcessGroup,
        partial_grad_check: PartialGradCheck | None = None,
        dp_group: ProcessGroup | None = None,
    ) -> None:
        """Use ``tp_group`` for clipping and partial grads (``dp_group``: the group ZeRO splits
        gradients over); run ``partial_grad_check`` at the first steps."""
        self.tp_group, self.partial_grad_check, self.dp_group = tp_group, partial_grad_check, dp_group

    _partials_summed = False  # this step's partial gradients are summed already (a manual clip came first)

    def _sum_partials(self, optimizer) -> None:
        if self._partials_summed:
            return
        params = list(self.main_params(optimizer))
        if self.partial_grad_check is not None and self.tp_group is not None:
            self.partial_grad_check(params, self.tp_group)
        all_reduce_partial_grads(params, self.tp_group)
        self._partials_summed = True

    def clip_gradients(
        self, optimizer, clip_val: int | float = 0.0, gradient_clip_algorithm=GradClipAlgorithmType.NORM
    ) -> None:
        # Manual optimization clips (self.clip_gradients) before the step's closure: sum the partial
        # gradients first, so the norm and the clipped values are the unsharded model's.
        self._sum_partials(optimizer)
        super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)

    def _after_closure(self, model, optimizer) -> None:
        self._sum_partials(optimizer)
        self.last_grad_norm = None
        try:
            super()._after_closure(model, optimizer)
        finally:
            self._partials_summed = False
        if self.last_grad_norm is not None and model.trainer is not None:
            model.log("grad_norm", self.last_grad_norm.float(), on_step=True, prog_bar=False, batch_size=1)

    def clip_grad_by_norm(self, optimizer, clip_val: int | float) -> None:
        params = [p for p in self.main_params(optimizer) if p.grad is not None]
        self.last_grad_norm = clip_grads_by_norm_(params, float(clip_val), self.tp_group, self.dp_group)

    def clip_grad_by_value(self, optimizer, clip_val: int | float) -> None:
        # element-wise, exact on shards; the unsharded norm before clipping is logged as under "norm"
        params = [p for p in self.main_params(optimizer) if p.grad is not None]
        self.last_grad_norm = tp_grad_norm(params, self.tp_group, dp_group=self.dp_group)
        super().clip_grad_by_value(optimizer, clip_val)


class TPPrecision(_TPPrecisionMixin, Precision):
    """``32-true`` with TP-aware clipping."""


class TPDoublePrecision(_TPPrecisionMixin, DoublePrecision):
    """``64-true`` with TP-aware clipping."""


class TPHalfPrecision(_TPPrecisionMixin, HalfPrecision):
    """``bf16-true`` / ``16-true`` with TP-aware clipping."""


class TPMixedPrecision(_TPPrecisionMixin, MixedPrecision):
    """``bf16-mixed`` / ``16-mixed`` autocast with TP-aware clipping; ``16-mixed`` scales the loss
    with a :class:`TPGradScaler`. Works on CPU (pass it in ``plugins=`` for CPU fp16, see module doc).

    Args:
        precision: ``"16-mixed"`` or ``"bf16-mixed"``.
        device: ``"cuda"`` or ``"cpu"``.
        scaler: a scaler for ``16-mixed`` (default: a new :class:`TPGradScaler`).
    """

    def __init__(self, precision: str, device: str, scaler: torch.amp.GradScaler | None = None) -> None:
        if scaler is None and precision == "16-mixed":
            scaler = TPGradScaler(device=device)
        super().__init__(precision, device, scaler)


def to_tp_precision(plugin: Precision | None) -> Precision:
    """The TP-aware version of a Lightning precision plugin (the strategy calls this on assignment)."""
    if plugin is None or isinstance(plugin, _TPPrecisionMixin):
        return plugin if plugin is not None else TPPrecision()
    kind = type(plugin)
    if kind is Precision:
        return TPPrecision()
    if kind is DoublePrecision:
        return TPDoublePrecision()
    if kind is HalfPrecision:
        return TPHalfPrecision(plugin.precision)
    if kind is MixedPrecision:
        scaler: Any = plugin.scaler
        if scaler is not None and not isinstance(scaler, TPGradScaler):
            scaler = TPGradScaler(device=plugin.device)
        return TPMixedPrecision(plugin.precision, plugin.device, scaler)
    raise TypeError(
        f"precision plugin {kind.__name__} is not supported by the megatron_tp strategy; use precision "
        "'32-true', 'bf16-mixed', '16-mixed', 'bf16-true' or '16-true' (or a lightning_tp.lightning.precision plugin)."
    )
