"""NaN/inf losses: fp32 and bf16 stop on every rank with ``NonFiniteLossError`` naming the step,
before anything is trained on the non-finite loss; 16-mixed skips the step and goes on.

(16-mixed with an inf gradient on one TP rank skipping everywhere and recovering is
tests/test_strategy.py::test_fp16_inf_on_one_rank_skips_everywhere.)
"""

from __future__ import annotations

import lightning as L
import lit
import pytest
import torch

import _dist
from lightning_tp import LightningTPError, MegatronTPStrategy, NonFiniteLossError, TPMixedPrecision

BAD_STEP, BAD_RANK = 3, 1


class BadLoss(lit.LitGPT):
    """Returns ``loss * value`` (NaN or inf) on one rank at one global step."""

    def __init__(self, value: float, **kwargs):
        super().__init__(**kwargs)
        self.value = value

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == BAD_STEP and self.global_rank == BAD_RANK:
            loss = loss * self.value
        return loss


class Snapshot(L.Callback):
    """The parameters at the start of every batch; per finished batch (global step, params unchanged)."""

    def __init__(self):
        self.rows: list[tuple[int, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.params = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        unchanged = all(torch.equal(a, b) for a, b in zip(self.params, pl_module.parameters(), strict=True))
        self.rows.append((trainer.global_step, unchanged))


def _fit_bad_loss(world: int, tp: int, value: float, precision: str, nan_check: bool = True) -> dict:
    with lit.external_launch(world):
        model, snap = BadLoss(value, batch_size=8 // (world // tp)), Snapshot()
        plugins = [TPMixedPrecision("16-mixed", "cpu")] if precision == "16-mixed" else []
        trainer = L.Trainer(
            **lit.trainer_kwargs(devices=world, strategy=MegatronTPStrategy(tensor_parallel_size=tp, nan_check=nan_check),
                                 max_steps=6, gradient_clip_val=1.0, callbacks=[snap], plugins=plugins,
                                 **({} if plugins else {"precision": precision}))
        )  # fmt: skip
        error = None
        try:
            trainer.fit(model)
        except Exception as exc:  # noqa: BLE001 - returned to the test
            error = exc
        params = list(model.parameters())
        return {
            "error": None if error is None else (type(error).__name__, str(error), isinstance(error, LightningTPError),
                                                 isinstance(error, FloatingPointError)),
            "step": trainer.global_step,
            "unchanged": all(torch.equal(a, b) for a, b in zip(snap.params, params, strict=True)),
            "finite": all(bool(torch.isfinite(p).all()) for p in params),
            "rows": snap.rows,
        }  # fmt: skip


@pytest.mark.parametrize(
    ("world", "tp", "value", "precision"),
    [(2, 2, float("nan"), "32-true"), (2, 2, float("inf"), "bf16-mixed"), (4, 2, float("nan"), "bf16-mixed")],
    ids=["nan-fp32-tp2", "inf-bf16-tp2", "nan-bf16-tp2xdp2"],
)
def test_non_finite_loss_stops_every_rank(world, tp, value, precision):
    kind = "NaN" if value != value else "inf"
    for r in _dist.run(world, _fit_bad_loss, world, tp, value, precision):
        assert r["error"] is not None, r
        name, message, typed, fp_error = r["error"]
        assert name == NonFiniteLossError.__name__ and typed and fp_error
        assert f"not finite at global step {BAD_STEP}" in message
        assert f"rank {BAD_RANK}: {kind}" in message and f"on 1 of {world} ranks" in message
        assert r["step"] == BAD_STEP  # no optimizer step on the bad loss ...
        assert r["unchanged"] and r["finite"]  # ... so the weights are those after step 3, all finite


def test_without_nan_check_training_goes_on_with_nan():
    """What nan_check prevents: the NaN reaches the weights silently."""
    for r in _dist.run(2, _fit_bad_loss, 2, 2, float("nan"), "32-true", False):
        assert r["error"] is None and r["step"] == 6
        assert not r["finite"]


def test_fp16_mixed_skips_a_nan_loss_and_continues():
    results = _dist.run(2, _fit_bad_loss, 2, 2, float("nan"), "16-mixed")
    for r in results:
        assert r["error"] is None, r["error"]
        skipped = [i for i, (_, unchanged) in enumerate(r["rows"]) if unchanged]
        assert skipped == [BAD_STEP], r["rows"]  # the loss scaler skipped the bad batch on every rank ...
        assert r["step"] == 6 and r["finite"]  # ... and training went on
        assert r["rows"] == results[0]["rows"]


def test_loss_of_reads_the_step_output():
    """The check reads only the step's output: a step that returns no loss contributes 'finite'."""
    from lightning_tp.lightning.faults import loss_of

    t = torch.tensor(1.0)
    assert loss_of(t) is t and loss_of({"loss": t, "x": 1}) is t
    assert loss_of(None) is None and loss_of({"x": t}) is None
