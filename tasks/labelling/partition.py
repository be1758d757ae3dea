"""Where a solution is cut into steps: EDU-PRM entropy anchors, and the newline / fixed-size baselines.

A partitioner maps one generated solution (per-token texts and next-token entropies) to the sorted START
indices of its steps: ``[0, a_1, a_2, ...]`` for a non-empty solution, ``[]`` for an empty one. A cut at
``a`` sits *before* token ``a`` (the anchor starts the new step), so step ``i`` is
``tokens[b_i:b_{i+1}]``; ``split_steps`` applies the cuts (the tree labeller cuts every row with it).

EDU-PRM (arXiv 2503.22233) cuts where the policy is unsure (high entropy), so each step ends just
before a real decision. The paper ships no code: the threshold, spacing, cap and whitelist here are
our defaults (``configs.schema.PartitionConfig``, whose docstring says so).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from configs.schema import PartitionConfig

T = TypeVar("T")


class AnchorCapWarning(UserWarning):
    """More entropy anchors qualified than ``max_anchors`` allows; the later ones were dropped."""


@runtime_checkable
class Partitioner(Protocol):
    """Cuts one solution into steps. ``params()`` is recorded as provenance with every row."""

    name: str

    def boundaries(self, token_texts: Sequence[str], entropies: Sequence[float]) -> list[int]:
        """Sorted step start indices: ``[0, ...]`` for a non-empty solution, ``[]`` for an empty one."""
        ...

    def params(self) -> dict[str, Any]: ...


def _check_inputs(token_texts: Sequence[str], entropies: Sequence[float] | None) -> None:
    if entropies is None:
        return
    if len(token_texts) != len(entropies):
        raise ValueError(
            f"token_texts and entropies differ in length: {len(token_texts)} tokens, {len(entropies)} entropies"
        )
    for i, h in enumerate(entropies):
        if not math.isfinite(h):
            raise ValueError(f"entropy at token {i} is {h}: entropies must be finite numbers (nats)")


@dataclass(frozen=True)
class EntropyPartition:
    """What ``EntropyPartitioner.partition`` found: the cuts, and whether (and how much) the cap bound."""

    boundaries: list[int]
    candidates: int  # anchors that qualified (tau, spacing, whitelist) before the cap
    dropped: int  # candidates beyond max_anchors, not cut

    @property
    def capped(self) -> bool:
        return self.dropped > 0

    @property
    def cap_reason(self) -> str | None:
        """Why anchors were dropped (for provenance / logs), or None when the cap did not bind."""
        if not self.dropped:
            return None
        kept = self.candidates - self.dropped
        return f"max_anchors={kept} reached: {self.dropped} of {self.candidates} entropy anchors dropped"


class EntropyPartitioner:
    """EDU-PRM (arXiv 2503.22233) steps: cut before each high-entropy token.

    Token ``t`` (``t >= 1``) is an anchor when, scanning left to right:
    - ``entropies[t] >= tau`` (nats);
    - ``t - last_cut >= min_step_tokens``, where the first ``last_cut`` is 0: no step shorter than
      ``min_step_tokens`` except the last one, which runs to the end of the solution;
    - with a ``boundary_whitelist``, the PREVIOUS token's text ends with one of its strings (cut only
      after a newline or sentence punctuation, say);
    - fewer than ``max_anchors`` anchors have been taken. Candidates past the cap are counted (as if
      cut, so spacing applies to them too), reported in ``EntropyPartition.dropped`` / ``cap_reason``
      and in ``self.capped`` / ``self.last_partition`` after ``boundaries``, and warned about with one
      ``AnchorCapWarning`` per solution (filter that category to silence it in bulk runs).
    """

    name = "edu"

    def __init__(
        self,
        tau: float = 1.0,
        min_step_tokens: int = 4,
        max_anchors: int = 8,
        boundary_whitelist: Sequence[str] | None = None,
    ) -> None:
        if not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"tau must be a finite number >= 0 (nats), got {tau}")
        if min_step_tokens < 1:
            raise ValueError(f"min_step_tokens must be >= 1, got {min_step_tokens}")
        if max_anchors < 1:
            raise ValueError(f"max_anchors must be >= 1, got {max_anchors}")
        if boundary_whitelist is not None:
            if len(boundary_whitelist) == 0 or any(not s for s in boundary_whitelist):
                raise ValueError(
                    "boundary_whitelist must hold non-empty strings (None allows any boundary), "
                    f"got {boundary_whitelist!r}"
                )
            boundary_whitelist = tuple(boundary_whitelist)
        self.tau = float(tau)
        self.min_step_tokens = int(min_step_tokens)
        self.max_anchors = int(max_anchors)
        self.boundary_whitelist: tuple[str, ...] | None = boundary_whitelist
        # State of the last `boundaries` call, for callers that record the cap (not thread-safe: use
        # `partition` when one instance serves several threads).
        self.last_partition: EntropyPartition | None = None

    @property
    def capped(self) -> bool:
        """Whether the cap bound in the last ``boundaries`` call."""
        return self.last_partition is not None and self.last_partition.capped

    def params(self) -> dict[str, Any]:
        return {
            "tau": self.tau,
            "min_step_tokens": self.min_step_tokens,
            "max_anchors": self.max_anchors,
            "boundary_whitelist": list(self.boundary_whitelist) if self.boundary_whitelist is not None else None,
        }

    def partition(self, token_texts: Sequence[str], entropies: Sequence[float]) -> EntropyPartition:
        """The cuts plus the cap bookkeeping; pure (no warning, no state)."""
        _check_inputs(token_texts, entropies)
        n = len(token_texts)
        if n == 0:
            return EntropyPartition([], 0, 0)
        cuts = [0]
        last = 0
        candidates = 0
        for t in range(1, n):
            if entropies[t] < self.tau or t - last < self.min_step_tokens:
                continue
            if self.boundary_whitelist is not None and not token_texts[t - 1].endswith(self.boundary_whitelist):
                continue
            candidates += 1
            last = t
            if candidates <= self.max_anchors:
                cuts.append(t)
        return EntropyPartition(cuts, candidates, max(0, candidates - self.max_anchors))

    def boundaries(self, token_texts: Sequence[str], entropies: Sequence[float]) -> list[int]:
        result = self.partition(token_texts, entropies)
        self.last_partition = result
        if result.capped:
            warnings.warn(f"EDU partition: {result.cap_reason}", AnchorCapWarning, stacklevel=2)
        return result.boundaries


class NewlinePartitioner:
    """Math-Shepherd style steps: a step ends with each newline.

    A token whose text contains ``"\\n"`` ends its step; the next step starts at the first following
    token that is not whitespace-only, so blank lines and indentation stay with the step they follow and
    no step is whitespace alone. A newline at the end never opens a trailing empty step. Entropies are
    not used (they may be None); when given they are checked like every partitioner's.
    """

    name = "newline"

    def params(self) -> dict[str, Any]:
        return {}

    def boundaries(self, token_texts: Sequence[str], entropies: Sequence[float] | None = None) -> list[int]:
        _check_inputs(token_texts, entropies)
        if not token_texts:
            return []
        cuts = [0]
        after_newline = False
        for t, text in enumerate(token_texts):
            if after_newline and text.strip():
                cuts.append(t)
                after_newline = False
            if "\n" in text:
                after_newline = True
        return cuts


class FixedPartitioner:
    """Baseline: steps of ``chunk_tokens`` tokens (the last one shorter). Entropies are not used."""

    name = "fixed"

    def __init__(self, chunk_tokens: int = 16) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.chunk_tokens = int(chunk_tokens)

    def params(self) -> dict[str, Any]:
        return {"chunk_tokens": self.chunk_tokens}

    def boundaries(self, token_texts: Sequence[str], entropies: Sequence[float] | None = None) -> list[int]:
        _check_inputs(token_texts, entropies)
        return list(range(0, len(token_texts), self.chunk_tokens))


def make_partitioner(cfg: PartitionConfig) -> Partitioner:
    """The partitioner a config asks for (``cfg.method``: edu | newline | fixed)."""
    if cfg.method == "edu":
        return EntropyPartitioner(cfg.tau, cfg.min_step_tokens, cfg.max_anchors, cfg.boundary_whitelist)
    if cfg.method == "newline":
        return NewlinePartitioner()
    if cfg.method == "fixed":
        return FixedPartitioner(cfg.fixed_chunk_tokens)
    raise ValueError(f"unknown partition method {cfg.method!r} (expected edu, newline or fixed)")


def split_steps(token_ids_or_texts: Sequence[T], boundaries: Sequence[int]) -> list[list[T]]:
    """Cut a token sequence at the step starts from ``Partitioner.boundaries``: step i is ``seq[b_i:b_{i+1}]``.

    ``boundaries`` must be ``[]`` for an empty sequence, else strictly increasing, start at 0 and lie
    inside the sequence; anything else raises ``ValueError`` (no step is ever empty).
    """
    n = len(token_ids_or_texts)
    b = list(boundaries)
    if n == 0:
        if b:
            raise ValueError(f"boundaries {b} given for an empty sequence (expected [])")
        return []
    if not b or b[0] != 0:
        raise ValueError(f"boundaries must start with 0 for a non-empty sequence, got {b}")
    if any(x >= y for x, y in zip(b, b[1:], strict=False)) or b[-1] >= n:
        raise ValueError(f"boundaries must be strictly increasing and < {n} (the sequence length), got {b}")
    ends = b[1:] + [n]
    return [list(token_ids_or_texts[s:e]) for s, e in zip(b, ends, strict=True)]


def decode_steps(tokenizer: Any, token_ids: Sequence[int], boundaries: Sequence[int]) -> list[str]:
    """The step texts of a solution cut at ``boundaries`` (``split_steps``), each decoded on its own: the one rule
    every row's ``completions`` follows (the tree and truth labellers, the active loop's pool)."""
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in split_steps(token_ids, boundaries)]
