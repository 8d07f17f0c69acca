"""How close a (compressed) model stays to a reference, as llama.cpp's users measure it.

Over windows of text, the second half of each window is scored (the first half is context, as
`llama-perplexity` does): both perplexities, the per-token KL divergence of the model from the
reference (mean and 99th percentile) and how often both pick the same top token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from openafm.model import KVCache, Transformer


@dataclass(frozen=True)
class QualityReport:
    ppl: float
    ppl_reference: float
    ppl_ratio: float
    kld_mean: float
    kld_p99: float
    top1_agreement: float
    tokens: int
    windows: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def reference_log_probs(
    reference: Transformer, windows: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The reference's log-probabilities on each window's scored half, to score many models."""
    return [F.log_softmax(reference(t)[0, t.shape[1] // 2 : -1].float(), dim=-1) for t in windows]


@torch.no_grad()
def compare_models(
    model: Transformer,
    reference: Transformer | Sequence[torch.Tensor],
    windows: Sequence[torch.Tensor],
    *,
    kv_dtype: torch.dtype | None = None,
    on_window: Callable[[int], None] | None = None,
) -> QualityReport:
    """Score `model` against `reference` on token windows `(1, n)` (the second halves).

    `reference` is a model, or its `reference_log_probs` on these windows.

    With `kv_dtype` (e.g. int8) `model` reads its keys and values back from a KV cache of that
    dtype, as generation does, so the cache's rounding is part of what is scored.
    """
    if not windows:
        raise ValueError("no text windows to score")
    klds, nll, nll_ref, same = [], 0.0, 0.0, 0
    for i, tokens in enumerate(windows):
        start = tokens.shape[1] // 2
        targets = tokens[0, start + 1 :]
        cache = None
        if kv_dtype is not None:
            cache = KVCache(model.config.n_layers, 1, tokens.shape[1], dtype=kv_dtype)
        logp = F.log_softmax(model(tokens, cache)[0, start:-1].float(), dim=-1)
        if isinstance(reference, Transformer):
            logp_ref = F.log_softmax(reference(tokens)[0, start:-1].float(), dim=-1)
        else:
            logp_ref = reference[i]
        klds.append((logp_ref.exp() * (logp_ref - logp)).sum(-1))
        nll -= float(logp.gather(1, targets.unsqueeze(1)).sum())
        nll_ref -= float(logp_ref.gather(1, targets.unsqueeze(1)).sum())
        same += int((logp.argmax(-1) == logp_ref.argmax(-1)).sum())
        if on_window is not None:
            on_window(i + 1)
    kld = torch.cat(klds).clamp(min=0)
    n = kld.numel()
    ppl, ppl_ref = math.exp(nll / n), math.exp(nll_ref / n)
    return QualityReport(
        ppl=ppl,
        ppl_reference=ppl_ref,
        ppl_ratio=ppl / ppl_ref,
        kld_mean=float(kld.mean()),
        kld_p99=float(torch.quantile(kld.double(), 0.99)),
        top1_agreement=same / n,
        tokens=n,
        windows=len(windows),
    )
