"""Palettization: a weight's rows share small lookup tables (k-means), chosen with care.

A group of `group_size` consecutive output rows shares one table of `2**bits` float16 values;
each row may first be divided by its own float16 scale (its largest magnitude) so rows of
different ranges can share a table. The table comes from 1-D k-means over the group's values,
optionally weighted by how strongly calibration text excites each input column (the diagonal
of `H = XᵀX`, activation-weighted k-means as in SqueezeLLM / coremltools' sensitive k-means).
Indices are then chosen column by column with GPTQ's error feedback: each column's rounding
error is spread over the columns not yet rounded through `H⁻¹`, which works with any grid,
lookup tables included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openafm.model.compressed import PalettizedWeight, pack_indices

BIT_WIDTHS = (1, 2, 3, 4, 6, 8)


@dataclass(frozen=True)
class PalettizeConfig:
    """How one weight is palettized (bits and table sharing) and how carefully."""

    bits: int = 4
    group_size: int = 16
    row_scale: bool = True
    weighted: bool = True  # activation-weighted k-means (needs calibration statistics)
    error_feedback: bool = True  # GPTQ column-by-column rounding (needs calibration statistics)
    act_order: bool = True  # round the most excited columns first
    kmeans_iters: int = 100
    damp: float = 0.01
    block: int = 128

    def __post_init__(self) -> None:
        if self.bits not in BIT_WIDTHS:
            raise ValueError(f"bits must be one of {BIT_WIDTHS}, not {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"group size must be positive, not {self.group_size}")

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Exact storage per weight: indices, float16 tables and float16 row scales."""
        tables = out_features // self.group_size * (1 << self.bits) * 16
        scales = out_features * 16 if self.row_scale else 0
        return self.bits + (tables + scales) / (out_features * in_features)


def weighted_kmeans_1d(
    values: torch.Tensor, weights: torch.Tensor | None, k: int, iters: int = 100
) -> torch.Tensor:
    """Sorted centroids `(groups, k)` of each row of `values` `(groups, n)`; `k` a power of two.

    Linde-Buzo-Gray: start from the weighted mean, split every centroid in two and run Lloyd's
    iterations, until there are `k`. (Lloyd's from quantiles stalls in poor local minima: on
    the default base's 6-bit tables it left 1.8x the squared error.) In one dimension every
    cluster is a run of the sorted values, so after one sort an iteration needs only prefix
    sums at the cluster boundaries. Deterministic. A row with at most `k` distinct values gets
    exactly those values (padded by repeating the last), so it is represented exactly.
    """
    if k & (k - 1):
        raise ValueError(f"k must be a power of two, not {k}")
    groups = values.shape[0]
    sorted_v, order = values.float().sort(dim=1)
    w = torch.ones_like(sorted_v) if weights is None else weights.float().gather(1, order)
    w = w.clamp(min=1e-12).double()
    zero = torch.zeros(groups, 1, dtype=torch.float64)
    cum_w = torch.cat([zero, w.cumsum(1)], dim=1)
    cum_wv = torch.cat([zero, (w * sorted_v.double()).cumsum(1)], dim=1)
    centroids = (cum_wv[:, -1:] / cum_w[:, -1:]).float()
    spread = (sorted_v[:, -1:] - sorted_v[:, :1]).clamp(min=1e-12) * 1e-3
    while centroids.shape[1] < k:
        centroids = torch.cat([centroids - spread, centroids + spread], dim=1).sort(dim=1).values
        centroids = _lloyd(sorted_v, cum_w, cum_wv, centroids, iters)
    distinct = (sorted_v[:, 1:] != sorted_v[:, :-1]).sum(dim=1) + 1
    for g in torch.nonzero(distinct <= k).flatten().tolist():
        values_g = torch.unique(sorted_v[g])
        centroids[g] = torch.cat([values_g, values_g[-1:].expand(k - values_g.numel())])
    return centroids


def _lloyd(
    sorted_v: torch.Tensor,
    cum_w: torch.Tensor,
    cum_wv: torch.Tensor,
    centroids: torch.Tensor,
    iters: int,
) -> torch.Tensor:
    """Lloyd's iterations on sorted values, from prefix sums of weights and weighted values."""
    groups, n = sorted_v.shape
    first, last = torch.zeros(groups, 1, dtype=torch.int64), torch.full((groups, 1), n)
    for _ in range(iters):
        mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
        edges = torch.cat([first, torch.searchsorted(sorted_v, mids.contiguous()), last], dim=1)
        mass = cum_w.gather(1, edges[:, 1:]) - cum_w.gather(1, edges[:, :-1])
        total = cum_wv.gather(1, edges[:, 1:]) - cum_wv.gather(1, edges[:, :-1])
        updated = torch.where(mass > 0, total / mass.clamp(min=1e-300), centroids.double()).float()
        updated = updated.sort(dim=1).values
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids


def _nearest_sorted(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of each row's sorted centroids, for every value."""
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.searchsorted(mids.contiguous(), values.contiguous())


def palettize(
    weight: torch.Tensor, config: PalettizeConfig, hessian: torch.Tensor | None = None
) -> PalettizedWeight:
    """Palettize `weight` `(out, in)`; `hessian` is `XᵀX` of its calibration inputs `(in, in)`."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    g = config.group_size
    if out_features % g:
        raise ValueError(f"group size {g} does not divide the {out_features} rows of a weight")
    scale = None
    if config.row_scale:
        scale = w.abs().amax(dim=1).clamp(min=1e-8).to(torch.float16)
        w = w / scale.float().unsqueeze(1)
    k = 1 << config.bits
    column_weight = None
    if config.weighted and hessian is not None:
        column_weight = hessian.diagonal().float().clamp(min=0) + 1e-8
    grouped = w.reshape(out_features // g, g * in_features)
    weights = None
    if column_weight is not None:
        weights = column_weight.repeat(g).expand(out_features // g, -1)
    lut = weighted_kmeans_1d(grouped, weights, k, config.kmeans_iters).to(torch.float16)
    row_lut = lut.float().repeat_interleave(g, dim=0)
    if config.error_feedback and hessian is not None:
        idx = _gptq_assign(w, row_lut, hessian.float(), config)
    else:
        idx = _nearest_sorted(w, row_lut)
    packed = pack_indices(idx, config.bits)
    return PalettizedWeight(
        packed, lut, scale, bits=config.bits, group_size=g, in_features=in_features
    )


def _gptq_assign(
    w: torch.Tensor, row_lut: torch.Tensor, hessian: torch.Tensor, config: PalettizeConfig
) -> torch.Tensor:
    """Table indices chosen column by column, each column's error fed forward through `H⁻¹`."""
    w = w.clone()
    n = w.shape[1]
    h = hessian.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(h.diagonal(), descending=True) if config.act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h.diagonal().add_(config.damp * h.diagonal().mean())
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    u = torch.linalg.cholesky(h_inv, upper=True)
    idx = torch.empty(w.shape, dtype=torch.int64)
    for start in range(0, n, config.block):
        end = min(start + config.block, n)
        block = w[:, start:end].clone()
        errors = torch.empty_like(block)
        u_block = u[start:end, start:end]
        for i in range(end - start):
            column = block[:, i]
            nearest = _nearest_sorted(column.unsqueeze(1), row_lut).squeeze(1)
            idx[:, start + i] = nearest
            error = (column - row_lut.gather(1, nearest.unsqueeze(1)).squeeze(1)) / u_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ u[start:end, end:]
    return idx[:, torch.argsort(perm)]
