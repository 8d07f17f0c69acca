"""The seed's RMSProp-with-momentum optimizer: against a NumPy transcription of its formulas,
its per-block clip, and the same step on parameters sharded by FSDP in 2 processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openafm.train.optim import RMSPropMomentum
from tests.distributed import run_processes


def _reference(p, grads, lr, betas, eps, clip, wd):
    """The update rule written out in NumPy, one block."""
    p, v, m = p.copy(), np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        v = betas[1] * v + (1 - betas[1]) * g * g
        u = g / (np.sqrt(v / (1 - betas[1] ** t)) + eps)
        u = u / max(1.0, np.sqrt(np.mean(u * u)) / clip)
        m = betas[0] * m + (1 - betas[0]) * u
        p = p - lr * (m + wd * p)
    return p


@pytest.mark.parametrize("clip", [0.3, 10.0])
def test_steps_match_the_formulas(clip):
    rng = np.random.default_rng(0)
    start = rng.normal(size=(5, 7))
    grads = [rng.normal(size=(5, 7)) * s for s in (1.0, 3.0, 0.1, 2.0)]
    param = torch.nn.Parameter(torch.tensor(start))
    settings = {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-8, "clip": clip, "wd": 0.1}
    optimizer = RMSPropMomentum(
        [param],
        lr=settings["lr"],
        betas=settings["betas"],
        eps=settings["eps"],
        clip=clip,
        weight_decay=settings["wd"],
    )
    for g in grads:
        param.grad = torch.tensor(g)
        optimizer.step()
    expected = _reference(start, grads, **settings)
    np.testing.assert_allclose(param.detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_a_block_update_is_clipped_to_its_rms_limit():
    param = torch.nn.Parameter(torch.zeros(100))
    grad = torch.ones(100)
    grad[0] = 1e6  # one huge entry: normalisation alone gives every entry magnitude ~1
    param.grad = grad
    RMSPropMomentum([param], lr=1.0, betas=(0.0, 0.9), clip=0.25).step()
    assert param.detach().pow(2).mean().sqrt().item() == pytest.approx(0.25, rel=1e-6)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="clip"):
        RMSPropMomentum([torch.nn.Parameter(torch.zeros(1))], clip=0.0)


def _sharded_step(rank: int, world: int, out: str) -> None:
    from openafm.train import MeshSpec, apply_fsdp, build_mesh
    from tests.conftest import make_tiny

    model = make_tiny(seed=3)
    apply_fsdp(model, build_mesh(MeshSpec.parse("dp_shard=2"), world))
    optimizer = RMSPropMomentum(model.parameters(), lr=0.01, clip=0.5, weight_decay=0.1)
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 17))
    for _ in range(2):
        logits = model(ids[rank : rank + 1, :-1])
        torch.nn.functional.cross_entropy(logits[0], ids[rank, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    weights = {n: p.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(weights, out)


def test_sharded_steps_equal_the_whole_model_steps(tmp_path):
    from tests.conftest import make_tiny

    model = make_tiny(seed=3)
    optimizer = RMSPropMomentum(model.parameters(), lr=0.01, clip=0.5, weight_decay=0.1)
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 17))
    for _ in range(2):
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, 512), ids[:, 1:].reshape(-1)
        ).backward()
        optimizer.step()
        optimizer.zero_grad()
    out = str(tmp_path / "weights.pt")
    run_processes(2, _sharded_step, out)
    sharded = torch.load(out)
    for name, p in model.named_parameters():
        torch.testing.assert_close(sharded[name], p.detach(), atol=1e-5, rtol=1e-4)
