"""Bad configurations through the CLI: ``python -m lightning_tp fit --config bad.yaml`` exits non-zero
with the typed error of SPEC section 5 naming the key and value; a policy pattern that matches
nothing is a warning and the run goes on.

Each bad YAML is recipes/gpt-cpu.yaml (TP 2 on 2 CPU processes) with one change, a smaller model,
no loggers or callbacks, one step, and the corpus cut to 200k characters with the tokenizer cached
in a temporary directory shared by the module. Layout and policy-style errors are raised when the
Trainer is built, model-dependent ones (heads, module types, ties) when the launcher plans the policy
on the main process's model: both before any other process is started (a model built later, in
``configure_model``, is planned on every rank before the first collective).

Each run is ``python -m lightning_tp`` in a process of its own, forked from one server that imported
the CLI once (tests/_forkserver.py); tests/test_recipes.py runs the README's main job in a new
interpreter.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _forkserver import server
from _procs import clean_env

import _dist
from lightning_tp.lightning.checkpoint import save
from lightning_tp.models import CausalLM
from lightning_tp.policy import apply_policy

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "gpt-cpu.yaml"
MODEL = {"vocab_size": 8192, "block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 64}
GPT_POLICY = {
    "model.transformer.h.*.attn.c_attn": "qkv",
    "model.transformer.h.*.attn.c_proj": "row",
    "model.transformer.h.*.mlp.c_fc": "column",
    "model.transformer.h.*.mlp.c_proj": "row",
    "model.transformer.wte": "vocab",
    "model.lm_head": "vocab",
    "model.transformer.wpe": "replicate",
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenizer-cache")


def write_config(tmp: Path, cache: Path, strategy: dict | None = None, model: dict | None = None) -> Path:
    """recipes/gpt-cpu.yaml with the given strategy/model init_args changed, made small and quiet."""
    cfg: dict[str, Any] = yaml.safe_load(RECIPE.read_text())
    trainer = cfg["trainer"]
    for key in ("logger", "callbacks", "val_check_interval"):
        trainer.pop(key, None)
    trainer.update(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   max_steps=1, limit_val_batches=0)  # fmt: skip
    # the ranks fork from the CLI process, which has imported everything (the main job's popen launch runs in
    # tests/test_recipes.py): no second interpreter start-up per test
    trainer["strategy"]["init_args"].update({"start_method": "fork", **(strategy or {})})
    cfg["model"]["init_args"].update({**MODEL, "warmup_steps": 1, "sample_tokens": 0, **(model or {})})
    cfg["data"]["init_args"].update(block_size=MODEL["block_size"], max_chars=200_000, cache_dir=str(cache))
    path = tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def lightning_tp(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m lightning_tp ARGS`` in ``tmp``: a process of its own, forked from tests/_forkserver.py's
    server (the imports paid once for every run here)."""
    return server().run(["-m", "lightning_tp", *args], env=clean_env(), cwd=tmp, timeout=240)


BAD_CONFIGS = {
    # id: (strategy init_args, model init_args, error, what the message must name)
    "tp-not-dividing-devices": (
        {"tensor_parallel_size": 3}, {}, "MeshConfigError",
        r"tensor_parallel_size=3 does not divide the world size 2: DP x TP must equal the world.*devices=2",
    ),
    "unknown-policy-style": (
        {"policy": {**GPT_POLICY, "model.transformer.h.*.mlp.c_fc": "diagonal"}}, {}, "PolicyError",
        r"policy entry 'model\.transformer\.h\.\*\.mlp\.c_fc': unknown style 'diagonal'",
    ),
    "heads-not-divisible": (
        {}, {"n_head": 3, "n_embd": 48}, "ShardingError",
        r"module 'model\.transformer\.h\.0\.attn': n_head=3 heads cannot be split over tensor_parallel_size=2",
    ),
    "style-does-not-fit-module": (
        {"policy": {**GPT_POLICY, "model.transformer.ln_f": "column"}}, {}, "TypeError",
        r"policy style 'column' \(pattern 'model\.transformer\.ln_f'\) does not fit module "
        r"'model\.transformer\.ln_f' of type LayerNorm",
    ),
    "policy-breaks-a-tie": (
        {"policy": {**GPT_POLICY, "model.lm_head": "replicate"}}, {}, "PolicyError",
        r"the policy would break a tied parameter shared by 'model\.transformer\.wte\.weight' \(vocab, pattern "
        r"'model\.transformer\.wte'\), 'model\.lm_head\.weight' \(replicate, pattern 'model\.lm_head'\)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_exits_with_typed_error(tmp_path, cache, case):
    strategy, model, error, message = BAD_CONFIGS[case]
    out = lightning_tp(tmp_path, "fit", "--config", str(write_config(tmp_path, cache, strategy, model)))
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert f"{error}: " in text, text[-3000:]
    assert re.search(message, text), text[-3000:]
    assert "Traceback" in text and "Epoch 0" not in text  # stopped before training
    assert "Initializing distributed" not in text  # before any process group (and any second process)


def test_pattern_matching_nothing_warns_and_trains(tmp_path, cache):
    policy = {**GPT_POLICY, "model.transformer.h.*.attn.q_proj": "column", "model.transformer.ln_f": "replicate"}
    out = lightning_tp(tmp_path, "fit", "--config", str(write_config(tmp_path, cache, {"policy": policy})))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "PolicyWarning" in text or "policy patterns match no module" in text
    assert "policy patterns match no module: ['model.transformer.h.*.attn.q_proj']" in text, text[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=1` reached" in text


def _save_causal_lm(path: str, n_layer: int) -> bool:
    m = _dist.mesh(2)
    torch.manual_seed(0)
    model = CausalLM(**{**MODEL, "n_layer": n_layer})
    apply_policy(model, m.tp_group, "auto", verify=False)
    save(path, model, [], m, {"epoch": 0, "global_step": 0})
    return True


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of the configured CausalLM: one of another depth, one truncated."""
    root = tmp_path_factory.mktemp("cli-ckpts")
    _dist.run(2, _save_causal_lm, str(root / "one-layer.ckpt"), 1)
    _dist.run(2, _save_causal_lm, str(root / "truncated.ckpt"), MODEL["n_layer"])
    shard = root / "truncated.ckpt" / "__1_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 3)
    return {"other-model": root / "one-layer.ckpt", "truncated": root / "truncated.ckpt"}


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("other-model", r"saved with a different model: missing keys \['model\.transformer\.h\.1\.attn\.c_attn\.bias'"),
        ("truncated", r"is corrupt or truncated: __1_0\.distcp is truncated or extended: \d+ bytes, expected \d+"),
    ],
)
def test_bad_checkpoint_from_the_cli(tmp_path, cache, checkpoints, which, message):
    config = write_config(tmp_path, cache)
    out = lightning_tp(tmp_path, "fit", "--config", str(config), f"--ckpt_path={checkpoints[which]}")
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert "CheckpointError: " in text and re.search(message, text), text[-3000:]


def test_export_of_truncated_checkpoint_fails(tmp_path, checkpoints):
    out = lightning_tp(tmp_path, "export", str(checkpoints["truncated"]), str(tmp_path / "dense.pt"))
    assert out.returncode != 0 and "CheckpointError: " in out.stderr, out.stderr[-3000:]
    assert "__1_0.distcp is truncated" in out.stderr and not (tmp_path / "dense.pt").exists()
