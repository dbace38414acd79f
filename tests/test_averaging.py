"""Lightning's weight-averaging callbacks (EMAWeightAveraging, WeightAveraging) on the sharded model:
the averaged weights of one process, the averaged model in validation, checkpoints holding both
weights (every rank's shards) and an exact resume; StochasticWeightAveraging refused."""

import lightning as L
import lit
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, StochasticWeightAveraging, WeightAveraging

import _dist
from lightning_tp import MegatronTPStrategy, UnsupportedCallbackError, _compat, consolidate
from lightning_tp.lightning.checkpoint import full_state_dict

STEPS = 6


def _averaging(kind):
    return EMAWeightAveraging(decay=0.7) if kind == "ema" else WeightAveraging()  # the latter: equal average


class ValLosses(L.Callback):
    def __init__(self):
        self.val = []

    def on_validation_epoch_end(self, trainer, pl_module):
        self.val.append(float(trainer.callback_metrics["val_loss"]))


def _kwargs(**kw):
    # 3 steps per epoch (24 samples, global batch 8); validation on 2 batches at every epoch's end
    return lit.trainer_kwargs(**{"max_steps": STEPS, "limit_val_batches": 2, "gradient_clip_val": 0.5, **kw})


def _reference(kind, steps=STEPS):
    model, val = lit.LitGPT(batch_size=8, n_train=24, ref_sampler=True), ValLosses()
    L.Trainer(**_kwargs(devices=1, callbacks=[_averaging(kind), val], max_steps=steps)).fit(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, val.val


def _fit(world, tp, kind, zero=0, ckpt_dir=None, ckpt_path=None):
    with lit.external_launch(world):
        model, val = lit.LitGPT(batch_size=8 // (world // tp), n_train=24), ValLosses()
        callbacks = [_averaging(kind), val]
        if ckpt_dir:
            callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1))
        strategy = MegatronTPStrategy(tensor_parallel_size=tp, zero_stage=zero)
        trainer = L.Trainer(**_kwargs(devices=world, strategy=strategy, callbacks=callbacks,
                                      enable_checkpointing=bool(ckpt_dir)))  # fmt: skip
        trainer.fit(model, ckpt_path=ckpt_path)
        full = full_state_dict(model, strategy.tp_group)  # collective (ZeRO: gathered over DP too)
        return full if torch.distributed.get_rank() == 0 else None, val.val, strategy.zero_active


def _assert_weights(got, want, rtol=1e-4):
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(
            got[key], value, rtol=rtol, atol=1e-5 if rtol else 0, msg=lambda m, key=key: f"{key}: {m}"
        )


@pytest.mark.parametrize(
    ("world", "tp", "kind", "zero"),
    [(2, 2, "ema", 0), (4, 2, "ema", 3), (4, 2, "equal", 2)],
    ids=["tp2-ema", "tp2xdp2-zero3-ema", "tp2xdp2-zero2-equal"],
)
def test_averaged_weights_and_validation_match_one_process(world, tp, kind, zero):
    """Each rank averages its shards (under ZeRO its DP part of them): after fit the model holds the
    averaged weights of one process, and validation (run on the averaged weights) gives its losses."""
    want, want_val = _reference(kind)
    results = _dist.run(world, _fit, world, tp, kind, zero)
    got, got_val, zero_active = results[0]
    assert zero_active == bool(zero)
    _assert_weights(got, want)
    torch.testing.assert_close(torch.tensor(got_val), torch.tensor(want_val), rtol=1e-5, atol=0)


def test_checkpoints_hold_the_averaged_and_the_training_weights(tmp_path):
    """A checkpoint's model state is the averaged weights (consolidated: those of one process at that
    step), the training weights beside them; a resume, also at another layout (TP 2 -> TP 2 x DP 2 with
    ZeRO-3), restores both and ends as the uninterrupted run."""
    full = _dist.run(2, _fit, 2, 2, "ema", 0, str(tmp_path / "a"))
    (ckpt,) = (tmp_path / "a").glob("*step=3.ckpt")
    assert len(list(ckpt.glob("*.distcp"))) == 2  # every rank's shards
    at3, _ = _reference("ema", steps=3)  # fit ends with the averaged weights in the model
    _assert_weights(consolidate(ckpt), at3)
    for world, zero in ((2, 0), (4, 3)):
        resumed = _dist.run(world, _fit, world, 2, "ema", zero, None, str(ckpt))
        _assert_weights(resumed[0][0], full[0][0])
        torch.testing.assert_close(torch.tensor(resumed[0][1]), torch.tensor(full[0][1][1:]), rtol=1e-5, atol=0)


def test_a_checkpoint_with_averaged_weights_resumes_without_the_callback_from_them(tmp_path):
    """Without the callback the model continues from the checkpoint's model state, the averaged
    weights, as Lightning loads such a checkpoint."""
    _dist.run(2, _fit, 2, 2, "ema", 0, str(tmp_path / "a"))
    (ckpt,) = (tmp_path / "a").glob("*step=3.ckpt")
    averaged = consolidate(ckpt)
    _assert_weights(_dist.run(2, _load_only, 2, str(ckpt))[0], averaged, rtol=0)


def _load_only(world, ckpt):
    with lit.external_launch(world):
        model = lit.LitGPT(batch_size=8, n_train=24)
        strategy = MegatronTPStrategy(tensor_parallel_size=2)
        trainer = L.Trainer(**_kwargs(devices=world, strategy=strategy, max_steps=3))  # already done: no step
        trainer.fit(model, ckpt_path=ckpt)
        return full_state_dict(model, strategy.tp_group)


def _fit_swa(world):
    with lit.external_launch(world):
        model = lit.LitGPT(batch_size=8, n_train=24)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        strategy = MegatronTPStrategy(tensor_parallel_size=2)
        trainer = L.Trainer(**_kwargs(devices=world, strategy=strategy,
                                      callbacks=[StochasticWeightAveraging(swa_lrs=1e-3)]))  # fmt: skip
        with pytest.raises(
            UnsupportedCallbackError, match="StochasticWeightAveraging is not supported.*WeightAveraging"
        ):
            trainer.fit(model)
        after = model.state_dict()
        return trainer.global_step == 0 and all(torch.equal(after[k], v) for k, v in before.items())


def test_stochastic_weight_averaging_is_refused_before_the_model_changes():
    assert all(_dist.run(2, _fit_swa, 2))


class _AverageIsModel(L.Callback):
    """At the start of training: whether the averaging callback's copy holds the model's weights."""

    def __init__(self, averaging):
        self.averaging, self.same = averaging, None

    def on_train_start(self, trainer, pl_module):
        copy = _compat.averaged_model(self.averaging).module
        pairs = zip(copy.parameters(), pl_module.parameters(), strict=True)
        self.same = all(torch.equal(a.to_local(), b.to_local()) for a, b in pairs)  # ZeRO: DTensors


def _after_fit(world, path):
    with lit.external_launch(world):
        model = lit.LitGPT(batch_size=4, n_train=24)
        strategy = MegatronTPStrategy(tensor_parallel_size=2, zero_stage=2)
        trainer = L.Trainer(**_kwargs(devices=world, strategy=strategy, callbacks=[_averaging("ema")]))
        trainer.fit(model)
        val = trainer.validate(model, verbose=False)[0]["val_loss"]  # the callback's copy is left from fit
        trainer.save_checkpoint(path)  # outside fit: the model's weights alone
        with pytest.raises(UnsupportedCallbackError, match="already sharded by an earlier fit"):
            L.Trainer(**_kwargs(devices=world, strategy=MegatronTPStrategy(tensor_parallel_size=2),
                                callbacks=[_averaging("ema")])).fit(model)  # fmt: skip
        fresh, averaging = lit.LitGPT(batch_size=4, n_train=24), _averaging("ema")
        check = _AverageIsModel(averaging)
        strategy = MegatronTPStrategy(tensor_parallel_size=2, zero_stage=2)
        trainer = L.Trainer(**_kwargs(devices=world, strategy=strategy, callbacks=[averaging, check],
                                      max_steps=STEPS + 1))  # fmt: skip
        trainer.fit(fresh, ckpt_path=path)
        return val, check.same, trainer.global_step


def test_validate_after_fit_a_checkpoint_then_and_a_second_fit(tmp_path):
    """ZeRO-2: validate after fit swaps with the callback's copy (the weights split over DP at both ends);
    a checkpoint saved then holds the model's weights, and a resume with the callback starts its copy
    from them; a second fit of the sharded model with the callback is refused before it copies."""
    for val, same, step in _dist.run(4, _after_fit, 4, str(tmp_path / "late.ckpt")):
        assert torch.isfinite(torch.tensor(val)) and same and step == STEPS + 1
