"""ZeRO stages 2 and 3 over the data-parallel group, built on torch's FSDP2 (``fully_shard``).

The model is rewritten for TP first (its parameters are this rank's TP shards, plain tensors); then
every layer (an element of an ``nn.ModuleList`` / ``nn.ModuleDict``, as deferred init forms them)
and the root are ``fully_shard``-ed over a 1-D mesh of the DP group: each TP shard is split again
over DP (dim 0). Stage 2 keeps the gathered parameters between forward and backward
(``reshard_after_forward=False``: gradients and optimizer state are sharded), stage 3 frees them
after each layer's forward and gathers them again for backward (parameters sharded too).
Gradients are reduce-scattered over DP (averaged, as DDP does).

FSDP2 replaces each Parameter with a new one holding a ``DTensor``; the TP marks recorded as
Parameter attributes (shard spec, partial-gradient mark, and any other attribute) are carried
over to the new Parameters. A layer whose parameter is also used outside it (a tie) is left to the
root's group, which gathers it once for every user.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from lightning_tp.engine.init import param_slots, units

ZERO_STAGES = (0, 2, 3)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: the local tensor of a DTensor (a ZeRO-sharded parameter or
    gradient), ``t`` itself otherwise. In-place changes to it change ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def is_dp_sharded(t: Tensor) -> bool:
    """Whether ``t`` (a parameter or gradient) is split over the data-parallel group (ZeRO)."""
    return isinstance(t, DTensor)


def dp_rows_start(t: Tensor) -> int:
    """The first row (dim 0) of this rank's part of ``t`` in its whole TP shard: 0 for a plain
    tensor; for a ZeRO DTensor split on dim 0 (FSDP2: ``torch.chunk`` pieces over the DP group,
    the last ones shorter or empty), ``dp_rank * ceil(rows / dp)``, capped at the row count."""
    if not isinstance(t, DTensor):
        return 0
    if len(t.placements) != 1 or not t.placements[0].is_shard(0):
        raise NotImplementedError(f"a ZeRO tensor placed as {t.placements} (expected Shard(0) over the DP group)")
    rows, dp, rank = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    per = -(-rows // dp)
    start = min(rank * per, rows)
    if t.to_local().shape[0] != max(0, min(per, rows - start)):
        raise NotImplementedError(f"a ZeRO tensor of {rows} rows over {dp} ranks holds {t.to_local().shape[0]} here")
    return start


def dp_mesh(dp_group: ProcessGroup, device_type: str) -> DeviceMesh:
    """A 1-D device mesh over the data-parallel group (what ``fully_shard`` shards over)."""
    return DeviceMesh.from_group(dp_group, device_type, mesh_dim_names=("data_parallel",))


def _holders(model: nn.Module) -> dict[int, set[str]]:
    """``id(parameter) -> names of the modules that hold it`` (ties: several)."""
    found: dict[int, set[str]] = {}
    for name, _, _, p in param_slots(model):
        found.setdefault(id(p), set()).add(name)
    return found


def _param_attrs(model: nn.Module) -> dict[tuple[str, str], dict]:
    """``{(module name, parameter name): the parameter's attributes}`` (the TP marks among them)."""
    return {(name, p_name): dict(p.__dict__) for name, _, p_name, p in param_slots(model) if p.__dict__}


def _restore_attrs(model: nn.Module, attrs: dict[tuple[str, str], dict]) -> None:
    for name, _, p_name, p in param_slots(model):
        for key, value in attrs.get((name, p_name), {}).items():
            if key not in p.__dict__:
                p.__dict__[key] = value


@contextmanager
def keep_param_attrs(model: nn.Module) -> Iterator[None]:
    """Keep the parameters' attributes (TP marks) across a move of a ZeRO-sharded model: moving a
    DTensor parameter (``module.to()``, ``.cpu()``) swaps its contents, ``__dict__`` included."""
    attrs = _param_attrs(model)
    try:
        yield
    finally:
        _restore_attrs(model, attrs)


def dp_shard(model: nn.Module, mesh: DeviceMesh, stage: int) -> list[str]:
    """``fully_shard`` every layer of ``model`` and ``model`` itself over ``mesh`` (ZeRO ``stage``
    2 or 3), keeping each Parameter's attributes. Returns the names of the layers sharded on their
    own (the rest belong to the root's group)."""
    if stage not in (2, 3):
        raise ValueError(f"dp_shard: zero_stage must be 2 or 3, got {stage!r}.")
    attrs = _param_attrs(model)
    holders = _holders(model)
    sharded = []
    for name, module, with_children in list(units(model)):
        if not with_children or not any(True for _ in module.parameters()):
            continue
        prefix = f"{name}."
        tied_out = any(any(h != name and not h.startswith(prefix) for h in holders[id(p)]) for p in module.parameters())
        if tied_out:
            continue  # a parameter used outside this layer too: the root's group gathers it
        fully_shard(module, mesh=mesh, reshard_after_forward=stage == 3)
        sharded.append(name)
    fully_shard(model, mesh=mesh, reshard_after_forward=stage == 3)
    _restore_attrs(model, attrs)  # FSDP2's new Parameters
    return sharded


def fsdp_modules(model: nn.Module) -> Iterator[FSDPModule]:
    return (m for m in model.modules() if isinstance(m, FSDPModule))


@contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Gradient accumulation under ZeRO: no reduce-scatter over DP in the backward passes inside."""
    modules = list(fsdp_modules(model))
    for m in modules:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.set_requires_gradient_sync(True, recurse=False)
