"""Which module becomes what: rules (where a policy comes from), styles (one object per kind of
rewrite), the plan (the complete rewrite, found once), applying it, the parity self-check and the
plan table. Imports point one way: styles <- rules <- ties, report <- plan <- verify <- apply.

A policy maps fnmatch patterns on fully qualified module names to a style (first match wins)::

    {"blocks.*.attn.qkv": "qkv", "blocks.*.attn.proj": "row",
     "blocks.*.mlp.fc1": "column", "blocks.*.mlp.fc2": "row",
     "tok_emb": "vocab", "head": {"style": "vocab", "gather_output": False}}
"""

from lightning_tp.policy.apply import apply_plan, apply_policy, warn_plan
from lightning_tp.policy.plan import Plan, PlannedModule, applied_plan, plan_policy
from lightning_tp.policy.rules import (
    PolicyError,
    PolicyWarning,
    Rule,
    auto_rules,
    hf_plan,
    register_policy,
    registered_policies,
    resolve_rules,
    translate_hf_plan,
)
from lightning_tp.policy.styles import STYLES, Style

__all__ = [
    "STYLES",
    "Plan",
    "PlannedModule",
    "PolicyError",
    "PolicyWarning",
    "Rule",
    "Style",
    "applied_plan",
    "apply_plan",
    "apply_policy",
    "auto_rules",
    "hf_plan",
    "plan_policy",
    "register_policy",
    "registered_policies",
    "resolve_rules",
    "translate_hf_plan",
    "warn_plan",
]
