"""Training: the device mesh, parallelism plans, the seed's optimizer and distillation losses
(more to come: trainer, checkpoints)."""

from openafm.train.context_parallel import apply_context_parallel, ring_attention, shard_sequence
from openafm.train.mesh import MESH_DIMS, MeshError, MeshSpec, build_mesh, data_parallel_rank
from openafm.train.optim import RMSPropMomentum
from openafm.train.parallel import (
    apply_fsdp,
    apply_tensor_parallel,
    fsdp_mesh,
    tensor_parallel_plan,
)

__all__ = [
    "MESH_DIMS",
    "MeshError",
    "MeshSpec",
    "RMSPropMomentum",
    "apply_context_parallel",
    "apply_fsdp",
    "apply_tensor_parallel",
    "build_mesh",
    "data_parallel_rank",
    "fsdp_mesh",
    "ring_attention",
    "shard_sequence",
    "tensor_parallel_plan",
]
