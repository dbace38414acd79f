"""Every recipe parses with the CLI; CPU recipes smoke-run a few steps; GPU recipes are planned."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_tp.cli import _cli, main, plan_main

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
CPU_RECIPES = ["gpt-cpu.yaml", "gpt-tp2-dp2.yaml", "llama-hf.yaml"]
GPU_RECIPES = ["gpt-small-tp8.yaml"]


def test_recipe_set():
    assert sorted(p.name for p in RECIPES) == sorted(CPU_RECIPES + GPU_RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_plans(recipe, capsys):
    args = ["--config", str(recipe)]
    if not torch.cuda.is_available():
        args.append("--trainer.accelerator=cpu")
    cli = _cli(args, run=False)
    assert type(cli.trainer.strategy).__name__ == "MegatronTPStrategy"
    text = plan_main(["--config", str(recipe)])
    assert "local shape" in text and "parameters per rank" in text
    assert "vocab" in text and "row" in text


def _smoke(recipe: str, tmp: Path, steps: int = 6) -> subprocess.CompletedProcess:
    args = [
        sys.executable, "-m", "lightning_tp", "fit", "--config", str(Path(__file__).parent.parent / "recipes" / recipe),
        f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}", "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1", "--data.init_args.max_chars=200000", f"--data.init_args.cache_dir={tmp / 'cache'}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=420)


@pytest.mark.parametrize("recipe", CPU_RECIPES)
def test_cpu_recipe_smoke_run(recipe, tmp_path):
    if recipe == "llama-hf.yaml":
        pytest.importorskip("transformers")
    out = _smoke(recipe, tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
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


def test_generate_pads_the_context_under_sequence_parallelism():
    """Under sequence parallelism the context is padded to a multiple of TP at the end; the model
    is causal, so the sampled tokens are exactly those of the unpadded context."""
    from types import SimpleNamespace

    from lightning_tp.models import CausalLM

    torch.manual_seed(0)
    lm = CausalLM(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)
    lm.configure_model()
    prompt = torch.tensor([[3, 7, 1]])
    plain = lm.generate(prompt, 6)
    seen = []
    lm.model.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    lm._trainer = SimpleNamespace(strategy=SimpleNamespace(sequence_parallel=True, tensor_parallel_size=4))
    padded = lm.generate(prompt, 6)
    assert torch.equal(padded, plain)
    assert all(n % 4 == 0 for n in seen) and seen[0] == 4 and max(seen) <= 16, seen
