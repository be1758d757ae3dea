"""Label quality of the default build (configs/toy.yaml) against the exact toy truth and against fresh rollouts.

Two independent references:
- the toy world's exact step truth (`prefix_is_correct`: can the text up to the end of this step still be
  completed into the right solution), for the non-final steps of every row;
- Monte-Carlo consistency: from step prefixes of the build, 32 fresh policy rollouts through the other
  engine (transformers, same temperature) estimate the prefix's success probability; the stored soft
  label k/N is a sample of that same probability, so the two differ only by sampling error.

The build is the session fixture `toy_build` (one vLLM build per test session).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from tasks.sources.toy_world import prefix_is_correct

pytestmark = pytest.mark.slow

FRESH_ROLLOUTS = 32
MC_PREFIXES = 40


def _steps(toy_build) -> list[dict]:
    """Every non-final step of the build with its labels, its prefix text and the exact truth."""
    from tasks.build import ingest

    by_id = {p.problem_id: p for p in ingest(toy_build["config"]).problems}
    steps = []
    for row in toy_build["rows"]:
        problem = by_id[row["problem_id"]]
        prefix = ""
        for i, text in enumerate(row["completions"][:-1]):
            prefix += text
            steps.append({"problem": problem, "prompt": row["prompt"], "prefix": prefix,
                          "truth": prefix_is_correct(problem, prefix), "hard": row["labels"][i],
                          "soft": row["soft_labels"][i], "k": row["successes"][i], "n": row["rollouts"][i],
                          "origin": row["step_origin"][i], "tree_value": row["tree_value"][i]})
    return steps


def test_default_build_labels_agree_with_the_truth(toy_build):
    steps = _steps(toy_build)
    truth = np.array([s["truth"] for s in steps])
    hard = np.array([s["hard"] for s in steps])
    soft = np.array([s["soft"] for s in steps], dtype=float)
    n_target = toy_build["config"].rollouts.n
    assert len(steps) >= 150, "the default build should label a few hundred non-final steps"
    assert {s["origin"] for s in steps} == {"rollout"} and all(s["n"] == n_target for s in steps)
    hard_acc = float((hard == truth).mean())
    soft_acc = float(((soft >= 0.5) == truth).mean())
    # Per class, so that a labeller saying True everywhere (or False everywhere) fails however the truth
    # is balanced: its recall on the other class is 0.
    hard_tnr = float((~hard[~truth]).mean())
    soft_tnr = float((soft[~truth] < 0.5).mean())
    soft_tpr = float((soft[truth] >= 0.5).mean())
    print(f"\nsteps {len(steps)}, truth positive {truth.mean():.3f}; hard acc {hard_acc:.3f} (TNR {hard_tnr:.3f}); "
          f"soft>=0.5 acc {soft_acc:.3f} (TPR {soft_tpr:.3f}, TNR {soft_tnr:.3f}); "
          f"mean soft on true steps {soft[truth].mean():.3f}, on wrong steps {soft[~truth].mean():.3f}")
    assert soft_acc >= 0.75
    assert hard_acc >= 0.85
    assert hard_tnr >= 0.5 and soft_tnr >= 0.5 and soft_tpr >= 0.5
    # Soft labels are success probabilities: higher on steps that can still succeed.
    assert soft[truth].mean() - soft[~truth].mean() >= 0.4


@pytest.fixture(scope="module")
def hf_engine(toy_build):
    from cluster.hf_engine import HFEngine
    from configs.schema import resolve_path

    return HFEngine(str(resolve_path(toy_build["config"].policy.model_path)), seed=0)


def test_soft_labels_match_fresh_policy_rollouts(toy_build, hf_engine):
    """Stored k/N (N = 4) vs 32 fresh HF rollouts from the same prefix, over 40 prefixes.

    Gate (sampling error, not a loose threshold): per prefix, with p the pooled success rate, the
    difference d = k/N - f has variance p(1-p)(1/N + 1/32); the mean signed difference must lie within
    3 standard errors of 0 (a labeller biased by 0.1 either way fails), and the mean absolute difference
    must not exceed its expectation under binomial sampling by more than 3 standard errors.
    """
    from tasks.build import load_tokenizer
    from tasks.generation import GenerationRequest
    from tasks.labelling.rollouts import request_seed
    from tasks.sources.answers import check_answer

    cfg = toy_build["config"]
    tok = load_tokenizer(cfg)
    unique: dict[tuple[str, str], dict] = {}
    for s in _steps(toy_build):
        unique.setdefault((s["problem"].problem_id, s["prefix"]), s)
    # A fixed, content-derived sample of prefixes (not the first ones: those come from few problems).
    chosen = sorted(unique.values(),
                    key=lambda s: hashlib.sha256((s["problem"].problem_id + s["prefix"]).encode()).hexdigest())
    chosen = chosen[:MC_PREFIXES]
    assert len(chosen) >= 30
    rc = cfg.rollouts
    requests = []
    for s in chosen:
        prompt_ids = tok.encode(s["prompt"], add_special_tokens=False)
        prefix_ids = tok.encode(s["prefix"], add_special_tokens=False)
        requests.append(GenerationRequest(prompt_token_ids=prompt_ids + prefix_ids, n=FRESH_ROLLOUTS,
                                          temperature=rc.temperature, top_p=rc.top_p,
                                          max_new_tokens=max(1, rc.max_new_tokens - len(prefix_ids)),
                                          seed=request_seed("mc-check", s["problem"].problem_id, s["prefix"]),
                                          stop_token_ids=[tok.eos_token_id]))
    results = hf_engine.generate(requests, stage="rollout")
    soft, fresh, var = [], [], []
    for s, res in zip(chosen, results, strict=True):
        p = s["problem"]
        wins = sum(x.finish_reason == "stop" and check_answer(p.source, s["prefix"] + x.text, p.answer)
                   for x in res.samples)
        f = wins / FRESH_ROLLOUTS
        pooled = (s["k"] + wins) / (s["n"] + FRESH_ROLLOUTS)
        soft.append(s["soft"])
        fresh.append(f)
        var.append(pooled * (1 - pooled) * (1 / s["n"] + 1 / FRESH_ROLLOUTS))
    soft_a, fresh_a, var_a = np.array(soft), np.array(fresh), np.array(var)
    m = len(soft)
    diff = soft_a - fresh_a
    se_mean = math.sqrt(var_a.sum()) / m
    # E|d| for d ~ Normal(0, var) is sqrt(2 var / pi); Var|d| = var (1 - 2/pi).
    expected_abs = float(np.sqrt(2 * var_a / math.pi).mean())
    se_abs = math.sqrt(float((var_a * (1 - 2 / math.pi)).sum())) / m
    mean_abs = float(np.abs(diff).mean())
    print(f"\n{m} prefixes: mean soft {soft_a.mean():.3f}, mean fresh {fresh_a.mean():.3f}, mean diff "
          f"{diff.mean():+.3f} (3 SE = {3 * se_mean:.3f}); mean |diff| {mean_abs:.3f} "
          f"(expected {expected_abs:.3f} + 3 SE {3 * se_abs:.3f})")
    assert abs(diff.mean()) <= 3 * se_mean
    assert mean_abs <= expected_abs + 3 * se_abs
