"""ZeRO stages 2 and 3 (FSDP2 over the data-parallel group) under tensor parallelism: the same
training as one process, with gradients and optimizer state (stage 3: parameters too) split over DP."""

from __future__ import annotations

import lightning as L
import lit
import pytest
import torch
from test_strategy import InjectInf, _fit, reference_losses

import _dist
from lightning_tp import MegatronTPStrategy, TPMixedPrecision
from lightning_tp.errors import MeshConfigError


@pytest.fixture(scope="module")
def ref_losses():
    return reference_losses()


def _check(results, ref, stage):
    for r in results:
        assert r["zero_active"]
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref), rtol=1e-5, atol=0)
        assert r["lm_head_tied"]
        ddp = 2 * r["param_bytes"]  # AdamW under DDP: exp_avg and exp_avg_sq of the whole TP shard
        assert ddp / 2 * 0.9 <= r["optimizer_bytes"] <= ddp / 2 * 1.05, (stage, r["optimizer_bytes"], ddp)


@pytest.mark.parametrize(("stage", "sp"), [(2, False), (3, True)], ids=["stage2", "stage3-sp-checkpointing"])
def test_zero_losses_match_single_process(stage, sp, ref_losses):
    """TP 2 x DP 2, AdamW, clipping by norm 0.5 (the norm summed over TP and DP shards), tied head:
    the losses of one process (fp32, rel 1e-5), and half the optimizer-state bytes of DDP. Stage 3
    with sequence parallelism and activation checkpointing of the layers (inside FSDP2's units)."""
    kw = {"zero_stage": stage, **({"activation_checkpointing": "model.layers.*"} if sp else {})}
    results = _dist.run(4, _fit, 4, 2, sp=sp, strategy_kw=kw)
    _check(results, ref_losses, stage)
    assert all(r["checkpointed"] == (2 if sp else 0) for r in results)
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0.5 for r in results)  # clipping was active


def test_zero3_clip_by_value_and_gradient_accumulation():
    """Stage 3 with clipping by value and two micro-batches per step (no reduce-scatter until the
    last): the losses of one process doing the same."""
    kw = {"clip": 0.05, "gradient_clip_algorithm": "value", "accumulate_grad_batches": 2}
    ref = reference_losses(steps=5, **kw)
    results = _dist.run(4, _fit, 4, 2, steps=5, strategy_kw={"zero_stage": 3}, **kw)
    _check(results, ref, 3)
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in results)  # logged under "value" too


def _fit_fp16_zero():
    with lit.external_launch(4):
        model, cb = lit.LitGPT(batch_size=4, lr=1e-3), InjectInf(2)
        strategy = MegatronTPStrategy(tensor_parallel_size=2, zero_stage=2)
        trainer = L.Trainer(**lit.trainer_kwargs(max_steps=5, devices=4, strategy=strategy, callbacks=[cb],
                                                 plugins=[TPMixedPrecision("16-mixed", "cpu")], gradient_clip_val=1.0))  # fmt: skip
        trainer.fit(model)
        return cb.rows


def test_zero_fp16_inf_on_one_rank_skips_everywhere():
    """16-mixed under ZeRO 2: an inf in one rank's gradient part makes every rank skip the step and
    halve its scale (found-inf reduced over all ranks)."""
    results = _dist.run(4, _fit_fp16_zero)
    assert all(rows == results[0] for rows in results)
    skipped = [i for i, (_, unchanged, _) in enumerate(results[0]) if unchanged]
    assert skipped, results[0]
    first = skipped[0]
    assert results[0][first][2] == (results[0][first - 1][2] if first else 65536.0) / 2
    assert any(not unchanged for _, unchanged, _ in results[0][first + 1 :])


def test_zero_stage_errors():
    for bad in (1, 4, True, "2"):
        with pytest.raises(MeshConfigError, match=rf"zero_stage must be 0 .* got {bad!r}"):
            MegatronTPStrategy(zero_stage=bad)


def _run_ckpt(world, stage, steps, ckpt_dir, ckpt_path=None):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from test_strategy import Recorder

    from lightning_tp.lightning.checkpoint import full_state_dict

    with lit.external_launch(world):
        # 3 steps per epoch: checkpoints (every 3 steps) at an epoch's end, where a resume is exact
        model, rec = lit.LitGPT(batch_size=8 // (world // 2), n_train=24), Recorder()  # losses: mean over DP
        ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1)
        strategy = MegatronTPStrategy(tensor_parallel_size=2, zero_stage=stage)
        trainer = L.Trainer(**lit.trainer_kwargs(max_steps=steps, devices=world, strategy=strategy, gradient_clip_val=0.5,
                                                 callbacks=[rec, ckpt], enable_checkpointing=True))  # fmt: skip
        trainer.fit(model, ckpt_path=ckpt_path)
        full = full_state_dict(model, strategy.tp_group)  # collective: gathered over DP and TP
        return rec.losses, full if torch.distributed.get_rank() == 0 else None, strategy.zero_active


def test_zero_checkpoints_load_across_stages_and_dp_sizes(tmp_path):
    """Stage 3 at DP 2 -> stage 0 at DP 1, and stage 0 at DP 1 -> stage 2 at DP 2 (TP 2 throughout):
    each resume continues the uninterrupted stage-3 run (same losses, rel 1e-5: the AdamW state came
    along) and ends with the same gathered weights. (The second hop starts from an uninterrupted
    stage-0 run's checkpoint: one written by a resumed run at an epoch's end records an epoch too few
    in Lightning 2.6's loop state, so a second resume would replay the previous epoch's shuffle, with
    any strategy.)"""
    a = _dist.run(4, _run_ckpt, 4, 3, 9, str(tmp_path / "a"))
    (a3,) = (tmp_path / "a").glob("*step=3.ckpt")
    b = _dist.run(2, _run_ckpt, 2, 0, 6, str(tmp_path / "b"), str(a3))
    d = _dist.run(2, _run_ckpt, 2, 0, 6, str(tmp_path / "d"))
    (d6,) = (tmp_path / "d").glob("*step=6.ckpt")
    c = _dist.run(4, _run_ckpt, 4, 2, 9, str(tmp_path / "c"), str(d6))
    ref = torch.tensor(a[0][0])
    for got, want in ((b, ref[3:6]), (d, ref[:6]), (c, ref[6:9])):
        torch.testing.assert_close(torch.tensor(got[0][0]), want, rtol=1e-5, atol=0)
    assert all(r[2] for r in a + c) and not any(r[2] for r in b + d)
    assert a[0][1].keys() == c[0][1].keys()
    for key, value in a[0][1].items():
        torch.testing.assert_close(c[0][1][key], value, rtol=1e-4, atol=1e-6)


def _fit_then_evaluate():
    with lit.external_launch(4):
        model = lit.LitGPT(batch_size=4)
        strategy = MegatronTPStrategy(tensor_parallel_size=2, zero_stage=3)
        trainer = L.Trainer(**lit.trainer_kwargs(max_steps=3, devices=4, strategy=strategy, limit_val_batches=2,
                                                 precision="bf16-mixed"))  # fmt: skip
        trainer.fit(model)
        val = trainer.validate(model, verbose=False)[0]["val_loss"]
        test = trainer.test(model, verbose=False)[0]["test_loss"]
        preds = trainer.predict(model)
        from lightning_tp.engine.sharding import shard_spec

        marked = sum(shard_spec(p) is not None for p in model.parameters())  # TP marks kept across the setups
        return val, test, len(preds), strategy.zero_active and marked > 0


def test_zero3_bf16_mixed_fits_then_validates_tests_and_predicts():
    for val, test, n, active in _dist.run(4, _fit_then_evaluate):
        assert active and n > 0 and torch.isfinite(torch.tensor([val, test])).all()


def _run_ckpt_in_place(world, steps, ckpt_dir, ckpt_path=None):
    """As :func:`_run_ckpt` at stage 3 on the multi-query model (a key/value head shared by both TP
    ranks, split again over DP), with ``DTensor.full_tensor`` refusing to run while fitting: saving
    and loading must not gather a parameter or its optimizer state over DP."""
    from unittest import mock

    from lightning.pytorch.callbacks import ModelCheckpoint
    from test_strategy import Recorder
    from torch.distributed.tensor import DTensor

    from lightning_tp.lightning.checkpoint import full_state_dict

    def refuse(self, *args, **kwargs):
        raise AssertionError("a ZeRO tensor was gathered over DP while fitting")

    with lit.external_launch(world):
        model, rec = lit.LitGPT(batch_size=4, n_train=24, model="plain_mqa"), Recorder()
        ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1)
        strategy = MegatronTPStrategy(tensor_parallel_size=2, zero_stage=3)
        trainer = L.Trainer(**lit.trainer_kwargs(max_steps=steps, devices=world, strategy=strategy, gradient_clip_val=0.5,
                                                 callbacks=[rec, ckpt], enable_checkpointing=True))  # fmt: skip
        with mock.patch.object(DTensor, "full_tensor", refuse):
            trainer.fit(model, ckpt_path=ckpt_path)
        full = full_state_dict(model, strategy.tp_group)
        return rec.losses, full if torch.distributed.get_rank() == 0 else None


def test_zero3_checkpoints_are_written_and_read_in_place(tmp_path):
    """Stage 3 at TP 2 x DP 2: each rank writes and reads its own rows of every parameter and of its
    optimizer state (no DTensor.full_tensor runs while fitting, saves and the resume included); the
    stored tensors are the dense weights (the step-6 checkpoint consolidates, without a process group,
    to the weights gathered at step 6), and a resume from step 3 continues the uninterrupted run
    exactly, to the same weights."""
    from lightning_tp import consolidate

    full = _dist.run(4, _run_ckpt_in_place, 4, 6, str(tmp_path / "a"))
    (ckpt,) = (tmp_path / "a").glob("*step=3.ckpt")
    (last,) = (tmp_path / "a").glob("*step=6.ckpt")
    stored = consolidate(last)
    assert stored.keys() == full[0][1].keys()
    for key, value in full[0][1].items():
        assert torch.equal(stored[key], value), key
    resumed = _dist.run(4, _run_ckpt_in_place, 4, 6, str(tmp_path / "b"), str(ckpt))
    assert resumed[0][0] == full[0][0][3:]
    for key, value in full[0][1].items():
        assert torch.equal(resumed[0][1][key], value), key


class _OptimizerHoldsParameters(L.Callback):
    """Whether ``pl_module.parameters()`` are the optimizer's, where callbacks read them after validation."""

    def __init__(self):
        self.seen = []

    def _check(self, trainer, pl_module):
        held = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        self.seen.append(all(id(p) in held for p in pl_module.parameters()))

    on_validation_end = on_train_epoch_start = _check


def _fit_ending_in_validation():
    from lightning_tp.engine.sharding import shard_spec

    with lit.external_launch(4):
        model, held = lit.LitGPT(batch_size=4, n_train=16), _OptimizerHoldsParameters()
        strategy = MegatronTPStrategy(tensor_parallel_size=2, zero_stage=2)
        trainer = L.Trainer(**lit.trainer_kwargs(max_steps=-1, max_epochs=2, devices=4, strategy=strategy,
                                                 limit_val_batches=1, callbacks=[held]))  # fmt: skip
        trainer.fit(model)
        return sum(shard_spec(p) is not None for p in model.parameters()), trainer.global_step, held.seen


def test_zero2_fit_ending_in_validation_keeps_the_tp_marks():
    """ZeRO-2 keeps the parameters gathered after an eval forward (FSDP2's unmarked ones): teardown
    reshards first, so after fit every split parameter still says how it is split (a checkpoint or a
    second fit reads them)."""
    for marked, step, held in _dist.run(4, _fit_ending_in_validation):
        assert step == 4 and marked >= 8  # 2 layers x (q, k, v, o, gate, up, down) + embedding
        # after each validation (and at the next epoch) the module's parameters are the optimizer's, not FSDP2's
        # gathered ones (a fine-tuning callback unfreezing them then froze other tensors, or failed on DTensors)
        assert held == [True] * 4, held


def _find_lr(root):
    from lightning.pytorch.tuner import Tuner

    from lightning_tp.lightning.checkpoint import full_state_dict

    with lit.external_launch(4):
        model = lit.LitGPT(batch_size=4, n_train=16)  # 2 steps an epoch: the finder validates after each, the last too
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        strategy = MegatronTPStrategy(tensor_parallel_size=2, zero_stage=2)
        trainer = L.Trainer(**lit.trainer_kwargs(devices=4, strategy=strategy, default_root_dir=root))
        finder = Tuner(trainer).lr_find(model, num_training=4, early_stop_threshold=None, update_attr=False)
        full = full_state_dict(model, strategy.tp_group)  # collective: gathered over TP and DP
        same = full.keys() == initial.keys() and all(torch.equal(full[k], v) for k, v in initial.items())
        return len(finder.results["lr"]), same


def test_zero2_learning_rate_finder_restores_the_model_after_validating(tmp_path):
    """Lightning's learning-rate finder reads its checkpoint back after validation runs, where ZeRO-2
    holds the parameters gathered: it restores the split ones (before: a CheckpointError, the shapes
    of the TP shards against the whole ones), and removes the checkpoint directory."""
    for n, same in _dist.run(4, _find_lr, str(tmp_path)):
        assert n == 4 and same
    assert list(tmp_path.iterdir()) == []
