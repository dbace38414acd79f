"""Bad checkpoints and failed saves: clear errors, nothing overwritten, correct resharding.

Already covered in tests/test_checkpoint.py (not repeated here): a truncated shard and a missing
``meta.pt`` (test_bad_checkpoints_are_clear_errors), a checkpoint of a model with an extra key
(missing keys named, same test), resharding TP 2 -> 1/2/4 with the vocabulary padded at TP 4
(test_reshard_across_tp_sizes), and pickled objects refused by ``consolidate``
(test_pickled_objects_refused).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from unittest import mock

import lightning as L
import lit
import models
import pytest
import test_checkpoint as tc
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.checkpoint import FileSystemWriter

import _dist
from lightning_tp import CheckpointError, MegatronTPStrategy, consolidate
from lightning_tp.lightning import checkpoint as ckpt
from lightning_tp.lightning.checkpoint import full_state_dict, load, read_meta, save
from lightning_tp.policy import apply_policy


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A TP-2 checkpoint of lit.LitGPT with AdamW state (do not modify: copy it)."""
    path = tmp_path_factory.mktemp("good") / "ckpt"
    _dist.run(2, tc._save_tp, str(path), 2)
    return path


def _rewritten(tp: int, width: int | None = None, **kwargs):
    m = _dist.mesh(tp)
    torch.manual_seed(99)
    model = lit.LitGPT(**kwargs)
    if width is not None:  # the same architecture at another width
        model.model = models.PlainGPT(vocab=lit.VOCAB, d=width, n_layers=2, n_heads=4, tied=True, ctx=lit.SEQ)
    apply_policy(model, m.tp_group, "auto", verify=False)
    return m, model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _load_fails(path: str, match: str, tp: int = 2, **model_kwargs) -> str:
    m, model, opt = _rewritten(tp, **model_kwargs)
    before = tc._digest(model)
    with pytest.raises(CheckpointError, match=match) as info:
        load(path, model, [opt], m)
    assert tc._digest(model) == before and not opt.state  # nothing loaded
    return str(info.value)


def _truncate(f: Path) -> None:
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)


def _flip_byte(f: Path) -> None:
    with open(f, "r+b") as fh:
        fh.seek(os.path.getsize(f) // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))


DAMAGE = {
    "missing-shard": (lambda p: (p / "__1_0.distcp").unlink(), r"corrupt or truncated: missing file __1_0\.distcp"),
    "truncated-index": (lambda p: _truncate(p / ".metadata"), r"\.metadata is truncated or extended"),
    "corrupt-shard": (lambda p: _flip_byte(p / "__0_0.distcp"), r"__0_0\.distcp is corrupt: its sha256 does not match"),
    "truncated-meta": (lambda p: _truncate(p / "meta.pt"), r"cannot read .*meta\.pt: .*corrupt or truncated"),
    "empty-directory": (lambda p: [f.unlink() for f in p.iterdir()], "is not a lightning_tp checkpoint"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_a_clear_error_on_every_rank(good, tmp_path, damage):
    path = tmp_path / "ckpt"
    shutil.copytree(good, path)
    damage_fn, match = DAMAGE[damage]
    damage_fn(path)
    messages = _dist.run(2, _load_fails, str(path), match)
    assert messages[0] == messages[1]  # every rank raises the same error (the checks are agreed on)
    with pytest.raises(CheckpointError, match=match):  # and the offline path says the same
        consolidate(path)


def _unreadable_on_rank1(path: str) -> str:
    hidden = _raise(CheckpointError(f"{path} is not visible on this node"))
    with mock.patch.object(ckpt, "read_meta", hidden) if dist.get_rank() == 1 else contextlib.nullcontext():
        return _load_fails(
            path, "not visible on this node" if dist.get_rank() == 1 else r"cannot be read on ranks \[1\]"
        )


def test_checkpoint_unreadable_on_one_rank_fails_on_all(good):
    """A file system that shows the checkpoint to some ranks only: every rank raises, none waits."""
    _dist.run(2, _unreadable_on_rank1, str(good))


def _save_untied(path: str) -> bool:
    m, model, opt = _rewritten(2, tied=False)
    save(path, model, [opt], m, {"epoch": 0})
    return True


def test_checkpoint_of_another_model_names_keys_and_shapes(good, tmp_path):
    untied = str(tmp_path / "untied")
    _dist.run(2, _save_untied, untied)
    # an extra tensor in the checkpoint: the unexpected key is named (the missing-key case is in test_checkpoint.py)
    _dist.run(2, _load_fails, untied, r"different model: missing keys \[\], unexpected keys \['model.lm_head.weight'\]")
    # the same names at another width: the first mismatching tensor and both shapes are named
    _dist.run(
        2, _load_fails, str(good), r"'model\.\S+' has shape \(\d+, 32\) in the checkpoint but \(\d+, 48\)", width=48
    )


def _reshard_from_padded(path: str, tp: int) -> tuple[dict, dict]:
    return tc._load_tp(path, tp)  # asserts the padded rows are zero and the tie is kept


@pytest.mark.parametrize("tp", [2, 1], ids=["tp4-to-tp2", "tp4-to-tp1"])
def test_reshard_from_padded_vocabulary(tmp_path, tp):
    """Saved at TP 4, where the vocabulary of 30 is padded to 32, loaded where it is not padded."""
    path = str(tmp_path / "ckpt")
    saved_weights, saved_optim = _dist.run(4, tc._save_tp, path, 4)[0]
    assert saved_weights["model.embed_tokens.weight"].shape == (lit.VOCAB, 32)  # gathered: unpadded
    for weights, optim in _dist.run(2, _reshard_from_padded, path, tp):
        assert all(torch.equal(weights[k], saved_weights[k]) for k in saved_weights)
        assert all(torch.equal(optim[k], saved_optim[k]) for k in saved_optim)


def test_pickled_objects_refused_when_resuming(tmp_path):
    """The resume path (``load``, used by ``trainer.fit(ckpt_path=...)``) also uses weights_only=True
    (``consolidate`` is tests/test_checkpoint.py::test_pickled_objects_refused)."""
    path = str(tmp_path / "ckpt")
    _dist.run(2, tc._pickled_meta, path)
    _dist.run(2, _load_fails, path, "holds pickled objects, which weights_only=True refuses.*weights_only=False")


# ------------------------------------------------------------------------------------------------
# A save that fails on one rank never replaces the previous checkpoint.
# ------------------------------------------------------------------------------------------------


def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


def _fault(where: str):
    """A context that makes one part of a save fail on one rank (a no-op on the other ranks)."""
    rank = dist.get_rank()
    if where == "rank1-prepare" and rank == 1:
        return mock.patch.object(ckpt, "_state_to_save", _raise(RuntimeError("out of memory")))
    if where == "rank1-write" and rank == 1:
        return mock.patch.object(FileSystemWriter, "write_data", _raise(OSError(28, "No space left on device")))
    if where == "rank0-meta" and rank == 0:
        return mock.patch.object(ckpt, "_manifest", _raise(OSError(122, "Disk quota exceeded")))  # after the shards
    if where == "rank0-rename" and rank == 0:
        real = Path.rename

        def rename(self, target):
            if self.name.startswith(ckpt._TMP):
                raise OSError(16, "Device or resource busy")
            return real(self, target)

        return mock.patch.object(Path, "rename", rename)
    return contextlib.nullcontext()


def _save_fails_then_load(path: str, where: str) -> tuple[str, list[str], bool]:
    m, model, opt = tc._gpt_with_optimizer(2)
    save(path, model, [opt], m, {"epoch": 0, "global_step": 2})  # the previous, good checkpoint
    good = full_state_dict(model, m.tp_group)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # what the failed save would have written
    with _fault(where), pytest.raises(CheckpointError, match=r"saving checkpoint .* failed on ranks \[") as info:
        save(path, model, [opt], m, {"epoch": 1, "global_step": 4})
    dist.barrier()
    leftovers = sorted(p.name for p in Path(path).parent.iterdir() if p.name != Path(path).name)
    m, fresh, fresh_opt = _rewritten(2)
    state, _ = load(path, fresh, [fresh_opt], m)
    loaded = full_state_dict(fresh, m.tp_group)
    intact = state["global_step"] == 2 and all(torch.equal(loaded[k], good[k]) for k in good)
    return str(info.value), leftovers, intact


@pytest.mark.parametrize(
    ("where", "named"),
    [
        ("rank1-prepare", r"failed on ranks \[1\]"),
        ("rank1-write", "No space left on device"),
        ("rank0-meta", r"failed on ranks \[0\]"),
        ("rank0-rename", r"failed on ranks \[0\]"),
    ],
)
def test_failed_save_keeps_previous_checkpoint(tmp_path, where, named):
    results = _dist.run(2, _save_fails_then_load, str(tmp_path / "ckpt"), where)
    assert any(re.search(named, message) for message, _, _ in results), results
    for message, leftovers, intact in results:
        assert "previous checkpoint at that path, if any, is unchanged" in message
        assert leftovers == []  # no temporary or moved-aside directory left behind
        assert intact  # the previous checkpoint loads, with its own weights and step


class FailSecondSave(L.Callback):
    """Rank 1 cannot write shards from the second checkpoint on (until ``stop``)."""

    def __init__(self):
        self.saves, self.patch = 0, None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saves += 1
        if self.saves == 2 and trainer.global_rank == 1:
            self.patch = mock.patch.object(FileSystemWriter, "write_data", _raise(OSError(28, "No space left")))
            self.patch.start()

    def stop(self):
        if self.patch is not None:
            self.patch.stop()


def _fit_failing_save(ckpt_dir: str) -> tuple[str, int]:
    with lit.external_launch(2):
        fail = FailSecondSave()
        callbacks = [fail, ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1)]
        trainer = L.Trainer(
            **lit.trainer_kwargs(devices=2, strategy=MegatronTPStrategy(tensor_parallel_size=2), max_steps=6,
                                 callbacks=callbacks, enable_checkpointing=True)
        )  # fmt: skip
        try:
            with pytest.raises(CheckpointError, match="No space left") as info:
                trainer.fit(lit.LitGPT())
        finally:
            fail.stop()  # the worker process is reused by later tests
        return str(info.value), trainer.global_step


def test_failed_save_during_fit_stops_every_rank(tmp_path):
    results = _dist.run(2, _fit_failing_save, str(tmp_path))
    assert [step for _, step in results] == [4, 4]  # both ranks stopped at the failed save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=2.ckpt"]
    assert read_meta(tmp_path / "epoch=0-step=2.ckpt")["global_step"] == 2
    lit.LitGPT().load_state_dict(consolidate(tmp_path / "epoch=0-step=2.ckpt"), strict=True)


def _resume_from(path: str) -> str:
    with lit.external_launch(2):
        trainer = L.Trainer(**lit.trainer_kwargs(devices=2, strategy=MegatronTPStrategy(tensor_parallel_size=2)))
        with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
            trainer.fit(lit.LitGPT(), ckpt_path=path)
        return str(info.value)


def test_resume_from_truncated_checkpoint_fails_on_every_rank(good, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(good, path)
    _truncate(path / "__0_0.distcp")
    messages = _dist.run(2, _resume_from, str(path))
    assert messages[0] == messages[1] and "__0_0.distcp is truncated" in messages[0]


def test_the_rename_blocks_signals_in_the_calling_thread(tmp_path, monkeypatch):
    """The previous checkpoint is moved aside, then the new one renamed into place: the thread doing it
    blocks SIGTERM / SIGINT for both renames (their default actions wait in a process of one thread; a
    second signal's exit waits in any case, see test_signals) and unblocks them after."""
    import signal

    from lightning_tp.lightning.checkpoint import _replace

    path, tmp, old = tmp_path / "step=4.ckpt", tmp_path / "tmp", tmp_path / "old"
    for d, text in ((path, "previous"), (tmp, "new")):
        d.mkdir()
        (d / "meta").write_text(text)
    rename, masks = Path.rename, []

    def rename_and_look(self, target):
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_and_look)
    _replace(tmp, path, old)
    assert len(masks) == 2 and all({signal.SIGTERM, signal.SIGINT} <= mask for mask in masks)
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert (path / "meta").read_text() == "new" and not old.exists() and not tmp.exists()
