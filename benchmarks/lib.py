"""What the benchmarks that build toy pools share: the worlds, the labellers' build configs, the build itself
and its shards, and the pool check against the rulers (bench_e2e, bench_ms_subsample, bench_export, bench_e2e_states).

Importing it sets the offline environment (``set_offline_env``) before anything reads it, as a benchmark does first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prm_factory import set_offline_env

set_offline_env()

POOL_SEED_BASE = 7100  # the pool of seed s: toy problems of seed 7100 + s
PROBLEMS_PER_SHARD = 16
# World -> (the policy that samples its data and is its PRMs' backbone, the ruler it is judged on).
WORLDS = {"v1": ("assets/toy-policy", "v1"), "v2": ("assets/toy-policy-v2", "v2")}
PROFILE: dict[str, float] = defaultdict(float)  # seconds per phase, for a benchmark's profile in its JSON


def log(msg: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def content_key(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def labeller_config(base: dict[str, Any], world: str, labeller: str, seed: int, problems: int) -> dict[str, Any]:
    """The build config of one labeller on one pool: the base config with the labeller's overrides."""
    cfg = json.loads(json.dumps(base))
    cfg["name"] = f"e2e-{world}-{labeller}-s{seed}"
    cfg["seed"] = seed
    cfg["policy"]["model_path"] = WORLDS[world][0]
    cfg["train"] = {**cfg.get("train", {}), "model_path": WORLDS[world][0], "seed": seed}
    cfg["sources"][0].update({"num_problems": problems, "seed": POOL_SEED_BASE + seed})
    cfg["rollouts"] = dict(cfg["rollouts"])
    cfg["dataset"] = {**cfg.get("dataset", {}), "problems_per_shard": PROBLEMS_PER_SHARD}
    kind, _, n = labeller.partition("-")
    if kind == "truth":
        cfg["partition"] = {"method": "newline"}
        cfg["tree"] = {**cfg.get("tree", {}), "enabled": False}
        cfg["labels"] = {**cfg["labels"], "labeller": "truth", "truth_samples": 4}
    elif kind == "ms":
        cfg["partition"] = {"method": "newline"}
        cfg["tree"] = {**cfg.get("tree", {}), "enabled": False}
        cfg["rollouts"]["n"] = int(n)
    elif labeller == "edu-flat":  # the scored trajectory alone: rollouts at its EDU cut points, no tree
        cfg["tree"] = {**cfg.get("tree", {}), "enabled": False}
    elif labeller != "edu":
        raise SystemExit(f"unknown labeller {labeller!r}")
    return cfg


class Engines:
    """One policy engine per world, started on first use; the previous world's engine is shut down first."""

    def __init__(self, log_file: Path) -> None:
        self.log_file = log_file  # the engines' start-up output
        self.world: str | None = None
        self.engine: Any = None
        self.start_seconds: dict[str, float] = {}

    def factory(self, world: str, cfg: Any) -> Any:
        def get() -> Any:
            if self.world != world:
                self.close()
                from cluster.engines import start_policy_engines

                t0 = time.perf_counter()
                log(f"starting the {cfg.policy.backend} engine of world {world}")
                self.engine, self.world = start_policy_engines(cfg, local=True, log_file=self.log_file), world
                self.start_seconds[world] = round(time.perf_counter() - t0, 1)
                PROFILE["engine_start"] += time.perf_counter() - t0
            return self.engine
        return get

    def close(self) -> None:
        if self.engine is not None and hasattr(self.engine, "shutdown"):
            self.engine.shutdown()
        self.engine = self.world = None


def build_dataset(cfg: Any, cache: Path, engine: Any) -> Path:
    """The labeller's dataset on the pool, through the build (it reuses a shard only when its key and sha256 match)."""
    from tasks.build import build

    out = cache / "datasets" / f"{cfg.name}-{cfg.config_hash()}"
    t0 = time.perf_counter()
    report = build(cfg, out, engine)
    if report.shards_built:
        PROFILE["generation"] += time.perf_counter() - t0
        log(f"built {out.name}: {report.shards_built} shards in {time.perf_counter() - t0:.0f}s")
    return out


def read_shards(dataset: Path) -> list[tuple[list[dict[str, Any]], dict[str, int]]]:
    """Each shard of a dataset, in pool order: its rows and its cost record."""
    import pyarrow.parquet as pq

    from tasks.cost import ShardCost
    from tasks.prm.training import dataset_shards
    from tasks.store.dataset import read_provenance

    paths, _ = dataset_shards(dataset)
    return [(pq.read_table(p).to_pylist(), ShardCost.from_dict(read_provenance(p).get("cost", {})).to_dict())
            for p in paths]


def subsampled(shards: list[tuple[list[dict[str, Any]], dict[str, int]]], n: int, seed: int
               ) -> list[tuple[list[dict[str, Any]], dict[str, int]]]:
    """A Math-Shepherd build's shards as a build with ``n`` rollouts per step would give them
    (`tasks.store.relabel.subsample_rollouts`); each cost record's rollout tokens become their expected share,
    (n - 1) / (N - 1) of the fresh rollouts (the solution is one of a step's N outcomes, the build tops up the
    rest)."""
    import pyarrow as pa

    from tasks.cost import ShardCost
    from tasks.store.dataset import ROW_SCHEMA
    from tasks.store.relabel import subsample_rollouts

    out = []
    for i, (rows, record) in enumerate(shards):
        big = max((k for r in rows for k, o in zip(r["rollouts"], r["step_origin"], strict=True) if o == "rollout"),
                  default=n)
        table = subsample_rollouts(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), n,
                                   int(content_key(["subsample", seed, n, i])[:8], 16))
        cost = ShardCost.from_dict(record)
        cost.rollout_tokens = round(cost.rollout_tokens * (n - 1) / max(1, big - 1))
        out.append((table.to_pylist(), cost.to_dict()))
    return out


def shard_tokens(records: list[dict[str, int]]) -> dict[str, Any]:
    """The tokens of a set of whole shards: exactly the sum of their cost records."""
    from tasks.cost import COST_STAGES, total_cost

    cost = total_cost(records)
    return {"generated": cost.generated_tokens, "prefill": cost.prompt_tokens, "scoring_forward": 0,
            "pool_generated": 0, "by_stage": {stage: getattr(cost, stage) for stage in COST_STAGES}}


def check_pools(base: dict[str, Any], worlds: list[str], args: Any) -> None:
    """Before any engine starts: no pool may hold a problem of its world's ruler (the PRM would be judged on its
    own training data). Toy problems are generated from the seed alone, so this is exact. ``args``: the pools'
    ``seed_list`` and ``problems``."""
    from configs.schema import ToySource
    from tasks.evaluation.ruler import SHIPPED_RULERS, load_ruler
    from tasks.sources.toy_world import generate_problems

    bad = []
    for world in worlds:
        ruler_ids = load_ruler(*SHIPPED_RULERS[WORLDS[world][1]]).problem_ids
        for s in args.seed_list:
            source = labeller_config(base, world, "edu", s, args.problems)["sources"][0]
            overlap = {p.problem_id for p in generate_problems(ToySource(**source))} & ruler_ids
            if overlap:
                bad.append(f"world {world} seed {s} (toy seed {POOL_SEED_BASE + s}): {len(overlap)} ruler problem(s)")
    if bad:
        raise SystemExit("these pools hold ruler problems, pick other --seeds: " + "; ".join(bad))


def rows_digest(rows: list[dict[str, Any]], target: str) -> str:
    return content_key([[r["problem_id"], r["prompt"], r["completions"], r[target]] for r in rows])


# -- training and measuring --------------------------------------------------------------------------------------


class Recipe:
    """The benchmark's train recipe on one world: each PRM fitted in this process (`tasks.prm.fit`), measured on
    the ruler, each point's figures cached."""

    def __init__(self, train_section: dict[str, Any], world: str, args: argparse.Namespace, ruler: Any) -> None:
        from configs.schema import TrainConfig

        self.train = TrainConfig(**{**train_section, "model_path": WORLDS[world][0], "epochs": args.epochs,
                                    "keep": "last"})
        self.world, self.args, self.ruler = world, args, ruler
        self.ruler_key = [ruler.manifest["content_hash"], len(ruler.problem_ids), args.n_boot]
        # Token states by text: the backbone is the world's frozen policy in every fit, so a row's states are the
        # same in each PRM that trains on it or scores it (the curve's sizes, the η grid, the active rounds, the
        # ruler); ``forget`` empties it between pools.
        self.states: dict[str, Any] = {}

    def forget(self) -> None:
        self.states.clear()

    def fit(self, rows: list[dict[str, Any]], seed: int, name: str, init_from: Path | None = None) -> Any:
        """The recipe trained on ``rows`` (`tasks.prm.fit.fit`, on the cached token states), a FittedPRM;
        ``init_from``: the active loop's warm start."""
        from tasks.prm.fit import fit

        t0 = time.perf_counter()
        fitted = fit(self.train, rows, seed, name=name, dataset_version="bench-e2e", init_from=init_from,
                     states_cache=self.states)
        PROFILE["training"] += time.perf_counter() - t0
        return fitted

    def measure(self, scorer: Any) -> dict[str, Any]:
        from tasks.evaluation.ruler import evaluate_ruler
        from tasks.evaluation.summary import ruler_figures

        t0 = time.perf_counter()
        out = ruler_figures(evaluate_ruler(scorer, self.ruler, [1, 8], n_boot=self.args.n_boot))
        PROFILE["evaluation"] += time.perf_counter() - t0
        return out

    def point(self, rows: list[dict[str, Any]], seed: int, name: str, need_model: bool = False
              ) -> tuple[dict[str, Any], Any]:
        """Figures of the recipe trained on ``rows`` (cached by the rows' digest, the recipe and the ruler), and
        the trained scorer when ``need_model`` (trained again if the figures came from the cache) or else None."""
        key = content_key([rows_digest(rows, self.train.target), self.train.train_hash(), seed, self.ruler_key])
        path = self.args.cache / "points" / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text()), (self.fit(rows, seed, name) if need_model else None)
        scorer = self.fit(rows, seed, name)
        out = self.measure(scorer)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        return out, (scorer if need_model else None)
