"""Sharded checkpoints: bitwise resume, resharding across TP sizes, export, bad checkpoints."""

import argparse
import hashlib
import os
from pathlib import Path

import lightning as L
import lit
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import _dist
from lightning_tp import CheckpointError, MegatronTPStrategy, consolidate
from lightning_tp.lightning.checkpoint import full_state_dict, load, save
from lightning_tp.lightning.precision import all_reduce_partial_grads
from lightning_tp.policy import apply_policy


def _digest(module):
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


class Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _run(world, tp, steps, ckpt_dir=None, ckpt_path=None, dropout=0.1):
    with lit.external_launch(world):
        model, rec = lit.LitGPT(batch_size=8 // (world // tp), n_train=24, dropout=dropout), Losses()
        callbacks = [rec]
        if ckpt_dir:
            callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1))
        trainer = L.Trainer(
            **lit.trainer_kwargs(max_steps=steps, devices=world, strategy=MegatronTPStrategy(tensor_parallel_size=tp),
                                 gradient_clip_val=1.0, callbacks=callbacks, enable_checkpointing=bool(ckpt_dir))
        )  # fmt: skip
        trainer.fit(model, ckpt_path=ckpt_path)
        return rec.losses, _digest(model), trainer.global_step


@pytest.mark.parametrize(("world", "tp"), [(2, 2), (4, 2)], ids=["tp2", "tp2xdp2"])
def test_resume_is_bitwise(tmp_path, world, tp):
    full = _dist.run(world, _run, world, tp, 6, str(tmp_path / "a"))
    (ckpt,) = (tmp_path / "a").glob("*step=3.ckpt")
    assert ckpt.is_dir() and (ckpt / "meta.pt").is_file()
    assert len(list(ckpt.glob("*.distcp"))) == world  # every rank's shards
    resumed = _dist.run(world, _run, world, tp, 6, None, str(ckpt))
    for (losses, digest, step), (r_losses, r_digest, r_step) in zip(full, resumed, strict=True):
        assert step == r_step == 6
        assert r_losses == losses[3:]  # exactly, with dropout on
        assert r_digest == digest


def _gpt_with_optimizer(tp, seed=0, model="plain"):
    m = _dist.mesh(tp)
    torch.manual_seed(seed)
    model = lit.LitGPT(model=model)
    apply_policy(model, m.tp_group, "auto", example_input=model.example_input_array)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = next(iter(model.train_dataloader()))
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(x).reshape(-1, lit.VOCAB), y.reshape(-1)).backward()
        all_reduce_partial_grads(list(model.parameters()), m.tp_group)  # replicated k/v heads: as the strategy
        opt.step()
        opt.zero_grad()
    return m, model, opt


def _optim_full(model, opt, group):
    """Dense exp_avg of every parameter (gathered), by name."""
    from lightning_tp.engine.layers import gather_weight
    from lightning_tp.engine.sharding import mark_sharded, shard_spec

    out = {}
    for name, p in model.named_parameters():
        t = opt.state[p]["exp_avg"]
        spec = shard_spec(p)
        if spec is not None:
            t = gather_weight(mark_sharded(t.clone(), spec), group)
        out[name] = t
    return out


def _save_tp(path, tp, model="plain"):
    m, model, opt = _gpt_with_optimizer(tp, model=model)
    save(path, model, [opt], m, {"epoch": 0})
    return full_state_dict(model, m.tp_group), _optim_full(model, opt, m.tp_group)


def _load_tp(path, tp, model="plain"):
    m = _dist.mesh(tp)
    torch.manual_seed(99)  # different init: everything must come from the checkpoint
    model = lit.LitGPT(model=model)
    apply_policy(model, m.tp_group, "auto", verify=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state, rng = load(path, model, [opt], m)
    assert state == {"epoch": 0}, state
    assert not rng, rng
    emb = model.model.embed_tokens.weight
    _, n_valid = emb.tp_shard_spec.valid_range(m.tp_rank)
    assert torch.count_nonzero(emb.detach()[n_valid:]) == 0  # padded vocabulary rows stay zero
    assert model.model.lm_head.weight is emb
    return full_state_dict(model, m.tp_group), _optim_full(model, opt, m.tp_group)


@pytest.mark.parametrize(
    ("saved", "world", "tp"), [(2, 2, 1), (2, 4, 4), (2, 2, 2), (4, 2, 2)],
    ids=["tp2-to-tp1", "tp2-to-tp4", "tp2-to-tp2", "tp4-to-tp2"],
)  # fmt: skip
def test_reshard_across_tp_sizes(tmp_path, saved, world, tp):
    """Grouped-query attention with 2 key/value heads: split at TP 2, replicated at TP 4 (each pair of
    ranks computes one head), whole at TP 1; every layout loads into every other."""
    path = str(tmp_path / "ckpt")
    saved_weights, saved_optim = _dist.run(saved, _save_tp, path, saved, "plain_gqa")[0]
    for weights, optim in _dist.run(world, _load_tp, path, tp, "plain_gqa"):
        assert weights.keys() == saved_weights.keys()
        for k in weights:
            assert torch.equal(weights[k], saved_weights[k]), k
        for k in optim:
            assert torch.equal(optim[k], saved_optim[k]), k
    # consolidate without a process group equals the gathered weights
    offline = consolidate(path)
    assert offline.keys() == saved_weights.keys()
    assert all(torch.equal(offline[k], saved_weights[k]) for k in offline)


def _export_logits(path):
    m, model, _ = _gpt_with_optimizer(2)
    save(path, model, [], m, {})
    x = torch.randint(0, lit.VOCAB, (2, lit.SEQ), generator=torch.Generator().manual_seed(3))
    from lightning_tp.engine.loss import gather_logits

    return gather_logits(model(x)).detach(), x  # vocab-sharded logits are not picklable: gathered


def test_export_loads_into_unmodified_model(tmp_path):
    path = tmp_path / "ckpt"
    logits, x = _dist.run(2, _export_logits, str(path))[0]
    from lightning_tp import export

    out = export(path, tmp_path / "model.pt")
    state = torch.load(out, weights_only=True)
    plain = lit.LitGPT()  # the user's module, never rewritten
    plain.load_state_dict(state, strict=True)
    torch.testing.assert_close(plain(x), logits, rtol=1e-5, atol=1e-5)


def _different_model(path):
    m = _dist.mesh(2)
    torch.manual_seed(0)
    model = lit.LitGPT(tied=False)
    apply_policy(model, m.tp_group, "auto", verify=False)
    before = _digest(model)
    with pytest.raises(CheckpointError, match=r"saved with a different model: missing keys \['model.lm_head.weight'\]"):
        load(path, model, [], m)
    assert _digest(model) == before
    return True


def _corrupt(path):
    m = _dist.mesh(2)
    model = lit.LitGPT()
    apply_policy(model, m.tp_group, "auto", verify=False)
    before = _digest(model)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(path, model, [], m)
    assert _digest(model) == before  # nothing overwritten
    return True


def test_bad_checkpoints_are_clear_errors(tmp_path):
    path = str(tmp_path / "ckpt")
    _dist.run(2, _save_tp, path, 2)
    assert all(_dist.run(2, _different_model, path))
    shard = sorted(Path(path).glob("*.distcp"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    assert all(_dist.run(2, _corrupt, path))
    (Path(path) / "meta.pt").unlink()
    with pytest.raises(CheckpointError, match="is not a lightning_tp checkpoint"):
        consolidate(path)


def _pickled_meta(path):
    m, model, _ = _gpt_with_optimizer(2)
    save(path, model, [], m, {"evil": argparse.Namespace(cmd="rm -rf")})  # an arbitrary object
    return True


def test_pickled_objects_refused(tmp_path):
    path = str(tmp_path / "ckpt")
    _dist.run(2, _pickled_meta, path)
    with pytest.raises(CheckpointError, match="pickled objects, which are refused"):
        consolidate(path)


def _factored_state_round_trip(path, tp, load_tp):
    """Adafactor (its row_var / col_var are shaped unlike their parameters) at ``tp``: saved, then read
    into a fresh model and optimizer at ``load_tp`` (``None``: the same mesh). Returns the states that
    came back different on this rank, or the CheckpointError's message."""
    m = _dist.mesh(tp)

    def build(seed, mesh):
        torch.manual_seed(seed)
        model = lit.LitGPT(model="plain")
        apply_policy(model, mesh.tp_group, "auto", verify=False)
        return model, torch.optim.Adafactor(model.parameters(), lr=1e-2)

    model, opt = build(0, m)
    x, y = next(iter(model.train_dataloader()))
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(x).reshape(-1, lit.VOCAB), y.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    save(path, model, [opt], m, {})
    other = _dist.mesh(load_tp or tp)
    model2, opt2 = build(5, other)
    try:
        load(path, model2, [opt2], other)
    except CheckpointError as exc:
        return str(exc)
    return [
        f"{n}.{k}"
        for (n, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True)
        for k, v in opt.state[p].items()
        if torch.is_tensor(v) and not torch.equal(v, opt2.state[p2][k])
    ]


def test_optimizer_state_shaped_unlike_its_parameter_is_kept_per_rank(tmp_path):
    """Adafactor's factored statistics of a sharded parameter differ on each TP rank: every rank's are
    saved and come back to it (before, one rank's were stored for all); at another TP size they cannot
    be resharded, which is a CheckpointError naming the state, not a silent mix."""
    for bad in _dist.run(2, _factored_state_round_trip, str(tmp_path / "a"), 2, None):
        assert bad == [], bad
    for msg in _dist.run(2, _factored_state_round_trip, str(tmp_path / "b"), 2, 1):
        assert "was saved per tensor-parallel rank" in msg and "tensor_parallel_size=1" in msg, msg
