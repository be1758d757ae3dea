"""What every policy engine does, whatever serves it (vLLM, transformers, the Ray pool): the protocol and records.

This module sits in tasks/ so that both the domain code (tasks/, which asks for generations) and cluster/
(whose engines and actor pool serve them) import it without an upward arrow: configs <- tasks <- cluster.

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
class Engine(Protocol):
    """What the labeller, the rollouts and the ruler need from a policy engine: batched generation.

    Implementations: cluster.vllm_engine.VLLMEngine, cluster.hf_engine.HFEngine, and cluster.actors.EnginePool
    (the same call, served by engine actors).
    """

    def generate(self, requests: list[GenerationRequest], stage: str = "generate") -> list[GenerationResult]:
        """Serve a batch; results come back in request order. `stage` only tags metrics (generate/branch/rollout)."""
        ...


def check_request(
    request: GenerationRequest, *, vocab_size: int, max_model_len: int, max_top_logprobs: int | None = None
) -> None:
    """Refuse a request no backend could serve, with the reason; raises EngineRequestError.

    Both backends call this before touching the model, so a bad request costs nothing and reads the same
    whichever engine serves it. A prompt must leave room for at least one new token.
    """
    rid = f"request {request.request_id!r}: " if request.request_id else ""
    ids = request.prompt_token_ids
    if not isinstance(ids, list | tuple) or len(ids) == 0:
        raise EngineRequestError(f"{rid}empty prompt (prompt_token_ids must be a non-empty list of ints)")
    if len(ids) >= max_model_len:
        raise EngineRequestError(
            f"{rid}prompt of {len(ids)} tokens leaves no room in the model's context of {max_model_len} tokens"
        )
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
        raise EngineRequestError(f"{rid}token ids out of vocabulary (size {vocab_size}): {bad[:5]}")
    bad_stops = [t for t in request.stop_token_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad_stops:
        raise EngineRequestError(f"{rid}stop_token_ids out of vocabulary (size {vocab_size}): {bad_stops[:5]}")
    if request.n < 1:
        raise EngineRequestError(f"{rid}n must be >= 1, got {request.n}")
    if request.max_new_tokens < 1:
        raise EngineRequestError(f"{rid}max_new_tokens must be >= 1, got {request.max_new_tokens}")
    if not request.temperature >= 0:
        raise EngineRequestError(f"{rid}temperature must be >= 0, got {request.temperature}")
    if not 0 < request.top_p <= 1:
        raise EngineRequestError(f"{rid}top_p must be in (0, 1], got {request.top_p}")
    if request.top_logprobs < 0 or (max_top_logprobs is not None and request.top_logprobs > max_top_logprobs):
        limit = f" and <= {max_top_logprobs}" if max_top_logprobs is not None else ""
        raise EngineRequestError(f"{rid}top_logprobs must be >= 0{limit}, got {request.top_logprobs}")
