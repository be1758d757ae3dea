"""What every policy engine does, whatever serves it (vLLM, transformers, the Ray pool): the protocol and records.

This module sits in tasks/ so that both the domain code (tasks/, which asks for generations) and cluster/
(whose engines and actor pool serve them) import it without an upward arrow: configs <- tasks <- cluster.

Prompts travel as token IDs so that prefixes shared between requests hit the prefix cache, and every
sampled token comes back with its log-probability, the top-k alternatives and an entropy estimate.

Across the Ray boundary a batch of results travels as `PackedResults`: a few flat numpy arrays (token ids,
logprobs, entropies, top-k ids and logprobs with a count per position). Ray moves numpy buffers without
pickling them element by element (zero-copy through the object store), where a list of Samples holding
lists of (token_id, logprob) tuples costs a pickle and an unpickle of every tuple (measured: ~50 ms each way
for 16k tokens x top-20 on the toy workload, the same order as a GPU engine's time for that batch).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np

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
    # Per-token logprobs and entropy. A rollout reads only its text and finish, so it sets False: an engine may then
    # skip them (vLLM: no logprobs, whose per-token decoding in the driver costs as much CPU as the sampling) and
    # return NaN in their place.
    entropy: bool = True
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


@dataclass
class PackedResults:
    """A batch of GenerationResults as flat arrays: what an engine actor returns through Ray.

    Per result: request id, token counts, number of samples. Per sample: text, finish reason, entropy kind,
    token count. Per generated token (all samples concatenated): token id, logprob, entropy (lower bound or
    exact), upper bound (NaN where a sample has none) and how many top-k alternatives it has. Per alternative
    (all positions concatenated): token id and logprob. `unpack_results(pack_results(rs)) == rs`.
    """

    request_ids: list[str]
    prompt_tokens: np.ndarray  # int64, one per result
    generated_tokens: np.ndarray  # int64, one per result
    cached_prompt_tokens: np.ndarray  # int64, one per result
    samples_per_result: np.ndarray  # int64, one per result
    texts: list[str]  # one per sample
    finish_reasons: list[str]
    entropy_kinds: list[str]
    has_upper: np.ndarray  # bool, one per sample: entropy_upper is not None
    sample_lengths: np.ndarray  # int64, one per sample
    token_ids: np.ndarray  # int64, one per generated token
    logprobs: np.ndarray  # float64
    entropy: np.ndarray  # float64
    entropy_upper: np.ndarray  # float64 (NaN for samples without bounds)
    top_counts: np.ndarray  # int64, alternatives per generated token
    top_ids: np.ndarray  # int64, one per alternative
    top_logprobs: np.ndarray  # float64


def pack_results(results: list[GenerationResult]) -> PackedResults:
    """Flatten results into a PackedResults (the engine actor's side of the Ray boundary)."""
    samples = [s for r in results for s in r.samples]
    lengths = [len(s.token_ids) for s in samples]
    for s, n in zip(samples, lengths, strict=True):
        per_position = (len(s.logprobs), len(s.entropy), len(s.top_logprobs))
        if any(m != n for m in per_position) or (s.entropy_upper is not None and len(s.entropy_upper) != n):
            raise ValueError(f"a sample of {n} tokens has per-position records of other lengths {per_position}")
    total = sum(lengths)
    chain = itertools.chain.from_iterable
    nan_row = [float("nan")]
    rows = [row for s in samples for row in s.top_logprobs]
    alts = list(chain(rows))
    return PackedResults(
        request_ids=[r.request_id for r in results],
        prompt_tokens=np.array([r.prompt_tokens for r in results], dtype=np.int64),
        generated_tokens=np.array([r.generated_tokens for r in results], dtype=np.int64),
        cached_prompt_tokens=np.array([r.cached_prompt_tokens for r in results], dtype=np.int64),
        samples_per_result=np.array([len(r.samples) for r in results], dtype=np.int64),
        texts=[s.text for s in samples],
        finish_reasons=[s.finish_reason for s in samples],
        entropy_kinds=[s.entropy_kind for s in samples],
        has_upper=np.array([s.entropy_upper is not None for s in samples], dtype=bool),
        sample_lengths=np.array(lengths, dtype=np.int64),
        token_ids=np.fromiter(chain(s.token_ids for s in samples), dtype=np.int64, count=total),
        logprobs=np.fromiter(chain(s.logprobs for s in samples), dtype=np.float64, count=total),
        entropy=np.fromiter(chain(s.entropy for s in samples), dtype=np.float64, count=total),
        entropy_upper=np.fromiter(
            chain(s.entropy_upper if s.entropy_upper is not None else nan_row * len(s.token_ids) for s in samples),
            dtype=np.float64, count=total),
        top_counts=np.fromiter(map(len, rows), dtype=np.int64, count=total),
        top_ids=np.fromiter((a[0] for a in alts), dtype=np.int64, count=len(alts)),
        top_logprobs=np.fromiter((a[1] for a in alts), dtype=np.float64, count=len(alts)),
    )


def unpack_results(packed: PackedResults) -> list[GenerationResult]:
    """The GenerationResults a PackedResults holds (the driver's side): one `tolist` per array, then slicing."""
    token_ids = packed.token_ids.tolist()
    logprobs = packed.logprobs.tolist()
    entropy = packed.entropy.tolist()
    upper = packed.entropy_upper.tolist()
    alts = iter(zip(packed.top_ids.tolist(), packed.top_logprobs.tolist(), strict=True))
    top_rows = [list(itertools.islice(alts, count)) for count in packed.top_counts.tolist()]
    samples: list[Sample] = []
    start = 0
    for i, n in enumerate(packed.sample_lengths.tolist()):
        end = start + n
        samples.append(Sample(
            token_ids=token_ids[start:end],
            text=packed.texts[i],
            finish_reason=packed.finish_reasons[i],
            logprobs=logprobs[start:end],
            top_logprobs=top_rows[start:end],
            entropy=entropy[start:end],
            entropy_upper=upper[start:end] if packed.has_upper[i] else None,
            entropy_kind=packed.entropy_kinds[i],  # type: ignore[arg-type]
        ))
        start = end
    results: list[GenerationResult] = []
    first = 0
    for i, count in enumerate(packed.samples_per_result.tolist()):
        results.append(GenerationResult(
            request_id=packed.request_ids[i],
            samples=samples[first : first + count],
            prompt_tokens=int(packed.prompt_tokens[i]),
            generated_tokens=int(packed.generated_tokens[i]),
            cached_prompt_tokens=int(packed.cached_prompt_tokens[i]),
        ))
        first += count
    return results


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
