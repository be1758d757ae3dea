"""Exact entropy from logits and the top-k bounds (EDU-PRM, arXiv 2503.22233), against hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.labelling.entropy import entropy_from_logits, entropy_from_logprobs, topk_entropy_bounds

LN2 = math.log(2)
# p = (0.75, 0.25): H = -(0.75 ln 0.75 + 0.25 ln 0.25)
H_3_1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))


def _exact(logits: np.ndarray) -> float:
    return float(entropy_from_logits(logits))


def _sorted_logprobs(logits: np.ndarray) -> np.ndarray:
    lp = logits - np.logaddexp.reduce(logits)
    return np.sort(lp)[::-1]


# -- entropy_from_logits ---------------------------------------------------------------------------------


def test_entropy_hand_values():
    assert _exact(np.zeros(8)) == pytest.approx(math.log(8), abs=1e-12)
    assert _exact(np.array([math.log(3), 0.0])) == pytest.approx(H_3_1, abs=1e-12)
    assert _exact(np.array([50.0, -50.0, -50.0])) == pytest.approx(0.0, abs=1e-12)
    assert H_3_1 == pytest.approx(0.5623351446188083, abs=1e-15)


def test_entropy_rows_and_shapes():
    logits = np.array([[0.0, 0.0], [math.log(3), 0.0], [0.0, 0.0]])
    h = entropy_from_logits(logits)
    assert h.shape == (3,)
    np.testing.assert_allclose(h, [LN2, H_3_1, LN2], atol=1e-12)
    assert entropy_from_logits(np.zeros(4)).shape == ()
    assert entropy_from_logits(np.zeros((2, 3, 5))).shape == (2, 3)


def test_entropy_temperature_divides_logits():
    # softmax([2 ln 3, 0] / 2) = (0.75, 0.25)
    assert float(entropy_from_logits(np.array([2 * math.log(3), 0.0]), temperature=2.0)) == pytest.approx(H_3_1)
    # T -> large flattens towards uniform
    assert float(entropy_from_logits(np.array([5.0, 0.0, 0.0]), temperature=1e6)) == pytest.approx(math.log(3))
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits(np.zeros(3), temperature=0.0)


def test_entropy_stable_for_huge_and_masked_logits():
    assert _exact(np.array([1e4, 1e4, -math.inf])) == pytest.approx(LN2, abs=1e-12)
    assert _exact(np.array([1e300, 1e300])) == pytest.approx(LN2, abs=1e-12)
    h = torch.tensor([[1e4, 1e4, -math.inf]], dtype=torch.float32)
    assert entropy_from_logits(h)[0] == pytest.approx(LN2, abs=1e-9)


def test_entropy_torch_matches_numpy_and_accepts_bf16():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 50, generator=g) * 3
    np.testing.assert_allclose(entropy_from_logits(t), entropy_from_logits(t.numpy()), atol=1e-10)
    np.testing.assert_allclose(entropy_from_logits(t.bfloat16()), entropy_from_logits(t.numpy()), atol=0.05)
    assert isinstance(entropy_from_logits(t), np.ndarray)


def test_entropy_rejects_empty_vocab():
    with pytest.raises(ValueError, match="vocabulary"):
        entropy_from_logits(np.zeros((3, 0)))


# -- topk_entropy_bounds ---------------------------------------------------------------------------------


def test_bounds_hand_values():
    # p = (1/2, 1/4, 1/8, 1/8), V = 4, k = 2: H_k = ln 2, r = 1/4, p_k = 1/4
    # lower = ln2 + 1/4 ln 4 = 1.5 ln 2; upper = ln2 + 1/4 ln(2 / (1/4)) = 1.75 ln 2 = exact (uniform tail)
    lp = [math.log(0.25), math.log(0.5)]  # any order
    lower, upper = topk_entropy_bounds(lp, 4)
    assert lower == pytest.approx(1.5 * LN2, abs=1e-12)
    assert upper == pytest.approx(1.75 * LN2, abs=1e-12)
    assert _exact(np.log([0.5, 0.25, 0.125, 0.125])) == pytest.approx(1.75 * LN2, abs=1e-12)


def test_bounds_k1():
    # p1 = 0.9, V = 11: H_1 = -0.9 ln 0.9, r = 0.1; lower = H_1 + 0.1 ln(1/0.9); upper = H_1 + 0.1 ln(10 / 0.1)
    h1 = -0.9 * math.log(0.9)
    lower, upper = topk_entropy_bounds([math.log(0.9)], 11)
    assert lower == pytest.approx(h1 - 0.1 * math.log(0.9), abs=1e-12)
    assert upper == pytest.approx(h1 + 0.1 * math.log(100.0), abs=1e-12)


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0, 10.0, 30.0])
def test_bounds_contain_exact_always(k, scale):
    v = 50
    for seed in range(200):
        rng = np.random.default_rng(seed)
        logits = rng.standard_normal(v) * scale
        exact = _exact(logits)
        top = _sorted_logprobs(logits)[:k]
        rng.shuffle(top)
        lower, upper = topk_entropy_bounds(top.tolist(), v)
        assert lower <= exact + 1e-12, (seed, lower, exact)
        assert exact <= upper + 1e-12, (seed, exact, upper)
        assert lower <= upper


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_bounds_full_vocab_equal_exact(scale):
    v = 50
    for seed in range(50):
        logits = np.random.default_rng(seed).standard_normal(v) * scale
        lower, upper = topk_entropy_bounds(_sorted_logprobs(logits).tolist(), v)
        assert lower == upper
        assert lower == pytest.approx(_exact(logits), abs=1e-10)


def test_bounds_tighten_with_k():
    logits = np.random.default_rng(7).standard_normal(50) * 2
    widths = []
    for k in (1, 5, 20, 49):
        lower, upper = topk_entropy_bounds(_sorted_logprobs(logits)[:k].tolist(), 50)
        widths.append(upper - lower)
    assert widths == sorted(widths, reverse=True)


def test_bounds_no_tail_mass_clamps():
    # top-k holds everything (sum rounds to 1 or a hair above): both bounds are H_k
    lower, upper = topk_entropy_bounds([math.log(0.5), math.log(0.5) + 1e-12], 1000)
    assert lower == upper == pytest.approx(LN2, abs=1e-9)
    # logprob 0.0 (one certain token)
    assert topk_entropy_bounds([0.0], 32000) == (0.0, 0.0)


def test_bounds_vllm_extra_sampled_token():
    # vLLM returns the top-k plus the sampled token when it is not among them: k + 1 entries.
    v = 50
    logits = np.concatenate([[4.0], np.full(v - 2, 0.0), [-8.0]])
    lp = _sorted_logprobs(logits)
    exact = _exact(logits)
    top1, sampled = lp[0], lp[-1]
    with_extra = [sampled, top1]
    # Read as a "top-2", the sampled token's tiny p is taken as bounding the tail: the lower bound breaks.
    wrong_lower, _ = topk_entropy_bounds(with_extra, v)
    assert wrong_lower > exact
    # Passing k (the number requested) keeps the k largest: the true top-1, and valid bounds.
    assert topk_entropy_bounds(with_extra, v, k=1) == topk_entropy_bounds([top1], v)
    lower, upper = topk_entropy_bounds(with_extra, v, k=1)
    assert lower <= exact <= upper


def test_bounds_validation():
    with pytest.raises(ValueError, match="empty"):
        topk_entropy_bounds([], 10)
    with pytest.raises(ValueError, match="sum"):
        topk_entropy_bounds([math.log(0.7), math.log(0.6)], 10)
    with pytest.raises(ValueError, match="NaN"):
        topk_entropy_bounds([math.nan], 10)
    with pytest.raises(ValueError, match="distinct"):
        topk_entropy_bounds([math.log(0.1)] * 3, 2)
    with pytest.raises(ValueError, match="vocab_size"):
        topk_entropy_bounds([math.log(0.1)], 0)


def test_torch_entropy_from_logprobs_equals_the_reference_and_guards_minus_inf():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, float("-inf"), 0.5, float("-inf")]], requires_grad=True)
    logp = torch.log_softmax(logits, dim=-1)
    naive = -(logp.exp() * logp).sum(-1)
    assert torch.isnan(naive[1]), "the guard matters: 0 * -inf is NaN"
    h = entropy_from_logprobs(logp)
    np.testing.assert_allclose(h.detach().numpy(), entropy_from_logits(logits.detach()), rtol=1e-6)
    assert abs(float(h[1].detach()) - math.log(2)) < 1e-6
    h.sum().backward()  # differentiable: the PRM's token features train through it
    assert torch.isfinite(logits.grad).all()
