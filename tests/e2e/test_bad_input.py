"""Bad input (issue 12): every bad row quarantined with its reason, every good row kept, counts exact.

No engine: the ingest path (loaders -> problems.parquet + quarantine.jsonl), config validation and the
math checker's bounds, plus property tests (hypothesis) on the loaders, the config schema and the labels.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs.schema import REPO_ROOT, ConfigError, FileSource, load_config, parse_config
from tasks.labelling.label_rule import er_label, hard_label, soft_label, step_labels
from tasks.sources.answers import MAX_MATH_DEPTH, math_equal, math_too_complex
from tasks.sources.loaders import REASONS, load_jsonl, load_math, load_sources, write_quarantine
from tests.integrity_helpers import cli_on_faulty_disk

MINIMAL = {"name": "minimal", "sources": [{"kind": "toy"}], "policy": {"model_path": "assets/toy-policy"}}


def nested_frac(depth: int) -> str:
    text = "2"
    for _ in range(depth):
        text = "\\frac{1}{" + text + "}"
    return text


# -- probes from the table ----------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "entropy"), [(None, "topk_lower"), ("vllm", "topk_lower"),
                                                  ("transformers", "exact")])
def test_minimal_config_validates_with_defaults_that_agree(backend, entropy):
    data = json.loads(json.dumps(MINIMAL))
    if backend:
        data["policy"]["backend"] = backend
    cfg = parse_config(data)
    assert cfg.partition.entropy_source == entropy


def test_an_explicit_contradiction_is_still_an_error():
    data = {**MINIMAL, "partition": {"entropy_source": "exact"}}
    with pytest.raises(ConfigError, match="entropy_source 'exact' needs policy.backend 'transformers'"):
        parse_config(data)


def test_duplicate_yaml_keys_are_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\nsources: [{kind: toy}]\npolicy: {model_path: assets/toy-policy}\n"
                    "rollouts: {n: 4}\nrollouts: {n: 8}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'rollouts' \(first at line 4\)"):
        load_config(path)
    nested = tmp_path / "nested.yaml"
    nested.write_text("name: a\nsources: [{kind: toy}]\npolicy: {model_path: assets/toy-policy, dtype: float32, "
                      "dtype: bfloat16}\n")
    with pytest.raises(ConfigError, match="duplicate key 'dtype'"):
        load_config(nested)


def test_deep_frac_is_rejected_in_bounded_time_not_called_equal():
    start = time.perf_counter()
    assert math_equal("\\frac{1}{2}", nested_frac(200)) is False
    assert math_equal("\\frac{1}{2}", nested_frac(60)) is False
    assert time.perf_counter() - start < 0.5, "decided by the bound, without asking math-verify"
    assert math_too_complex(nested_frac(100)) == "nesting depth 100, over the 24 the math checker accepts"
    assert math_too_complex(nested_frac(MAX_MATH_DEPTH - 1)) is None
    assert "characters" in math_too_complex("1+" * 1500)


def test_lone_surrogate_and_invalid_utf8_are_quarantined_with_reasons(tmp_path):
    path = tmp_path / "user.jsonl"
    path.write_bytes(b'{"question": "ok 1", "answer": "1"}\n'
                     b'{"question": "bad \\ud800 text", "answer": "2"}\n'
                     b'{"question": "fine", "answer": "3", "note": ["x", {"\\udfff": 1}]}\n'
                     b'{"question": "bytes \xff\xfe here", "answer": "4"}\n'
                     b'{"question": "ok 2", "answer": "5"}\n')
    result = load_jsonl(FileSource(kind="jsonl", path=str(path)))
    assert [p.question for p in result.problems] == ["ok 1", "ok 2"]
    assert [(q.line, q.reason) for q in result.quarantined] == [(2, "invalid_text"), (3, "invalid_text"),
                                                               (4, "invalid_text")]
    assert "lone surrogate '\\ud800'" in result.quarantined[0].detail
    assert result.quarantined[2].detail == "invalid UTF-8 at byte 20 of the line"
    out = write_quarantine(result.quarantined, tmp_path / "q.jsonl")  # the raw rows must be writable as UTF-8
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_unwritable_output_is_one_line_and_exit_3(tmp_path, fault):
    """Issue probe: a read-only or full --out gives one clear line and an exit code, not a traceback."""
    config = tmp_path / "cfg.yaml"
    policy = {"model_path": "assets/toy-policy", "backend": "transformers"}
    config.write_text(yaml.safe_dump({**MINIMAL, "policy": policy, "sources": [{"kind": "toy", "num_problems": 2}],
                                      "rollouts": {"n": 1, "max_new_tokens": 8}}))
    target = tmp_path / "target"
    target.mkdir()
    result = cli_on_faulty_disk(target, fault, ["build", "--config", str(config), "--out", str(target / "ds"),
                                                "--local"])
    assert result.returncode == 3, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("cannot write")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    reason = "No space left on device" if fault == "full" else ("Read-only file system" if os.geteuid() == 0
                                                                 else "Permission denied")
    assert f": {reason} (make the output writable" in lines[0] and str(target) in lines[0]


# -- bad input at scale ---------------------------------------------------------------------------------------


def scale_file(path: Path, good: int = 900) -> tuple[int, Counter]:
    """A MATH-format JSONL of `good` good problems and a known mix of bad ones; returns (good, reasons)."""
    lines: list[bytes] = []
    reasons: Counter = Counter()

    def bad(reason: str, line: bytes) -> None:
        reasons[reason] += 1
        lines.append(line)

    def row(obj: object) -> bytes:
        return json.dumps(obj).encode()

    for i in range(good):
        extra = {"unique_id": f"../../../escape-{i}"} if i % 10 == 0 else {"unique_id": f"test/{i}.json"}
        lines.append(row({"problem": f"Compute {i} + {i + 1}.", "answer": str(2 * i + 1), **extra}))
        if i % 9 == 0:
            bad("missing_field", row({"problem": f"No answer {i}."}))
        if i % 11 == 0:
            bad("wrong_type", row({"problem": i, "answer": "1"}))
        if i % 13 == 0:
            bad("wrong_type", row([f"a list {i}", "1"]))
        if i % 17 == 0:
            bad("invalid_text", b'{"problem": "bytes \xc3\x28 ' + str(i).encode() + b'", "answer": "1"}')
        if i % 19 == 0:
            bad("invalid_text", row({"problem": f"surrogate \ud800 {i}", "answer": "1"}))
        if i % 23 == 0:
            bad("duplicate", row({"problem": f"Compute {i} +  {i + 1}.", "answer": str(2 * i + 1)}))  # same text
        if i % 29 == 0:
            bad("unparseable_answer", row({"problem": f"Deep {i}.", "answer": nested_frac(60)}))  # 5 s in sympy
        if i % 31 == 0:
            bad("invalid_json", b'{"problem": "cut off ' + str(i).encode())
        if i % 37 == 0:
            bad("empty_question", row({"problem": "   ", "answer": "1"}))
        if i % 41 == 0:
            bad("wrong_type", row({"problem": f"Bool answer {i}.", "answer": True}))
    for i in range(2):
        bad("too_long", row({"problem": f"{i} " + "x" * 1_000_000, "answer": "1"}))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return good, reasons


def test_bad_input_at_scale_every_row_accounted_for(tmp_path):
    source = tmp_path / "math.jsonl"
    good, reasons = scale_file(source)
    assert good + sum(reasons.values()) >= 1000 and len(reasons) == 8
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({**MINIMAL, "sources": [{"kind": "math", "path": str(source)}]}))
    out = tmp_path / "ingest"
    before = set(tmp_path.iterdir())
    proc = subprocess.run([sys.executable, "-m", "prm_factory.cli", "ingest", "--config", str(config), "--out",
                           str(out), "--json"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["kept"], summary["quarantined"]) == (good, sum(reasons.values()))
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()]
    assert Counter(q["reason"] for q in quarantine) == reasons
    assert all(q["detail"] for q in quarantine) and {q["reason"] for q in quarantine} <= set(REASONS)
    problems = pq.read_table(out / "problems.parquet").to_pylist()
    assert len(problems) == good and len({p["problem_id"] for p in problems}) == good
    assert all(re.fullmatch(r"[0-9a-f]{16}", p["problem_id"]) for p in problems)
    assert sum('"../../../escape-' in p["meta"] for p in problems) == 90  # kept as metadata, never a path
    assert set(tmp_path.iterdir()) - before == {out}, "nothing written outside the output directory"
    assert sorted(p.name for p in out.iterdir()) == ["problems.parquet", "quarantine.jsonl"]


# -- property tests -------------------------------------------------------------------------------------------

text = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)  # surrogates included
json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                          max_leaves=6)
user_row = st.one_of(
    st.fixed_dictionaries({"question": json_value, "answer": json_value}, optional={"id": json_value}),
    st.dictionaries(text, json_value, max_size=3),
    json_value,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(user_row, min_size=1, max_size=12))
def test_loader_keeps_or_quarantines_every_row(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="ascii")
    result = load_jsonl(FileSource(kind="jsonl", path=str(path)))
    assert result.rows_read == len(rows)
    for p in result.problems:
        assert p.question.strip() and p.answer.strip()
        (p.question + p.answer + json.dumps(p.meta, ensure_ascii=False)).encode("utf-8")  # never raises
    assert {q.reason for q in result.quarantined} <= set(REASONS)
    write_quarantine(result.quarantined, tmp_path / "q.jsonl")


config_leaf = st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12)
config_keys = st.sampled_from(["name", "seed", "sources", "policy", "cluster", "partition", "tree", "rollouts",
                               "labels", "dataset", "backend", "entropy_source", "n", "eta", "tau", "bogus"])


@settings(max_examples=200, deadline=None)
@given(section=st.sampled_from(["policy", "partition", "tree", "rollouts", "labels", "cluster", "dataset", None]),
       key=config_keys, value=config_leaf | st.dictionaries(config_keys, config_leaf, max_size=3))
def test_config_validation_accepts_or_names_the_problem(section, key, value):
    data = json.loads(json.dumps(MINIMAL))
    if section is None:
        data[key] = value
    else:
        data.setdefault(section, {})
        if isinstance(data[section], dict):
            data[section][key] = value
    try:
        cfg = parse_config(data, check_paths=False)
    except ConfigError as err:
        assert str(err).startswith("invalid config <dict>:\n  ")
        return
    assert (cfg.partition.entropy_source == "exact") == (cfg.policy.backend == "transformers")


counts = st.integers(1, 64).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n)))


@settings(max_examples=300, deadline=None)
@given(kn=counts, eta=st.floats(1e-6, 1e6))
def test_er_label_lies_between_soft_and_hard(kn, eta):
    k, n = kn
    er, soft, hard = er_label(k, n, eta), soft_label(k, n), float(hard_label(k, n))
    assert 0.0 <= er <= 1.0 and soft - 1e-9 <= er <= hard + 1e-9
    if 0 < k < n:  # strictly inside: larger eta moves the label toward the hard one
        assert er_label(k, n, eta * 2) >= er - 1e-12


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(counts, min_size=1, max_size=8), eta=st.floats(0.01, 100), final=st.none() | st.booleans())
def test_step_labels_shape_and_final_step(steps, eta, final):
    k = [s[0] for s in steps]
    n = [s[1] for s in steps]
    origins = ["rollout"] * (len(steps) - 1) + ["rollout" if final is None else "final"]
    labels = step_labels(k, n, origins, eta, [None] * (len(steps) - 1) + [final])
    assert all(len(v) == len(steps) for v in (labels.hard, labels.soft, labels.er, labels.valued))
    assert labels.hard_list()[:-1] == [x > 0 for x in k[:-1]]
    if final is not None:
        assert labels.hard_list()[-1] == final and labels.er_list()[-1] == float(final)
    else:
        assert math.isclose(labels.soft_list()[-1], k[-1] / n[-1])


@settings(max_examples=100, deadline=None)
@given(depth=st.integers(MAX_MATH_DEPTH + 1, 400), filler=st.sampled_from(["{", "(", "["]))
def test_math_checker_refuses_deep_input_fast(depth, filler):
    closing = {"{": "}", "(": ")", "[": "]"}[filler]
    deep = filler * depth + "1" + closing * depth
    start = time.perf_counter()
    assert math_equal("1", deep) is False
    assert time.perf_counter() - start < 0.2


def test_sources_load_lazily_enough_for_scale(tmp_path):
    """`load_sources` over two copies of the scale file: the second copy is all duplicates, nothing else."""
    source = tmp_path / "math.jsonl"
    good, reasons = scale_file(source, good=120)
    src = FileSource(kind="math", path=str(source))
    (_, first), (_, second) = load_sources([src, src])
    assert len(first.problems) == good and len(second.problems) == 0
    assert Counter(q.reason for q in second.quarantined)["duplicate"] == good + reasons["duplicate"]
    assert load_math(src).rows_read == good + sum(reasons.values())
