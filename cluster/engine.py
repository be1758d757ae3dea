"""What every policy engine does, whatever serves it (vLLM, transformers): the protocol and its records.

Prompts travel as token IDs so that prefixes shared between requests hit the prefix cache, and every
sampled token comes back with its log-probability, the top-k alternatives and an entropy estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

EntropyKind = Literal["exact", "topk_bounds"]


class EngineRequestError(ValueError):
    """A request the engine refuses (empty prompt, too long, n < 1, ...). The engine keeps serving."""


@dataclass(frozen=True)
class GenerationRequest:
    """Sample `n` continuations of `prompt_token_ids`."""

    prompt_token_ids: list[int]
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    top_logprobs: int = 0  # alternatives returned per generated token (0: none)
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    request_id: str = ""


@dataclass
class Sample:
    """One sampled continuation."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    logprobs: list[float]  # log p of each sampled token (under the distribution it was sampled from)
    top_logprobs: list[list[tuple[int, float]]]  # per position: [(token_id, logprob)] best first
    entropy: list[float]  # per position: exact H_t, or the lower bound when entropy_kind == "topk_bounds"
    entropy_upper: list[float] | None = None  # per position upper bound (topk_bounds only)
    entropy_kind: EntropyKind = "exact"


@dataclass
class GenerationResult:
    """The `n` samples of one request, plus the token counts that measure its cost."""

    request_id: str
    samples: list[Sample]
    prompt_tokens: int
    generated_tokens: int
    cached_prompt_tokens: int = 0


@runtime_checkable
class EngineProtocol(Protocol):
    """A policy engine. Implementations: cluster.vllm_engine.VLLMEngine, cluster.hf_engine.HFEngine."""

    model_path: str

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Serve a batch; results come back in request order."""
        ...

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, token_ids: list[int]) -> str: ...

    def health(self) -> dict: ...
