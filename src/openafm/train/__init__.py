"""Training: device mesh and parallelism plans (more to come: trainer, checkpoints, distillation)."""

from openafm.train.parallel import apply_tensor_parallel, tensor_parallel_plan

__all__ = ["apply_tensor_parallel", "tensor_parallel_plan"]
