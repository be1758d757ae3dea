"""The shipped toy PRM (assets/toy-prm): it loads, is held out from the ruler, and scores the ruler's first
problems to the figures its README states (assets/toy-prm/expected.json holds them, written by the command in the
README; the README's table quotes the same numbers)."""

from __future__ import annotations

import json

import pytest

from configs.schema import REPO_ROOT
from tasks.evaluation.ruler import check_disjoint, evaluate_ruler, load_ruler
from tasks.prm.model import load_prm, training_problem_ids

ASSET = REPO_ROOT / "assets" / "toy-prm"


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((ASSET / "expected.json").read_text())


def test_the_shipped_prm_loads_with_its_recipe_and_provenance():
    prm = load_prm(ASSET)
    cfg = prm.config
    assert cfg["reads"] == "tokens" and cfg["token_features"] == "distribution" and cfg["target"] == "er_labels"
    assert cfg["dataset_version"] and cfg["prompt_template"] == "{question}\n"
    assert cfg["factory_config"]["name"] == "toy-prm"  # configs/toy-prm.yaml
    assert sum(p.stat().st_size for p in ASSET.rglob("*") if p.is_file()) < 8 * 2**20  # a few MB
    trained_on, _ = training_problem_ids(ASSET)
    check_disjoint(load_ruler(), trained_on, "assets/toy-prm's training problems")


def test_the_shipped_prm_scores_the_rulers_first_problems_as_its_readme_says(expected):
    ruler = load_ruler().limited(expected["ruler_problems"])
    report = evaluate_ruler(load_prm(ASSET), ruler, [8], n_boot=expected["n_boot"])
    steps, bon = report["steps"], report["best_of_n"]
    assert steps["within_position_auroc"] == pytest.approx(expected["within_position_auroc"], abs=1e-6)
    assert steps["first_error_f1"] == pytest.approx(expected["first_error_f1"], abs=1e-6)
    assert steps["step_auroc"] == pytest.approx(expected["step_auroc"], abs=1e-6)
    assert bon["accuracy"]["min_step"][0] == pytest.approx(expected["bon8_min_step"], abs=1e-9)
    readme = (ASSET / "README.md").read_text()
    for key in ("within_position_auroc", "first_error_f1", "step_auroc", "bon8_min_step"):
        assert f"{expected[key]:.3f}" in readme, f"README does not state {key} = {expected[key]:.3f}"
