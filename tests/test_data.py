"""The project's data module: deterministic split over data-parallel replicas and an exact mid-epoch resume."""

from __future__ import annotations

import pytest
import torch

from lightning_tp.data import BlockDataset, ResumableSampler, TextDataModule


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_resumable_sampler_leaves_out_what_was_trained_in_that_epoch_only():
    ds = BlockDataset(torch.arange(101), 4)  # 25 blocks
    for rank in range(2):
        full = ResumableSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        resumed = ResumableSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        resumed.resume(1, 5)
        assert _epoch(resumed, 0) == _epoch(full, 0)  # another epoch: untouched
        assert _epoch(resumed, 1) == _epoch(full, 1)[5:]
        assert _epoch(resumed, 1) == _epoch(full, 1)[5:]  # Lightning may iterate an epoch's loader twice at setup
        assert _epoch(resumed, 2) == _epoch(full, 2)
    a, b = (_epoch(ResumableSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=3, drop_last=True), 0)
            for r in range(2))  # fmt: skip
    assert len(a) == len(b) == 12 and not set(a) & set(b)  # the replicas see different blocks
    with pytest.raises(ValueError, match="samples must be >= 0"):
        full.resume(0, -1)


def test_data_module_state_round_trip(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(chr(i % 30) for i in range(500)))
    dm = TextDataModule(paths=[str(text)], tokenizer="byte", vocab_size=256, block_size=4, batch_size=3,
                        cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert dm.state_dict() == {}  # no trainer: nothing to record
    dm.setup("fit")
    plain = [b[0] for b in dm.train_dataloader()]
    dm.load_state_dict({"epoch": 0, "batches": 2})
    resumed = [b[0] for b in dm.train_dataloader()]
    assert len(plain) == 39 and len(resumed) == 37
    assert all(torch.equal(x, y) for x, y in zip(resumed, plain[2:], strict=True))
    dm.teardown("fit")
    assert len(list(dm.train_dataloader())) == len(plain)
