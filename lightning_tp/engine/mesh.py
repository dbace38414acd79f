"""Tensor x data parallel process groups on a torch `DeviceMesh`.

Layout (Megatron's rule): tensor-parallel ranks are contiguous, so a TP group lives inside one node
when TP <= devices per node::

    global_rank = dp_rank * tp_size + tp_rank

    world 4, tp 2:   tensor_parallel groups [0, 1] [2, 3]
                     data_parallel   groups [0, 2] [1, 3]

The mesh has dims ``("data_parallel", "tensor_parallel")`` and shape ``(dp_size, tp_size)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lightning_tp.errors import MeshConfigError

DP_DIM = "data_parallel"
TP_DIM = "tensor_parallel"


def parallel_sizes(world_size: int, tensor_parallel_size: int) -> tuple[int, int]:
    """Return ``(dp_size, tp_size)`` for a world, after validating the request.

    Args:
        world_size: number of processes in the job.
        tensor_parallel_size: ranks that share one model replica.

    Raises:
        MeshConfigError: a size is not a positive int or TP does not divide the world.
    """
    for name, value in (("world_size", world_size), ("tensor_parallel_size", tensor_parallel_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MeshConfigError(f"{name} must be an int >= 1, got {value!r}.")
    if world_size % tensor_parallel_size != 0:
        raise MeshConfigError(
            f"tensor_parallel_size={tensor_parallel_size} does not divide the world size {world_size}: "
            f"DP x TP must equal the world. Use a tensor_parallel_size that divides {world_size} "
            f"(one of {[d for d in range(1, world_size + 1) if world_size % d == 0]}) or change the "
            "number of devices/nodes."
        )
    return world_size // tensor_parallel_size, tensor_parallel_size


def rank_coords(rank: int, tensor_parallel_size: int) -> tuple[int, int]:
    """Return ``(dp_rank, tp_rank)`` of a global rank (TP ranks contiguous)."""
    return divmod(rank, tensor_parallel_size)


def global_rank(dp_rank: int, tp_rank: int, tensor_parallel_size: int) -> int:
    """Return the global rank at mesh coordinates ``(dp_rank, tp_rank)``."""
    return dp_rank * tensor_parallel_size + tp_rank


@dataclass(frozen=True)
class TPMesh:
    """A 2D (data_parallel, tensor_parallel) mesh and the groups and coordinates derived from it.

    Build one with :func:`init_tp_mesh`; pass it (or its ``tp_group``) explicitly to layers.
    """

    device_mesh: DeviceMesh

    @cached_property
    def tp_group(self) -> ProcessGroup:
        return self.device_mesh.get_group(TP_DIM)

    @cached_property
    def dp_group(self) -> ProcessGroup:
        return self.device_mesh.get_group(DP_DIM)

    @property
    def tp_size(self) -> int:
        return self.device_mesh.size(1)

    @property
    def dp_size(self) -> int:
        return self.device_mesh.size(0)

    @property
    def tp_rank(self) -> int:
        return self.device_mesh.get_local_rank(TP_DIM)

    @property
    def dp_rank(self) -> int:
        return self.device_mesh.get_local_rank(DP_DIM)

    @property
    def world_size(self) -> int:
        return self.device_mesh.size()

    @property
    def rank(self) -> int:
        return global_rank(self.dp_rank, self.tp_rank, self.tp_size)

    @property
    def device_type(self) -> str:
        return self.device_mesh.device_type

    def __repr__(self) -> str:
        return (
            f"TPMesh(dp={self.dp_size}, tp={self.tp_size}, rank={self.rank}, "
            f"dp_rank={self.dp_rank}, tp_rank={self.tp_rank}, device_type={self.device_type!r})"
        )


def init_tp_mesh(tensor_parallel_size: int, device_type: str = "cpu") -> TPMesh:
    """Build the (data_parallel, tensor_parallel) mesh over the initialized default process group.

    Every rank must call this (it creates sub-groups collectively). Sizes are validated before any
    collective.

    Args:
        tensor_parallel_size: ranks per model replica; must divide the world size.
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (nccl).

    Raises:
        RuntimeError: the default process group is not initialized.
        MeshConfigError: TP does not divide the world size.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "init_tp_mesh needs an initialized default process group: call "
            "torch.distributed.init_process_group(...) first (the Lightning strategy does this)."
        )
    dp, tp = parallel_sizes(dist.get_world_size(), tensor_parallel_size)
    mesh = init_device_mesh(device_type, (dp, tp), mesh_dim_names=(DP_DIM, TP_DIM))
    return TPMesh(mesh)
