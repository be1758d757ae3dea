"""Engine results packed into numpy arrays for the trip through Ray, and back, without losing a field."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.generation import GenerationResult, Sample, pack_results, unpack_results


def results() -> list[GenerationResult]:
    vllm_like = Sample(token_ids=[5, 9, 2], text="ab", finish_reason="stop", logprobs=[-0.1, -1.5, -0.25],
                       top_logprobs=[[(5, -0.1), (7, -2.5)], [(8, -0.9), (9, -1.5), (3, -2.0)], [(2, -0.25)]],
                       entropy=[0.3, 1.1, 0.2], entropy_upper=[0.31, 1.4, 0.2], entropy_kind="topk_bounds")
    hf_like = Sample(token_ids=[4], text="c", finish_reason="length", logprobs=[-0.7], top_logprobs=[[]],
                     entropy=[0.69])
    empty = Sample(token_ids=[], text="", finish_reason="stop", logprobs=[], top_logprobs=[], entropy=[])
    return [
        GenerationResult("a", [vllm_like, hf_like], prompt_tokens=7, generated_tokens=4, cached_prompt_tokens=3),
        GenerationResult("b", [], prompt_tokens=2, generated_tokens=0),
        GenerationResult("c", [empty], prompt_tokens=1, generated_tokens=0),
    ]


def test_unpack_gives_back_every_field():
    assert unpack_results(pack_results(results())) == results()


def test_packed_fields_are_flat_numeric_arrays():
    packed = pack_results(results())
    assert packed.token_ids.tolist() == [5, 9, 2, 4]
    assert packed.top_counts.tolist() == [2, 3, 1, 0]
    assert packed.top_ids.tolist() == [5, 7, 8, 9, 3, 2]
    assert packed.top_logprobs.tolist() == [-0.1, -2.5, -0.9, -1.5, -2.0, -0.25]
    assert packed.sample_lengths.tolist() == [3, 1, 0] and packed.samples_per_result.tolist() == [2, 0, 1]
    assert packed.entropy_upper[:3].tolist() == [0.31, 1.4, 0.2] and math.isnan(packed.entropy_upper[3])
    arrays = [v for v in vars(packed).values() if isinstance(v, np.ndarray)]
    assert len(arrays) == 13 and all(a.dtype != object for a in arrays)


def test_a_sample_with_ragged_records_is_refused():
    bad = Sample(token_ids=[1, 2], text="", finish_reason="stop", logprobs=[-0.1], top_logprobs=[[], []],
                 entropy=[0.0, 0.0])
    with pytest.raises(ValueError, match="other lengths"):
        pack_results([GenerationResult("x", [bad], prompt_tokens=1, generated_tokens=2)])
