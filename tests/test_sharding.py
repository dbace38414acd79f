"""Single-process shard math: ShardSpec layouts, padding, round trips and errors."""

import pytest
import torch

from lightning_tp.engine.sharding import ShardSpec
from lightning_tp.errors import ShardingError


@pytest.mark.parametrize(
    ("sizes", "tp", "pad", "dim", "shared"),
    [((12,), 2, False, 0, ()), ((12,), 4, False, 1, ()), ((8, 8, 8), 4, False, 0, ()), ((8, 4, 4), 2, False, -1, ()),
     ((30,), 4, True, 0, ()), ((5,), 4, True, 0, ()), ((7, 9), 2, True, 1, ()),
     # shared chunks: split into tp / shared pieces, each held by shared consecutive ranks
     ((8,), 2, False, 0, (2,)), ((8,), 4, False, 0, (4,)), ((8, 4, 4), 4, False, 0, (1, 2, 2)),
     ((16, 4, 4), 4, False, -1, (1, 4, 4)), ((12, 6, 6), 2, False, 1, (1, 2, 2))],
)  # fmt: skip
def test_shard_unshard_round_trip(sizes, tp, pad, dim, shared):
    """shard, unshard and the activation gather index agree; summed over the ranks, each chunk's
    squares divided by the ranks holding it give the dense squared norm (a shared piece counts once)."""
    spec = ShardSpec(dim=dim, sizes=sizes, tp_size=tp, pad=pad, shared=shared)
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
    total = sum(
        s.narrow(dim, first, size).square().sum() / spec.shared[c]
        for s in shards
        for c, first, size in spec.chunk_ranges()
    )
    assert torch.allclose(total, full.square().sum())  # padding rows are zeros


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


def test_shared_key_value_heads_layout():
    """(q, k, v) = (8, 2, 2) at TP 4 with the k/v chunks shared by 2 ranks: each rank holds its 2 query
    rows and the k/v head its query heads read."""
    spec = ShardSpec(dim=0, sizes=(8, 2, 2), tp_size=4, shared=(1, 2, 2))
    full = torch.arange(12)  # q = 0..7, k = 8, 9, v = 10, 11
    assert [spec.shard(full, r).tolist() for r in range(4)] == [
        [0, 1, 8, 10], [2, 3, 8, 10], [4, 5, 9, 11], [6, 7, 9, 11]
    ]  # fmt: skip
    assert spec.pieces == (4, 2, 2) and spec.local_sizes == (2, 1, 1) and spec.is_shared
    assert [spec.valid_range(r, 1) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert spec.chunk_ranges() == [(0, 0, 2), (1, 2, 1), (2, 3, 1)]
    assert spec.chunk_ranges((1, 3)) == [(0, 0, 1), (1, 1, 1)]  # a part of the shard (ZeRO's rows)
    assert not ShardSpec(dim=0, sizes=(8,), tp_size=4).is_shared


def test_bad_sharing_is_a_typed_error():
    with pytest.raises(ShardingError, match=r"kv: shared=\[3\] must give, for each of the 1 chunks, a number of ranks"):
        ShardSpec(dim=0, sizes=(8,), tp_size=4, shared=(3,), name="kv")
    with pytest.raises(ShardingError, match=r"shared=\[2\] must give, for each of the 2 chunks"):
        ShardSpec(dim=0, sizes=(8, 8), tp_size=4, shared=(2,), name="kv")
    with pytest.raises(ShardingError, match=r"a chunk of size 3 shared by 2 ranks must divide into 2 equal pieces"):
        ShardSpec(dim=0, sizes=(8, 3), tp_size=4, shared=(1, 2), name="kv")
