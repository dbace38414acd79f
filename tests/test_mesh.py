import pytest
import torch.distributed as dist

import _dist
from lightning_tp.engine.mesh import global_rank, init_tp_mesh, parallel_sizes, rank_coords
from lightning_tp.errors import MeshConfigError


@pytest.mark.parametrize(("world", "tp", "expected"), [(4, 2, (2, 2)), (4, 4, (1, 4)), (8, 1, (8, 1)), (6, 3, (2, 3))])
def test_parallel_sizes(world, tp, expected):
    assert parallel_sizes(world, tp) == expected


@pytest.mark.parametrize(
    ("world", "tp", "match"),
    [
        (4, 3, r"tensor_parallel_size=3 does not divide the world size 4.*one of \[1, 2, 4\]"),
        (4, 0, r"tensor_parallel_size must be an int >= 1, got 0"),
        (0, 1, r"world_size must be an int >= 1, got 0"),
        (4, 2.0, r"tensor_parallel_size must be an int >= 1, got 2.0"),
        (4, True, r"tensor_parallel_size must be an int >= 1, got True"),
    ],
)
def test_parallel_sizes_errors(world, tp, match):
    with pytest.raises(MeshConfigError, match=match):
        parallel_sizes(world, tp)
    assert issubclass(MeshConfigError, ValueError)


def test_rank_arithmetic_is_tp_contiguous():
    tp = 4
    for rank in range(16):
        dp_rank, tp_rank = rank_coords(rank, tp)
        assert rank == dp_rank * tp + tp_rank == global_rank(dp_rank, tp_rank, tp)


def test_init_without_process_group_raises():
    with pytest.raises(RuntimeError, match="initialized default process group"):
        init_tp_mesh(1)


def _mesh_layout(tp):
    m = _dist.mesh(tp)
    return {
        "rank": dist.get_rank(),
        "mesh_rank": m.rank,
        "coords": (m.dp_rank, m.tp_rank),
        "sizes": (m.dp_size, m.tp_size),
        "tp_group": dist.get_process_group_ranks(m.tp_group),
        "dp_group": dist.get_process_group_ranks(m.dp_group),
        "dims": m.device_mesh.mesh_dim_names,
    }


def _mesh_error_before_collective():
    # A bad size must raise on every rank before any sub-group is created (no hang).
    with pytest.raises(MeshConfigError, match="tensor_parallel_size=3 does not divide the world size 4"):
        init_tp_mesh(3)
    return True


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mesh_groups_world4(tp):
    layouts = _dist.run(4, _mesh_layout, tp)
    dp = 4 // tp
    for lay in layouts:
        r = lay["rank"]
        assert lay["mesh_rank"] == r
        assert lay["coords"] == (r // tp, r % tp)
        assert lay["sizes"] == (dp, tp)
        assert lay["tp_group"] == [r // tp * tp + i for i in range(tp)]
        assert lay["dp_group"] == [i * tp + r % tp for i in range(dp)]
        assert lay["dims"] == ("data_parallel", "tensor_parallel")


def test_mesh_error_world4():
    assert all(_dist.run(4, _mesh_error_before_collective))
