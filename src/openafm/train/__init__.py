"""Pre-training: the device mesh and its parallelism plans, the trainer (data order, checkpoints,
metrics), distillation losses and the seed's optimizer."""

from openafm.train.config import TrainConfig, load_train_config
from openafm.train.context_parallel import apply_context_parallel, ring_attention, shard_sequence
from openafm.train.mesh import MESH_DIMS, MeshError, MeshSpec, build_mesh, data_parallel_rank
from openafm.train.optim import RMSPropMomentum
from openafm.train.parallel import (
    apply_fsdp,
    apply_tensor_parallel,
    fsdp_mesh,
    tensor_parallel_plan,
)
from openafm.train.trainer import RunSummary, train

__all__ = [
    "MESH_DIMS",
    "MeshError",
    "MeshSpec",
    "RMSPropMomentum",
    "RunSummary",
    "TrainConfig",
    "apply_context_parallel",
    "apply_fsdp",
    "apply_tensor_parallel",
    "build_mesh",
    "data_parallel_rank",
    "fsdp_mesh",
    "load_train_config",
    "ring_attention",
    "shard_sequence",
    "tensor_parallel_plan",
    "train",
]
