"""The toy ruler: steps and truth on hand-made text, the shipped set's integrity and held-out guarantees,
the oracle/constant reference scorers through the real `eval` command, reproducing the shipped rows, and
ruler v2 (toy world v2, issue 21)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs.schema import REPO_ROOT, ToySource, load_config
from tasks.evaluation.reference_scorers import ConstantScorer, OracleScorer, reference_scorer
from tasks.evaluation.ruler import (
    DEFAULT_RULER_DIR,
    DEFAULT_RULER_V2_DIR,
    POLICY_TRAINING_SOURCES,
    SHIPPED_RULERS,
    TOY_RULER,
    TOY_RULER_V2,
    Ruler,
    check_disjoint,
    cut_at_newlines,
    dataset_problem_ids,
    evaluate_ruler,
    load_ruler,
    ruler_problems,
    sample_ruler_rows,
    shipped_spec,
    step_truth,
)
from tasks.evaluation.scorers import EvaluationError
from tasks.sources.misconceptions import misconception_at, misconception_rules
from tasks.sources.problems import Problem
from tasks.sources.toy_world import check_solution, generate_problems

Q = "Start at 7. Apply in order: +5, *3."  # 7+5=12, 12*3=36


def _problem(question: str = Q) -> Problem:
    return Problem.make("toy", question, "36")


@pytest.fixture(scope="module")
def ruler():
    return load_ruler(DEFAULT_RULER_DIR)


@pytest.fixture(scope="module")
def ruler_v2():
    return load_ruler(DEFAULT_RULER_V2_DIR, TOY_RULER_V2)


def test_cut_at_newlines_keeps_text():
    assert cut_at_newlines("7+5=12\n12*3=36\nAnswer: 36") == ["7+5=12\n", "12*3=36\n", "Answer: 36"]
    assert cut_at_newlines("a\n\nb\n") == ["a\n", "\n", "b\n"]
    assert cut_at_newlines("") == []


@pytest.mark.parametrize(("steps", "truth"), [
    (["7+5=12\n", "12*3=36\n", "Answer: 36"], [True, True, True]),
    (["7+5=12\n", "12*3=35\n", "Answer: 35"], [True, False, False]),  # wrong value: wrong from there on
    (["7+5=12\n", "12*3=36\n", "Answer: 3"], [True, True, False]),  # a finished "Answer: 3" is wrong, not a prefix
    (["7+5=12\n", "12*3=36\n", "Answer: 36\n"], [True, True, True]),  # trailing newline tolerated
    (["7+5=12\n", "12*3=36\n", "Answer: 36\n", "7"], [True, True, True, False]),  # text after the answer
    (["7+6=13\n", "13*3=39\n"], [False, False]),
    (["7+5=12\n", "12*3=36"], [True, True]),  # stopped before the answer line: the written steps are right
])
def test_step_truth_hand_cases(steps, truth):
    assert step_truth(_problem(), steps) == truth


def test_shipped_ruler_is_the_spec_and_verifies(ruler):
    m = ruler.manifest
    assert m["spec_hash"] == TOY_RULER.spec_hash() and m["ruler_version"] == TOY_RULER.version
    assert m["problems"] == TOY_RULER.num_problems == len(ruler.problem_ids)
    assert m["trajectories"] == len(ruler.rows) == TOY_RULER.num_problems * TOY_RULER.samples_per_problem
    assert m["steps"] == sum(len(r["completions"]) for r in ruler.rows)
    # both classes well represented, so AUROC is meaningful
    assert 0.1 < 1 - m["correct_steps"] / m["steps"] < 0.5 and 0.3 < m["final_correct"] / m["trajectories"] < 0.9


def test_stored_truth_agrees_with_the_line_checker(ruler):
    """Independent of prefix_is_correct: the first False of the stored truth is check_solution's first error."""
    for row in ruler.rows:
        problem = Problem.make("toy", row["question"], row["answer"])
        check = check_solution(problem, "".join(row["completions"]))
        truth = row["step_truth"]
        expected_first_false = check.first_error if 0 <= check.first_error < len(truth) else -1
        first_false = truth.index(False) if False in truth else -1
        assert first_false == expected_first_false, row
        assert all(not t for t in truth[first_false:]) if first_false >= 0 else all(truth)


def test_ruler_is_held_out_from_configs_and_policy_validation(ruler):
    reserved: list[ToySource] = [POLICY_TRAINING_SOURCES[1]]  # the 30k training set: checked at build (22 s)
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        reserved += [s for s in load_config(path, check_paths=False).sources if isinstance(s, ToySource)]
    assert len(reserved) >= 2
    ids = {p.problem_id for src in reserved for p in generate_problems(src)}
    assert not ids & ruler.problem_ids
    assert ruler.manifest["excluded_reserved_problems"] >= 0  # what the build skipped is on record


def test_reference_scorers_on_the_full_ruler(ruler):
    oracle = evaluate_ruler(OracleScorer(), ruler)
    assert oracle["steps"]["step_auroc"] == 1.0 and oracle["steps"]["step_accuracy"] == 1.0
    const = evaluate_ruler(ConstantScorer(0.5), ruler, bon_ns=None)
    m = ruler.manifest
    assert const["steps"]["step_auroc"] == 0.5
    assert const["steps"]["step_accuracy"] == pytest.approx(m["correct_steps"] / m["steps"])  # 0.5 -> "correct"
    assert "best_of_n" not in const
    # the oracle's min-step pick at N=16 is the first fully correct solution of a problem, when there is one
    by_problem: dict[str, list[dict]] = {}
    for row in ruler.rows:
        by_problem.setdefault(row["problem_id"], []).append(row)
    expected = sum(next((r for r in rows if all(r["step_truth"])), rows[0])["final_correct"]
                   for rows in by_problem.values()) / len(by_problem)
    bon = oracle["best_of_n"]
    assert bon["accuracy"]["min_step"][-1] == pytest.approx(expected)
    assert bon["accuracy"]["min_step"][0] == pytest.approx(m["final_correct"] / m["trajectories"])  # N=1: no choice


def _copy_ruler(tmp_path):
    dst = tmp_path / "ruler"
    shutil.copytree(REPO_ROOT / DEFAULT_RULER_DIR, dst)
    return dst


def test_load_ruler_refuses_changed_content(tmp_path):
    dst = _copy_ruler(tmp_path)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["content_hash"] = "0" * 64
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EvaluationError, match="content hash"):
        load_ruler(dst)
    data = bytearray((dst / "ruler.parquet").read_bytes())
    data[100] ^= 1
    (dst / "ruler.parquet").write_bytes(bytes(data))
    with pytest.raises(EvaluationError, match="sha256"):
        load_ruler(dst)
    with pytest.raises(EvaluationError, match="comparisons need the same ruler"):
        load_ruler(REPO_ROOT / DEFAULT_RULER_DIR, dataclasses.replace(TOY_RULER, sample_seed=1))
    with pytest.raises(EvaluationError, match="no ruler at"):
        load_ruler(tmp_path / "nowhere")


def _fake_dataset(root, problem_ids):
    (root / "shards").mkdir(parents=True)
    pq.write_table(pa.table({"problem_id": problem_ids}), root / "shards" / "part-00000.parquet")
    return root


def test_check_disjoint_refuses_overlap(ruler, tmp_path):
    some = sorted(ruler.problem_ids)[:2]
    overlapping = _fake_dataset(tmp_path / "a", ["x", some[0], some[1]])
    with pytest.raises(EvaluationError, match="2 ruler problem"):
        check_disjoint(ruler, dataset_problem_ids(overlapping))
    check_disjoint(ruler, dataset_problem_ids(_fake_dataset(tmp_path / "b", ["x", "y"])))
    with pytest.raises(EvaluationError, match="no dataset shards"):
        dataset_problem_ids(tmp_path / "c")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prm_factory.cli", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)


def test_eval_command_with_reference_scorers(ruler, tmp_path):
    out = tmp_path / "report.json"
    res = _cli("eval", "--scorer", "oracle", "--ruler-problems", "8", "--bon", "1,4,16", "--json", "--out", str(out))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert json.loads(out.read_text()) == report
    assert report["scorer"] == "oracle" and report["ruler"]["steps"]["problems"] == 8
    assert report["ruler"]["steps"]["step_auroc"] == 1.0
    rows = ruler.limited(8).rows
    assert report["ruler"]["steps"]["trajectories"] == len(rows) == 128
    assert report["ruler"]["best_of_n"]["ns"] == [1, 4, 16]
    assert report["ruler"]["best_of_n"]["accuracy"]["random"][0] == pytest.approx(
        sum(r["final_correct"] for r in rows) / len(rows))
    res = _cli("eval", "--scorer", "constant", "--ruler-problems", "4", "--bon", "none")
    assert res.returncode == 0 and "step AUROC 0.500" in " ".join(res.stderr.split())


def test_eval_command_bad_input(ruler, tmp_path):
    cases = [
        (("eval", "--scorer", "oracle", "--processbench", "../shared/data/processbench"), "know only the toy ruler"),
        (("eval", "--scorer", "oracle", "--bon", "32"), "exceeds the ruler's 16 samples"),
        (("eval", "--scorer", "oracle", "--bon", "two"), "--bon must be"),
        (("eval", "--scorer", "best"), "--scorer must be one of"),
        (("eval", "--scorer", "model-confidence"), "--model PATH goes with --scorer model-confidence"),
        (("eval", "--scorer", "oracle", "--model", "assets/toy-policy"), "--model PATH goes with"),
        (("eval", "--scorer", "model-confidence", "--model", str(tmp_path / "none")), "no model at"),
        (("eval",), "exactly one of --checkpoint"),
        (("eval", "--scorer", "oracle", "--ruler", str(tmp_path)), "no ruler at"),
        (("eval", "--scorer", "oracle", "--dataset",
          str(_fake_dataset(tmp_path / "ds", sorted(ruler.problem_ids)[:1]))), "1 ruler problem(s) are in dataset"),
    ]
    from typer.testing import CliRunner

    from prm_factory.cli import app

    runner = CliRunner()  # in-process: these fail before any scorer work, so no need for a subprocess each
    for args, message in cases:
        res = runner.invoke(app, list(args))
        assert res.exit_code == 2, (args, res.stderr)
        assert message in " ".join(res.stderr.split()), (args, res.stderr)


def test_eval_of_a_missing_checkpoint_is_one_line_exit_2(tmp_path):
    res = _cli("eval", "--checkpoint", str(tmp_path / "run"), "--ruler-problems", "2", "--bon", "none")
    assert res.returncode == 2
    assert f"checkpoint not found: {tmp_path / 'run'}" in " ".join(res.stderr.split())
    assert "Traceback" not in res.stderr


def test_position_reference_wins_step_auroc_but_not_the_metrics_it_cannot_game(ruler):
    small = ruler.limited(64)
    report = evaluate_ruler(reference_scorer("position"), small, bon_ns=[8], n_boot=100)
    steps = report["steps"]
    assert steps["step_auroc"] > 0.65  # later steps are wrong more often: position alone "ranks" them
    assert steps["within_position_auroc"] == 0.5 and steps["within_position_auroc_ci"] == [0.5, 0.5]
    assert steps["first_error_f1"] == 0.0  # 1/(1+j) >= 0.5 for j <= 1 then below: it "finds" errors at step 2
    lo, hi = report["best_of_n"]["diff_vs_majority"]["min_step"][0]
    assert hi < 0  # picking the shortest solution is worse than majority vote


def test_policy_confidence_reads_the_rulers_policy_and_sees_a_slip():
    prompt = "Start at 7. Apply in order: +5, *3.\n"
    right = ["7+5=12\n", "12*3=36\n", "Answer: 36"]
    slip = ["7+5=12\n", "12*3=38\n", "Answer: 38"]
    scorer = reference_scorer("policy-confidence", Ruler([], {"spec": {"policy_path": "assets/toy-policy"}}))
    good, bad = scorer.score([prompt, prompt], [right, slip])
    assert all(0 < x <= 1 for x in good.mean + bad.mean)
    assert all(a >= b for a, b in zip(good.mean, good.mean[1:], strict=False))  # a running minimum
    assert good.mean[0] == pytest.approx(bad.mean[0])  # the same first step
    assert bad.mean[1] < 0.1 < good.mean[1]  # the policy did not expect 38: the step where the slip is
    with pytest.raises(EvaluationError, match="names no policy"):
        reference_scorer("policy-confidence", Ruler([], {"spec": {}}))
    with pytest.raises(EvaluationError, match="no model at"):
        reference_scorer("policy-confidence", Ruler([], {"spec": {"policy_path": "assets/no-such-policy"}}))


def test_model_confidence_is_another_models_view_of_the_policys_tokens(ruler_v2):
    """On the v2 ruler, the v1 policy (which knows the true rules) scores the v2 policy's steps; it is the same
    scorer as policy-confidence, over the model given."""
    v2 = ruler_v2.limited(2)
    prompts, completions = [r["prompt"] for r in v2.rows[:8]], [r["completions"] for r in v2.rows[:8]]
    v1_view = reference_scorer("model-confidence", v2, model="assets/toy-policy")
    assert v1_view.name == "model-confidence"
    same = reference_scorer("policy-confidence", Ruler([], {"spec": {"policy_path": "assets/toy-policy"}}))
    assert [s.mean for s in v1_view.score(prompts, completions)] == [s.mean for s in same.score(prompts, completions)]
    own = reference_scorer("policy-confidence", v2)  # the v2 policy's own view differs
    assert [s.mean for s in own.score(prompts, completions)] != [s.mean for s in same.score(prompts, completions)]
    with pytest.raises(EvaluationError, match="goes with the model-confidence scorer"):
        reference_scorer("model-confidence", v2)
    with pytest.raises(EvaluationError, match="goes with the model-confidence scorer"):
        reference_scorer("position", v2, model="assets/toy-policy")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHIPPED_RULERS))
def test_shipped_ruler_rows_are_reproduced_by_the_engine(name):
    """The spec really defines the set: sampling its first 2 problems again gives the shipped rows (v1 and v2)."""
    import torch

    from cluster.hf_engine import HFEngine

    torch.set_num_threads(1)
    ruler_dir, shipped_spec_ = SHIPPED_RULERS[name]
    ruler = load_ruler(ruler_dir, shipped_spec_)
    spec = dataclasses.replace(shipped_spec_, num_problems=2)
    problems, _ = ruler_problems(spec, set())
    shipped = [r for r in ruler.rows if r["problem_id"] in {p.problem_id for p in problems}]
    assert len(shipped) == 2 * spec.samples_per_problem  # the first two were not excluded as reserved
    engine = HFEngine(str(REPO_ROOT / spec.policy_path), dtype="float32", seed=spec.sample_seed)
    rows = sample_ruler_rows(spec, problems, engine)
    assert rows == shipped[: len(rows)]


def test_ruler_v2_loads_with_its_hashes_and_names_its_policy(ruler, ruler_v2, tmp_path):
    """Toy world v2 (issue 21): v1's problems, sampling seed and truth; the policy with misconceptions sampled it."""
    m = ruler_v2.manifest
    assert m["spec_hash"] == TOY_RULER_V2.spec_hash() != TOY_RULER.spec_hash()
    assert m["ruler_version"] == "toy-ruler-v2" and m["spec"]["policy_path"] == "assets/toy-policy-v2"
    assert dataclasses.replace(TOY_RULER_V2, version=TOY_RULER.version, policy_path=TOY_RULER.policy_path) == TOY_RULER
    assert ruler_v2.problem_ids == ruler.problem_ids and m["content_hash"] != ruler.manifest["content_hash"]
    assert m["trajectories"] == len(ruler_v2.rows) == TOY_RULER.num_problems * TOY_RULER.samples_per_problem
    assert m["steps"] == sum(len(r["completions"]) for r in ruler_v2.rows)
    assert (shipped_spec(DEFAULT_RULER_V2_DIR), shipped_spec(DEFAULT_RULER_DIR), shipped_spec(tmp_path)) == (
        TOY_RULER_V2, TOY_RULER, None)
    with pytest.raises(EvaluationError, match="comparisons need the same ruler"):
        load_ruler(DEFAULT_RULER_V2_DIR, TOY_RULER)
    for row in ruler_v2.rows:  # the same exact truth as v1: the checker's first error, never a misconception
        check = check_solution(Problem.make("toy", row["question"], row["answer"]), "".join(row["completions"]))
        truth = row["step_truth"]
        assert (truth.index(False) if False in truth else -1) == (
            check.first_error if 0 <= check.first_error < len(truth) else -1)


def test_ruler_v2_holds_confident_misconceptions(ruler, ruler_v2):
    """The v2 policy's errors include its taught rules; the v1 policy's almost never match them."""
    seed = json.loads((REPO_ROOT / TOY_RULER_V2.policy_path / "training_log.json").read_text())["args"][
        "misconceptions"]
    rules = misconception_rules(seed)

    def share(rows):
        errors = [r for r in rows if 0 <= r["first_error"] < len(r["completions"])]
        hits = [r for r in errors if misconception_at(rules, Problem.make("toy", r["question"], r["answer"]),
                                                      r["first_error"], r["completions"][r["first_error"]])]
        return len(hits) / len(errors)

    assert 0.3 <= share(ruler_v2.rows) <= 0.7
    assert share(ruler.rows) < 0.1


def test_ruler_command_checks_the_shipped_v2(ruler_v2):
    res = _cli("ruler", "--spec", "v2", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["ruler_version"] == "toy-ruler-v2" and summary["content_hash"] == ruler_v2.manifest["content_hash"]
    res = _cli("ruler", "--spec", "v3")
    assert res.returncode == 2 and "--spec must be one of v1, v2" in res.stderr
