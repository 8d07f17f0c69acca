"""The named device mesh, and one training step under FSDP/HSDP/TP meshes in 4 CPU processes
equal to the same step in one process (loss and gathered gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from openafm.train import MeshError, MeshSpec
from tests.distributed import run_processes


def test_mesh_spec_fills_the_rest_and_names_its_dimensions():
    assert MeshSpec.parse("tp=2").resolve(8) == {"dp_replicate": 1, "dp_shard": 4, "cp": 1, "tp": 2}
    assert MeshSpec.parse("dp_replicate=2, dp_shard=2, tp=-1").resolve(8)["tp"] == 2
    assert MeshSpec.parse("").resolve(3)["dp_shard"] == 3
    assert MeshSpec.parse("cp=-1").resolve(4) == {
        "dp_replicate": 1,
        "dp_shard": 1,
        "cp": 4,
        "tp": 1,
    }


@pytest.mark.parametrize(
    ("text", "world", "message"),
    [
        ("tp=3", 8, "multiple of 3"),
        ("dp_shard=2,tp=2", 8, "4 places for 8"),
        ("pp=2", 4, "bad mesh entry"),
        ("tp=two", 4, "not an integer"),
        ("tp=-1,cp=-1", 4, "only one"),
        ("tp=0", 4, "positive"),
        ("tp=2,tp=2", 4, "given twice"),
    ],
)
def test_bad_meshes_fail_with_one_clear_error(text, world, message):
    with pytest.raises(MeshError, match=message):
        MeshSpec.parse(text).resolve(world)


def _step(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _worker(rank: int, world: int, text: str, out: str) -> None:
    from torch.distributed.tensor import DTensor

    from openafm.train import (
        apply_context_parallel,
        apply_fsdp,
        apply_tensor_parallel,
        build_mesh,
        data_parallel_rank,
        shard_sequence,
    )
    from tests.conftest import make_tiny

    torch.manual_seed(0)
    ids = torch.randint(0, 512, (4, 17))
    model = make_tiny(seed=3)
    mesh = build_mesh(MeshSpec.parse(text), world)
    if mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if mesh["cp"].size() > 1:
        apply_context_parallel(model, mesh["cp"])
    apply_fsdp(model, mesh)
    dp_rank, dp_size = data_parallel_rank(mesh)
    rows = ids[dp_rank * (4 // dp_size) : (dp_rank + 1) * (4 // dp_size)]
    inputs, labels = (shard_sequence(t, mesh["cp"]) for t in (rows[:, :-1], rows[:, 1:]))
    logits = model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    placements = {n: p.placements for n, p in model.named_parameters()}
    assert all(isinstance(p, DTensor) for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.step()
    for p in model.parameters():  # the optimizer's state is sharded exactly like its parameter
        for moment in ("exp_avg", "exp_avg_sq"):
            state = optimizer.state[p][moment]
            assert state.placements == p.placements and state.device_mesh == p.device_mesh
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        q = placements["layers.0.attn.q.weight"]
        torch.save({"losses": losses, "grads": grads, "q": [repr(p) for p in q]}, out)


# a q projection's placements: FSDP shards rows over dp_shard (HSDP replicates across
# dp_replicate); under TP its rows are first split over tp, and FSDP shards each rank's part
PLACEMENTS = {
    "dp_shard=4": ["Shard(dim=0)"],
    "dp_replicate=2,dp_shard=2": ["Replicate()", "Shard(dim=0)"],
    "dp_shard=2,tp=2": ["_StridedShard(dim=0, sf=2)", "Shard(dim=0)"],
    "dp_shard=2,cp=2": ["Shard(dim=0)"],  # FSDP shards over dp_shard x cp flattened
}


@pytest.mark.parametrize("text", list(PLACEMENTS))
def test_one_step_equals_the_single_process_step(tmp_path, text):
    from tests.conftest import make_tiny

    torch.manual_seed(0)
    ids = torch.randint(0, 512, (4, 17))
    model = make_tiny(seed=3)
    loss = _step(model, ids)
    loss.backward()
    out = str(tmp_path / "out.pt")
    run_processes(4, _worker, text, out)
    result = torch.load(out)
    assert result["q"] == PLACEMENTS[text]
    assert torch.stack(result["losses"]).mean() == pytest.approx(loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(result["grads"][name], p.grad, atol=2e-5, rtol=1e-4)
