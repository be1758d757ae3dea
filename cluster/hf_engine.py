"""The transformers backend: exact per-token entropy from the full logits, on CPU, no vLLM needed.

It is the reference the vLLM backend's entropy bounds are checked against, the engine for machines
without vLLM, and the teacher-forced scorer (`HFEngine.score`) that gives exact entropies for tokens
another engine generated.

Which distribution is measured: the one each token is actually sampled from, i.e. the model's logits
divided by the temperature and then cut to the top-p nucleus (renormalised). The reported logprobs,
top-k alternatives and entropy all refer to that distribution; it is the same one vLLM reports with
``logprobs_mode="processed_logprobs"`` (see cluster/vllm_engine.py). Greedy requests (temperature 0)
report the untempered distribution (temperature 1, no nucleus cut), as vLLM does.
"""

from __future__ import annotations

import itertools
import time

import torch

from configs.models import resolve_model
from tasks.generation import EngineRequestError, GenerationRequest, GenerationResult, Sample, check_request
from tasks.labelling.entropy import entropy_from_logprobs

GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: temperatures below this sample greedily


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probabilities of the distribution tokens are sampled from: logits / T, then the top-p nucleus.

    Tokens outside the nucleus get -inf. The nucleus rule is vLLM's (drop tokens whose ascending
    cumulative probability is <= 1 - top_p, always keep the best one), so both backends cut the same set.
    """
    logits = logits.float()
    if temperature < GREEDY_EPS:
        return logits.log_softmax(dim=-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1.0 - top_p
        drop[..., -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits.log_softmax(dim=-1)


def _top_alternatives(logprobs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Per row: the k best (token_id, logprob), best first, without tokens of probability 0."""
    if k <= 0:
        return [[] for _ in range(logprobs.shape[0])]
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return [
        [(int(t), float(v)) for t, v in zip(row_ids, row_vals, strict=True) if v != float("-inf")]
        for row_ids, row_vals in zip(ids.tolist(), values.tolist(), strict=True)
    ]


class HFEngine:
    """A policy served by transformers on CPU; implements tasks.generation.Engine.

    Per request the prompt is run once; its KV cache is repeated for the `n` samples, which then decode
    as one batch (finished samples leave the batch). Sampling uses a torch.Generator seeded from the
    request's seed, or else from the engine seed and the request's position in the engine's lifetime,
    so the same engine seed and the same calls give the same tokens.
    """

    def __init__(self, model_path: str, dtype: str = "float32", max_model_len: int | None = None, seed: int = 0,
                 offline: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # A directory or a hub id (offline: from the local HF cache only); loaded from the local directory.
        path = resolve_model(model_path, offline=offline)
        self.model_path = str(model_path)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        cfg = self.model.config
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        context = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None
        self.max_model_len = int(max_model_len or context or 2048)
        if context and self.max_model_len > context:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's context of {context}")
        eos = self.model.generation_config.eos_token_id
        eos = cfg.eos_token_id if eos is None else eos
        self.eos_token_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.seed = seed
        self._request_counter = itertools.count()

    # -- tasks.generation.Engine -----------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest], stage: str = "generate") -> list[GenerationResult]:
        """Serve a batch; results come back in request order. A bad request raises before any work."""
        for req in requests:
            check_request(req, vocab_size=self.vocab_size, max_model_len=self.max_model_len)
        return [self._generate_one(req, next(self._request_counter)) for req in requests]

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def health(self) -> dict:
        return {
            "backend": "transformers",
            "model_path": self.model_path,
            "max_model_len": self.max_model_len,
            "vocab_size": self.vocab_size,
            "ok": True,
            "time": time.time(),
        }

    # -- teacher forcing -----------------------------------------------------------------------------
    @torch.no_grad()
    def score(
        self,
        prompt_token_ids: list[int],
        token_ids: list[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_logprobs: int = 0,
    ) -> Sample:
        """Exact entropies, logprobs and alternatives for a given continuation (one teacher-forced pass).

        The distribution is the one `generate` would sample from with this temperature and top_p.
        """
        if not token_ids:
            raise EngineRequestError("score needs at least one continuation token")
        req = GenerationRequest(prompt_token_ids=list(prompt_token_ids), max_new_tokens=len(token_ids))
        check_request(req, vocab_size=self.vocab_size, max_model_len=self.max_model_len)
        full = list(prompt_token_ids) + list(token_ids)
        if len(full) > self.max_model_len or not all(0 <= t < self.vocab_size for t in token_ids):
            raise EngineRequestError("continuation out of vocabulary or past the model's context")
        logits = self.model(torch.tensor([full])).logits[0, len(prompt_token_ids) - 1 : len(full) - 1]
        logprobs = sampling_logprobs(logits, temperature, top_p)
        chosen = torch.tensor(token_ids)
        return Sample(
            token_ids=list(token_ids),
            text=self.detokenize(list(token_ids)),
            finish_reason="stop" if token_ids[-1] in self.eos_token_ids else "length",
            logprobs=logprobs.gather(-1, chosen[:, None])[:, 0].tolist(),
            top_logprobs=_top_alternatives(logprobs, top_logprobs),
            entropy=entropy_from_logprobs(logprobs).tolist(),
            entropy_kind="exact",
        )

    # -- sampling ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _generate_one(self, req: GenerationRequest, ordinal: int) -> GenerationResult:
        n, prompt_len = req.n, len(req.prompt_token_ids)
        budget = min(req.max_new_tokens, self.max_model_len - prompt_len)
        stop_ids = self.eos_token_ids | set(req.stop_token_ids)
        gen = torch.Generator().manual_seed(req.seed if req.seed is not None else self.seed * 1_000_003 + ordinal)
        greedy = req.temperature < GREEDY_EPS

        # The shared prefix is computed once; its cache is repeated for the n samples.
        out = self.model(torch.tensor([req.prompt_token_ids]), use_cache=True)
        cache = out.past_key_values
        if n > 1:
            cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1, :].expand(n, -1)

        tokens: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[float]] = [[] for _ in range(n)]
        tops: list[list[list[tuple[int, float]]]] = [[] for _ in range(n)]
        ents: list[list[float]] = [[] for _ in range(n)]
        finish = ["length"] * n
        active = list(range(n))  # sample index of each row still in the batch

        for step in range(budget):
            logprobs = sampling_logprobs(logits, req.temperature, req.top_p)
            if greedy:
                chosen = logprobs.argmax(dim=-1)
            else:
                chosen = torch.multinomial(logprobs.exp(), 1, generator=gen)[:, 0]
            chosen_lp = logprobs.gather(-1, chosen[:, None])[:, 0].tolist()
            row_ents = entropy_from_logprobs(logprobs).tolist()
            row_tops = _top_alternatives(logprobs, req.top_logprobs)
            keep = []
            for row, i in enumerate(active):
                tok = int(chosen[row])
                tokens[i].append(tok)
                lps[i].append(chosen_lp[row])
                ents[i].append(row_ents[row])
                tops[i].append(row_tops[row])
                if tok in stop_ids:
                    finish[i] = "stop"
                else:
                    keep.append(row)
            if not keep or step == budget - 1:
                break
            if len(keep) < len(active):
                cache.batch_select_indices(torch.tensor(keep))
                chosen = chosen[keep]
                active = [active[r] for r in keep]
            out = self.model(chosen[:, None], past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1, :]

        samples = [
            Sample(
                token_ids=tokens[i],
                # As vLLM does: the stop token is in token_ids but not in the text.
                text=self.detokenize(tokens[i][:-1] if finish[i] == "stop" else tokens[i]),
                finish_reason=finish[i],
                logprobs=lps[i],
                top_logprobs=tops[i],
                entropy=ents[i],
                entropy_kind="exact",
            )
            for i in range(n)
        ]
        return GenerationResult(
            request_id=req.request_id,
            samples=samples,
            prompt_tokens=prompt_len,
            generated_tokens=sum(len(t) for t in tokens),
            cached_prompt_tokens=0,
        )
