"""Sharded checkpoints: bitwise resume, resharding across TP sizes, export, bad checkpoints."""

import argparse
import hashlib
import os
from pathlib import Path
from unittest import mock

import lightning as L
import lit
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import _dist
from lightning_tp import CheckpointError, MegatronTPStrategy, consolidate
from lightning_tp.lightning import checkpoint as ckpt
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
    with pytest.raises(CheckpointError, match="pickled objects, which weights_only=True refuses.*weights_only=False"):
        consolidate(path)
    assert consolidate(path, weights_only=False).keys() == consolidate(path, weights_only=False).keys()  # trusted


class PathHparams(lit.LitGPT):
    """Hyperparameters holding objects of the user's: a path (commonly), and an argparse Namespace."""

    def __init__(self, data_dir=Path("/data"), extra=None, **kw):
        super().__init__(**kw)
        self.save_hyperparameters()


class DropLastLayer(lit.LitGPT):
    """Lightning's partial checkpoint: a hook leaves a layer out, loading is non-strict."""

    strict_loading = False

    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if ".layers.1." not in k}


def _fit_with(world, cls, steps, root, ckpt_path=None, weights_only=None, **kw):
    with lit.external_launch(world):
        model = cls(batch_size=4, n_train=16, **kw)
        callbacks = [ModelCheckpoint(dirpath=root, save_weights_only=True, filename="weights", save_last=False)]
        trainer = L.Trainer(**lit.trainer_kwargs(max_steps=steps, devices=world, default_root_dir=root,
                                                 strategy=MegatronTPStrategy(tensor_parallel_size=world),
                                                 enable_checkpointing=True, callbacks=callbacks))  # fmt: skip
        trainer.fit(model, ckpt_path=ckpt_path, weights_only=weights_only)
        return trainer, model


def _checkpoint_paths(root):
    from lightning_tp.lightning.checkpoint import read_meta

    out = {}
    trainer, model = _fit_with(2, PathHparams, 2, root, extra=argparse.Namespace(a=1))
    state = full_state_dict(model, trainer.strategy.tp_group)
    # a URL would be a directory named after it here: refused; file:// is a path
    with pytest.raises(CheckpointError, match="is a URL"):
        trainer.save_checkpoint("s3://bucket/run/x.ckpt")
    written = []  # where the shards go first: the temporary directory a save killed mid-write leaves behind
    real_save = ckpt.dcp.save
    with mock.patch.object(ckpt.dcp, "save", lambda *a, **k: written.append(k["checkpoint_id"]) or real_save(*a, **k)):
        trainer.save_checkpoint(f"file://{root}/hpc_ckpt_1.ckpt")
    out["file_url"] = os.path.isdir(f"{root}/hpc_ckpt_1.ckpt")
    # such a leftover beside the checkpoint: SLURM's resume ("hpc") must not read version digits from it
    if torch.distributed.get_rank() == 0:
        os.makedirs(written[0])
    torch.distributed.barrier()
    with pytest.raises(CheckpointError, match="weights_only=False"):  # the Namespace: refused by default
        _fit_with(2, PathHparams, 4, root, ckpt_path="hpc", extra=argparse.Namespace(a=1))
    trainer, model = _fit_with(2, PathHparams, 2, root, ckpt_path="hpc", weights_only=False)  # trusted
    out["hpc"] = trainer.global_step == 2 and all(
        torch.equal(v, state[k]) for k, v in full_state_dict(model, trainer.strategy.tp_group).items()
    )
    # weights only: no optimizer state written; a fit cannot resume from it, a validation can
    weights = f"{root}/weights.ckpt"
    out["weights_only_keys"] = sorted({k.split(".")[0] for k in _stored_keys(weights)})
    with pytest.raises(CheckpointError, match="saved with the weights only"):
        _fit_with(2, PathHparams, 4, root, ckpt_path=weights, weights_only=False)
    with lit.external_launch(2):
        trainer.validate(model, ckpt_path=weights, verbose=False, weights_only=False)
    # a hook's partial checkpoint: the layer it left out is not written, and keeps its value on a non-strict load
    trainer, model = _fit_with(2, DropLastLayer, 2, root)
    trainer.save_checkpoint(f"{root}/partial.ckpt")
    saved = full_state_dict(model, trainer.strategy.tp_group)
    out["partial_layout"] = sorted({k.split(".")[2] for k in read_meta(f"{root}/partial.ckpt")["lightning_tp"]["layout"]
                                    if k.startswith("model.layers.")})  # fmt: skip
    trainer, model = _fit_with(2, DropLastLayer, 2, root, ckpt_path=f"{root}/partial.ckpt")  # done: loads only
    fresh = lit.LitGPT().state_dict()
    loaded = full_state_dict(model, trainer.strategy.tp_group)
    out["partial_load"] = all(torch.equal(v, (fresh if ".layers.1." in k else saved)[k]) for k, v in loaded.items())
    return out


def _stored_keys(path):
    from torch.distributed.checkpoint import FileSystemReader

    return list(FileSystemReader(path).read_metadata().state_dict_metadata)


def test_checkpoint_paths_as_lightning_users_give_them(tmp_path):
    """file:// URLs (other URLs refused, not written to a relative directory named after them); SLURM's
    "hpc" resume beside a save's leftover temporary directory; hyperparameters holding a path load by
    default, other objects with weights_only=False; weights-only checkpoints hold no optimizer state
    (a fit refuses them, a validation uses them); a hook's partial checkpoint loads non-strictly."""
    try:
        results = _dist.run(2, _checkpoint_paths, str(tmp_path))
    finally:
        _dist.close(2)  # its refused fits leave much behind in the processes
    assert results[0] == results[1]
    r = results[0]
    assert r["file_url"] and r["hpc"]
    assert r["weights_only_keys"] == ["model"]
    assert r["partial_layout"] == ["0"] and r["partial_load"]


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


def test_a_save_over_a_link_replaces_the_link_only(tmp_path):
    """ModelCheckpoint(save_last="link") leaves last.ckpt a link to another checkpoint: a save to last.ckpt
    replaces the link (no dangling link left beside it), and the checkpoint it pointed to stays."""
    target, new = tmp_path / "epoch=0.ckpt", tmp_path / ".new"
    target.mkdir()
    (target / "meta.pt").write_text("old")
    new.mkdir()
    (new / "meta.pt").write_text("new")
    (tmp_path / "last.ckpt").symlink_to(target.name)
    ckpt._replace(new, tmp_path / "last.ckpt", tmp_path / ".old")
    assert not (tmp_path / "last.ckpt").is_symlink() and (tmp_path / "last.ckpt" / "meta.pt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0.ckpt", "last.ckpt"]
    assert (target / "meta.pt").read_text() == "old"


def _other_groups(path):
    m, model, opt = _gpt_with_optimizer(2)
    save(path, model, [opt], m, {"global_step": 2})
    params = list(model.parameters())
    regrouped = torch.optim.AdamW([{"params": params[:3]}, {"params": params[3:], "lr": 1e-3}], lr=1e-2)
    with pytest.raises(
        CheckpointError, match=r"parameter groups of \[\d+\] parameters, the optimizer here has \[3, \d+\]"
    ):
        load(path, model, [regrouped], m)
    return True


def test_optimizer_groups_other_than_saved_are_refused(tmp_path):
    """Resuming with other parameter groups (a fine-tuning callback's group not added again) is an error,
    as torch's load_state_dict makes it, not a silent loss of a group's state."""
    assert all(_dist.run(2, _other_groups, str(tmp_path / "ckpt")))
