"""End to end: the labelling tokens each labeller needs to reach a PRM quality, at a scale that resolves (issue 21).

For each world (``--worlds``: v1, the policy that errs only by sampling slips; v2, the policy that also makes
confident misconceptions) and each seed (``--seeds``), one pool of ``--problems`` toy problems (toy seed
7100 + seed, checked disjoint from both rulers) is labelled by every labeller through the factory's own build
(`tasks.build.build`, the vLLM engine of that world's policy, 16 problems per shard):

- ``truth``: 4 policy samples per problem, newline steps, each step judged by the exact checker (the ceiling);
- ``ms-N`` (Math-Shepherd): newline steps, no tree, N rollouts per step, N in ``--ms-ns``; only the largest N is
  built, the smaller ones keep a random n of its N outcomes per step (`tasks.store.relabel.subsample_rollouts`: the
  same distribution as n fresh rollouts, the solutions are the same) and count the expected share of its rollout
  tokens; ``--ms-independent`` builds each N on its own (``benchmarks/bench_ms_subsample.py`` compares the two);
- ``edu``: EDU entropy cuts, branching and ``--edu-n`` rollouts, ER labels with η = 1; the η grid (``--etas``)
  relabels the same rows (`tasks.store.relabel.relabel`: no new generation);
- ``actprm`` and ``random``: runs of the product's loop (`tasks.active.loop.ActiveLoop`, what ``prm-factory
  active`` runs) over the ``edu``-labelled pool, selector ``uncertainty`` (``--selection``, else the config's
  ``active.selection``: the paper's thresholds, top-k) and ``random``: round 0 labels the loop's random seed set
  (the same for both), each of ``--rounds`` later rounds at most ``--per-round`` problems, the PRM warm-started
  from the round before (``--cold-start``: from the backbone).
  Nothing is generated to label: the pool is the build's first row per problem, written through the loop's
  ``write_pool`` (no engine), and ``ReplayLabeller`` returns a chosen problem's rows in the full build (the build
  seeds every request by problem and prefix, so a problem labelled alone gives the same rows) and charges exactly
  its labelling tokens. The two arms are compared at equal labelling tokens through their curves (tokens to reach),
  not in lockstep;
- ``filter`` (and ``filter-random``): ActPRM as a filter of an already labelled pool, as the paper filtered 1M
  trajectories (arXiv 2504.10559), as one round of the same loop after its seed set (a fresh PRM, warm start off):
  the seed-set PRM scores the whole pool and the PRM trains on the seed set plus the uncertain share
  ``--filter-share`` (the control: as many problems drawn at random).

Static labellers are measured along a curve: the first k problems of the pool, k in ``--sizes`` (whole shards, so
a point's cost is exactly the sum of its shards' cost records). Every PRM is trained the same way: the recipe of
``configs/toy.yaml``'s ``train:`` section (tokens read, distribution features, frozen backbone) for ``--epochs``
epochs in this process (`tasks.prm.fit`, the epoch loop Ray Train runs), keeping the last epoch; the frozen
backbone's token states are computed once per text for a whole pool (`Recipe.states`, fit's ``states_cache``: every
PRM of the pool trains on them, and scores the ruler and the active pool from them), so the epochs train only the
heads (``benchmarks/bench_e2e_states.py`` measures what that saves).

Tokens, per point:
- ``generated``: what the labelling generated (policy solutions + EDU branches + rollouts), plus, for the active
  arms, the pool's generation (one policy solution per pool problem, made to be scored): the headline's cost;
- ``prefill``: prompt tokens of those requests, reported apart (for a problem picked by an active round: its shard's
  prompt tokens shared in proportion to its generated tokens);
- ``scoring_forward``: tokens the PRM read to score the pool (prompt + solution per scored trajectory), apart.

Quality: each world's own ruler (``assets/toy-ruler`` or ``assets/toy-ruler-v2``), its first ``--ruler-problems``
problems x 16 samples: within-position AUROC, first-error F1 and best-of-8 (min step) against majority vote, with
95% bootstrap intervals over problems; position and policy-confidence measured on the same slice.

Headline, per world: the tokens each labeller needs to reach 95% of the truth ceiling's within-position AUROC
(``truth`` at the whole pool), and to reach the ceiling's best-of-8; per seed, and as an interval from the points'
bootstrap intervals (optimistic: the first point whose upper end reaches the target; pessimistic: its lower end).
A round-0 point of an active arm is never credited: it is a random seed set, no selection has run.

Everything built is cached under ``--cache`` by content key (datasets: through the build's own shard keys and
hashes; points: the rows' digest, the train recipe and the ruler), so an interrupted run resumes.

    python -m benchmarks.bench_e2e --json-out benchmarks/results/e2e.json --plot benchmarks/results/e2e.png
    python -m benchmarks.bench_e2e --ci ...   # run_all's size: world v1, seed 0, a 32-problem pool
    python -m benchmarks.bench_e2e --from-json benchmarks/results/e2e.json --json-out ...  # summary again, no run

The JSON's ``profile`` says where the time went (generation, training, evaluation, pool scoring, engine start).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.lib import (
    POOL_SEED_BASE,
    PROBLEMS_PER_SHARD,
    PROFILE,
    WORLDS,
    Engines,
    Recipe,
    build_dataset,
    check_pools,
    content_key,
    labeller_config,
    log,
    read_shards,
    shard_tokens,
    subsampled,
)

REPO = Path(__file__).resolve().parent.parent
ACTIVE_ARMS = ("actprm", "random")  # runs of the product's active loop in rounds (one point per round)
STREAM_ARMS = ("stream-actprm", "stream-random", "stream-all")  # its streaming schedule (one point per batch)
# The streaming gate that labels everything: no trajectory is confident at a std of at most 0.
LABEL_ALL = {"delta_pred": 0.999999, "delta_std": 0.0}
# The labellers the streaming arms can replay (--stream-labellers), with the suffix of their arms' names.
STREAM_LABELLERS = {"edu": "", "edu-hard": "@hard", "truth": "@truth", "edu-flat": "@flat"}


# -- data ---------------------------------------------------------------------------------------------------------


def problem_costs(shards: list[tuple[list[dict[str, Any]], dict[str, int]]]) -> dict[str, dict[str, Any]]:
    """Per problem: its generated labelling tokens (the sum of its rows' ``rollout_tokens``, which share the tree's
    and the rollouts' tokens out between rows), its prefill (its shard's prompt tokens in proportion), and
    ``stages``: its generated tokens split over the cost stages as its shard's record splits them (whole tokens
    that sum to ``generated`` exactly)."""
    from tasks.cost import COST_STAGES

    out: dict[str, dict[str, Any]] = {}
    for rows, record in shards:
        gen: dict[str, int] = defaultdict(int)
        for r in rows:
            gen[r["problem_id"]] += int(r["rollout_tokens"])
        total = max(1, sum(gen.values()))
        by_stage = {stage: int(record.get(stage, 0)) for stage in COST_STAGES}
        stage_total = sum(by_stage.values())
        for pid, g in gen.items():
            stages = {stage: (g * n // stage_total if stage_total else 0) for stage, n in by_stage.items()}
            stages["rollout_tokens"] += g - sum(stages.values())  # what flooring left, so the stages sum to g
            out[pid] = {"generated": g, "prefill": record["prompt_tokens"] * g / total, "stages": stages}
    return out


def pool_items(shards: list[tuple[list[dict[str, Any]], dict[str, int]]]) -> dict[str, dict[str, Any]]:
    """The active pool: per problem its first row (the policy's own solution, the tree's first leaf)."""
    out: dict[str, dict[str, Any]] = {}
    for rows, _ in shards:
        for r in rows:
            out.setdefault(r["problem_id"], r)
    return out


def references(ruler: Any, world: str, args: argparse.Namespace) -> dict[str, Any]:
    """The free references on the same ruler slice: position and the world's policy confidence."""
    from tasks.evaluation.reference_scorers import reference_scorer
    from tasks.evaluation.ruler import evaluate_ruler
    from tasks.evaluation.summary import ruler_figures

    key = content_key(["refs", ruler.manifest["content_hash"], len(ruler.problem_ids), args.n_boot])
    path = args.cache / "points" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    out = {name: ruler_figures(evaluate_ruler(reference_scorer(name, ruler), ruler, [1, 8], n_boot=args.n_boot))
           for name in ("position", "policy-confidence")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


# -- the arms ------------------------------------------------------------------------------------------------------


def static_points(arm: str, shards: list, recipe: Recipe, seed: int, sizes: list[int], eta: float | None = None
                  ) -> list[dict[str, Any]]:
    """The arm measured on the first k problems of the pool (whole shards), k in ``sizes``."""
    out = []
    for k in sizes:
        take = shards[: math.ceil(k / PROBLEMS_PER_SHARD)]
        rows = [r for rs, _ in take for r in rs]
        if eta is not None:
            rows = relabelled(rows, eta)
        problems = len({r["problem_id"] for r in rows})
        fig, _ = recipe.point(rows, seed, f"{arm} k={k}")
        out.append({"arm": arm, "seed": seed, "problems": problems, "rows": len(rows),
                    "tokens": shard_tokens([rec for _, rec in take]), **fig})
        log(f"{recipe.world} {arm} seed {seed} k={k}: {out[-1]['tokens']['generated']:,} tokens, "
            f"within-position AUROC {fig['within_position_auroc']:.3f}, BoN@8 {fig['bon8_min_step']:.3f}")
    return out


def relabelled(rows: list[dict[str, Any]], eta: float) -> list[dict[str, Any]]:
    import pyarrow as pa

    from tasks.store.dataset import ROW_SCHEMA
    from tasks.store.relabel import relabel

    return relabel(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), eta).to_pylist()


# The active arms run the product's loop (tasks/active/loop.py ActiveLoop): its round 0, its selectors and gate,
# its label versions and its warm start. Only the labelling is replayed from the cached ``edu`` build, and the PRM
# trains in this process on the recipe's cached token states; nothing here selects or loops over rounds.


class ReplayLabeller:
    """The loop's Labeller, replaying a cached build: for the chosen problems, exactly the build's rows and a cost
    record that charges exactly those problems' labelling tokens (``problem_costs``). The build seeds every request by
    problem and prefix, so a problem labelled alone gives the rows it has in the full build."""

    def __init__(self, shards: list[tuple[list[dict[str, Any]], dict[str, int]]]) -> None:
        self.costs = problem_costs(shards)
        self.by_problem: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for rows, _ in shards:
            for r in rows:
                self.by_problem[r["problem_id"]].append({k: v for k, v in r.items() if k != "shard"})

    def label(self, problems: Any) -> Any:
        from tasks.cost import ShardCost
        from tasks.labelling.tree_labeller import ShardResult

        ids = [p.problem_id for p in problems]
        missing = [pid for pid in ids if pid not in self.by_problem]
        if missing:
            raise KeyError(f"the cached build has no rows for {missing[:3]} (of {len(missing)}): not in its pool")
        cost = ShardCost(prompt_tokens=round(sum(self.costs[pid]["prefill"] for pid in ids)))
        for pid in ids:
            for stage, tokens in self.costs[pid]["stages"].items():
                setattr(cost, stage, getattr(cost, stage) + tokens)
        return ShardResult(rows=[dict(r) for pid in ids for r in self.by_problem[pid]], cost=cost)


def loop_config(base: dict[str, Any], world: str, seed: int, args: argparse.Namespace, recipe: Recipe,
                active: dict[str, Any]) -> Any:
    """The ``edu`` labeller's config with the benchmark's train recipe and this arm's ``active`` section."""
    from configs.schema import parse_config

    raw = labeller_config(base, world, "edu", seed, args.problems)
    raw["train"] = recipe.train.model_copy(update={"seed": seed}).model_dump(mode="json")
    raw["active"] = {"seed_size": args.seed_size, "seed": seed, "selection": selection_of(base, args), **active}
    return parse_config(raw, f"bench_e2e active {active}")


def selection_of(base: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The uncertainty arms' ``active.selection``: ``--selection`` (JSON), else the config's, else the paper's
    thresholds with top-k (what the former benchmark loop ran)."""
    if args.selection:
        return json.loads(args.selection)
    return (base.get("active") or {}).get("selection") or {"preset": "paper", "pick": "top_k"}


def replayed_loop(cfg: Any, shards: list, recipe: Recipe, seed: int, name: str, out: Path) -> Any:
    """The product's ActiveLoop in ``out`` with no engine: the pool written from the cached build (each problem's
    first row, ``pool_items``) through the loop's own ``write_pool``, labels replayed (``ReplayLabeller``), the PRM
    trained here (``Recipe.fit``, warm-started from ``init_from``) into a real checkpoint, the ruler as eval."""
    from tasks.active.loop import ActiveLoop
    from tasks.active.run_dir import PoolItem, check_out_dir, read_pool, write_pool
    from tasks.prm.fit import FittedPRM
    from tasks.prm.model import find_checkpoint_dir, load_prm, save_checkpoint

    loop = ActiveLoop(cfg, out, None, train_fn=None)
    problems = loop.problems()
    check_out_dir(out, cfg)  # pins OUT before the pool goes in (the loop refuses a non-empty unpinned dir)
    in_ids = [p.problem_id for p in problems]
    cached = read_pool(out, cfg.labelling_hash())
    if cached is None or cached[1].get("problem_ids_in") != in_ids:
        rows = pool_items(shards)
        items = [PoolItem(pid, rows[pid]["source"], rows[pid]["prompt"], list(rows[pid]["completions"]),
                          int(rows[pid]["completion_tokens"]), "stop") for pid in in_ids if pid in rows]
        write_pool(out, items, {"labelling_hash": cfg.labelling_hash(), "problem_ids_in": in_ids,
                                "pool_tokens": sum(i.completion_tokens for i in items), "rejected": [],
                                "replayed_from": "the benchmark's cached edu build"})
    scorers: dict[str, Any] = {}  # checkpoint dir -> the trained scorer (reads the recipe's cached states)

    def scorer_of(checkpoint: Path) -> Any:
        key = str(find_checkpoint_dir(checkpoint))  # the loop names a round's run dir or its model dir
        if key not in scorers:  # a round finished by an earlier run: its checkpoint, on the cached states
            prm = load_prm(key)
            prm.model.requires_grad_(False)  # a frozen backbone: its token states are the cached ones
            scorers[key] = FittedPRM(prm.model, prm.tokenizer, prm.max_length, prm.config, recipe.states)
        return scorers[key]

    def train_fn(dataset_dir: Path, run_dir: Path, init_from: Path | None) -> dict[str, Any]:
        rows = [r for rs, _ in read_shards(dataset_dir) for r in rs]
        t0 = time.perf_counter()
        scorer = recipe.fit(rows, seed, f"{name} {run_dir.parent.name}", init_from=init_from)
        model_dir = run_dir / "model"
        save_checkpoint(scorer.model, scorer.prm_config, model_dir, scorer.tokenizer)
        scorers[str(model_dir)] = scorer
        return {"model_dir": str(model_dir), "epochs": recipe.train.epochs, "global_step": scorer.steps,
                "seconds": round(time.perf_counter() - t0, 2), "history": [{"train_loss": scorer.last_loss}]}

    def pool_scorer(checkpoint: Path) -> Any:
        return _Timed(scorer_of(checkpoint))

    return ActiveLoop(cfg, out, None, train_fn, lambda model_dir, _ids: recipe.measure(scorer_of(model_dir)),
                      labeller_factory=lambda *_: ReplayLabeller(shards), scorer_factory=pool_scorer)


class _Timed:
    """A pool scorer whose time goes to the profile's pool_scoring."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer

    def score(self, prompts: list[str], completions: list[list[str]]) -> list[Any]:
        t0 = time.perf_counter()
        try:
            return self.scorer.score(prompts, completions)
        finally:
            PROFILE["pool_scoring"] += time.perf_counter() - t0


GATE_FIGURES = ("uncertain", "confident", "trusted_share", "pseudo_label_acc", "error_share_selected",
                "error_share_scored", "std_auroc_within_margin")


def round_points(arm: str, seed: int, rounds: list[dict[str, Any]], shards: list, active: Any = None
                 ) -> list[dict[str, Any]]:
    """A loop's finished rounds (or streaming batches) as curve points: cumulative problems, rows and tokens, the
    ruler's figures (the loop's held-out eval), the gate's figures of the round. ``active``: the loop's active
    section (a streaming run's pass order and batch size, for the PRM's scoring tokens)."""
    from tasks.active.loop import stream_order

    seed_of_loop, batch_size = (active.seed, active.batch_size) if active is not None else (0, 0)
    pool, costs = pool_items(shards), problem_costs(shards)
    pool_generated = sum(int(r["completion_tokens"]) for r in pool.values())
    pool_prefill = sum(int(r["prompt_tokens"]) for r in pool.values())
    labelled: list[str] = []
    rows = scoring = 0
    out = []
    for rec in rounds:
        if rec.get("schedule") == "streaming":
            if rec["round"] > 0:  # the PRM read the batch (both selectors: random draws as many as the gate left)
                batch = stream_order(sorted(pool), seed_of_loop)[rec["round"] * batch_size:
                                                                 (rec["round"] + 1) * batch_size]
                scoring += sum(int(pool[pid]["prompt_tokens"]) + int(pool[pid]["completion_tokens"]) for pid in batch)
            if not rec.get("trained"):  # a batch the PRM trusted whole: nothing bought, no new model, no point
                continue
        elif rec.get("selector") == "uncertainty" and rec["round"] > 0:  # the PRM read every unlabelled trajectory
            scoring += sum(int(r["prompt_tokens"]) + int(r["completion_tokens"])
                           for pid, r in pool.items() if pid not in set(labelled))
        labelled += rec["selected_problem_ids"]
        rows += int(rec["labelled_rows"] or 0)
        label = int(rec["cumulative_label_tokens"])
        figures = {k.removeprefix("heldout_"): v for k, v in rec.items() if k.startswith("heldout_")}
        out.append({"arm": arm, "seed": seed, "round": rec["round"], "problems": len(labelled), "rows": rows,
                    "tokens": {"generated": label + pool_generated, "label_generated": label,
                               "pool_generated": pool_generated,
                               "prefill": int(round(sum(costs[p]["prefill"] for p in labelled) + pool_prefill)),
                               "scoring_forward": scoring},
                    # None where no gate ran (round 0, selector random)
                    "gate": {k: rec.get(k) for k in GATE_FIGURES} if rec.get("trusted_share") is not None else None,
                    "warm_start_from": rec.get("warm_start_from"),
                    **figures})
    return out


def active_points(shards: list, recipe: Recipe, seed: int, args: argparse.Namespace, base: dict[str, Any]
                  ) -> list[dict[str, Any]]:
    """ActPRM (selector uncertainty) and random selection (selector random), each a run of the product's loop over
    the ``edu``-labelled pool: round 0 the same random seed set, then ``--rounds`` rounds of at most
    ``--per-round`` problems. With ``pick: std_per_token``, a third arm, ``cost-random``: a draw weighted by the
    same expected labelling cost with the std ignored (a gate that trusts nothing, ``pick: inverse_cost``).
    Compared at equal labelling tokens through their curves (the headline's tokens-to-reach), not in lockstep."""
    points: list[dict[str, Any]] = []
    arms: list[tuple[str, str, dict[str, Any] | None]] = [("actprm", "uncertainty", None), ("random", "random", None)]
    if selection_of(base, args).get("pick") == "std_per_token":  # its control: the same cost weighting, no std
        arms.append(("cost-random", "uncertainty", {**LABEL_ALL, "pick": "inverse_cost"}))
    for arm, selector, selection in arms:
        active = {"rounds": args.rounds + 1, "max_selected": args.per_round, "selector": selector,
                  "warm_start": not args.cold_start, **({"selection": selection} if selection else {})}
        cfg = loop_config(base, recipe.world, seed, args, recipe, active)
        out = args.cache / "active" / f"{cfg.name}-{arm}-{loop_key(cfg, recipe)}"
        result = replayed_loop(cfg, shards, recipe, seed, arm, out).run()
        for p in round_points(arm, seed, result.rounds, shards):
            points.append(p)
            log(f"{recipe.world} {arm} seed {seed} round {p['round']}: {p['problems']} problems, "
                f"{p['tokens']['generated']:,} tokens, within-position AUROC {p['within_position_auroc']:.3f}, "
                f"BoN@8 {p['bon8_min_step']:.3f} (stop: {result.stop_reason})")
    return points


def streaming_points(shards_of: dict[str, list], recipe: Recipe, seed: int, args: argparse.Namespace,
                     base: dict[str, Any]) -> list[dict[str, Any]]:
    """The streaming schedule (the reference's: one pass over the pool in batches of ``--stream-batch``, the current
    PRM gates each batch, only its uncertain part is labelled and trained on, warm-started, no retraining), three
    runs of the product's loop per labeller: ``stream-actprm`` (the gate of ``--stream-selection``),
    ``stream-random`` (as many as that gate left uncertain, drawn at random from the batch) and ``stream-all`` (a
    gate that trusts nothing: every batch labelled). ``--stream-labellers`` adds diagnosis labellers: ``edu-hard``
    (the EDU rows with hard labels, eta = inf), ``truth`` (exact step labels) and ``edu-flat`` (EDU labels of the
    scored trajectory alone, no tree: what the gate scored is what is bought); their arms are suffixed ``@hard``,
    ``@truth`` and ``@flat``."""
    points: list[dict[str, Any]] = []
    gate = json.loads(args.stream_selection)
    for labeller in args.stream_labellers.split(","):
        shards = ([(relabelled(rows, math.inf), rec) for rows, rec in shards_of["edu"]] if labeller == "edu-hard"
                  else shards_of[labeller])
        suffix = STREAM_LABELLERS[labeller]
        for arm, selector, selection in (("stream-actprm", "uncertainty", gate), ("stream-random", "random", gate),
                                         ("stream-all", "uncertainty", LABEL_ALL)):
            active = {"schedule": "streaming", "batch_size": args.stream_batch, "selector": selector,
                      "warm_start": True, "seed_size": args.stream_batch, "selection": selection}
            cfg = loop_config(base, recipe.world, seed, args, recipe, active)
            name = arm + suffix
            key = loop_key(cfg, recipe) if labeller == "edu" else content_key([loop_key(cfg, recipe), labeller])
            out = args.cache / "active" / f"{cfg.name}-{name.replace('@', '-')}-{key}"
            result = replayed_loop(cfg, shards, recipe, seed, name, out).run()
            for p in round_points(name, seed, result.rounds, shards, cfg.active):
                points.append(p)
                g = p["gate"] or {}
                log(f"{recipe.world} {name} seed {seed} batch {p['round']}: {p['problems']} problems, "
                    f"{p['tokens']['label_generated']:,} label tokens, within-position AUROC "
                    f"{p['within_position_auroc']:.3f}, trusted {g.get('trusted_share')}")
    return points


def loop_key(cfg: Any, recipe: Recipe) -> str:
    """A loop directory's cache key: the labelling, the recipe and the active section, the ruler (its figures are
    in the round records)."""
    return content_key([cfg.labelling_hash(), cfg.train.train_hash(), cfg.active.model_dump(mode="json"),
                        recipe.ruler_key])


def filter_points(shards: list, recipe: Recipe, seed: int, args: argparse.Namespace, base: dict[str, Any]
                  ) -> list[dict[str, Any]]:
    """ActPRM as a filter of the labelled pool, as one round of the product's loop after its seed set: the seed-set
    PRM keeps the uncertain share (top_k up to ``--filter-share`` of the pool), a fresh PRM trains on the seed set plus
    the kept (warm_start off); the control (``filter-random``) draws as many at random."""
    ids = sorted(pool_items(shards))
    keep = int(round(args.filter_share * len(ids))) - args.seed_size
    if keep < 1:
        log(f"{recipe.world} filter seed {seed}: --filter-share keeps no problem beyond the seed set, skipped")
        return []
    full = shard_tokens([rec for _, rec in shards])
    out: list[dict[str, Any]] = []
    for arm, selector in (("filter", "uncertainty"), ("filter-random", "random")):
        active = {"rounds": 2, "max_selected": keep, "selector": selector, "warm_start": False}
        cfg = loop_config(base, recipe.world, seed, args, recipe, active)
        path = args.cache / "active" / f"{cfg.name}-{arm}-{loop_key(cfg, recipe)}"
        result = replayed_loop(cfg, shards, recipe, seed, arm, path).run()
        last = round_points(arm, seed, result.rounds, shards)[-1]
        if arm == "filter":
            uncertain = result.rounds[-1]["uncertain"]
            keep = max(1, len(result.rounds[-1]["selected_problem_ids"]))  # the control draws as many
        out.append({**{k: v for k, v in last.items() if k not in ("round", "tokens", "warm_start_from")},
                    "uncertain_in_pool": uncertain, "pool_problems": len(ids),
                    "tokens": {**full, "scoring_forward": last["tokens"]["scoring_forward"]}})
        log(f"{recipe.world} {arm} seed {seed}: trains on {last['problems']} of {len(ids)} problems "
            f"({uncertain} uncertain), within-position AUROC {last['within_position_auroc']:.3f}")
    return out


# -- the headline ---------------------------------------------------------------------------------------------------

METRICS = {"within_position_auroc": "within-position AUROC", "bon8_min_step": "best-of-8 (min step)"}


def family(arm: str) -> str:
    return arm.split("-eta")[0]


def tokens_to_reach(curve: list[dict[str, Any]], metric: str, target: float) -> dict[str, Any]:
    """The fewest generated tokens at which a curve's points reach ``target`` on ``metric``.

    Point estimate: the cheapest point whose value is at least the target. Interval from the point's 95% bootstrap
    interval: optimistic, the cheapest point whose upper end reaches it; pessimistic, the cheapest whose lower end
    does. A round-0 point of an active arm is a random seed set, no selection has run: never credited (``refused``
    counts the round-0 points that would have reached the target).
    """
    eligible = [p for p in curve if p.get("round", 1) != 0]
    refused = sum(1 for p in curve if p.get("round", 1) == 0 and p[metric] >= target)

    def cheapest(pred: Any) -> int | None:
        hits = [p["tokens"]["generated"] for p in eligible if pred(p)]
        return min(hits) if hits else None

    ci = f"{metric}_ci"
    return {"target": target, "tokens": cheapest(lambda p: p[metric] >= target),
            "optimistic": cheapest(lambda p: (p.get(ci) or [p[metric]] * 2)[1] >= target),
            "pessimistic": cheapest(lambda p: (p.get(ci) or [p[metric]] * 2)[0] >= target),
            "round0_refused": refused}


def headline(points: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Per metric: the truth ceiling (``truth`` on the whole pool, seed mean), and for every arm family the tokens
    to reach 95% of its within-position AUROC and its best-of-8, per seed and as the seed mean; then the issue's
    two goals, judged per seed (met only when every seed meets it)."""
    out: dict[str, Any] = {}
    full = max((p["problems"] for p in points if p["arm"] == "truth"), default=0)
    ceiling = [p for p in points if p["arm"] == "truth" and p["problems"] == full]
    if not ceiling:
        return {"note": "no truth point on the whole pool: no ceiling to measure against"}
    for metric, share in (("within_position_auroc", 0.95), ("bon8_min_step", 1.0)):
        cap = statistics.mean(p[metric] for p in ceiling)
        target = share * cap
        per_arm: dict[str, Any] = {}
        for arm in sorted({p["arm"] for p in points if p["arm"] not in ("truth",)}):
            seeds_out = {}
            for s in seeds:
                curve = [p for p in points if p["arm"] == arm and p["seed"] == s]
                if curve:
                    seeds_out[s] = tokens_to_reach(curve, metric, target)
            reached = [v["tokens"] for v in seeds_out.values()]
            per_arm[arm] = {"per_seed": seeds_out,
                            "all_seeds_reach": bool(reached) and all(t is not None for t in reached),
                            "mean_tokens": statistics.mean(reached) if reached and None not in reached else None,
                            "range": [min(reached), max(reached)] if reached and None not in reached else None}
        out[metric] = {"ceiling": cap, "target": target, "target_rule": f"{share:g} x the truth ceiling",
                       "arms": per_arm, "goals": goals(points, seeds, metric, target)}
    out["ladder"] = ladder(points, seeds, "within_position_auroc", LADDER)
    out["against_cheapest_ms"] = against_cheapest_ms(points, seeds, "within_position_auroc")
    return out


LADDER = (0.70, 0.75, 0.80, 0.85, 0.90)  # within-position AUROC targets of the token ladder


def ladder(points: list[dict[str, Any]], seeds: list[int], metric: str, targets: Any) -> dict[str, Any]:
    """Tokens each arm needs for each of a ladder of quality targets, per seed (None: not reached in the pool),
    and per seed the ratio of Math-Shepherd N=8's tokens to the arm's: where the 95%-of-ceiling target is out of
    every labeller's reach, this still compares labellers at the qualities they do reach."""
    out: dict[str, Any] = {}
    arms = sorted({p["arm"] for p in points})
    for target in targets:
        row: dict[str, Any] = {}
        for arm in arms:
            per_seed = {s: tokens_to_reach([p for p in points if p["arm"] == arm and p["seed"] == s], metric,
                                           target)["tokens"] for s in seeds}
            ms8 = {s: tokens_to_reach([p for p in points if p["arm"] == "ms-8" and p["seed"] == s], metric,
                                      target)["tokens"] for s in seeds}
            cheap = {s: cheapest_ms(points, s, metric, target) for s in seeds}
            row[arm] = {"tokens": per_seed,
                        "ms8_over_arm": {s: ms8[s] / t if t and ms8[s] else None for s, t in per_seed.items()},
                        "cheapest_ms": cheap,
                        "cheapest_ms_over_arm": {s: cheap[s]["tokens"] / t if t and cheap[s] else None
                                                 for s, t in per_seed.items()}}
        out[f"{target:.2f}"] = row
    return out


def cheapest_ms(points: list[dict[str, Any]], seed: int, metric: str, target: float) -> dict[str, Any] | None:
    """The Math-Shepherd N (of those measured) that reaches ``target`` with the fewest generated tokens in ``seed``:
    the cheapest baseline of that quality, not N = 8 alone (None: no N reaches it)."""
    hits = []
    for arm in sorted({p["arm"] for p in points if p["arm"].startswith("ms-")}):
        got = tokens_to_reach([p for p in points if p["arm"] == arm and p["seed"] == seed], metric, target)["tokens"]
        if got is not None:
            hits.append({"arm": arm, "tokens": got})
    return min(hits, key=lambda h: h["tokens"]) if hits else None


def against_cheapest_ms(points: list[dict[str, Any]], seeds: list[int], metric: str) -> dict[str, Any]:
    """Per labelling arm and seed: the quality of its last point, its tokens, and the cheapest Math-Shepherd N's
    tokens to reach that quality (ratio above 1: the arm is cheaper)."""
    out: dict[str, Any] = {}
    for arm in ("edu", "actprm", "stream-actprm", "stream-random", "stream-all"):
        per_seed = {}
        for s in seeds:
            top = last_point(points, arm, s)
            if top is None:
                continue
            cheap = cheapest_ms(points, s, metric, top[metric])
            per_seed[s] = {"quality": top[metric], "tokens": top["tokens"]["generated"], "cheapest_ms": cheap,
                           "ms_over_arm": cheap["tokens"] / top["tokens"]["generated"] if cheap else None}
        if per_seed:
            out[arm] = per_seed
    return out


def goals(points: list[dict[str, Any]], seeds: list[int], metric: str, target: float) -> dict[str, Any]:
    """The issue's goals, per seed: EDU + ActPRM with >= 20x fewer tokens than Math-Shepherd N=8 at equal quality
    (the quality Math-Shepherd N=8 reaches on the whole pool), and active labelling at <= 30% of full labelling's
    labelled problems (to reach what ``edu`` on the whole pool reaches)."""
    out: dict[str, Any] = {"ms8_over_actprm": {}, "actprm_label_share": {}}
    for s in seeds:
        mine = [p for p in points if p["seed"] == s]
        ms8 = [p for p in mine if p["arm"] == "ms-8"]
        act = [p for p in mine if p["arm"] == "actprm"]
        edu = [p for p in mine if p["arm"] == "edu"]
        if ms8 and act:
            top = max(ms8, key=lambda p: p["problems"])
            hit = tokens_to_reach(act, metric, top[metric])["tokens"]
            ms_hit = tokens_to_reach(ms8, metric, top[metric])["tokens"]
            out["ms8_over_actprm"][s] = {"quality": top[metric], "ms8_tokens": ms_hit, "actprm_tokens": hit,
                                         "ratio": ms_hit / hit if hit else None}
        if edu and act:
            top = max(edu, key=lambda p: p["problems"])
            hits = [p for p in act if p.get("round", 1) != 0 and p[metric] >= top[metric]]
            first = min(hits, key=lambda p: p["tokens"]["generated"]) if hits else None
            out["actprm_label_share"][s] = {"quality": top[metric], "full_problems": top["problems"],
                                            "actprm_problems": first["problems"] if first else None,
                                            "share": first["problems"] / top["problems"] if first else None}
    floor = max((p.get("bon8_random", 0.0) for p in points), default=0.0) if metric.startswith("bon") else 0.5
    for key in ("ms8_over_actprm", "actprm_label_share"):  # matching a quality no better than no scorer proves nothing
        for v in out[key].values():
            if v["quality"] <= floor:
                v.update({"ratio": None} if key == "ms8_over_actprm" else {"share": None})
                v["note"] = f"the quality to match ({v['quality']:.3f}) is not above the scorer-free {floor:.3f}"
    ratios = [v["ratio"] for v in out["ms8_over_actprm"].values()]
    shares = [v["share"] for v in out["actprm_label_share"].values()]
    out["goal_20x_met"] = bool(ratios) and all(r is not None and r >= 20 for r in ratios)
    out["goal_30pct_met"] = bool(shares) and all(x is not None and x <= 0.30 for x in shares)
    return out


def seed_sign(points: list[dict[str, Any]], a: str, b: str, metric: str) -> dict[str, Any]:
    """Per seed, ``a`` minus ``b`` on ``metric`` at each arm's largest point; "unresolved" when the signs differ (and
    with one seed)."""
    diffs = {}
    for s in sorted({p["seed"] for p in points}):
        pa = [p for p in points if p["arm"] == a and p["seed"] == s]
        pb = [p for p in points if p["arm"] == b and p["seed"] == s]
        if pa and pb:
            top_a = max(pa, key=lambda p: (p["problems"], p.get("round", 0)))
            top_b = max(pb, key=lambda p: (p["problems"], p.get("round", 0)))
            diffs[s] = top_a[metric] - top_b[metric]
    signs = {math.copysign(1, d) for d in diffs.values() if d != 0}
    if len(diffs) < 2:
        return {"per_seed": diffs, "verdict": "one seed: cannot resolve"}
    return {"per_seed": diffs, "verdict": "unresolved" if len(signs) > 1 else
            ("higher" if signs == {1.0} else "lower" if signs else "equal")}


def last_point(points: list[dict[str, Any]], arm: str, seed: int) -> dict[str, Any] | None:
    mine = [p for p in points if p["arm"] == arm and p["seed"] == seed]
    return max(mine, key=lambda p: (p["problems"], p.get("round", 0))) if mine else None


def seed_bootstrap(diffs: list[float], n_boot: int = 2000) -> list[float] | None:
    """95% bootstrap interval of the mean of per-seed differences, resampling seeds (None under two seeds)."""
    if len(diffs) < 2:
        return None
    rng = random.Random(0)
    means = sorted(statistics.mean(rng.choices(diffs, k=len(diffs))) for _ in range(n_boot))
    return [means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]]


def at_equal_tokens(points: list[dict[str, Any]], a: str, b: str, metric: str) -> dict[str, Any]:
    """Per seed, ``a``'s last point minus ``b``'s point with the most generated tokens not above ``a``'s (b's curve
    at no more tokens); the mean over seeds with a seed-bootstrap interval."""
    per_seed: dict[int, Any] = {}
    for s in sorted({p["seed"] for p in points}):
        top = last_point(points, a, s)
        cheaper = [p for p in points if p["arm"] == b and p["seed"] == s
                   and p["tokens"]["generated"] <= (top or {"tokens": {"generated": -1}})["tokens"]["generated"]]
        if top and cheaper:
            ref = max(cheaper, key=lambda p: p["tokens"]["generated"])
            per_seed[s] = {"diff": top[metric] - ref[metric], a: top[metric], b: ref[metric],
                           f"{a}_tokens": top["tokens"]["generated"], f"{b}_tokens": ref["tokens"]["generated"]}
        elif top:
            per_seed[s] = {"diff": None, "note": f"{b} has no point at or under {a}'s tokens"}
    diffs = [v["diff"] for v in per_seed.values() if v["diff"] is not None]
    return {"per_seed": per_seed, "mean": statistics.mean(diffs) if diffs else None,
            "ci95_over_seeds": seed_bootstrap(diffs), "above_in_every_seed": bool(diffs) and len(diffs) == len(
                per_seed) and all(d > 0 for d in diffs), "not_below_in_any_seed": bool(diffs) and all(
                d >= 0 for d in diffs)}


def paired_rounds(points: list[dict[str, Any]], a: str, b: str, metric: str) -> dict[str, Any]:
    """Per round (or streaming batch) both arms reached in every seed: per-seed ``a`` minus ``b``, their mean and a
    seed-bootstrap interval (the arms share round 0 and, in the streaming schedule, the batch each round reads)."""
    seeds = sorted({p["seed"] for p in points if p["arm"] == a})
    out: dict[str, Any] = {}
    rounds = sorted({p["round"] for p in points if p["arm"] == a})
    for r in rounds:
        pa = {p["seed"]: p for p in points if p["arm"] == a and p["round"] == r}
        pb = {p["seed"]: p for p in points if p["arm"] == b and p["round"] == r}
        if seeds and all(s in pa and s in pb for s in seeds):
            diffs = [pa[s][metric] - pb[s][metric] for s in seeds]
            out[str(r)] = {"per_seed": dict(zip(seeds, diffs, strict=True)), "mean": statistics.mean(diffs),
                           "ci95_over_seeds": seed_bootstrap(diffs),
                           "tokens_a": statistics.mean(pa[s]["tokens"]["label_generated"] for s in seeds),
                           "tokens_b": statistics.mean(pb[s]["tokens"]["label_generated"] for s in seeds)}
    return out


def reach_whole_pool(points: list[dict[str, Any]], arm: str, metric: str) -> dict[str, Any]:
    """Per seed: the first point of ``arm`` inside the whole-pool ``edu`` PRM's interval on ``metric`` (at or above
    its lower end), and its share of that PRM's generated and labelling tokens and of its problems."""
    out: dict[int, Any] = {}
    for s in sorted({p["seed"] for p in points if p["arm"] == arm}):
        full = last_point(points, "edu", s)
        if full is None:
            continue
        lo = (full.get(f"{metric}_ci") or [full[metric]] * 2)[0]
        hits = [p for p in points if p["arm"] == arm and p["seed"] == s and p[metric] >= lo]
        first = min(hits, key=lambda p: p["tokens"]["generated"]) if hits else None
        pool_gen = first["tokens"]["pool_generated"] if first else 0
        out[s] = {"edu_whole_pool": full[metric], "edu_ci_low": lo, "edu_tokens": full["tokens"]["generated"],
                  "reached": first is not None, "at": first[metric] if first else None,
                  "round": first["round"] if first else None,
                  "token_share": first["tokens"]["generated"] / full["tokens"]["generated"] if first else None,
                  "label_token_share": (first["tokens"]["label_generated"]
                                        / (full["tokens"]["generated"] - pool_gen)) if first else None,
                  "problem_share": first["problems"] / full["problems"] if first else None}
    return out


# -- output -----------------------------------------------------------------------------------------------------------

COLORS = {"truth": "black", "ms-4": "#9ecae1", "ms-8": "tab:blue", "ms-16": "#08519c", "edu": "tab:green",
          "edu-eta0.1": "#74c476", "edu-eta10": "#006d2c",
          "actprm": "tab:red", "random": "tab:gray", "filter": "tab:purple", "filter-random": "#bcbddc"}


def plot(results: dict[str, Any], path: Path) -> None:
    """Per world one row: quality against generated tokens, one line per arm (seed mean), log x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = list(results["worlds"])
    fig, axes = plt.subplots(len(worlds), 2, figsize=(13, 4.6 * len(worlds)), squeeze=False)
    for row, world in zip(axes, worlds, strict=True):
        res = results["worlds"][world]
        for ax, metric in zip(row, METRICS, strict=True):
            by_arm: dict[str, dict[Any, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
            for p in res["points"]:
                by_arm[p["arm"]][p.get("round", p["problems"])].append(p)
            for arm, groups in by_arm.items():
                xs = [statistics.mean(p["tokens"]["generated"] for p in ps) for ps in groups.values()]
                ys = [statistics.mean(p[metric] for p in ps) for ps in groups.values()]
                order = sorted(range(len(xs)), key=xs.__getitem__)
                ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o", label=arm,
                        color=COLORS.get(arm), linestyle="-" if len(xs) > 1 else "none")
            for name, ref in res["references"].items():
                ax.axhline(ref[metric], linestyle=":", linewidth=0.8, color="black")
                ax.text(0.01, ref[metric], name, fontsize=7, va="bottom", transform=ax.get_yaxis_transform())
            target = results["worlds"][world]["headline"].get(metric, {}).get("target")
            if target:
                ax.axhline(target, linestyle="--", linewidth=0.8, color="tab:orange")
            ax.set_xscale("log")
            ax.set_xlabel("generated tokens (labelling + the active pool's generation)")
            ax.set_ylabel(f"{METRICS[metric]}, ruler {world}")
            ax.grid(True, which="both", alpha=0.3)
        row[0].legend(fontsize=7)
    fig.suptitle(f"pool {results['pool_problems']} problems, seeds {results['seeds']}; mean over seeds", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_ladder(lad: dict[str, Any]) -> None:
    """Generated tokens to reach each within-position AUROC target: one row per arm, seeds joined by '/'."""
    targets = list(lad)
    print("\n| arm | " + " | ".join(f"tokens to {t}" for t in targets) + " |")
    print("|---|" + "---:|" * len(targets))
    for arm in next(iter(lad.values()), {}):
        cells = []
        for t in targets:
            got = lad[t][arm]["tokens"]
            cells.append(" / ".join(f"{v / 1000:.0f}k" if v else "-" for v in got.values()))
        print(f"| {arm} | " + " | ".join(cells) + " |")
    print()


def print_summary(results: dict[str, Any]) -> None:
    """Markdown tables per world and the headline lines (what run_all copies into REPORT.md)."""
    if not results.get("complete", True):
        done = {w: r.get("seeds_done") for w, r in results["worlds"].items()}
        print(f"\n**Stopped before the end**: measured {done} (world: seeds) of worlds "
              f"{results['settings']['worlds']} x seeds {results.get('seeds_requested')}.")
    for world, res in results["worlds"].items():
        print(f"\n### World {world} (ruler {world}, first {res['ruler']['problems']} problems x 16)\n")
        print("| arm | point | problems | generated tokens | prefill | PRM scoring | within-pos AUROC | F1 | BoN@8 "
              "| BoN@8 - majority |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
        groups: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
        for p in res["points"]:
            groups[(p["arm"], p.get("round", p["problems"]))].append(p)
        for (arm, step), ps in groups.items():
            def mean(f: Any, ps: list[dict[str, Any]] = ps) -> float:
                return statistics.mean(f(p) for p in ps)
            au = [p["within_position_auroc"] for p in ps]
            spread = f" ({min(au):.3f}-{max(au):.3f})" if len(ps) > 1 else ""
            diff = [p["bon8_min_step_minus_majority_ci"] for p in ps]
            point = (f"round {step}" if arm in ACTIVE_ARMS else f"batch {step}" if arm.startswith("stream-")
                     else f"k={step}")
            print(f"| {arm} | {point} | {mean(lambda p: p['problems']):.0f} | "
                  f"{mean(lambda p: p['tokens']['generated']):,.0f} | {mean(lambda p: p['tokens']['prefill']):,.0f} | "
                  f"{mean(lambda p: p['tokens']['scoring_forward']):,.0f} | {statistics.mean(au):.3f}{spread} | "
                  f"{mean(lambda p: p['first_error_f1']):.3f} | {mean(lambda p: p['bon8_min_step']):.3f} | "
                  + ", ".join(f"{lo:+.3f}..{hi:+.3f}" for lo, hi in diff) + " |")
        for name, ref in res["references"].items():
            lo, hi = ref["bon8_min_step_minus_majority_ci"]
            print(f"| {name} (reference) | - | - | - | - | - | {ref['within_position_auroc']:.3f} | "
                  f"{ref['first_error_f1']:.3f} | {ref['bon8_min_step']:.3f} | {lo:+.3f}..{hi:+.3f} |")
        print()
        for metric, h in res["headline"].items():
            if metric in ("ladder", "against_cheapest_ms"):
                continue
            if not isinstance(h, dict) or "arms" not in h:
                print(f"- {metric}: {h}")
                continue
            print(f"- **{METRICS[metric]}**: truth ceiling {h['ceiling']:.3f}, target {h['target']:.3f} "
                  f"({h['target_rule']}); generated tokens to reach it per seed [optimistic..pessimistic]:")
            for arm, a in h["arms"].items():
                cells = [f"seed {s}: {v['tokens'] if v['tokens'] is not None else 'not reached'} "
                         f"[{v['optimistic']}..{v['pessimistic']}]" + (" (round 0 refused)" if v["round0_refused"]
                                                                         else "") for s, v in a["per_seed"].items()]
                print(f"  - {arm}: " + "; ".join(cells))
            g = h["goals"]
            ratios = ", ".join(f"{v['ratio']:.1f}x" if v["ratio"] else "-" for v in g["ms8_over_actprm"].values())
            shares = ", ".join(f"{v['share']:.0%}" if v["share"] else "-" for v in g["actprm_label_share"].values())
            print(f"  - goal >= 20x fewer tokens than ms-8 at its quality: {g['goal_20x_met']} (per seed: {ratios}); "
                  f"goal <= 30% of full labelling's problems: {g['goal_30pct_met']} (per seed: {shares})")
        if "ladder" in res["headline"]:
            print_ladder(res["headline"]["ladder"])
        for arm, per_seed in res["headline"].get("against_cheapest_ms", {}).items():
            print(f"- {arm} against the cheapest Math-Shepherd N at its own quality (within-position AUROC): "
                  + "; ".join(
                f"seed {s}: {v['quality']:.3f} with {v['tokens'] / 1000:.0f}k tokens, "
                + (f"{v['cheapest_ms']['arm']} {v['cheapest_ms']['tokens'] / 1000:.0f}k ({v['ms_over_arm']:.2f}x)"
                   if v["cheapest_ms"] else "no N reaches it") for s, v in per_seed.items()))
        for name, cmp in res.get("comparisons", {}).items():
            print(f"- {name}: **{cmp['verdict']}** (per seed: "
                  + ", ".join(f"{d:+.3f}" for d in cmp["per_seed"].values()) + ")")
        for name, eq in res.get("at_equal_tokens", {}).items():
            ci = eq["ci95_over_seeds"]
            cells = ", ".join("-" if v["diff"] is None else f"{v['diff']:+.3f}" for v in eq["per_seed"].values())
            mean = "-" if eq["mean"] is None else f"{eq['mean']:+.3f}"
            print(f"- {name} at no more generated tokens (within-position AUROC, last point): mean {mean}"
                  + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}] over seeds" if ci else "") + f" (per seed: {cells})")
        for name, rounds in res.get("paired_by_round", {}).items():
            print(f"- {name} per round, paired by seed (mean [95% over seeds]): " + "; ".join(
                f"{r}: {v['mean']:+.3f}" + (f" [{v['ci95_over_seeds'][0]:+.3f}, {v['ci95_over_seeds'][1]:+.3f}]"
                                            if v["ci95_over_seeds"] else "") for r, v in rounds.items()))
        for arm, per_seed in res.get("reach_whole_pool_edu", {}).items():
            print(f"- {arm} reaches the whole-pool EDU PRM's interval: " + "; ".join(
                f"seed {s}: " + (f"batch/round {v['round']}, {v['token_share']:.0%} of its tokens "
                                 f"({v['label_token_share']:.0%} of its labelling tokens), {v['problem_share']:.0%} "
                                 "of its problems" if v["reached"] else f"no (best below {v['edu_ci_low']:.3f})")
                for s, v in per_seed.items()))
    print(f"\nprofile (s): {json.dumps(results.get('profile', {}))}; whole run {results.get('seconds')} s")


# -- main ---------------------------------------------------------------------------------------------------------


def run_world(world: str, base: dict[str, Any], args: argparse.Namespace, engines: Engines,
              save: Any = None) -> dict[str, Any]:
    """Every labeller on every seed's pool of one world; ``save(world, result)`` after each seed, so a run stopped
    early leaves the seeds it finished in the JSON."""
    from configs.schema import parse_config
    from tasks.evaluation.ruler import SHIPPED_RULERS, load_ruler

    ruler_dir, spec = SHIPPED_RULERS[WORLDS[world][1]]
    full_ruler = load_ruler(ruler_dir, spec)
    ruler = full_ruler.limited(args.ruler_problems)
    recipe = Recipe(base.get("train", {}), world, args, ruler)
    t0 = time.perf_counter()
    refs = references(ruler, world, args)
    PROFILE["references"] += time.perf_counter() - t0
    points: list[dict[str, Any]] = []
    datasets: dict[str, dict[str, str]] = {}
    ms_built = args.ms_list if args.ms_independent or not args.ms_list else [max(args.ms_list)]
    flat = ["edu-flat"] if "streaming" in args.arm_list and "edu-flat" in args.stream_labellers.split(",") else []
    for s in args.seed_list:
        recipe.forget()
        shards_of: dict[str, list] = {}
        for labeller in ["truth", *[f"ms-{n}" for n in ms_built], "edu", *flat]:
            cfg = parse_config(labeller_config(base, world, labeller, s, args.problems), f"bench_e2e {labeller}")
            dataset = build_dataset(cfg, args.cache, engines.factory(world, cfg))
            shards_of[labeller] = read_shards(dataset)
            datasets.setdefault(str(s), {})[labeller] = str(dataset)
            ids = {r["problem_id"] for rows, _ in shards_of[labeller] for r in rows}
            if ids & full_ruler.problem_ids:  # checked on what was labelled, so a changed source cannot slip by
                raise SystemExit(f"{labeller} seed {s}: the pool holds ruler problems; pick other --seeds")
        for n in sorted(set(args.ms_list) - set(ms_built)):
            shards_of[f"ms-{n}"] = subsampled(shards_of[f"ms-{ms_built[0]}"], n, s)
            datasets[str(s)][f"ms-{n}"] = f"{datasets[str(s)][f'ms-{ms_built[0]}']} (subsampled to N={n})"
        if "static" in args.arm_list:
            points += static_points("truth", shards_of["truth"], recipe, s, [args.problems])
            for n in args.ms_list:
                sizes = args.size_list if n == 8 else [args.problems]
                points += [p | ({} if n in ms_built else {"subsampled_from": f"ms-{ms_built[0]}"})
                           for p in static_points(f"ms-{n}", shards_of[f"ms-{n}"], recipe, s, sizes)]
            points += static_points("edu", shards_of["edu"], recipe, s, args.size_list)
            for eta in args.eta_list:
                if eta != base["labels"].get("eta", 1.0):
                    points += static_points(f"edu-eta{eta:g}", shards_of["edu"], recipe, s, [args.problems], eta)
        if "rounds" in args.arm_list:
            points += active_points(shards_of["edu"], recipe, s, args, base)
        if "filter" in args.arm_list:
            points += filter_points(shards_of["edu"], recipe, s, args, base)
        if "streaming" in args.arm_list:
            points += streaming_points(shards_of, recipe, s, args, base)
        done = args.seed_list[: args.seed_list.index(s) + 1]
        result = {"seeds_done": done, **world_result(world, ruler, ruler_dir, refs, points, datasets, done, args,
                                                     base, recipe)}
        if save is not None:
            save(world, result)
    return result


def world_result(world: str, ruler: Any, ruler_dir: str, refs: dict, points: list, datasets: dict, seeds: list[int],
                 args: argparse.Namespace, base: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    return {"ruler": {"dir": ruler_dir, "problems": len(ruler.problem_ids), "trajectories": len(ruler.rows),
                      "content_hash": ruler.manifest["content_hash"]},
            "policy": WORLDS[world][0], "references": refs, "points": points, "datasets": datasets,
            **summarize(points, seeds, args.eta_list, base["labels"].get("eta", 1.0)),
            "train": recipe.train.model_dump(mode="json")}


def summarize(points: list[dict[str, Any]], seeds: list[int], etas: list[float], base_eta: float) -> dict[str, Any]:
    """A world's headline and its seed-sign comparisons, from its points (also what ``--from-json`` recomputes)."""
    comparisons = {
        "edu minus ms-8 (within-position AUROC, whole pool)": seed_sign(points, "edu", "ms-8",
                                                                         "within_position_auroc"),
        "actprm minus random (within-position AUROC, last round)": seed_sign(points, "actprm", "random",
                                                                              "within_position_auroc"),
        "actprm minus random (BoN@8, last round)": seed_sign(points, "actprm", "random", "bon8_min_step"),
        "filter minus filter-random (within-position AUROC)": seed_sign(points, "filter", "filter-random",
                                                                       "within_position_auroc"),
    }
    metric = "within_position_auroc"
    streams = {p["arm"] for p in points if p["arm"].startswith("stream-")}
    if {"stream-actprm", "stream-random"} <= streams:
        comparisons["stream-actprm minus stream-random (within-position AUROC, last batch)"] = seed_sign(
            points, "stream-actprm", "stream-random", metric)
    pairs = [("actprm", "random"), ("actprm", "cost-random"), ("cost-random", "random"),
             ("stream-actprm", "stream-random"), ("stream-actprm", "edu"),
             ("stream-actprm", "stream-all"), ("stream-random", "edu")]
    pairs += [("stream-actprm@flat", "edu"), ("stream-all@flat", "edu")]  # the flat labeller against EDU's trees
    for suffix in [s for s in STREAM_LABELLERS.values() if s]:  # the other labellers' streaming arms, against theirs
        pairs += [(f"stream-actprm{suffix}", f"stream-random{suffix}"),
                  (f"stream-actprm{suffix}", f"stream-all{suffix}")]
    present = {p["arm"] for p in points}
    equal = {f"{a} minus {b}": at_equal_tokens(points, a, b, metric) for a, b in pairs if {a, b} <= present}
    paired = {f"{a} minus {b}": paired_rounds(points, a, b, metric)
              for a, b in pairs if {a, b} <= present and b.startswith(("random", "stream-random", "cost-random"))}
    reach = {arm: reach_whole_pool(points, arm, metric) for arm in sorted(present)
             if arm == "actprm" or arm.startswith(("stream-actprm", "stream-random"))}
    for eta in etas:
        if eta != base_eta:
            comparisons[f"edu eta {eta:g} minus eta 1 (within-position AUROC)"] = seed_sign(
                points, f"edu-eta{eta:g}", "edu", "within_position_auroc")
    return {"headline": headline(points, seeds), "comparisons": comparisons,
            "at_equal_tokens": equal, "paired_by_round": paired, "reach_whole_pool_edu": reach}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/toy-e2e.yaml", help="base config: the labelling, train and active "
                    "sections (the defaults of --rounds, --seed-size, --per-round, --cold-start, --stream-batch and "
                    "--epochs)")
    ap.add_argument("--worlds", default="v1,v2")
    ap.add_argument("--seeds", default="3,6,7", help="pool seeds (toy seed 7100 + s); the default's 1,024-problem "
                    "pools hold no problem of either ruler (checked at start-up)")
    ap.add_argument("--problems", type=int, default=1024, help="pool size: problems every labeller labels")
    ap.add_argument("--sizes", default="128,256,512,1024", help="curve points of the static labellers (problems)")
    ap.add_argument("--ms-ns", default="4,8,16", help="Math-Shepherd rollouts per step; the largest is built, the "
                    "others subsampled from it; none: no Math-Shepherd arm (the active arms' runs alone)")
    ap.add_argument("--ms-independent", action="store_true", help="build every Math-Shepherd N on its own instead")
    ap.add_argument("--etas", default="0.1,1,10", help="the ER η grid on the EDU rows (relabelled, not regenerated)")
    ap.add_argument("--rounds", type=int, default=None, help="active rounds after round 0 (default: the config's "
                    "active.rounds, which counts round 0, minus 1)")
    ap.add_argument("--seed-size", type=int, default=None, help="problems labelled at random in round 0 (default: "
                    "the config's active.seed_size)")
    ap.add_argument("--per-round", type=int, default=None, help="most problems ActPRM labels per later round "
                    "(default: the config's active.max_selected)")
    ap.add_argument("--cold-start", action="store_true", help="the active arms retrain from the backbone every "
                    "round (the loop's active.warm_start false); default: the config's active.warm_start")
    ap.add_argument("--selection", default=None, help="the ActPRM and filter arms' active.selection as JSON, e.g. "
                    "'{\"calibrate_trusted_share\": 0.5, \"pick\": \"uniform\"}'; default: the config's "
                    "active.selection")
    ap.add_argument("--arms", default="static,rounds,filter,streaming", help="which arms run: static (truth, "
                    "Math-Shepherd, EDU and its eta grid on pool prefixes), rounds (ActPRM and random in the loop's "
                    "rounds), filter, streaming (the loop's streaming schedule: ActPRM, random, everything)")
    ap.add_argument("--stream-batch", type=int, default=None, help="problems per streaming batch (default: the "
                    "config's active.batch_size, the reference's 64)")
    ap.add_argument("--stream-selection", default='{"calibrate_trusted_share": 0.5}',
                    help="the streaming ActPRM gate's active.selection as JSON (default: thresholds calibrated on the "
                    "first batch to trust half of it; the paper's: '{\"preset\": \"paper\"}')")
    ap.add_argument("--stream-labellers", default="edu", help="labellers the streaming arms replay: edu, and for "
                    "diagnosis edu-hard (hard labels, eta = inf), truth (exact step labels) and edu-flat (EDU labels "
                    "of the scored trajectory alone, rollouts at its cut points and no tree: built when asked for)")
    ap.add_argument("--filter-share", type=float, default=0.3, help="share of the pool the filter trains on")
    ap.add_argument("--epochs", type=int, default=None, help="default: the config's train.epochs")
    ap.add_argument("--ruler-problems", type=int, default=128)
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "bench-e2e-cache")
    ap.add_argument("--ci", action="store_true", help="CI size: world v1, seed 0, pool 32 (sizes 16, 32), N in "
                    "{4, 8}, η 1 and 10, 1 round of 8 after 8, 2 epochs, ruler 32 (overrides those flags)")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--from-json", type=Path, default=None, help="recompute the headline, the plot and the summary "
                    "from this JSON's points (written by this script), running nothing; writes --json-out")
    args = ap.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        st = results["settings"]
        for res in results["worlds"].values():
            res.update(summarize(res["points"], res.get("seeds_done", st["seed_list"]), st["eta_list"],
                                 st.get("base_eta", 1.0)))
        if args.plot:
            plot(results, args.plot)
        if args.json_out:
            args.json_out.write_text(json.dumps(results, indent=1) + "\n")
        print_summary(results)
        return
    import yaml

    from configs.schema import parse_config

    base = yaml.safe_load((REPO / args.config).read_text())
    cfg = parse_config(base, args.config)
    if args.rounds is None:
        args.rounds = cfg.active.rounds - 1
    if args.seed_size is None:
        args.seed_size = cfg.active.seed_size
    if args.per_round is None:
        args.per_round = cfg.active.max_selected
    if args.stream_batch is None:
        args.stream_batch = cfg.active.batch_size
    if args.epochs is None:
        args.epochs = cfg.train.epochs
    args.cold_start = args.cold_start or not cfg.active.warm_start
    if args.ci:
        args.worlds, args.seeds, args.problems, args.sizes, args.ms_ns = "v1", "0", 32, "16,32", "4,8"
        args.etas, args.rounds, args.seed_size, args.per_round, args.epochs = "1,10", 1, 8, 8, 2
        args.ruler_problems, args.n_boot, args.stream_batch = 32, 200, 8
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    args.size_list = sorted({int(k) for k in args.sizes.split(",")} | {args.problems})
    args.ms_list = [] if args.ms_ns == "none" else [int(n) for n in args.ms_ns.split(",")]
    args.eta_list = [float(e) for e in args.etas.split(",")]
    args.arm_list = args.arms.split(",")
    bad_arms = set(args.arm_list) - {"static", "rounds", "filter", "streaming"}
    bad_labellers = set(args.stream_labellers.split(",")) - set(STREAM_LABELLERS)
    if bad_arms or bad_labellers:
        raise SystemExit(f"unknown --arms {sorted(bad_arms)} or --stream-labellers {sorted(bad_labellers)}")
    worlds = args.worlds.split(",")
    unknown = [w for w in worlds if w not in WORLDS]
    if unknown or max(args.size_list) > args.problems or args.problems % PROBLEMS_PER_SHARD or any(
            k % PROBLEMS_PER_SHARD for k in args.size_list) or (args.ms_list and 8 not in args.ms_list):
        raise SystemExit(f"--worlds from {sorted(WORLDS)}; --sizes and --problems multiples of {PROBLEMS_PER_SHARD}, "
                         "sizes at most the pool; --ms-ns must hold 8 (the headline's reference) or be none")

    import torch

    torch.set_num_threads(2)
    started = time.perf_counter()
    args.cache.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    engines = Engines(args.cache / "engine.log")
    results: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.bench_e2e " + " ".join(sys.argv[1:]),
        "seeds": [], "seeds_requested": args.seed_list, "pool_problems": args.problems, "complete": False,
        "pool_seed_base": POOL_SEED_BASE,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tokens_counted": "generated: the labelling's generated tokens (policy solutions, EDU branches, rollouts) "
                          "from the shards' cost records, plus for actprm/random the pool's generation (one solution "
                          "per pool problem); prefill: the prompt tokens of those requests, apart; scoring_forward: "
                          "prompt + solution tokens the PRM read to score the pool, apart; a subsampled ms-N point "
                          "(subsampled_from) counts (N - 1) / (N_built - 1) of the built arm's rollout tokens",
        "worlds": {},
    }

    def save(world: str, result: dict[str, Any]) -> None:
        results["worlds"][world] = result
        results["seeds"] = [s for s in args.seed_list if all(s in r["seeds_done"] for r in results["worlds"].values())]
        results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                              "load_average_at_start": [round(x, 1) for x in load0],
                              "load_average_at_end": [round(x, 1) for x in os.getloadavg()]}
        results["engine_start_seconds"] = engines.start_seconds
        results["seconds"] = round(time.perf_counter() - started, 1)
        results["profile"] = {k: round(v, 1) for k, v in sorted(PROFILE.items(), key=lambda kv: -kv[1])}
        results["complete"] = world == worlds[-1] and result["seeds_done"] == args.seed_list
        if args.plot:
            plot(results, args.plot)
            results["plot"] = str(args.plot)
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(results, indent=1) + "\n")

    check_pools(base, worlds, args)
    try:
        for world in worlds:
            run_world(world, base, args, engines, save)
    finally:
        engines.close()
    print_summary(results)


if __name__ == "__main__":
    main()
