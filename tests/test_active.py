"""The ActPRM active loop (issue 14): config section, budget guard, round bookkeeping (fast, no engine)."""

from __future__ import annotations

import pytest

from configs.schema import REPO_ROOT, ConfigError, load_config, parse_config


def _toy(**active) -> dict:
    import yaml

    data = yaml.safe_load((REPO_ROOT / "configs" / "toy.yaml").read_text())
    data["active"] = active
    return data


def test_shipped_active_configs_carry_both_parameter_sets():
    paper = load_config(REPO_ROOT / "configs" / "toy-active.yaml").active.selection.params()
    code = load_config(REPO_ROOT / "configs" / "toy-active-code.yaml").active.selection.params()
    assert (paper.delta_pred, paper.delta_std) == (0.95, 0.005)
    assert (code.delta_pred, code.delta_std) == (0.9, 0.01)


def test_explicit_thresholds_replace_the_preset():
    cfg = parse_config(_toy(selection={"preset": "paper", "delta_pred": 0.8, "delta_std": 0.02}))
    p = cfg.active.selection.params()
    assert (p.delta_pred, p.delta_std, p.error_threshold) == (0.8, 0.02, 0.5)


@pytest.mark.parametrize(("active", "path"), [
    ({"selection": {"delta_pred": 0.9}}, "active.selection"),
    ({"selection": {"preset": "strict"}}, "active.selection.preset"),
    ({"selector": "entropy"}, "active.selector"),
    ({"rounds": 0}, "active.rounds"),
    ({"label_token_budget": 0}, "active.label_token_budget"),
    ({"seed_sise": 4}, "active.seed_sise"),
])
def test_bad_active_section_names_its_field(active, path):
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        parse_config(_toy(**active))


def test_active_section_does_not_change_the_dataset_hash():
    assert parse_config(_toy(rounds=7)).config_hash() == parse_config(_toy()).config_hash()
