"""The ActPRM active loop (issue 14): config section, budget guard, round bookkeeping (fast, no engine), and the
pool scored through vLLM (one slow test)."""

from __future__ import annotations

import pytest

from configs.schema import REPO_ROOT, ConfigError, FactoryConfig, load_config, parse_config
from tasks.active.selection import selection_params


def _toy(**active) -> dict:
    import yaml

    data = yaml.safe_load((REPO_ROOT / "configs" / "toy.yaml").read_text())
    data["active"] = active
    return data


def test_shipped_active_configs_carry_both_parameter_sets():
    paper = selection_params(load_config(REPO_ROOT / "configs" / "toy-active.yaml").active.selection)
    code = selection_params(load_config(REPO_ROOT / "configs" / "toy-active-code.yaml").active.selection)
    assert (paper.delta_pred, paper.delta_std) == (0.95, 0.005)
    assert (code.delta_pred, code.delta_std) == (0.9, 0.01)


def test_explicit_thresholds_replace_the_preset():
    cfg = parse_config(_toy(selection={"preset": "paper", "delta_pred": 0.8, "delta_std": 0.02}))
    p = selection_params(cfg.active.selection)
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


@pytest.mark.parametrize(("selection", "message"), [
    ({"delta_pred": 0.5, "delta_std": 0.01}, r"active\.selection\.delta_pred: Value error, delta_pred must be in "
                                             r"\(0\.5, 1\), got 0\.5: a step is confident when"),
    ({"delta_pred": 1.0, "delta_std": 0.01}, r"delta_pred must be in \(0\.5, 1\), got 1\.0"),
    ({"delta_pred": 1.2, "delta_std": 0.01}, r"delta_pred must be in \(0\.5, 1\), got 1\.2"),
    ({"delta_pred": 0.9, "delta_std": -0.01}, r"active\.selection\.delta_std: Value error, delta_std must be in "
                                              r"\[0, 0\.5\], got -0\.01: .* never negative"),
    ({"calibrate_trusted_share": 0.3, "delta_pred": 0.9, "delta_std": 0.01}, "give it or them, not both"),
    ({"calibrate_trusted_share": 1.0}, r"active\.selection\.calibrate_trusted_share"),
])
def test_thresholds_outside_their_range_are_refused_by_validate(tmp_path, selection, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(_toy(selection=selection))
    result = _run_cli("validate", _write_config(tmp_path / "c.yaml", _toy(selection=selection)))
    assert result.exit_code != 0 and "active.selection" in result.output


def test_streaming_needs_the_warm_start():
    with pytest.raises(ConfigError, match="schedule streaming .* needs warm_start true"):
        parse_config(_toy(schedule="streaming", warm_start=False))


def test_train_backbone_defaults_to_the_policy():
    v2 = load_config(REPO_ROOT / "configs" / "toy-v2.yaml")
    assert v2.train.model_path == v2.policy.model_path == "assets/toy-policy-v2"
    explicit = {**_toy_v2(), "train": {"model_path": "assets/toy-policy"}}
    assert parse_config(explicit).train.model_path == "assets/toy-policy"  # an explicit backbone wins
    # A config whose policy is the old default hashes its trainer as before (the same path is hashed).
    toy = parse_config(_toy())
    assert toy.train.model_path == "assets/toy-policy"
    def with_backbone(data: dict, path: str) -> FactoryConfig:
        return parse_config({**data, "train": {**data.get("train", {}), "model_path": path}})

    assert toy.train.train_hash() == with_backbone(_toy(), "assets/toy-policy").train.train_hash()
    assert v2.train.train_hash() != with_backbone(_toy_v2(), "assets/toy-policy").train.train_hash()


def _toy_v2() -> dict:
    import yaml

    return yaml.safe_load((REPO_ROOT / "configs" / "toy-v2.yaml").read_text())


def test_active_section_does_not_change_the_dataset_hash():
    assert parse_config(_toy(rounds=7)).config_hash() == parse_config(_toy()).config_hash()


# -- bad input: clear errors before any engine starts (CLI, no engine, no Ray) --------------------------------------


def _write_config(path, data: dict) -> str:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return str(path)


def _run_cli(*args: str):
    from typer.testing import CliRunner

    from prm_factory.cli import app

    return CliRunner().invoke(app, list(args))


def test_budget_below_one_problem_is_refused_before_any_engine(tmp_path):
    import time

    from tasks.active.loop import estimate_label_cost

    data = _toy(label_token_budget=100)
    cfg = parse_config(data)
    est = estimate_label_cost(cfg)
    # toy.yaml: EDU branching width 2 -> 2 leaves; rollouts.n 4; max_new_tokens 96.
    assert (est["leaves"], est["tokens"]) == (2, 2 * 4 * 96)
    started = time.perf_counter()
    result = _run_cli("active", "--config", _write_config(tmp_path / "c.yaml", data), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "label_token_budget 100 is below the estimated cost of labelling one problem, 768 tokens" in result.output
    assert not (tmp_path / "out").exists()  # nothing was written, no engine was started
    assert time.perf_counter() - started < 10


def test_empty_pool_is_refused_before_any_engine(tmp_path):
    import json

    data = _toy()
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"question": "1+1?"}) + "\n" + json.dumps({"answer": "2"}) + "\n")
    data["sources"] = [{"kind": "jsonl", "path": str(problems)}]
    result = _run_cli("active", "--config", _write_config(tmp_path / "c.yaml", data), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "empty pool: the sources gave no usable problem" in result.output
    assert not (tmp_path / "out").exists()


def test_a_loop_without_an_engine_refuses_to_generate_the_pool(tmp_path):
    """engine_factory None (a replay, the end-to-end benchmark's): a pool missing from OUT is an ActiveError naming
    it, not an engine started."""
    from tasks.active.loop import ActiveLoop
    from tasks.active.run_dir import ActiveError

    cfg = parse_config(_toy(pool_size=2))
    loop = ActiveLoop(cfg, tmp_path / "out", None, train_fn=lambda *a: pytest.fail("no training"))
    with pytest.raises(ActiveError, match="no policy engine .* the pool in"):
        loop.run()
    assert not loop.engine_started


def test_out_dir_of_another_config_is_refused(tmp_path):
    from tasks.active.run_dir import ActiveError, check_out_dir

    out = tmp_path / "out"
    assert check_out_dir(out, parse_config(_toy())) is False
    assert check_out_dir(out, parse_config(_toy(rounds=9, label_token_budget=10**6))) is True  # may grow
    with pytest.raises(ActiveError, match="selector"):
        check_out_dir(out, parse_config(_toy(selector="random")))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(ActiveError, match="not an active-run directory"):
        check_out_dir(tmp_path / "other", parse_config(_toy()))


def test_budget_cap_and_round_seed():
    from tasks.active.loop import budget_cap, round_seed

    assert budget_cap(None, 500, 5) is None
    assert budget_cap(1000, 0, 0) is None          # nothing bought yet: no average to go by
    assert budget_cap(1000, 400, 4) == 6           # 100 tokens per problem so far, 600 left
    assert budget_cap(1000, 950, 4) == 1           # less than one problem left: still one (then the budget stops)
    assert round_seed(0, 1) != round_seed(0, 2) and round_seed(0, 1) == round_seed(0, 1)


def test_torn_round_line_is_ignored(tmp_path):
    import json

    from tasks.active.run_dir import append_round, read_rounds

    append_round(tmp_path, {"round": 0, "x": 1})
    with open(tmp_path / "rounds.jsonl", "a") as fh:
        fh.write('{"round": 1, "x"')  # a kill while the line was written
    assert read_rounds(tmp_path) == [{"round": 0, "x": 1}]
    append_round(tmp_path, {"round": 1, "x": 2})
    assert [json.loads(line)["x"] for line in (tmp_path / "rounds.jsonl").read_text().splitlines()] == [1, 2]


def test_warm_start_checkpoint_must_fit_the_model(tmp_path):
    from cluster.train import _warm_start_dir
    from configs.models import resolve_model
    from tasks.prm.model import build_prm, save_checkpoint
    from tasks.prm.training import TrainError, run_prm_config

    small = {**_toy(), "train": {"num_heads": 4, "head_hidden": [32, 32], "epochs": 1}}
    cfg = parse_config(small)
    backbone = resolve_model(cfg.train.model_path, offline=True)
    made = run_prm_config(cfg.train, backbone, "v1")
    ckpt = save_checkpoint(build_prm({**made, "backbone": str(backbone)}), made, tmp_path / "ckpt")
    # Another dataset version and more epochs: the same model, so the weights fit.
    later = parse_config({**small, "train": {**small["train"], "epochs": 3}})
    assert _warm_start_dir(tmp_path / "ckpt", run_prm_config(later.train, backbone, "v2")) == str(ckpt.resolve())
    with pytest.raises(TrainError, match="warm start: .* is a PRM of another model config"):
        _warm_start_dir(ckpt, run_prm_config(parse_config(_toy()).train, backbone, "v2"))  # 8 heads of 128
    with pytest.raises(TrainError, match="warm start: checkpoint not found"):
        _warm_start_dir(tmp_path / "nope", made)


@pytest.mark.slow
def test_vllm_scorer_selects_what_the_transformers_scorer_selects(tmp_path, ray_session):
    """`active.scorer: vllm`: round 1 scores the pool from a vLLM scoring actor in the Ray pool (the round-0 PRM
    whole, as the package's vLLM plugin model) and picks the same problems, with the same figures, as the
    PRM scored in the driver. The toy PRM stands in for round 0's PRM; the pool is ruler trajectories."""
    import json
    import shutil

    import pyarrow.parquet as pq

    from cluster.active_run import pool_scorer
    from tasks.active.loop import ActiveLoop
    from tasks.active.run_dir import PRM_DIR, ROUNDS_DIR, ActiveError, PoolItem

    rows = pq.read_table(REPO_ROOT / "assets" / "toy-ruler" / "ruler.parquet").to_pylist()
    by_problem = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], r)  # one trajectory per problem, as an active pool holds
    pool = [PoolItem(pid, "toy", r["prompt"], r["completions"], 0, "stop") for pid, r in list(by_problem.items())[:48]]
    records = [{"selected_problem_ids": [p.problem_id for p in pool[:8]], "label_tokens": 0}]
    with pytest.raises(ActiveError, match="scorer factory"):  # vllm without the cluster's factory: refused
        ActiveLoop(parse_config(_toy(scorer="vllm")), tmp_path / "x", engine_factory=lambda: None, train_fn=None)
    picks, scores = {}, {}
    for scorer in ("transformers", "vllm"):
        cfg = parse_config(_toy(scorer=scorer, selection={"preset": "actprm_code"}))
        out = tmp_path / scorer
        shutil.copytree(REPO_ROOT / "assets" / "toy-prm", out / ROUNDS_DIR / "round-000" / PRM_DIR)
        loop = ActiveLoop(cfg, out, engine_factory=lambda: pytest.fail("no policy engine is needed to select"),
                          train_fn=lambda *a, **k: pytest.fail("no training in a selection"),
                          scorer_factory=pool_scorer(cfg))
        scores[scorer] = loop.score_pool(out / ROUNDS_DIR / "round-000" / PRM_DIR, pool[8:])
        picks[scorer] = loop.select(1, pool, records)
    worst = max(abs(a - b) for x, y in zip(scores["transformers"], scores["vllm"], strict=True)
                for a, b in zip(x.mean + x.std, y.mean + y.std, strict=True))
    assert worst <= 1e-4
    keep = ("how", "unlabelled", "uncertain", "confident", "selected_problem_ids", "selected_digest")
    assert {k: picks["vllm"][k] for k in keep} == {k: picks["transformers"][k] for k in keep}
    assert picks["vllm"]["how"] == "uncertainty" and picks["vllm"]["unlabelled"] == 40
    assert json.loads((tmp_path / "vllm" / ROUNDS_DIR / "round-001" / "selection.json").read_text())["round"] == 1
