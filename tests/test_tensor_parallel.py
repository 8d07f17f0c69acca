"""The unchanged model under a tensor-parallel plan in 2 CPU processes equals one process."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_processes


def _worker(rank: int, world: int, sequence_parallel: bool, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from openafm.train import apply_tensor_parallel
    from tests.conftest import make_tiny

    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 16))
    model = make_tiny(seed=3)
    with torch.no_grad():
        expected = model(ids)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    apply_tensor_parallel(model, mesh, sequence_parallel=sequence_parallel)
    q = model.layers[0].attn.q.weight
    assert isinstance(q, DTensor) and q.placements == (Shard(0),)
    assert model.layers[0].attn.o.weight.placements == (Shard(1),)
    assert q.to_local().shape == (model.config.dim // world, model.config.dim)
    assert model.output.weight is model.embed.weight  # still one tensor
    with torch.no_grad():
        got = model(ids)
    if rank == 0:
        torch.save({"expected": expected, "got": got}, out)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tensor_parallel_forward_equals_single_process(tmp_path, sequence_parallel):
    out = str(tmp_path / "out.pt")
    run_processes(2, _worker, sequence_parallel, out)
    result = torch.load(out)
    torch.testing.assert_close(result["got"], result["expected"], atol=1e-5, rtol=1e-5)
