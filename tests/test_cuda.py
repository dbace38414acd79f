"""The CUDA/NCCL path (marker ``cuda``; skipped without a GPU, so CI on CPU does not run it).

Each test runs ``tests/scripts/cuda_fit.py`` in fresh processes: the column/row/vocab layers and the
vocab-parallel loss against dense float32 on the GPU (TP 1, and TP 2 where two GPUs exist; the fused loss,
Triton kernels, against the unfused one), and
Trainer runs of ``lit.LitGPT`` with ``bf16-mixed`` and ``16-mixed`` at TP 1 against plain Lightning
on one GPU, and at TP 2 (two GPUs) against one GPU; per-block ``torch.compile`` (inductor) against
eager on the GPU; deferred init on the meta device materialized on the GPU with block-by-block verify;
an out-of-range target or token id ends the process (a device-side assert).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU")]
TESTS = Path(__file__).resolve().parent
SCRIPT = TESTS / "scripts" / "cuda_fit.py"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def _launch(tmp_path: Path, *args: str, ranks: int = 0) -> tuple[list[tuple[int, str]], Path]:
    """One process (``ranks=0``: Lightning starts any others), or ``ranks`` started here as torchrun
    would; returns each process's (exit status, output) and the result file's path."""
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}.json"
    cmd = [sys.executable, str(SCRIPT), str(out), *args]
    if ranks == 0:
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
        return [(proc.returncode, proc.stdout[-3000:] + proc.stderr[-3000:])], out
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [
        subprocess.Popen(cmd, env=_env(LOCAL_RANK=str(r), RANK=str(r), WORLD_SIZE=str(ranks),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(ranks)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=600)[0][-3000:] for p in procs]  # then each returncode is set
    return [(p.returncode, o) for p, o in zip(procs, outputs, strict=True)], out


def _run(tmp_path: Path, *args: str, ranks: int = 0) -> dict:
    results, out = _launch(tmp_path, *args, ranks=ranks)
    for code, output in results:
        assert code == 0, output
    return json.loads(out.read_text())


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_layers_and_vocab_parallel_loss_on_gpu(tmp_path, tp):
    if tp > GPUS:
        pytest.skip(f"needs {tp} GPUs, {GPUS} present")
    errors = _run(tmp_path, "layers", "--devices", str(tp), ranks=tp)["errors"]
    assert all(e < 1e-4 for e in errors.values()), errors  # TF32 matmuls may be on: not float32-exact


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_training_at_tp1_matches_plain_lightning(tmp_path, precision):
    ref = _run(tmp_path, "fit", "--tp", "0", "--precision", precision)
    got = _run(tmp_path, "fit", "--tp", "1", "--precision", precision)
    assert got["global_step"] == ref["global_step"] == 6
    assert all(torch.isfinite(torch.tensor(got["losses"])))
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=2e-2, atol=2e-2)
    if precision == "16-mixed":
        assert got["scale"] is not None and got["scale"] > 0


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
def test_tp2_training_on_two_gpus_matches_one_gpu(tmp_path):
    ref = _run(tmp_path, "fit", "--tp", "0")
    got = _run(tmp_path, "fit", "--tp", "2", "--devices", "2")
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-3, atol=1e-3)


def test_compiled_training_on_gpu_matches_eager(tmp_path):
    ref = _run(tmp_path, "fit", "--tp", "1", "--precision", "bf16-mixed")
    got = _run(tmp_path, "fit", "--tp", "1", "--precision", "bf16-mixed", "--compile")
    assert got["global_step"] == 6 and ref["graphs"] == 0
    assert got["compiled"] == ["layers.0", "layers.1"], got["compiled"]  # each block of the model
    assert got["graphs"] >= 1 and got["graph_breaks"] == 0
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=2e-2, atol=2e-2)


def test_deferred_init_on_gpu(tmp_path):
    got = _run(tmp_path, "deferred", "--precision", "bf16-mixed", "--steps", "4")
    assert got["deferred"] and got["keys_equal"] and got["param_devices"] == ["cuda:0"]
    assert got["start_max_diff"] == 0.0  # the Trainer's materialization is the standalone one, bit for bit
    assert got["global_step"] == 4 and all(torch.isfinite(torch.tensor(got["losses"])))


@pytest.mark.parametrize(("what", "tp"), [("target", 1), ("ids", 2)])
def test_out_of_range_target_or_token_id_fails_on_gpu(tmp_path, what, tp):
    """No rank holds such a class or row: a device-side assert instead of a silently wrong loss."""
    if tp > GPUS:
        pytest.skip(f"needs {tp} GPUs, {GPUS} present")
    results, out = _launch(tmp_path, "bad", "--what", what, "--devices", str(tp), ranks=tp)
    assert any(code != 0 for code, _ in results) and not out.exists(), results
    assert any("out of" in output or "device-side assert" in output for _, output in results), results
