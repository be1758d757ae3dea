"""Next-token entropy of a policy, exact from logits or bounded from top-k logprobs.

EDU-PRM (arXiv 2503.22233) cuts a solution where the policy's next-token entropy
``H_t = -sum_v p_v log p_v`` (nats) is high. A transformers forward pass gives the full logits, so
``H_t`` is exact; vLLM returns only the top-k logprobs (k <= 20; the full vocabulary is slow), which
bound ``H_t`` from both sides (see ``topk_entropy_bounds``). Callers record which estimate they used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# A top-k whose probabilities sum above 1 + this is not a distribution (beyond rounding).
_SUM_TOL = 1e-6


def entropy_from_logits(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Exact entropy in nats of ``softmax(logits / temperature)`` along the last axis.

    ``logits`` is a torch tensor or anything numpy accepts, shaped ``[V]`` or ``[T, V]`` (any leading
    dims work); the result has the leading shape (``()`` for ``[V]``, ``[T]`` for ``[T, V]``), float64.
    Computed through a log-softmax in float64, so large logits do not overflow; ``-inf`` logits (masked
    tokens) contribute zero. Torch tensors are reduced on their own device, then copied to the host.
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency, but the math does not need it
        torch = None
    if torch is not None and isinstance(logits, torch.Tensor):
        if logits.ndim == 0 or logits.shape[-1] == 0:
            raise ValueError(f"logits must have a non-empty last (vocabulary) axis, got shape {tuple(logits.shape)}")
        x = logits.detach().to(torch.float64) / temperature
        logp = torch.log_softmax(x, dim=-1)
        p = logp.exp()
        plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
        return (-plogp.sum(dim=-1)).cpu().numpy()
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) axis, got shape {x.shape}")
    x = x / temperature
    m = np.max(x, axis=-1, keepdims=True)
    if not np.all(np.isfinite(m)):
        raise ValueError("every row of logits needs at least one finite value (and no +inf / NaN)")
    z = x - m
    with np.errstate(invalid="ignore", divide="ignore"):
        logp = z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))
        p = np.exp(logp)
        plogp = np.where(p > 0, p * logp, 0.0)
    return -np.sum(plogp, axis=-1)


def entropy_from_logprobs(logprobs: Any) -> Any:
    """H = -sum_v p_v log p_v in nats over the last axis of a torch tensor of log-probabilities, as a tensor on
    the same device and in the same dtype (differentiable: the PRM's token features train through it).

    ``-inf`` entries (tokens of probability 0: masked, or outside a top-p nucleus) contribute nothing, where the
    naive ``-(p * logp).sum()`` gives ``0 * -inf = NaN``. The one home of the torch entropy: the transformers
    engine, the policy evaluation and the PRM's token features use it; ``entropy_from_logits`` is the float64
    reference it is tested against.
    """
    p = logprobs.exp()
    plogp = (p * logprobs.masked_fill(p == 0, 0.0)).sum(dim=-1)
    return (-plogp).clamp_min(0.0)


def topk_entropy_bounds(
    top_logprobs: Sequence[float], vocab_size: int, *, k: int | None = None
) -> tuple[float, float]:
    """Lower and upper bound (nats) on the entropy of a distribution known only by its top-k logprobs.

    With ``H_k = -sum_{i<=k} p_i log p_i``, tail mass ``r = 1 - sum_{i<=k} p_i`` and ``p_k`` the smallest
    of the top k (EDU-PRM arXiv 2503.22233 takes the entropy from the policy's logprobs; vLLM returns the top k)::

        lower = H_k + r * (-log p_k)         every tail token has p <= p_k, so -log p >= -log p_k
        upper = H_k + r * log((V - k) / r)   the tail spread uniformly over the other V - k tokens

    Entries may come in any order. ``r <= 0`` (rounding: the top k hold all the mass) and ``k == V`` give
    ``lower == upper == H_k``; a top-k summing above ``1 + 1e-6`` raises ``ValueError``.

    The lower bound holds only if the entries ARE the k most likely tokens, each once. vLLM's per-position
    logprobs (a dict keyed by token id, so no duplicates) hold the top-k *plus the sampled token* when that
    token is not among them: k + 1 entries, the extra one possibly far down the distribution, and its
    ``p`` is not a bound on the tail. Pass the distinct top entries only, or pass ``k`` (the number
    requested) and the ``k`` largest entries are used. The upper bound holds for any distinct tokens.

    The bounds are for whatever distribution the logprobs describe: vLLM's V1 engine returns raw
    (pre-temperature) logprobs unless ``logprobs_mode`` says otherwise.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    lp = np.asarray(top_logprobs, dtype=np.float64).ravel()
    if lp.size == 0:
        raise ValueError("top_logprobs is empty: need at least one logprob")
    if np.any(np.isnan(lp)) or np.any(lp == np.inf):
        raise ValueError(f"top_logprobs must be logprobs (<= 0, not NaN), got {lp.tolist()}")
    if k is not None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        lp = np.sort(lp)[::-1][:k]
    n_top = int(lp.size)
    if n_top > vocab_size:
        raise ValueError(f"{n_top} logprobs given for a vocabulary of {vocab_size}: entries must be distinct tokens")
    p = np.exp(np.minimum(lp, 0.0))  # logprobs a hair above 0 are rounding
    total = math.fsum(p.tolist())
    if total > 1.0 + _SUM_TOL:
        raise ValueError(f"top-k probabilities sum to {total:.9f} > 1: not logprobs of one distribution")
    with np.errstate(invalid="ignore"):
        h_k = float(-np.sum(np.where(p > 0, p * np.minimum(lp, 0.0), 0.0)))
    r = 1.0 - total
    if r <= 0.0 or n_top == vocab_size:  # rounding can push r to or below 0: the tail is empty
        return h_k, h_k
    p_min = float(p.min())
    if p_min <= 0.0:
        raise ValueError("a zero-probability entry among the top-k while mass remains in the tail: not a top-k")
    upper = h_k + r * math.log((vocab_size - n_top) / r)
    lower = h_k + r * (-math.log(p_min))
    # For a true top-k, r / (V - k) <= p_k, so lower <= upper; keep rounding from inverting them.
    return min(lower, upper), upper
