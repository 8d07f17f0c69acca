"""Context (sequence) parallelism: ring attention over the `cp` mesh dimension.

Each of the `n` ranks of the `cp` group holds one contiguous slice of every sequence. Attention
passes the key/value slices around the ring (`n - 1` neighbour exchanges with
`torch.distributed` point-to-point operations) and merges each slice's partial attention by its
log-sum-exp, so no rank ever holds the whole sequence's scores. Causality makes slices from
later ranks invisible, and a rank's own slice is causal within itself.

PyTorch's own `context_parallel` dispatches only its CUDA attention kernels (on this CPU it
fails with "aten._scaled_dot_product_flash_attention_for_cpu does not have a sharding strategy
registered"), so the ring is written here; it runs on any device and backend with
point-to-point support (gloo, nccl).

The plan leaves the model's code alone: `apply_context_parallel` makes the model's causal
`scaled_dot_product_attention` calls go through the ring (a `TorchFunctionMode` entered for the
model's forward, as PyTorch's implementation does) and offsets the rotary positions by the
slice's start.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.overrides import TorchFunctionMode

from openafm.model import Transformer


class _Exchange:
    """Send a tensor to the ring's next rank while receiving the previous rank's (in flight
    during the computation that follows; `wait()` returns what arrived)."""

    def __init__(self, x: torch.Tensor, group: dist.ProcessGroup) -> None:
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        x = x.contiguous()
        self.received = torch.empty_like(x)
        self.requests = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, x, dist.get_global_rank(group, (rank + 1) % n), group),
                dist.P2POp(
                    dist.irecv, self.received, dist.get_global_rank(group, (rank - 1) % n), group
                ),
            ]
        )

    def wait(self) -> torch.Tensor:
        for request in self.requests:
            request.wait()
        return self.received


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        t = scores.shape[-1]
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores


class _RingAttention(torch.autograd.Function):
    """Forward: each visible key/value slice's attention, merged by log-sum-exp. Backward: the
    slices go round again, each carrying its key/value gradient home (flash-attention style,
    from the saved output and log-sum-exp). Computed in float32."""

    @staticmethod
    def forward(ctx, q, k, v, group, scale):  # type: ignore[override]
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        groups = q.shape[1] // k.shape[1]
        qf = q.float()
        kv = torch.stack((k, v)).float()
        out = torch.zeros_like(qf)
        lse = torch.full((*q.shape[:-1], 1), float("-inf"), device=q.device)
        for step in range(n):
            exchange = _Exchange(kv, group) if step < n - 1 else None
            source = (rank - step) % n  # whose slice `kv` holds now
            if source <= rank:
                k_s, v_s = (t.repeat_interleave(groups, dim=1) for t in kv)
                scores = _scores(qf, k_s, scale, causal=source == rank)
                l_s = scores.logsumexp(dim=-1, keepdim=True)
                merged = torch.logaddexp(lse, l_s)
                out = out * (lse - merged).exp() + ((scores - merged).exp() @ v_s)
                lse = merged
            if exchange is not None:
                kv = exchange.wait()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale = group, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        groups = q.shape[1] // k.shape[1]
        qf, dout = q.float(), grad_out.float()
        delta = (dout * out).sum(dim=-1, keepdim=True)
        dq = torch.zeros_like(qf)
        kv = torch.stack((k, v)).float()
        dkv = torch.zeros_like(kv)  # the gradient of the slice `kv` holds, travelling with it
        for step in range(n):
            source = (rank - step) % n
            if source <= rank:
                k_s, v_s = (t.repeat_interleave(groups, dim=1) for t in kv)
                p = (_scores(qf, k_s, scale, causal=source == rank) - lse).exp()
                ds = p * (dout @ v_s.transpose(-2, -1) - delta) * scale
                dq += ds @ k_s
                b, hkv, t, d = kv.shape[1:]
                dkv[0] += (ds.transpose(-2, -1) @ qf).view(b, hkv, groups, t, d).sum(2)
                dkv[1] += (p.transpose(-2, -1) @ dout).view(b, hkv, groups, t, d).sum(2)
            if step < n - 1:
                kv, dkv = _Exchange(torch.cat((kv, dkv)), group).wait().chunk(2)
            else:
                dkv = _Exchange(dkv, group).wait()
        # after n moves every slice's gradient is back with its owner
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's query slice over the whole ring's keys and values.

    `q` is `(batch, heads, t, head_dim)`, `k`/`v` `(batch, kv_heads, t, head_dim)` (grouped
    heads are shared), each rank holding positions `[rank·t, (rank+1)·t)` of the sequence.
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _RingAttention.apply(q, k, v, group, scale)


class _RingAttentionMode(TorchFunctionMode):
    """Routes causal, unmasked `scaled_dot_product_attention` calls through `ring_attention`."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and kwargs.get("attn_mask") is None:
            q, k, v = args[:3]
            if kwargs.get("is_causal") and kwargs.get("dropout_p", 0.0) == 0.0:
                return ring_attention(q, k, v, self.group, kwargs.get("scale"))
            raise RuntimeError(
                "context parallelism supports causal attention without a mask only"
                " (training; decode with a KV cache runs unsharded)"
            )
        return func(*args, **kwargs)


def apply_context_parallel(model: Transformer, cp: DeviceMesh) -> Transformer:
    """Make `model` attend across the 1-D `cp` mesh; each rank feeds its sequence slice.

    Feed `shard_sequence(tokens, cp)`; the rotary positions of rank r's slice start at r·t.
    """
    group = cp.get_group()
    rank = cp.get_local_rank()
    mode = _RingAttentionMode(group)

    def enter(module: torch.nn.Module, args: tuple) -> None:
        mode.__enter__()

    def leave(module: torch.nn.Module, args: tuple, output: object) -> None:
        mode.__exit__(None, None, None)

    def offset_positions(module: torch.nn.Module, args: tuple) -> tuple:
        positions = args[0]
        return (positions + rank * positions.shape[-1],)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)
    model.rope.register_forward_pre_hook(offset_positions)
    return model


def shard_sequence(x: torch.Tensor, cp: DeviceMesh, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous slice of `x` along `dim` (its length must divide by the cp size)."""
    n = cp.size()
    if x.shape[dim] % n:
        raise ValueError(
            f"sequence length {x.shape[dim]} is not divisible by the context-parallel size {n}"
        )
    return x.chunk(n, dim=dim)[cp.get_local_rank()]
