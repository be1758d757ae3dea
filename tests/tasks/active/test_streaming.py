"""`active.schedule: streaming` (issue 35): the current PRM gates each batch, only the uncertain part is labelled and
trained on, trusted trajectories never reach the labeller. Hand-made scores (a scorer keyed by problem), a recording
labeller of the product's ``Labeller`` protocol, and a recording trainer that writes a checkpoint's config; the pool
is written to OUT beforehand, so no engine starts. Bad input: unscored pools and foreign checkpoints stop the loop
before any labelling."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from configs.schema import REPO_ROOT, parse_config
from tasks.cost import ShardCost
from tasks.labelling.tree_labeller import ShardResult
from tests.tasks.store.test_dataset import make_row

SURE_RIGHT, SURE_WRONG, UNSURE = (0.99, 0.001), (0.01, 0.001), (0.7, 0.001)


def _config(**active) -> dict:
    import yaml

    data = yaml.safe_load((REPO_ROOT / "configs" / "toy.yaml").read_text())
    data["train"] = {**data.get("train", {}), "num_heads": 4}
    data["active"] = {"schedule": "streaming", "batch_size": 4, "pool_size": 12, "ruler_problems": None,
                      "selection": {"preset": "actprm_code"}, **active}
    return data


@dataclass
class Scores:
    mean: list[float]
    std: list[float]


class HandScorer:
    """The pool scorer (``scorer_factory``'s product): a hand-made ensemble score per problem, found by prompt."""

    def __init__(self, by_prompt: dict[str, list[tuple[float, float]]], calls: list[list[str]]):
        self.by_prompt, self.calls = by_prompt, calls

    def score(self, prompts, completions):
        self.calls.append(list(prompts))
        return [Scores([m for m, _ in self.by_prompt[p]], [s for _, s in self.by_prompt[p]]) for p in prompts]


class RecordingLabeller:
    """A ``Labeller``: records which problems it was asked to label, returns one valid row per problem."""

    def __init__(self, calls: list[list[str]]):
        self.calls = calls

    def label(self, problems):
        self.calls.append([p.problem_id for p in problems])
        rows = []
        for p in problems:
            row = make_row(0, [3, 1, 1], [4, 4, 1])
            row.update(problem_id=p.problem_id, prompt=p.question + "\n", tree_id=f"{p.problem_id}-tree")
            rows.append(row)
        return ShardResult(rows, ShardCost(rollout_tokens=100 * len(problems)))


def _recording_train(trained: list[dict], num_heads: int):
    """A ``TrainFn``: records the problems of the dataset version it is given and where it warm-starts from, and
    writes a checkpoint directory (prm_config.json with the ensemble size, the weights file)."""

    def train(dataset_dir: Path, run_dir: Path, init_from: Path | None) -> dict:
        from tasks.prm.model import prm_config_hash
        from tasks.store.dataset import read_manifest

        shards = [dataset_dir / e["path"] for e in read_manifest(dataset_dir)["shards"]]
        ids = sorted(pid for s in shards for pid in pq.read_table(s, columns=["problem_id"]).column(0).to_pylist())
        trained.append({"problems": ids, "init_from": init_from})
        model = run_dir / "model"
        model.mkdir(parents=True, exist_ok=True)
        prm_config = {**json.loads((REPO_ROOT / "assets" / "toy-prm" / "prm_config.json").read_text()),
                      "num_heads": num_heads}
        (model / "prm_config.json").write_text(json.dumps({**prm_config, "config_hash": prm_config_hash(prm_config)}))
        (model / "model.safetensors").write_bytes(str(len(trained)).encode())
        return {"model_dir": str(model), "epochs": 1, "global_step": 1, "history": [{"train_loss": 0.5}]}

    return train


def _loop(tmp_path, cfg, scores: dict[str, list[tuple[float, float]]], steps: dict[str, list[str]],
          trained_heads: int | None = None):
    """An ActiveLoop on a pool written beforehand (steps per problem), with the recording pieces."""
    from tasks.active.loop import ActiveLoop
    from tasks.active.run_dir import PoolItem, check_out_dir, write_pool
    from tasks.build import ingest

    out = tmp_path / "out"
    problems = ingest(cfg).problems[: cfg.active.pool_size]
    check_out_dir(out, cfg)
    items = [PoolItem(p.problem_id, p.source, p.problem_id, steps[p.problem_id], 10, "stop") for p in problems]
    write_pool(out, items, {"labelling_hash": cfg.labelling_hash(), "problem_ids_in": [p.problem_id for p in problems],
                            "pool_tokens": 0})
    rec = {"labelled": [], "scored": [], "trained": []}
    loop = ActiveLoop(cfg, out, engine_factory=lambda: None, train_fn=_recording_train(
                          rec["trained"], trained_heads or cfg.train.num_heads),
                      labeller_factory=lambda c, e, t: RecordingLabeller(rec["labelled"]),
                      tokenizer_factory=lambda: None,
                      scorer_factory=lambda ckpt: HandScorer(scores, rec["scored"]))
    return loop, problems, rec


def _steps(problem) -> list[str]:
    """The problem's right solution, a line a step (so the toy truth says every step is right)."""
    from tasks.sources.toy_world import canonical_solution

    lines = canonical_solution(problem).split("\n")
    return [line + "\n" for line in lines[:-1]] + [lines[-1]]


def test_streaming_labels_and_trains_exactly_the_uncertain(tmp_path):
    from tasks.active.loop import stream_order

    cfg = parse_config(_config())
    from tasks.build import ingest

    problems = ingest(cfg).problems[:12]
    by_id = {p.problem_id: p for p in problems}
    order = stream_order(list(by_id), cfg.active.seed)
    b0, b1, b2 = order[:4], order[4:8], order[8:]
    steps = {pid: _steps(p) for pid, p in by_id.items()}
    assert min(len(s) for s in steps.values()) >= 3

    def padded(pid: str, *head: tuple[float, float]) -> list[tuple[float, float]]:
        return list(head) + [SURE_RIGHT] * (len(steps[pid]) - len(head))

    scores = {pid: padded(pid) for pid in by_id}
    scores[b1[0]] = padded(b1[0], SURE_RIGHT, UNSURE, SURE_WRONG)      # first predicted error past an unsure step
    scores[b1[1]] = padded(b1[1], SURE_RIGHT, SURE_RIGHT, (0.99, 0.3))  # wide std on a step that matters
    scores[b1[2]] = padded(b1[2], SURE_RIGHT, SURE_WRONG, UNSURE)      # trusted: the unsure step is after the error
    # b1[3]: trusted, and right (every step of the solution is right)
    # Batch 2: the PRM trusts all of it.
    loop, _, rec = _loop(tmp_path, cfg, scores, steps)
    result = loop.run()

    assert result.stop_reason == "pool_exhausted" and len(result.rounds) == 3
    # The first batch has no PRM yet: labelled whole. Then only the two uncertain of batch 1; batch 2 none.
    assert rec["labelled"] == [sorted(b0), sorted([b1[0], b1[1]])]
    assert not {b1[2], b1[3], *b2} & {pid for call in rec["labelled"] for pid in call}
    # Each batch trains on its own labels only, on top of the last batch's weights.
    assert [t["problems"] for t in rec["trained"]] == [sorted(b0), sorted([b1[0], b1[1]])]
    assert rec["trained"][0]["init_from"] is None
    assert rec["trained"][1]["init_from"] == Path(result.rounds[0]["checkpoint"])
    # The gate saw batches 1 and 2 (the prompts are the problem ids here), each once.
    assert [sorted(c) for c in rec["scored"]] == [sorted(b1), sorted(b2)]
    r0, r1, r2 = result.rounds
    assert (r0["selected"], r0["trusted_share"], r0["trained"]) == (4, None, True)
    assert (r1["uncertain"], r1["confident"], r1["selected"], r1["trusted_share"]) == (2, 2, 2, 0.5)
    # Of the two trusted, b1[2] predicts an error on a right step (wrong), b1[3] is right: accuracy 1/2.
    assert (r1["pseudo_label_checked"], r1["pseudo_label_acc"]) == (2, 0.5)
    assert (r2["selected"], r2["trusted_share"], r2["pseudo_label_acc"], r2["trained"]) == (0, 1.0, 1.0, False)
    assert r2["label_tokens"] == 0 and r2["cumulative_label_tokens"] == 600  # 4 + 2 problems at 100 tokens
    assert r1["gate"]["how"] == "preset actprm_code" and r1["gate_note"] is None
    # Every solution here is right: no errors among the picks or the scored. The two misclassified steps (a sure
    # "wrong" on a right step) have the heads' smallest std, tied with most right steps: std ranks them below
    # chance within their margin bin, which is what the figure is for.
    assert (r1["error_share_selected"], r1["error_share_scored"]) == (0.0, 0.0)
    assert 0 < r1["std_auroc_within_margin"] < 0.5 and r0["std_auroc_within_margin"] is None
    from tasks.active.report import report_markdown, round_rows

    rows = round_rows(result.rounds)
    assert [r["tokens_per_problem"] for r in rows] == [100.0, 100.0, None]  # 100 tokens a problem; none labelled
    table = report_markdown("t", result.rounds, result.stop_reason, "", None).splitlines()
    header, r1_line = table[4], table[7]
    assert header.count("|") == r1_line.count("|") and "errors in picks" in header
    assert "| 0.0 | 0.0 |" in r1_line
    # Run again in the same directory: it resumes as finished, nothing labelled, scored or trained again.
    assert loop.run().stop_reason == "pool_exhausted"
    assert (len(rec["labelled"]), len(rec["scored"]), len(rec["trained"])) == (2, 2, 2)


def test_calibrated_gate_fires_on_the_seed_set(tmp_path):
    """calibrate_trusted_share: the first batch (the seed set) scored by its own PRM sets the thresholds so that
    half of it is trusted; the paper's preset would trust none of these scores."""
    from tasks.active.loop import stream_order
    from tasks.active.run_dir import CALIBRATION_FILE
    from tasks.build import ingest

    cfg = parse_config(_config(pool_size=8, selection={"calibrate_trusted_share": 0.5}))
    ids = [p.problem_id for p in ingest(cfg).problems[:8]]
    b0, b1 = stream_order(ids, 0)[:4], stream_order(ids, 0)[4:]
    margins = {pid: (0.6 + 0.08 * i, 0.004 + 0.004 * (3 - i)) for i, pid in enumerate(b0)}  # i = 2, 3 most sure
    scores = {pid: [margins[pid]] for pid in b0}
    scores.update({b1[0]: [(0.8, 0.006)], b1[1]: [(0.9, 0.001)], b1[2]: [(0.7, 0.001)], b1[3]: [(0.95, 0.02)]})
    loop, _, rec = _loop(tmp_path, cfg, scores, {pid: ["1+1=2\n"] for pid in ids})
    result = loop.run()
    cal = json.loads((loop.out / CALIBRATION_FILE).read_text())
    assert (cal["target_share"], cal["trusted_share"], cal["scored"]) == (0.5, 0.5, 4)
    assert cal["delta_pred"] == pytest.approx(0.76) and cal["delta_std"] == pytest.approx(0.008)
    # Batch 1 under (0.76, 0.008): b1[0] and b1[1] trusted; b1[2] (0.7) and b1[3] (std 0.02) labelled.
    assert rec["labelled"][1] == sorted([b1[2], b1[3]])
    assert result.rounds[1]["trusted_share"] == 0.5 and result.rounds[1]["gate"]["how"].startswith("calibrated")


def test_streaming_random_arm_labels_as_many_as_the_gate_leaves(tmp_path):
    from tasks.active.loop import stream_order

    cfg = parse_config(_config(selector="random", pool_size=8))
    from tasks.build import ingest

    ids = [p.problem_id for p in ingest(cfg).problems[:8]]
    b1 = stream_order(ids, 0)[4:]
    scores = {pid: [SURE_RIGHT] for pid in ids}
    scores[b1[0]] = [UNSURE]
    loop, _, rec = _loop(tmp_path, cfg, scores, {pid: ["1+1=2\n"] for pid in ids})
    result = loop.run()
    assert len(rec["labelled"]) == 2 and len(rec["labelled"][1]) == 1  # one uncertain: one drawn at random
    assert result.rounds[1]["selector"] == "random" and result.rounds[1]["how"].startswith("streaming random")


def test_unscored_pool_and_foreign_checkpoint_stop_before_labelling(tmp_path):
    from tasks.active.run_dir import ActiveError

    cfg = parse_config(_config(pool_size=8))
    from tasks.build import ingest

    ids = [p.problem_id for p in ingest(cfg).problems[:8]]
    steps = {pid: ["1+1=2\n"] for pid in ids}
    loop, _, rec = _loop(tmp_path / "nan", cfg, {pid: [(math.nan, math.nan)] for pid in ids}, steps)
    with pytest.raises(ActiveError, match="streaming batch 1: the PRM scored no step of any of the 4 trajectories"):
        loop.run()
    assert len(rec["labelled"]) == 1  # the first batch only (no PRM yet); nothing after the unscored one
    # A checkpoint of 8 heads under a config of 4: refused before the batch is scored or labelled.
    loop, _, rec = _loop(tmp_path / "heads", cfg, {pid: [SURE_RIGHT] for pid in ids}, steps, trained_heads=8)
    with pytest.raises(ActiveError, match="is an ensemble of 8 heads but train.num_heads is 4"):
        loop.run()
    assert len(rec["labelled"]) == 1 and rec["scored"] == []


def test_rounds_draw_among_the_uncertain_and_record_the_gate(tmp_path):
    """The rounds schedule with ``pick: uniform``: round 1 labels a seeded draw of the uncertain, never a trusted
    one, trains on everything so far (cumulative versions), and records the trusted share."""
    from tasks.build import ingest

    cfg = parse_config(_config(schedule="rounds", rounds=2, seed_size=2, max_selected=2, pool_size=10,
                               selection={"preset": "actprm_code", "pick": "uniform"}))
    ids = [p.problem_id for p in ingest(cfg).problems[:10]]
    scores = {pid: [UNSURE] if i % 2 else [SURE_RIGHT] for i, pid in enumerate(ids)}
    loop, _, rec = _loop(tmp_path, cfg, scores, {pid: ["1+1=2\n"] for pid in ids})
    result = loop.run()
    seed, picked = rec["labelled"]
    uncertain_left = {pid for i, pid in enumerate(ids) if i % 2 and pid not in seed}
    assert len(picked) == 2 and set(picked) <= uncertain_left
    assert rec["trained"][1]["problems"] == sorted(seed + picked)  # rounds retrain on every label so far
    r1 = result.rounds[1]
    assert r1["how"] == "uncertainty (uniform draw)" and r1["uncertain"] == len(uncertain_left)
    assert r1["trusted_share"] == pytest.approx(r1["confident"] / r1["unlabelled"]) and r1["confident"] >= 3


def test_rounds_draw_by_std_per_token_weighs_each_pool_trajectory_by_its_tokens_and_steps(tmp_path, monkeypatch):
    """``pick: std_per_token``: the round's draw gets each unlabelled trajectory's expected labelling cost (its
    tokens x its steps, ``expected_label_cost``), in the order of the ids it draws from."""
    from tasks.active import loop as loop_mod
    from tasks.build import ingest

    cfg = parse_config(_config(schedule="rounds", rounds=2, seed_size=2, max_selected=2, pool_size=6,
                               selection={"preset": "actprm_code", "pick": "std_per_token"}))
    ids = [p.problem_id for p in ingest(cfg).problems[:6]]
    seen = {}
    real = loop_mod.draw_uncertain

    def spy(ids_, scores_, params, k, seed, weight="uniform", costs=None, **kw):
        seen.update(weight=weight, costs=dict(zip(ids_, costs, strict=True)))
        return real(ids_, scores_, params, k, seed, weight=weight, costs=costs, **kw)

    monkeypatch.setattr(loop_mod, "draw_uncertain", spy)
    steps = {pid: ["1+1=2\n"] * (1 + i % 3) for i, pid in enumerate(ids)}
    loop, _, _ = _loop(tmp_path, cfg, {pid: [UNSURE] for pid in ids}, steps)
    result = loop.run()
    assert seen["weight"] == "std_per_token" and result.rounds[1]["how"] == "uncertainty (std_per_token draw)"
    pool = {item.problem_id: item for item in loop._pool}
    assert seen["costs"] and all(c == loop_mod.expected_label_cost(pool[pid]) for pid, c in seen["costs"].items())
    assert {len(pool[pid].completions) for pid in seen["costs"]} > {1}  # the steps differ, and so do the costs
