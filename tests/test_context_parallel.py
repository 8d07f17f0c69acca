"""Ring attention across 3 CPU processes equals PyTorch's causal attention over the whole
sequence, forward and backward, with grouped key/value heads."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed import run_processes

SHAPES = {"q": (2, 4, 24, 8), "k": (2, 2, 24, 8), "v": (2, 2, 24, 8)}


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}
    tensors["grad"] = torch.randn(SHAPES["q"], generator=gen)
    return tensors


def _worker(rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from openafm.train import ring_attention, shard_sequence

    cp = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    x = {name: shard_sequence(t, cp, dim=2) for name, t in _inputs().items()}
    q, k, v = (x[n].clone().requires_grad_() for n in "qkv")
    o = ring_attention(q, k, v, cp.get_group())
    (o * x["grad"]).sum().backward()
    gathered = {}
    for name, t in {"out": o.detach(), "q": q.grad, "k": k.grad, "v": v.grad}.items():
        parts = [torch.zeros_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        gathered[name] = torch.cat(parts, dim=2)
    if rank == 0:
        torch.save(gathered, out)


def test_ring_attention_equals_whole_sequence_attention(tmp_path):
    x = _inputs()
    q, k, v = (x[n].clone().requires_grad_() for n in "qkv")
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    (o * x["grad"]).sum().backward()
    out = str(tmp_path / "ring.pt")
    run_processes(3, _worker, out)
    ring = torch.load(out)
    torch.testing.assert_close(ring["out"], o.detach(), atol=1e-5, rtol=1e-5)
    for name, t in (("q", q), ("k", k), ("v", v)):
        torch.testing.assert_close(ring[name], t.grad, atol=1e-5, rtol=1e-5)


def _shard_worker(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from openafm.train import shard_sequence

    cp = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    with pytest.raises(ValueError, match="not divisible by the context-parallel size 2"):
        shard_sequence(torch.zeros(1, 7), cp)


def test_a_sequence_that_does_not_split_evenly_is_refused():
    run_processes(2, _shard_worker)
