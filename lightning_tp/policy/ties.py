"""Ties: parameters shared by several modules must be split the same way by each of them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_tp.engine.init import module_aliases
from lightning_tp.engine.sharding import ShardSpec
from lightning_tp.policy.rules import PolicyError
from lightning_tp.policy.styles import as_linear


def _weight_key(spec: ShardSpec | None) -> tuple | None:
    return None if spec is None else (spec.dim % 2, spec.sizes, spec.padded_sizes, spec.shared)


def param_owners(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """``id(param) -> [(module name, param name), ...]``: every place that holds each parameter."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append((mod_name, p_name))
    return owners


def _describe(planned: Mapping[str, Any], aliases: dict[str, tuple[str, ...]], m: str, p: str) -> str:
    row = planned.get(m)
    how = "unmatched/replicate" if row is None else row.style
    how += f", pattern {row.pattern!r}" if row is not None and row.pattern else ""
    how += f", also registered as {list(aliases[m][1:])}" if m in aliases else ""
    return f"'{m}.{p}' ({how})"


def check_ties(model: nn.Module, planned: Mapping[str, Any]) -> None:
    """Modules that share a parameter must split it the same way. A module that only holds the
    parameter (not an ``nn.Linear``/``nn.Embedding``, e.g. BERT's ``cls.predictions`` holding the
    decoder's bias) follows the layer that uses it: :func:`apply_plan` points it at the new shard."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for places in param_owners(model).values():
        seen: set[tuple[int, str]] = set()  # a module registered under several names holds it once
        group = [(m, p) for m, p in places if (id(modules[m]), p) not in seen and not seen.add((id(modules[m]), p))]
        if len({m for m, _ in group}) < 2:
            continue
        layouts = {}
        for mod_name, p_name in group:
            entry = planned.get(mod_name)
            module = modules[mod_name]
            if entry is None and as_linear(module) is None and not isinstance(module, nn.Embedding):
                continue  # a holder, not a user of the parameter
            if entry is not None and hasattr(entry.kind, "param_specs"):  # a spec per parameter (experts)
                spec = entry.kind.param_specs(entry.name, module, entry.options, entry.spec.tp_size)[p_name]
                layouts[(mod_name, p_name)] = (spec.dim, spec.sizes)
            elif entry is not None and p_name == "bias" and entry.spec is not None and entry.spec.dim == 0:
                layouts[(mod_name, p_name)] = ("bias", entry.spec.sizes, entry.spec.padded_sizes)
            elif entry is not None and entry.spec is None and entry.kind.replaces:
                # replicated k/v: one head per rank, a layout of its own
                layouts[(mod_name, p_name)] = ("computed in part", mod_name)
            elif entry is not None and p_name == "bias":
                layouts[(mod_name, p_name)] = None  # whole on every rank (a row layer's bias)
            else:
                layouts[(mod_name, p_name)] = _weight_key(entry.spec) if entry is not None else None
        if len(set(layouts.values())) > 1:
            desc = ", ".join(_describe(planned, module_aliases(model), m, p) for m, p in layouts)
            raise PolicyError(
                f"the policy would break a tied parameter shared by {desc}: each side would be split differently. "
                "Give all modules that share a parameter the same style (e.g. 'vocab' for both a tied embedding "
                "and LM head), or 'replicate' for all of them."
            )
        users = [m for m, _ in layouts]
        for mod_name in users[1:]:
            if mod_name in planned and planned[mod_name].tied_to is None and mod_name != users[0]:
                planned[mod_name].tied_to = users[0]
