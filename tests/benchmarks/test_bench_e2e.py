"""The end-to-end benchmark's bookkeeping and run_all's carry-on-after-failure and coverage.

The headline (tokens to reach a quality, round 0 never credited, the two goals, the seed-sign verdict) is pure
arithmetic over points, checked against values computed by hand. The token accounting is checked on a real
4-problem build: an arm's tokens are its shards' cost records, plus the pool's generation for the active arms; a
Math-Shepherd arm subsampled from a larger N, on a real 4-problem build too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import lib

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def e2e():
    from benchmarks import bench_e2e

    return bench_e2e


@pytest.fixture(scope="module")
def run_all():
    from benchmarks import run_all

    return run_all


def _pt(arm: str, seed: int, tokens: int, auroc: float, problems: int = 0, rnd: int | None = None,
        ci: tuple[float, float] | None = None, bon: float = 0.8) -> dict:
    p = {"arm": arm, "seed": seed, "problems": problems, "tokens": {"generated": tokens},
         "within_position_auroc": auroc, "within_position_auroc_ci": list(ci or (auroc - 0.02, auroc + 0.02)),
         "bon8_min_step": bon, "bon8_random": 0.5}
    if rnd is not None:
        p["round"] = rnd
    return p


def test_tokens_to_reach_takes_the_cheapest_point_and_its_interval_from_the_points_intervals(e2e):
    curve = [_pt("ms-8", 0, 1000, 0.80, ci=(0.75, 0.85)), _pt("ms-8", 0, 2000, 0.88, ci=(0.84, 0.92)),
             _pt("ms-8", 0, 4000, 0.91, ci=(0.87, 0.95)), _pt("ms-8", 0, 8000, 0.93, ci=(0.905, 0.955))]
    got = e2e.tokens_to_reach(curve, "within_position_auroc", 0.90)
    # point: 0.91 at 4,000 is the first at >= 0.90; optimistic: 0.92 (upper end) at 2,000; pessimistic: 0.905 at 8,000
    assert (got["tokens"], got["optimistic"], got["pessimistic"]) == (4000, 2000, 8000)
    assert got["round0_refused"] == 0
    assert e2e.tokens_to_reach(curve, "within_position_auroc", 0.99)["tokens"] is None


def test_the_headline_never_credits_round_0(e2e):
    # Round 0 is a random seed set: it reaches the target at 500 tokens, but no selection has run yet.
    curve = [_pt("actprm", 0, 500, 0.95, rnd=0), _pt("actprm", 0, 900, 0.93, rnd=1),
             _pt("actprm", 0, 1300, 0.96, rnd=2)]
    got = e2e.tokens_to_reach(curve, "within_position_auroc", 0.94)
    assert got["tokens"] == 1300 and got["round0_refused"] == 1
    only_round0 = e2e.tokens_to_reach(curve[:1], "within_position_auroc", 0.94)
    assert only_round0["tokens"] is None and only_round0["optimistic"] is None and only_round0["round0_refused"] == 1


def _world() -> list[dict]:
    pts = []
    for s in (0, 1):
        pts += [_pt("truth", s, 3000, 0.96, problems=256), _pt("truth", s, 1500, 0.90, problems=128)]
        pts += [_pt("ms-8", s, 20000, 0.85, problems=128), _pt("ms-8", s, 40000, 0.88, problems=256)]
        pts += [_pt("edu", s, 4000, 0.87, problems=128), _pt("edu", s, 8000, 0.90, problems=256)]
        pts += [_pt("actprm", s, 1000, 0.80, problems=32, rnd=0), _pt("actprm", s, 1800 + 200 * s, 0.89, problems=64,
                                                                        rnd=1),
                _pt("actprm", s, 3000, 0.92, problems=96, rnd=2)]
    return pts


def test_headline_targets_and_goals_by_hand(e2e):
    h = e2e.headline(_world(), [0, 1])["within_position_auroc"]
    # ceiling: truth on the whole pool (256 problems), 0.96; target 0.95 x 0.96 = 0.912
    assert h["ceiling"] == pytest.approx(0.96) and h["target"] == pytest.approx(0.912)
    assert h["arms"]["actprm"]["per_seed"][0]["tokens"] == 3000  # round 2 (0.92) is the first at >= 0.912
    assert h["arms"]["ms-8"]["all_seeds_reach"] is False and h["arms"]["ms-8"]["mean_tokens"] is None
    g = h["goals"]
    # Equal quality = ms-8 on the whole pool (0.88 at 40,000); ActPRM reaches it at round 1: 1,800 / 2,000 tokens.
    assert g["ms8_over_actprm"][0]["ratio"] == pytest.approx(40000 / 1800)
    assert g["ms8_over_actprm"][1]["ratio"] == pytest.approx(40000 / 2000)
    assert g["goal_20x_met"] is True  # 22.2x and 20.0x: every seed
    # Full labelling = edu on 256 problems at 0.90; ActPRM first reaches it at round 2 with 96 problems: 37.5%
    assert g["actprm_label_share"][0]["share"] == pytest.approx(96 / 256)
    assert g["goal_30pct_met"] is False


def test_the_ladder_compares_arms_at_the_qualities_they_reach(e2e):
    lad = e2e.ladder(_world(), [0, 1], "within_position_auroc", (0.85, 0.89, 0.95))
    # 0.85: ms-8 at 20,000 (its 128-problem point), edu at 4,000 (0.87): 5x; ActPRM round 1 (0.89) at 1,800 / 2,000
    assert lad["0.85"]["ms-8"]["tokens"] == {0: 20000, 1: 20000}
    assert lad["0.85"]["edu"]["ms8_over_arm"] == {0: 5.0, 1: 5.0}
    assert lad["0.85"]["actprm"]["tokens"] == {0: 1800, 1: 2000}
    # 0.89: ms-8 never gets there (0.88 at most): no ratio; 0.95: only the truth ceiling (0.96)
    assert lad["0.89"]["ms-8"]["tokens"] == {0: None, 1: None} and lad["0.89"]["edu"]["ms8_over_arm"][0] is None
    assert [a for a, v in lad["0.95"].items() if v["tokens"][0]] == ["truth"]


def test_no_goal_is_judged_at_a_quality_no_better_than_no_scorer(e2e):
    pts = [dict(p, bon8_min_step=0.45 if p["arm"] == "ms-8" else p["bon8_min_step"]) for p in _world()]
    g = e2e.headline(pts, [0, 1])["bon8_min_step"]["goals"]  # ms-8's 0.45 is below the random pick's 0.5
    assert g["ms8_over_actprm"][0]["ratio"] is None and "scorer-free" in g["ms8_over_actprm"][0]["note"]
    assert g["goal_20x_met"] is False


def test_seed_sign_says_unresolved_when_seeds_disagree(e2e):
    pts = [_pt("edu", 0, 1, 0.90, problems=256), _pt("ms-8", 0, 1, 0.85, problems=256),
           _pt("edu", 1, 1, 0.84, problems=256), _pt("ms-8", 1, 1, 0.86, problems=256),
           _pt("edu", 1, 1, 0.99, problems=64)]  # a smaller point is not the arm's figure
    got = e2e.seed_sign(pts, "edu", "ms-8", "within_position_auroc")
    assert got["verdict"] == "unresolved" and got["per_seed"][1] == pytest.approx(-0.02)
    assert e2e.seed_sign(pts[:2], "edu", "ms-8", "within_position_auroc")["verdict"] == "one seed: cannot resolve"
    agree = [*pts[:2], _pt("edu", 1, 1, 0.88, problems=256), _pt("ms-8", 1, 1, 0.86, problems=256)]
    assert e2e.seed_sign(agree, "edu", "ms-8", "within_position_auroc")["verdict"] == "higher"


def test_the_cheapest_math_shepherd_n_that_reaches_a_quality_by_hand(e2e):
    """Against the cheapest baseline: the N with the fewest tokens to the quality, not N = 8 alone."""
    pts = [_pt("ms-8", 0, 1000, 0.85, problems=128), _pt("ms-8", 0, 4000, 0.92, problems=1024),
           _pt("ms-4", 0, 2500, 0.91, problems=1024), _pt("ms-16", 0, 9000, 0.93, problems=1024),
           _pt("edu", 0, 3000, 0.90, problems=1024)]
    assert e2e.cheapest_ms(pts, 0, "within_position_auroc", 0.90) == {"arm": "ms-4", "tokens": 2500}
    assert e2e.cheapest_ms(pts, 0, "within_position_auroc", 0.80) == {"arm": "ms-8", "tokens": 1000}
    assert e2e.cheapest_ms(pts, 0, "within_position_auroc", 0.95) is None
    got = e2e.against_cheapest_ms(pts, [0], "within_position_auroc")["edu"][0]
    assert got["cheapest_ms"] == {"arm": "ms-4", "tokens": 2500} and got["ms_over_arm"] == pytest.approx(2500 / 3000)


def test_equal_tokens_paired_rounds_and_reach_by_hand(e2e):
    """At no more tokens: a's last point against b's most expensive point not above it; per round: differences
    paired by seed; reach: the first point at or above the whole-pool EDU PRM's lower interval end."""
    def pt(arm, seed, tokens, auroc, problems, rnd=None, label=0, pool=0, ci=None):
        p = _pt(arm, seed, tokens, auroc, problems=problems, rnd=rnd, ci=ci)
        p["tokens"].update(label_generated=label, pool_generated=pool)
        return p

    pts = [pt("stream-actprm", 0, 500, 0.80, 2, 0, 100, 400), pt("stream-actprm", 0, 900, 0.86, 4, 1, 500, 400),
           pt("stream-random", 0, 500, 0.80, 2, 0, 100, 400), pt("stream-random", 0, 1000, 0.84, 4, 1, 600, 400),
           pt("stream-random", 0, 800, 0.83, 3, 2, 400, 400),  # not a curve in tokens: the cheaper-or-equal rule
           pt("edu", 0, 600, 0.82, 4), pt("edu", 0, 1200, 0.90, 8, ci=(0.85, 0.95)),
           pt("stream-actprm", 1, 500, 0.70, 2, 0, 100, 400), pt("stream-actprm", 1, 700, 0.75, 4, 1, 300, 400),
           pt("stream-random", 1, 500, 0.70, 2, 0, 100, 400), pt("stream-random", 1, 700, 0.79, 4, 1, 300, 400),
           pt("edu", 1, 2000, 0.90, 8)]
    eq = e2e.at_equal_tokens(pts, "stream-actprm", "stream-random", "within_position_auroc")
    # seed 0: actprm's last (4 problems, round 1, 900 tokens) 0.86 against random's 800-token point 0.83
    assert eq["per_seed"][0]["diff"] == pytest.approx(0.03) and eq["per_seed"][0]["stream-random_tokens"] == 800
    assert eq["per_seed"][1]["diff"] == pytest.approx(-0.04)
    assert eq["mean"] == pytest.approx(-0.005) and not eq["not_below_in_any_seed"] and not eq["above_in_every_seed"]
    lo, hi = eq["ci95_over_seeds"]
    assert lo == pytest.approx(-0.04) and hi == pytest.approx(0.03)
    assert e2e.at_equal_tokens(pts, "stream-actprm", "edu", "within_position_auroc")["per_seed"][1]["diff"] is None
    paired = e2e.paired_rounds(pts, "stream-actprm", "stream-random", "within_position_auroc")
    assert set(paired) == {"0", "1"}  # round 2 is in one arm and one seed only
    assert paired["0"]["mean"] == 0 and paired["1"]["per_seed"] == pytest.approx({0: 0.02, 1: -0.04})
    assert paired["1"]["tokens_a"] == 400 and paired["1"]["tokens_b"] == 450
    reach = e2e.reach_whole_pool(pts, "stream-actprm", "within_position_auroc")
    assert reach[0]["reached"] and reach[0]["round"] == 1 and reach[0]["token_share"] == pytest.approx(900 / 1200)
    assert reach[0]["label_token_share"] == pytest.approx(500 / 800) and reach[0]["problem_share"] == 0.5
    assert not reach[1]["reached"] and reach[1]["token_share"] is None


def test_the_summary_compares_each_diagnosis_labeller_with_its_own_arms_and_needs_no_math_shepherd(e2e):
    """``--stream-labellers edu-hard,truth``: stream-actprm@hard is compared with stream-random@hard (never with the
    edu arms), at equal tokens and batch by batch; a run with ``--ms-ns none`` has no ms arm and still summarizes."""
    def pt(arm, seed, tokens, auroc, rnd):
        p = _pt(arm, seed, tokens, auroc, problems=2 + rnd, rnd=rnd)
        p["tokens"].update(label_generated=tokens, pool_generated=0)
        return p

    pts = [pt("truth", s, 100, 0.95, 2) for s in (0, 1)]
    for s, (hard, rand) in enumerate(((0.90, 0.85), (0.80, 0.82))):
        pts += [pt("stream-actprm@hard", s, 50, 0.7, 0), pt("stream-actprm@hard", s, 90, hard, 1),
                pt("stream-random@hard", s, 50, 0.7, 0), pt("stream-random@hard", s, 90, rand, 1),
                pt("stream-actprm", s, 90, 0.5, 1), pt("stream-random", s, 90, 0.6, 1)]
    out = e2e.summarize(pts, [0, 1], [1.0], 1.0)
    hard = out["at_equal_tokens"]["stream-actprm@hard minus stream-random@hard"]
    assert [hard["per_seed"][s]["diff"] for s in (0, 1)] == pytest.approx([0.05, -0.02])
    assert out["at_equal_tokens"]["stream-actprm minus stream-random"]["mean"] == pytest.approx(-0.1)
    assert out["paired_by_round"]["stream-actprm@hard minus stream-random@hard"]["1"]["mean"] == pytest.approx(0.015)
    assert "stream-actprm@truth minus stream-random@truth" not in out["at_equal_tokens"]  # no truth arms ran
    assert not any(k.startswith("ms-") for k in out["headline"]["within_position_auroc"]["arms"])


def test_the_streaming_arms_run_the_products_streaming_schedule(e2e, edu4, tmp_path):
    """stream-actprm, stream-random and stream-all are runs of the product's loop with schedule streaming: batch 0
    is labelled whole, random labels as many per batch as the gate left, stream-all every problem; tokens are the
    chosen problems' records, the PRM's scoring tokens are the batch it read; the hard-label replay is the same
    build's rows with eta = inf."""
    import argparse

    from tasks.active.loop import LABELS_DIR, read_rounds, stream_order
    from tasks.evaluation.ruler import SHIPPED_RULERS, load_ruler
    from tasks.store.versions import version_dir

    shards, _, base = edu4
    costs, pool = e2e.problem_costs(shards), e2e.pool_items(shards)
    args = argparse.Namespace(epochs=1, n_boot=10, cache=tmp_path, problems=4, seed_size=2, per_round=1, rounds=1,
                              cold_start=False, selection=None, stream_batch=2,
                              stream_selection='{"preset": "paper"}', stream_labellers="edu,edu-hard")
    recipe = e2e.Recipe(base["train"], "v1", args, load_ruler(*SHIPPED_RULERS["v1"]).limited(2))
    points = e2e.streaming_points({"edu": shards, "truth": shards}, recipe, 0, args, base)
    arms = [p["arm"] for p in points]
    assert set(arms) == {"stream-actprm", "stream-random", "stream-all", "stream-actprm@hard", "stream-random@hard",
                         "stream-all@hard"}
    for arm in ("stream-actprm", "stream-random", "stream-all"):
        out = next((tmp_path / "active").glob(f"*-{arm}-[0-9a-f]*"))
        rounds = read_rounds(out)
        assert [r["schedule"] for r in rounds] == ["streaming"] * 2
        assert len(rounds[0]["selected_problem_ids"]) == 2  # batch 0: no PRM yet, all labelled
        for rec in rounds:
            assert rec["label_tokens"] == sum(costs[p]["generated"] for p in rec["selected_problem_ids"])
        mine = [p for p in points if p["arm"] == arm]
        batch1 = stream_order(sorted(pool), 0)[2:4]
        want = sum(int(pool[p]["prompt_tokens"]) + int(pool[p]["completion_tokens"]) for p in batch1)
        if rounds[1]["trained"]:  # the last point is batch 1's: its PRM read batch 1's two trajectories
            assert mine[-1]["round"] == 1 and mine[-1]["tokens"]["scoring_forward"] == want
    rounds = {arm: read_rounds(next((tmp_path / "active").glob(f"*-{arm}-[0-9a-f]*")))
              for arm in ("stream-actprm", "stream-random", "stream-all")}
    assert len(rounds["stream-random"][1]["selected_problem_ids"]) == rounds["stream-actprm"][1]["uncertain"]
    assert sum(len(r["selected_problem_ids"]) for r in rounds["stream-all"]) == 4
    assert rounds["stream-all"][1]["uncertain"] == 2  # the gate that trusts nothing
    def labels(arm):  # the ER labels of every row the run bought (its last label version holds them all)
        out = next((tmp_path / "active").glob(f"*-{arm}-[0-9a-f]*"))
        last = read_rounds(out)[-1]["version_id"]
        rows = [r for rs, _ in e2e.read_shards(version_dir(out / LABELS_DIR, last)) for r in rs]
        return {v for r in rows for v in r["er_labels"] if v is not None}

    values = labels("stream-all-hard")
    assert values and values <= {0.0, 1.0}  # hard labels: the replayed rows relabelled with eta = inf
    soft = labels("stream-all")
    assert soft - {0.0, 1.0}, "the edu replay keeps its soft ER labels"


def test_the_flat_labeller_buys_exactly_the_scored_trajectory(e2e, edu4, tmp_path):
    """``edu-flat`` (``--stream-labellers edu-flat``): the same EDU cuts and rollouts with no tree, so a problem's
    rows are its one policy solution (the pool trajectory the gate scores), labelled at its cut points; the tree
    build holds that same solution among its leaves and costs more."""
    import yaml

    from cluster.hf_engine import HFEngine
    from configs.schema import parse_config
    from tasks.build import build

    base = yaml.safe_load((REPO / "configs" / "toy-e2e.yaml").read_text())
    raw = lib.labeller_config(base, "v1", "edu-flat", 0, 4)
    raw["policy"]["backend"] = "transformers"
    raw["partition"]["entropy_source"] = "exact"
    raw["dataset"]["problems_per_shard"] = 2
    cfg = parse_config(raw)
    assert cfg.partition.method == "edu" and not cfg.branching
    build(cfg, tmp_path / "flat", lambda: HFEngine(str(REPO / "assets" / "toy-policy")))
    flat = lib.read_shards(tmp_path / "flat")
    rows = [r for rs, _ in flat for r in rs]
    assert len(rows) == len({r["problem_id"] for r in rows}) == 4  # one trajectory per problem
    pool = e2e.pool_items(flat)
    assert all(pool[r["problem_id"]]["completions"] == r["completions"] for r in rows)
    tree_rows = [r for rs, _ in edu4[0] for r in rs]
    for r in rows:  # the tree's leaves include the very solution the flat build labelled
        assert any(t["completions"] == r["completions"] for t in tree_rows if t["problem_id"] == r["problem_id"])
    tree_cost, flat_cost = e2e.problem_costs(edu4[0]), e2e.problem_costs(flat)
    assert sum(c["generated"] for c in flat_cost.values()) < sum(c["generated"] for c in tree_cost.values())


@pytest.fixture(scope="module")
def edu4(e2e, tmp_path_factory):
    """A real 4-problem EDU build (2 shards of 2 problems, transformers engine): its shards, as the benchmark reads
    them, and its manifest's cost."""
    import yaml

    from cluster.hf_engine import HFEngine
    from configs.schema import parse_config
    from tasks.build import build
    from tasks.cost import total_cost
    from tasks.store.dataset import read_manifest

    base = yaml.safe_load((REPO / "configs" / "toy-e2e.yaml").read_text())
    raw = lib.labeller_config(base, "v1", "edu", 0, 4)
    raw["policy"]["backend"] = "transformers"
    raw["partition"]["entropy_source"] = "exact"
    raw["dataset"]["problems_per_shard"] = 2
    out = tmp_path_factory.mktemp("edu4") / "ds"
    build(parse_config(raw), out, lambda: HFEngine(str(REPO / "assets" / "toy-policy")))
    return lib.read_shards(out), total_cost([read_manifest(out)["extra"]["cost"]]), base


def test_token_accounting_equals_the_shard_records_plus_the_pool(e2e, edu4):
    """Every arm's tokens come from the build's records: a static arm's are its shards' records, the per-problem
    costs share them out."""
    shards, manifest_cost, _ = edu4
    assert len(shards) == 2
    # Static arm: exactly the sum of its shards' records, which is what the manifest says.
    whole = lib.shard_tokens([rec for _, rec in shards])
    assert whole["generated"] == manifest_cost.generated_tokens > 0
    assert whole["prefill"] == manifest_cost.prompt_tokens > 0
    assert lib.shard_tokens([shards[0][1]])["generated"] == shards[0][1]["generated_tokens"]
    # Active arm: per-problem costs share out the shards' records (rounding: at most a token per row).
    costs = e2e.problem_costs(shards)
    rows = sum(len(rs) for rs, _ in shards)
    assert len(costs) == 4
    assert abs(sum(c["generated"] for c in costs.values()) - manifest_cost.generated_tokens) <= rows
    assert sum(c["prefill"] for c in costs.values()) == pytest.approx(manifest_cost.prompt_tokens)
    for c in costs.values():  # the stage split is whole tokens that add up to the problem's tokens
        assert sum(c["stages"].values()) == c["generated"] and min(c["stages"].values()) >= 0


def test_token_accounting_a_4_problem_replay_charges_exactly_the_selected_problems_labelling_tokens(e2e, edu4):
    """The replay labeller the benchmark hands the product's loop: for the chosen problems, exactly their rows in
    the build and a cost record of exactly their labelling tokens; the round points add the pool's generation."""
    from types import SimpleNamespace

    shards, _, _ = edu4
    costs = e2e.problem_costs(shards)
    ids = sorted(costs)
    replay = e2e.ReplayLabeller(shards)
    for chosen in (ids[:1], [ids[3], ids[0]], ids):
        result = replay.label([SimpleNamespace(problem_id=pid) for pid in chosen])
        assert result.cost.generated_tokens == sum(costs[p]["generated"] for p in chosen) > 0
        assert result.cost.prompt_tokens == round(sum(costs[p]["prefill"] for p in chosen))
        want = [r for rs, _ in shards for r in rs if r["problem_id"] in chosen]
        assert sorted(r["problem_id"] for r in result.rows) == sorted(r["problem_id"] for r in want)
        assert sorted(len(r["completions"]) for r in result.rows) == sorted(len(r["completions"]) for r in want)
    with pytest.raises(KeyError, match="no rows"):
        replay.label([SimpleNamespace(problem_id="not-in-the-pool")])
    pool = e2e.pool_items(shards)
    pool_generated = sum(int(r["completion_tokens"]) for r in pool.values())
    rounds = [{"round": 0, "selector": "random", "selected_problem_ids": ids[:2], "labelled_rows": 3,
               "cumulative_label_tokens": sum(costs[p]["generated"] for p in ids[:2]), "heldout_x": 0.5},
              {"round": 1, "selector": "uncertainty", "selected_problem_ids": ids[2:3], "labelled_rows": 2,
               "cumulative_label_tokens": sum(costs[p]["generated"] for p in ids[:3]), "heldout_x": 0.6}]
    pts = e2e.round_points("actprm", 0, rounds, shards)
    assert [p["problems"] for p in pts] == [2, 3] and [p["rows"] for p in pts] == [3, 5] and pts[1]["x"] == 0.6
    tok = pts[1]["tokens"]
    assert tok["label_generated"] == sum(costs[p]["generated"] for p in ids[:3])
    assert tok["generated"] == tok["label_generated"] + pool_generated and tok["pool_generated"] == pool_generated
    # round 1's PRM read the two unlabelled trajectories, round 0 read none (a random seed set)
    assert pts[0]["tokens"]["scoring_forward"] == 0
    assert tok["scoring_forward"] == sum(int(pool[p]["prompt_tokens"]) + int(pool[p]["completion_tokens"])
                                         for p in ids[2:])


def test_the_active_arms_run_the_products_loop_with_labels_replayed(e2e, edu4, tmp_path, monkeypatch):
    """The benchmark's ActPRM and random arms are runs of tasks.active.loop.ActiveLoop: every round goes through
    its run_round, no engine starts, each round's labels are exactly the chosen problems' build rows and tokens,
    and round r > 0 warm-starts from round r-1's checkpoint."""
    import argparse

    from tasks.active import loop as loop_module
    from tasks.evaluation.ruler import SHIPPED_RULERS, load_ruler

    shards, _, base = edu4
    costs = e2e.problem_costs(shards)
    calls = []
    real = loop_module.ActiveLoop.run_round

    def spy(self, r):
        calls.append((self.cfg.active.selector, r))
        return real(self, r)

    monkeypatch.setattr(loop_module.ActiveLoop, "run_round", spy)
    args = argparse.Namespace(epochs=1, n_boot=10, cache=tmp_path, problems=4, seed_size=2, per_round=1, rounds=1,
                              cold_start=False, filter_share=0.75, selection=None)
    recipe = e2e.Recipe(base["train"], "v1", args, load_ruler(*SHIPPED_RULERS["v1"]).limited(2))
    points = e2e.active_points(shards, recipe, 0, args, base)
    assert ("uncertainty", 0) in calls and ("uncertainty", 1) in calls and ("random", 1) in calls
    assert [(p["arm"], p["round"], p["problems"]) for p in points] == [
        ("actprm", 0, 2), ("actprm", 1, 3), ("random", 0, 2), ("random", 1, 3)]
    for arm in ("actprm", "random"):
        out = next((tmp_path / "active").glob(f"*-{arm}-*"))
        rounds = loop_module.read_rounds(out)
        summary = json.loads((out / loop_module.SUMMARY_FILE).read_text())
        assert summary["engine_started"] is False
        assert rounds[1]["warm_start_from"] == rounds[0]["checkpoint"]
        for rec in rounds:
            assert rec["label_tokens"] == sum(costs[p]["generated"] for p in rec["selected_problem_ids"])
        pts = [p for p in points if p["arm"] == arm]
        assert pts[-1]["tokens"]["label_generated"] == sum(rec["label_tokens"] for rec in rounds)
        assert 0 <= pts[-1]["within_position_auroc"] <= 1
        assert pts[0]["gate"] is None and (pts[1]["gate"] is None) == (arm == "random")  # a gate ran in round 1
    assert points[0]["within_position_auroc"] == points[2]["within_position_auroc"]  # the same round 0
    # the filter arm is a run of the loop too: one round after the seed set, up to 3 of 4 problems in all
    calls.clear()
    filtered = e2e.filter_points(shards, recipe, 0, args, base)
    assert [p["arm"] for p in filtered] == ["filter", "filter-random"] and ("uncertainty", 1) in calls
    assert filtered[0]["problems"] <= 3 and filtered[1]["problems"] == filtered[0]["problems"]
    # pick std_per_token brings its control: cost-random, the loop's draw by expected cost alone, trusting nothing
    calls.clear()
    args.selection = '{"calibrate_trusted_share": 0.5, "pick": "std_per_token"}'
    points = e2e.active_points(shards, recipe, 0, args, base)
    assert sorted({p["arm"] for p in points}) == ["actprm", "cost-random", "random"]
    out = next((tmp_path / "active").glob("*-cost-random-*"))
    rounds = loop_module.read_rounds(out)
    assert rounds[1]["how"] == "uncertainty (inverse_cost draw)" and rounds[1]["confident"] == 0


def test_the_active_arms_selection_is_the_flags_else_the_configs_else_the_papers(e2e):
    import argparse

    import yaml

    from configs.schema import SelectionConfig

    flag = argparse.Namespace(selection='{"calibrate_trusted_share": 0.5, "pick": "uniform"}')
    none = argparse.Namespace(selection=None)
    config = {"active": {"selection": {"preset": "actprm_code"}}}
    assert e2e.selection_of(config, flag) == {"calibrate_trusted_share": 0.5, "pick": "uniform"}
    assert e2e.selection_of(config, none) == {"preset": "actprm_code"}
    assert e2e.selection_of({}, none) == {"preset": "paper", "pick": "top_k"}
    shipped = e2e.selection_of(yaml.safe_load((REPO / "configs" / "toy-e2e.yaml").read_text()), none)
    assert SelectionConfig(**shipped) == SelectionConfig(preset="paper", pick="top_k"), "the former loop's rule"


def test_benchmarks_define_no_round_or_selection_loop_of_their_own():
    """The product's loop is the only one: no benchmark imports the selection rules to run rounds itself."""
    import ast

    rules = {"select_uncertain", "draw_uncertain", "random_selection"}
    offenders = []
    for path in (REPO / "benchmarks").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = {a.name.split(".")[-1] for a in node.names} if isinstance(node, ast.Import | ast.ImportFrom) \
                else {node.attr} if isinstance(node, ast.Attribute) else set()
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names & rules]
    assert not offenders, f"a benchmark uses a selection rule itself (run tasks.active.loop.ActiveLoop): {offenders}"
    source = (REPO / "benchmarks" / "bench_e2e.py").read_text()
    assert "ActiveLoop" in source and "for rnd in range" not in source


def test_subsampled_math_shepherd_from_a_real_build(e2e, tmp_path):
    """A real 4-problem Math-Shepherd build with N = 4 (transformers engine) subsampled to N = 2: same solutions,
    the solution's own outcome kept, one of the three fresh rollouts drawn, a third of the rollout tokens."""
    import yaml

    from cluster.hf_engine import HFEngine
    from configs.schema import parse_config
    from tasks.build import build
    from tasks.store.dataset import rows_to_table

    base = yaml.safe_load((REPO / "configs" / "toy-e2e.yaml").read_text())
    raw = lib.labeller_config(base, "v1", "ms-4", 0, 4)
    raw["policy"]["backend"] = "transformers"
    raw["dataset"]["problems_per_shard"] = 2
    out = tmp_path / "ms4"
    build(parse_config(raw), out, lambda: HFEngine(str(REPO / "assets" / "toy-policy")))
    shards = lib.read_shards(out)
    sub = lib.subsampled(shards, 2, 0)
    assert lib.subsampled(shards, 2, 0) == sub  # seeded
    steps = 0
    for (rows, rec), (srows, srec) in zip(shards, sub, strict=True):
        assert srec["rollout_tokens"] == round(rec["rollout_tokens"] / 3) > 0
        assert (srec["generate_tokens"], srec["prompt_tokens"]) == (rec["generate_tokens"], rec["prompt_tokens"])
        assert srec["generated_tokens"] == srec["generate_tokens"] + srec["rollout_tokens"]
        rows_to_table([{**r, "shard": 0} for r in srows])  # the dataset's own row checks
        for r, s in zip(rows, srows, strict=True):
            assert s["completions"] == r["completions"] and s["final_correct"] == r["final_correct"]
            own = int(r["final_correct"])
            for k0, k, n, o in zip(r["successes"], s["successes"], s["rollouts"], s["step_origin"], strict=True):
                if o != "rollout":
                    assert k == k0
                    continue
                steps += 1
                fresh = k0 - own
                assert n == 2 and own <= k <= own + 1 and k <= k0
                if fresh in (0, 3):  # all three fresh rollouts lost, or all won: the draw is decided
                    assert k == own + fresh // 3
    assert steps > 0


def test_every_benchmark_has_a_ci_size(run_all, tmp_path):
    names = {r.name for r in run_all.ci_runs(tmp_path)}
    assert {p.stem.removeprefix("bench_") for p in (REPO / "benchmarks").glob("bench_*.py")} <= names


def test_run_all_goes_on_after_a_failing_step_and_marks_it(run_all, tmp_path):
    bad = run_all.Run("bad", [sys.executable, "-c", "import sys; print('| a | b |'); sys.exit(3)"], 60)
    slow = run_all.Run("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1)
    dependent = run_all.Run("dep", [sys.executable, "-c", "print('never')"], 60, needs=["bad"])
    good = run_all.Run("good", [sys.executable, "-c", "print('| x | y |\\n|---|---|\\n| 1 | 2 |')"], 60)
    done: dict = {}
    for r in (bad, slow, dependent, good):
        run_all.run_one(r, tmp_path, done)
        done[r.name] = r
    assert (bad.status, bad.reason) == ("failed", "exit code 3")
    assert slow.status == "failed" and slow.reason.startswith("timed out after 1 s")
    assert (dependent.status, dependent.reason) == ("skipped", "needs bad, which did not finish")
    assert good.status == "ok" and "| 1 | 2 |" in good.output_tail
    report = tmp_path / "REPORT.md"
    meta = {"command": "benchmarks/run_all", "started": "2026-11-23 20:00", "machine": run_all.machine()}
    run_all.write_report([bad, slow, dependent, good], ["newbench"], tmp_path, report, meta)
    text = report.read_text()
    run_all.report_only(tmp_path, report)  # rebuilt from run_all.json and the logs: the same figures
    assert report.read_text().split("## Machine")[1].split("load average")[0] == \
        text.split("## Machine")[1].split("load average")[0]
    assert "| bad | failed: exit code 3 |" in report.read_text() and "| 1 | 2 |" in report.read_text()
    assert "| bad | failed: exit code 3 |" in text
    assert "| dep | skipped: needs bad, which did not finish |" in text
    assert "| newbench | not run: no CI size in benchmarks/run_all.py |" in text
    assert "| 1 | 2 |" in text
