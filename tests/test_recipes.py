"""Every recipe parses with the CLI; CPU recipes smoke-run a few steps; GPU recipes are planned."""

import inspect
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _forkserver import server

from lightning_tp import MegatronTPStrategy
from lightning_tp.cli import _cli, main, plan_main
from lightning_tp.policy import plan_policy

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
MAIN_RECIPE = "gpt-cpu.yaml"  # the README's main job
CPU_RECIPES = ["gpt-cpu.yaml", "gpt-tp2-dp2.yaml", "llama-hf.yaml", "llama-hf-finetune.yaml"]
PRETRAINED_RECIPES = {"llama-hf-finetune.yaml"}  # need a pretrained directory: the tests make a small one


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A small pretrained Hugging Face Llama directory (what `save_pretrained` writes)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "llama-hf-base"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _overrides(recipe: Path, request) -> list[str]:
    """Command-line overrides a recipe needs here (its pretrained directory)."""
    if recipe.name not in PRETRAINED_RECIPES:
        return []
    base = request.getfixturevalue("hf_base")
    return [f"--model.init_args.pretrained={base}", f"--trainer.strategy.init_args.pretrained={base}"]


GPU_RECIPES = ["gpt-small-tp8.yaml"]


def test_recipe_set():
    assert sorted(p.name for p in RECIPES) == sorted(CPU_RECIPES + GPU_RECIPES)


# Trainer settings a recipe may set, compared with the Trainer the CLI builds (name -> Trainer attribute).
TRAINER_SETTINGS = {
    "devices": "num_devices",
    "precision": "precision",
    "max_steps": "max_steps",
    "val_check_interval": "val_check_interval",
    "limit_val_batches": "limit_val_batches",
    "num_sanity_val_steps": "num_sanity_val_steps",
    "gradient_clip_val": "gradient_clip_val",
    "log_every_n_steps": "log_every_n_steps",
}
NOT_COMPARED = {"accelerator", "strategy", "logger", "callbacks"}  # accelerator: cpu here when no GPU


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_plans(recipe, request):
    """The CLI builds what the YAML says, and ``plan`` prints the plan the policy makes for that model."""
    config = yaml.safe_load(recipe.read_text())
    if config["model"]["init_args"].get("arch", "").startswith("hf-"):
        pytest.importorskip("transformers")
    overrides = _overrides(recipe, request)
    for arg in overrides:  # what the YAML says, with the overrides applied
        key, _, value = arg.removeprefix("--").partition("=")
        node = config
        for part in key.split(".")[:-1]:
            node = node[part]
        node[key.split(".")[-1]] = value
    args = ["--config", str(recipe), *overrides]
    if not torch.cuda.is_available():
        args.append("--trainer.accelerator=cpu")
    cli = _cli(args, run=False)

    trainer_cfg = config["trainer"]
    assert set(trainer_cfg) <= set(TRAINER_SETTINGS) | NOT_COMPARED, "a trainer setting this test does not compare"
    for key, attr in TRAINER_SETTINGS.items():
        if key in trainer_cfg:
            assert getattr(cli.trainer, attr) == trainer_cfg[key], key
    strategy, strategy_cfg = cli.trainer.strategy, trainer_cfg["strategy"]
    assert isinstance(strategy, MegatronTPStrategy)
    defaults = {k: v.default for k, v in inspect.signature(MegatronTPStrategy).parameters.items()}
    expected = {**defaults, **strategy_cfg["init_args"]}
    assert strategy.tensor_parallel_size == expected["tensor_parallel_size"]
    assert strategy.policy == expected["policy"]
    assert strategy.sequence_parallel is expected["sequence_parallel"]
    model_cfg = config["model"]
    assert type(cli.model).__name__ == model_cfg["class_path"].rsplit(".", 1)[1]
    assert {k: cli.model.hparams[k] for k in model_cfg["init_args"]} == model_cfg["init_args"]

    text = plan_main(["--config", str(recipe), *overrides])
    if hasattr(cli.model, "configure_model"):
        cli.model.configure_model()
    tp = strategy.tensor_parallel_size
    assert tp > 1  # every recipe shards; the checks below assume it
    plan = plan_policy(cli.model, tp, strategy.policy, sequence_parallel=strategy.sequence_parallel)
    styles = {m.style for m in plan.modules if m.splits}
    assert {"vocab", "row"} <= styles and styles & {"column", "qkv"}, styles
    assert plan.local_params < plan.full_params
    assert f"tensor_parallel_size={tp}" in text
    assert f"parameters per rank: {plan.local_params:,} of {plan.full_params:,} unsharded" in text
    lines = text.splitlines()
    for row in (m for m in plan.modules if m.splits):
        assert math.prod(row.local_shape) < math.prod(row.full_shape), row
        line = next((x for x in lines if x.startswith(f"│ {row.name} ")), None)
        assert line is not None, f"{row.name} not in the printed plan"
        local_shape = " x ".join(map(str, row.local_shape))
        assert row.style in line and local_shape in line and f"{row.local_params:,}" in line, (row, line)


def _smoke(
    recipe: str, tmp: Path, steps: int = 6, extra: list[str] = (), fresh: bool = True
) -> subprocess.CompletedProcess:
    """``python -m lightning_tp fit`` of a recipe for a few steps: a new interpreter (``fresh``), or a process
    forked from tests/_forkserver.py's server, which has imported the CLI already."""
    args = [
        "-m", "lightning_tp", "fit", "--config", str(Path(__file__).parent.parent / "recipes" / recipe),
        f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}", "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1", "--data.init_args.max_chars=200000", f"--data.init_args.cache_dir={tmp / 'cache'}",
        *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    if not fresh:
        return server().run(args, env=env, cwd=tmp, timeout=420)
    return subprocess.run([sys.executable, *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=420)


@pytest.mark.parametrize("recipe", CPU_RECIPES)
def test_cpu_recipe_smoke_run(recipe, tmp_path, request):
    if recipe.startswith("llama-hf"):
        pytest.importorskip("transformers")
    extra = _overrides(Path(recipe), request)
    if recipe != MAIN_RECIPE:
        # The main job runs as the README runs it (a new interpreter, and popen: each rank a new interpreter,
        # ~10 s of imports each); the others run in a process forked from the fork server, which forks its ranks.
        extra.append("--trainer.strategy.init_args.start_method=fork")
    out = _smoke(recipe, tmp_path, extra=extra, fresh=recipe == MAIN_RECIPE)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "args parameter is intended to run from within Python" not in out.stdout + out.stderr  # args given once
    if recipe in PRETRAINED_RECIPES:
        assert re.search(r"lightning_tp: loaded 21 pretrained tensors from \S*llama-hf-base", out.stdout + out.stderr)
    runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # one W&B run (rank 0 only)
    log = next(runs[0].glob("*.wandb")).read_bytes()
    for key in (b"train_loss", b"val_loss", b"val_ppl", b"grad_norm", b"tok/s", b"train/items_per_sec"):
        assert key in log, key
    assert list((runs[0] / "files" / "media" / "table").glob("samples_*.table.json"))


def test_export_cli(tmp_path, capsys):
    import test_checkpoint

    import _dist

    path = str(tmp_path / "ckpt")
    _dist.run(2, test_checkpoint._save_tp, path, 2)
    main(["export", path, str(tmp_path / "dense.pt")])
    assert "load with model.load_state_dict" in capsys.readouterr().out
    state = torch.load(tmp_path / "dense.pt", weights_only=True)
    import lit

    lit.LitGPT().load_state_dict(state, strict=True)
