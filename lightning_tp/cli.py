"""The ``lightning-tp`` command: LightningCLI with the strategy names registered, plus ``plan`` and
``export``.

    lightning-tp fit --config recipes/gpt-cpu.yaml          # also validate / test / predict
    lightning-tp plan --config recipes/llama-hf.yaml        # the policy table, no training
    lightning-tp export CKPT OUT.pt                          # one dense state_dict
    lightning-tp export CKPT OUT_DIR --format hf             # a from_pretrained directory

W&B runs offline unless ``WANDB_API_KEY`` (or ``WANDB_MODE``) is set.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from lightning.pytorch.cli import LightningCLI

import lightning_tp  # noqa: F401  (registers the strategy names)
from lightning_tp.lightning.export import export
from lightning_tp.lightning.strategy import MegatronTPStrategy, forward_target
from lightning_tp.policy import plan_policy


def _cli(args: list[str], run: bool = True) -> LightningCLI:
    kwargs = dict(
        run=run,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "lightning-tp"} if run else {"prog": "lightning-tp plan"},
    )
    if args == sys.argv[1:]:  # the command line itself: LightningCLI reads it (no warning about args given twice)
        return LightningCLI(**kwargs)
    if run:
        return LightningCLI(args=args, **kwargs)
    argv, sys.argv = sys.argv, sys.argv[:1]  # `plan`: parse ``args`` alone; nothing runs while sys.argv is short
    try:
        return LightningCLI(args=args, **kwargs)
    finally:
        sys.argv = argv


def plan_main(args: list[str]) -> str:
    """Print the policy table for a config: model built, nothing trained, no process group."""
    if not torch.cuda.is_available() and not any(a.startswith("--trainer.accelerator") for a in args):
        args = [*args, "--trainer.accelerator=cpu"]  # plan a GPU recipe on a CPU machine
    cli = _cli(args, run=False)
    model = cli.model
    if hasattr(model, "configure_model"):
        model.configure_model()
    strategy = cli.trainer.strategy
    tp, policy, strict, sp = 1, "auto", False, False
    if isinstance(strategy, MegatronTPStrategy):
        tp, policy, strict, sp = (
            strategy.tensor_parallel_size,
            strategy.policy,
            strategy.strict,
            strategy.sequence_parallel,
        )
    forward, example = forward_target(model)  # what the strategy's plan traces
    plan = plan_policy(model, tp, policy, strict=strict, sequence_parallel=sp, example_input=example,
                       forward_module=forward)  # fmt: skip
    text = str(plan)
    print(text)
    return text


def export_main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lightning-tp export", description="Consolidate a sharded checkpoint.")
    parser.add_argument("checkpoint", help="a lightning_tp checkpoint directory (*.ckpt)")
    parser.add_argument(
        "out", help="output: a file for the dense state_dict (torch.save), or a directory (--format hf)"
    )
    parser.add_argument("--format", choices=["pt", "hf"], default="pt", help="hf: a from_pretrained directory")
    parser.add_argument(
        "--weights-only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--no-weights-only: unpickle the objects the checkpoint's trainer state holds (a LightningModule's "
        "own hyperparameters); only for files you trust",
    )
    ns = parser.parse_args(args)
    out = export(ns.checkpoint, ns.out, format=ns.format, weights_only=ns.weights_only)
    if ns.format == "hf":
        print(f"wrote {out}: config.json + safetensors; load with <ModelClass>.from_pretrained({str(out)!r})")
        return
    state = torch.load(out, weights_only=True, map_location="cpu")
    n = sum(t.numel() for t in state.values())
    print(
        f"wrote {out}: {len(state)} tensors, {n:,} values; load with model.load_state_dict(torch.load(...), strict=True)"
    )


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "WANDB_API_KEY" not in os.environ:
        os.environ.setdefault("WANDB_MODE", "offline")
    if args and args[0] == "export":
        export_main(args[1:])
    elif args and args[0] == "plan":
        plan_main(args[1:])
    else:
        _cli(args)


if __name__ == "__main__":
    main()
