"""Single-process shard math: ShardSpec layouts, padding, round trips and errors."""

import pytest
import torch

from lightning_tp.engine.sharding import ShardSpec
from lightning_tp.errors import ShardingError


@pytest.mark.parametrize(
    ("sizes", "tp", "pad", "dim"),
    [((12,), 2, False, 0), ((12,), 4, False, 1), ((8, 8, 8), 4, False, 0), ((8, 4, 4), 2, False, -1),
     ((30,), 4, True, 0), ((5,), 4, True, 0), ((7, 9), 2, True, 1)],
)  # fmt: skip
def test_shard_unshard_round_trip(sizes, tp, pad, dim):
    spec = ShardSpec(dim=dim, sizes=sizes, tp_size=tp, pad=pad)
    shape = [3, 3]
    shape[dim] = sum(sizes)
    full = torch.randn(*shape, dtype=torch.float64)
    shards = [spec.shard(full, r) for r in range(tp)]
    assert all(s.shape[dim] == spec.local_size for s in shards)
    assert torch.equal(spec.unshard(shards), full)
    # Gathering an activation = concatenating shards in rank order, then the index.
    cat = torch.cat(shards, dim=dim)
    index = spec.gather_index()
    assert torch.equal(cat if index is None else cat.index_select(dim, index), full)


def test_fused_chunks_give_each_rank_the_same_heads_of_q_k_v():
    spec = ShardSpec(dim=0, sizes=(4, 4, 4), tp_size=2)
    full = torch.arange(12)  # q = 0..3, k = 4..7, v = 8..11
    assert spec.shard(full, 0).tolist() == [0, 1, 4, 5, 8, 9]
    assert spec.shard(full, 1).tolist() == [2, 3, 6, 7, 10, 11]


def test_vocab_padding_layout():
    spec = ShardSpec(dim=0, sizes=(30,), tp_size=4, pad=True)
    assert spec.padded_sizes == (32,) and spec.local_size == 8
    assert [spec.valid_range(r) for r in range(4)] == [(0, 8), (8, 8), (16, 8), (24, 6)]
    last = spec.shard(torch.arange(1, 31), 3)
    assert last.tolist() == [25, 26, 27, 28, 29, 30, 0, 0]
    tiny = ShardSpec(dim=0, sizes=(5,), tp_size=4, pad=True)
    assert [tiny.valid_range(r) for r in range(4)] == [(0, 2), (2, 2), (4, 1), (6, 0)]


def test_uneven_split_is_a_typed_error():
    with pytest.raises(
        ShardingError, match=r"cannot split out_features of 'mlp.fc' of size 10 over tensor_parallel_size=4"
    ):
        ShardSpec(dim=0, sizes=(10,), tp_size=4, name="out_features of 'mlp.fc'")
    with pytest.raises(ShardingError, match=r"\(chunk sizes \[8, 6, 6\]\) of size 6 over tensor_parallel_size=4"):
        ShardSpec(dim=0, sizes=(8, 6, 6), tp_size=4, name="qkv")
    spec = ShardSpec(dim=0, sizes=(8,), tp_size=2, name="w")
    with pytest.raises(ShardingError, match=r"w: expected size 8 on dim 0, got \(6, 2\)"):
        spec.shard(torch.zeros(6, 2), 0)
    with pytest.raises(ShardingError, match="w: expected 2 shards, got 1"):
        spec.unshard([torch.zeros(4)])
    assert issubclass(ShardingError, ValueError)
