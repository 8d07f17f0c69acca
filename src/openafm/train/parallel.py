"""Parallelism plans applied to an unchanged model: tensor parallelism with sequence-parallel
norms, and fully-sharded data parallelism (FSDP2, HSDP with a replicate dimension).

The plan follows torchtitan's for llama: column-parallel Q/K/V and gate/up, row-parallel O and
down, the residual stream sharded along the sequence between blocks (norms run
`SequenceParallel`), the vocabulary sharded in the embedding and the output head; per-head
q/k norms see their rank's heads as a shard of the head dimension. With tied
embeddings both styles shard the one tensor on its vocabulary dimension, so the tie is kept.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from openafm.model import Transformer


def tensor_parallel_plan(
    model: Transformer, *, sequence_parallel: bool = True
) -> dict[str, ParallelStyle]:
    """The `parallelize_module` plan for `model` (module path → style)."""
    seq = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "output": ColwiseParallel(input_layouts=seq, output_layouts=Replicate()),
    }
    if sequence_parallel:
        plan["norm"] = SequenceParallel()
    for i in range(len(model.layers)):
        p = f"layers.{i}."
        plan |= {
            p + "attn": PrepareModuleInput(
                input_layouts=(seq, None, None, None, None, None),
                desired_input_layouts=(Replicate(), None, None, None, None, None),
            ),
            p + "attn.q": ColwiseParallel(),
            p + "attn.k": ColwiseParallel(),
            p + "attn.v": ColwiseParallel(),
            p + "attn.o": RowwiseParallel(output_layouts=seq),
            p + "mlp": PrepareModuleInput(
                input_layouts=(seq,), desired_input_layouts=(Replicate(),)
            ),
            p + "mlp.gate": ColwiseParallel(),
            p + "mlp.up": ColwiseParallel(),
            p + "mlp.down": RowwiseParallel(output_layouts=seq),
        }
        if sequence_parallel:
            plan[p + "attn_norm"] = SequenceParallel()
            plan[p + "mlp_norm"] = SequenceParallel()
        if model.config.qk_norm:  # each rank norms its own heads: the weight's gradient sums them
            heads = SequenceParallel(sequence_dim=1, use_local_output=True)
            plan[p + "attn.q_norm"] = heads
            plan[p + "attn.k_norm"] = heads
    return plan


def apply_tensor_parallel(
    model: Transformer, mesh: DeviceMesh, *, sequence_parallel: bool = True
) -> Transformer:
    """Shard `model` in place over the 1-D `mesh`; head counts must divide by its size."""
    c, tp = model.config, mesh.size()
    for name, n in (("n_heads", c.n_heads), ("n_kv_heads", c.n_kv_heads), ("ffn_dim", c.ffn_dim)):
        if n % tp:
            raise ValueError(f"{name}={n} is not divisible by the tensor-parallel size {tp}")
    parallelize_module(
        model, mesh, tensor_parallel_plan(model, sequence_parallel=sequence_parallel)
    )
    model.tie_weights()
    return model


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP shards over: `dp_shard` (flattened with `cp`, whose ranks hold the same
    weights and whose gradients must be averaged too), and `dp_replicate` before it (HSDP)."""
    shard = "dp_shard"
    if mesh["cp"].size() > 1:
        shard = "dp_shard_cp"
        mesh["dp_shard", "cp"]._flatten(shard)  # idempotent: the same layout is reused
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", shard]
    return mesh[shard]


def apply_fsdp(model: Transformer, mesh: DeviceMesh) -> Transformer:
    """Shard every block, then the rest (embedding, head, final norm), over `fsdp_mesh(mesh)`
    of the named `mesh` (`openafm.train.mesh`); gradients are averaged across it."""
    dp = fsdp_mesh(mesh)
    for layer in model.layers:
        fully_shard(layer, mesh=dp)
    fully_shard(model, mesh=dp)
    return model
