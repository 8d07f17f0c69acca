"""Training: the device mesh, parallelism plans and the seed's optimizer (more to come: trainer,
checkpoints, distillation)."""

from openafm.train.mesh import MESH_DIMS, MeshError, MeshSpec, build_mesh
from openafm.train.optim import RMSPropMomentum
from openafm.train.parallel import (
    apply_fsdp,
    apply_tensor_parallel,
    data_parallel_mesh,
    tensor_parallel_plan,
)

__all__ = [
    "MESH_DIMS",
    "MeshError",
    "MeshSpec",
    "RMSPropMomentum",
    "apply_fsdp",
    "apply_tensor_parallel",
    "build_mesh",
    "data_parallel_mesh",
    "tensor_parallel_plan",
]
