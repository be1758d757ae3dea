"""Step partitioners: EDU-PRM entropy anchors (arXiv 2503.22233) and the newline / fixed baselines."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from configs.schema import PartitionConfig
from tasks.labelling.partition import (
    AnchorCapWarning,
    EntropyPartitioner,
    FixedPartitioner,
    NewlinePartitioner,
    Partitioner,
    make_partitioner,
    split_steps,
)

TEXTS = list("abcdefghij")
#            0    1    2    3    4    5    6    7    8    9
ENTROPY = [2.0, 0.1, 0.1, 2.0, 0.1, 1.5, 0.1, 0.1, 1.0, 0.1]


def _edu(**kw) -> EntropyPartitioner:
    args = {"tau": 1.0, "min_step_tokens": 2, "max_anchors": 8, "boundary_whitelist": None} | kw
    return EntropyPartitioner(**args)


# -- EDU -------------------------------------------------------------------------------------------------


def test_edu_hand_sequence():
    # t=0 is the start (never an anchor); t=3 (2.0), t=5 (1.5), t=8 (1.0 == tau counts) are >= tau and >= 2 apart
    assert _edu().boundaries(TEXTS, ENTROPY) == [0, 3, 5, 8]


def test_edu_min_step_tokens_from_last_cut_and_from_start():
    # min 3: t=3 ok (3 - 0), t=5 too close to 3, t=8 ok (8 - 3)
    assert _edu(min_step_tokens=3).boundaries(TEXTS, ENTROPY) == [0, 3, 8]
    # min 4: t=3 is too close to the start; t=5 is the first anchor, then t=8 is 3 away: dropped
    assert _edu(min_step_tokens=4).boundaries(TEXTS, ENTROPY) == [0, 5]


def test_edu_tau():
    assert _edu(tau=1.5).boundaries(TEXTS, ENTROPY) == [0, 3, 5]
    assert _edu(tau=1.6).boundaries(TEXTS, ENTROPY) == [0, 3]
    assert _edu(tau=5.0).boundaries(TEXTS, ENTROPY) == [0]  # no anchor: one step


def test_edu_empty_sequence():
    p = _edu()
    assert p.boundaries([], []) == []
    assert not p.capped


def test_edu_cap_binds_with_warning_and_reason():
    p = _edu(tau=0.0, min_step_tokens=1, max_anchors=3)
    with pytest.warns(AnchorCapWarning, match="6 of 9"):
        cuts = p.boundaries(TEXTS, ENTROPY)
    assert cuts == [0, 1, 2, 3]  # the first 3 anchors, left to right
    assert p.capped
    assert p.last_partition is not None
    assert (p.last_partition.candidates, p.last_partition.dropped) == (9, 6)
    assert "max_anchors=3" in p.last_partition.cap_reason


def test_edu_cap_counts_dropped_with_spacing():
    # cap 1 with min 2: anchors 3, 5, 8 qualify; only 3 is cut, 2 dropped
    result = _edu(max_anchors=1).partition(TEXTS, ENTROPY)
    assert (result.boundaries, result.candidates, result.dropped) == ([0, 3], 3, 2)


def test_edu_no_warning_when_cap_does_not_bind():
    p = _edu(max_anchors=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert p.boundaries(TEXTS, ENTROPY) == [0, 3, 5, 8]
    assert not p.capped
    assert p.last_partition.cap_reason is None


def test_edu_partition_is_pure():
    p = _edu(tau=0.0, min_step_tokens=1, max_anchors=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = p.partition(TEXTS, ENTROPY)  # no warning, no state
    assert result.capped and p.last_partition is None


def test_edu_whitelist_looks_at_previous_token():
    texts = ["x", "=", "1", ".\n", "y", "=", "2", ";", "z", "3"]
    flat = [2.0] * len(texts)
    assert _edu(min_step_tokens=1, boundary_whitelist=["\n", ";"]).boundaries(texts, flat) == [0, 4, 8]
    # ".\n" ends with "\n", not "."
    assert _edu(min_step_tokens=1, boundary_whitelist=["."]).boundaries(texts, flat) == [0]
    # the whitelisted position must still be high-entropy
    low_at_4 = flat.copy()
    low_at_4[4] = 0.0
    assert _edu(min_step_tokens=1, boundary_whitelist=["\n", ";"]).boundaries(texts, low_at_4) == [0, 8]


def test_length_mismatch_names_both_lengths():
    for p in (_edu(), NewlinePartitioner(), FixedPartitioner(4)):
        with pytest.raises(ValueError, match="3 tokens, 2 entropies"):
            p.boundaries(["a", "b", "c"], [0.1, 0.2])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_entropy_rejected(bad):
    with pytest.raises(ValueError, match="token 1"):
        _edu().boundaries(["a", "b", "c"], [0.1, bad, 0.2])
    with pytest.raises(ValueError, match="token 1"):
        NewlinePartitioner().boundaries(["a", "b", "c"], [0.1, bad, 0.2])


def test_edu_parameter_validation():
    with pytest.raises(ValueError, match="tau"):
        EntropyPartitioner(tau=-1.0)
    with pytest.raises(ValueError, match="min_step_tokens"):
        EntropyPartitioner(min_step_tokens=0)
    with pytest.raises(ValueError, match="max_anchors"):
        EntropyPartitioner(max_anchors=0)
    with pytest.raises(ValueError, match="boundary_whitelist"):
        EntropyPartitioner(boundary_whitelist=[])
    with pytest.raises(ValueError, match="boundary_whitelist"):
        EntropyPartitioner(boundary_whitelist=["\n", ""])


def test_edu_params_are_json():
    p = _edu(tau=0.5, boundary_whitelist=["\n"])
    assert p.name == "edu"
    assert json.loads(json.dumps(p.params())) == {
        "tau": 0.5,
        "min_step_tokens": 2,
        "max_anchors": 8,
        "boundary_whitelist": ["\n"],
    }


# -- newline / fixed ----------------------------------------------------------------------------------------


def test_newline_steps():
    texts = ["Step", " 1", "\n", "Step", " 2", ".\n", "\n", "Answer", "\n"]
    cuts = NewlinePartitioner().boundaries(texts, [0.0] * len(texts))
    # the blank line stays with step 2; the final newline opens no empty step
    assert cuts == [0, 3, 7]
    assert ["".join(s) for s in split_steps(texts, cuts)] == ["Step 1\n", "Step 2.\n\n", "Answer\n"]


def test_newline_edge_cases():
    p = NewlinePartitioner()
    assert p.boundaries([]) == []
    assert p.boundaries(["no", " newline"]) == [0]
    assert p.boundaries(["\n", "\n", "x"]) == [0, 2]  # leading newlines: no empty first step
    assert p.boundaries(["a", "\n", "  ", "b"]) == [0, 3]  # indentation stays with the previous step
    assert p.name == "newline" and p.params() == {}


def test_fixed_steps():
    p = FixedPartitioner(4)
    assert p.boundaries(list("abcdefghij")) == [0, 4, 8]
    assert p.boundaries(list("abcdefgh")) == [0, 4]
    assert p.boundaries(["a"]) == [0]
    assert p.boundaries([]) == []
    assert p.params() == {"chunk_tokens": 4}
    with pytest.raises(ValueError, match="chunk_tokens"):
        FixedPartitioner(0)


# -- factory and split -------------------------------------------------------------------------------------


def test_make_partitioner_from_config():
    edu = make_partitioner(PartitionConfig(tau=0.7, min_step_tokens=3, max_anchors=5, boundary_whitelist=["\n"]))
    assert isinstance(edu, EntropyPartitioner) and isinstance(edu, Partitioner)
    assert edu.params() == {"tau": 0.7, "min_step_tokens": 3, "max_anchors": 5, "boundary_whitelist": ["\n"]}
    nl = make_partitioner(PartitionConfig(method="newline"))
    assert isinstance(nl, NewlinePartitioner) and isinstance(nl, Partitioner)
    fixed = make_partitioner(PartitionConfig(method="fixed", fixed_chunk_tokens=7))
    assert isinstance(fixed, FixedPartitioner) and fixed.chunk_tokens == 7


def test_split_steps():
    ids = list(range(10, 20))
    assert split_steps(ids, [0, 3, 5, 8]) == [[10, 11, 12], [13, 14], [15, 16, 17], [18, 19]]
    assert split_steps(ids, [0]) == [ids]
    assert split_steps([], []) == []
    cuts = _edu().boundaries(TEXTS, ENTROPY)
    assert "".join("".join(s) for s in split_steps(TEXTS, cuts)) == "".join(TEXTS)


@pytest.mark.parametrize("bad", [[], [1, 3], [0, 3, 3], [0, 5, 3], [0, 10]])
def test_split_steps_rejects_bad_boundaries(bad):
    with pytest.raises(ValueError, match="boundaries"):
        split_steps(list(range(10)), bad)


def test_split_steps_rejects_cuts_for_empty_sequence():
    with pytest.raises(ValueError, match="empty"):
        split_steps([], [0])
