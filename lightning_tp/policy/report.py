"""Printing a :class:`~lightning_tp.policy.plan.Plan`: module, style, full shape, local shape, params.

Reads the plan's fields only (no import of the plan module: the plan imports this one)."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console
from rich.table import Table

Plan = Any  # a lightning_tp.policy.plan.Plan


def _shape(shape: tuple[int, ...]) -> str:
    return " x ".join(str(s) for s in shape) if shape else "-"


def plan_table(plan: Plan) -> Table:
    """A rich table of the plan, with a caption of parameters per rank vs unsharded."""
    sp = ", sequence_parallel" if plan.sequence_parallel else ""
    table = Table(title=f"lightning_tp plan: tensor_parallel_size={plan.tp_size}{sp}, policy: {plan.source}")
    for col in ("module", "type", "style", "full shape", "local shape", "params / rank"):
        table.add_column(col, justify="right" if col == "params / rank" else "left")
    for m in plan.modules:
        style = (
            m.style
            + (f" {dict(m.options)}" if m.options else "")
            + (f" (tied to {m.tied_to})" if m.tied_to else "")
            + (f" ({m.note})" if m.note else "")
        )
        table.add_row(m.name, m.module_type, style, _shape(m.full_shape), _shape(m.local_shape), f"{m.local_params:,}")
    for name in plan.unmatched:
        table.add_row(name, "", "[yellow]unmatched (replicated)[/yellow]", "", "", "")
    ratio = plan.local_params / plan.full_params if plan.full_params else 1.0
    caption = [f"parameters per rank: {plan.local_params:,} of {plan.full_params:,} unsharded ({ratio:.1%})"]
    caption += [f"{p or '<root>'}.{a}: {old} -> {new}" for p, a, old, new in plan.attribute_changes]
    if plan.unused_patterns:
        caption.append(f"patterns matching nothing: {plan.unused_patterns}")
    names = getattr(plan, "names_would_split", None)
    if names:
        caption.append(
            f"the name rules would split {len(names)} modules this plan leaves whole: policy 'names' uses them"
        )
    table.caption = "\n".join(caption)
    return table


def render_plan(plan: Plan, width: int = 140) -> str:
    """The plan table as plain text."""
    buf = io.StringIO()
    Console(file=buf, width=width, no_color=True, highlight=False).print(plan_table(plan))
    return buf.getvalue()
