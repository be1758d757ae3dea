"""End to end: held-out PRM quality per generated labelling token, one curve per labeller (issue 14).

Every arm labels the same toy problems (a seeded pool, disjoint from the toy ruler), trains a PRM with the same
trainer (`cluster.train.train_on_ray`, Ray Train, the ``train:`` section of the base config) and is measured on the
same held-out ruler problems (`assets/toy-ruler`, exact step truth):

- ``ms-N`` (Math-Shepherd style): newline steps, no tree, N policy samples per step, N in ``--ms-ns``;
- ``edu-N``: EDU entropy cuts and branching (the base config's partition and tree), samples topped up to N;
  on the whole pool this is also the "full data" PRM of the ActPRM share;
- ``actprm``: the ActPRM loop (`tasks.active.loop.ActiveLoop`: round 0 labels a random seed set, later rounds label
  the trajectories the ensemble is unsure about) on the same pool, EDU labels, warm-started Ray Train rounds;
- ``random``: the same loop with ``selector: random`` (as many problems per round, drawn at random).

Cost on the x axis = **generated labelling tokens** from the datasets' cost records (``generated_tokens`` =
policy generation of the labelled solutions + EDU branches + rollouts; prompt tokens are not counted). For the
active arms it is the cumulative ``label_tokens`` of the rounds; the pool (one solution per pool problem, made
to be scored, never labelled) is reported separately as ``pool_tokens`` and the headline ratio is given with
and without it.

Quality (y) on the first ``--ruler-problems`` ruler problems x 16 samples: step AUROC against the exact truth,
and best-of-N accuracy at N = ``--bon`` choosing by the minimum step score (random pick and majority vote on
the same groups as references). Seeds (``--seeds``) change the problems, the labelling seed, the train seed
and the active draw; the JSON keeps every point, the plot shows the mean and the min-max spread.

Everything built is cached under ``--cache`` by content key (dataset: the config hash; PRM: dataset version
+ train hash; active run: its pinned config; evaluation: checkpoint sha256 + ruler size), so a rerun reuses
what exists and only evaluates and plots again.

    python benchmarks/bench_e2e.py --json-out benchmarks/results/e2e.json --plot benchmarks/results/e2e.png
    python benchmarks/bench_e2e.py --ci ...     # run_all's size: one seed, a 24-problem pool, 2 rounds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prm_factory import set_offline_env  # noqa: E402 - needs the repo on sys.path first

set_offline_env()

# Problem seeds of the pools: seed s uses POOL_SEED_BASE + s. Checked against the ruler at start-up.
POOL_SEED_BASE = 7100
# What this run took from the cache and what it made (printed with the summary, so a report says which it was).
CACHE = {"datasets_reused": 0, "datasets_built": 0, "prms_reused": 0, "prms_trained": 0, "evals_reused": 0,
         "evals_run": 0}


def log(msg: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- configs --------------------------------------------------------------------------------------------------


def arm_config(base: dict[str, Any], arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The config dict of one arm and seed: the base config with the arm's overrides (documented in the docstring)."""
    cfg = json.loads(json.dumps(base))
    cfg["name"] = f"e2e-{arm}-s{seed}"
    cfg["seed"] = seed
    src = cfg["sources"][0]
    src.update({"num_problems": args.problems, "seed": POOL_SEED_BASE + seed})
    cfg["rollouts"] = {**cfg["rollouts"], "seed": seed}
    cfg["train"] = {**cfg.get("train", {}), "seed": seed}
    cfg["dataset"] = {**cfg.get("dataset", {}), "out_dir": "runs/bench-e2e/dataset"}
    kind, _, n = arm.partition("-")
    if kind == "ms":
        cfg["partition"] = {"method": "newline"}
        cfg["tree"] = {**cfg.get("tree", {}), "enabled": False}
        cfg["rollouts"]["n"] = int(n)
    elif kind == "edu":
        cfg["rollouts"]["n"] = int(n)
    elif kind in ("actprm", "random"):
        cfg["rollouts"]["n"] = args.edu_n
        cfg["active"] = {**cfg.get("active", {}), "rounds": args.rounds, "seed_size": args.seed_size,
                         "max_selected": args.per_round, "pool_size": None, "label_token_budget": None,
                         "selector": "uncertainty" if kind == "actprm" else "random", "seed": seed}
    else:
        raise SystemExit(f"unknown arm {arm!r}")
    return cfg


def content_key(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- the cached steps -----------------------------------------------------------------------------------------


class Engine:
    """One policy engine for every arm (the policy section is the same in all of them), started on first use."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.engine: Any = None
        self.start_seconds: float | None = None

    def __call__(self) -> Any:
        if self.engine is None:
            from cluster.engines import start_policy_engines

            t0 = time.perf_counter()
            log(f"starting the {self.cfg.policy.backend} engine")
            self.engine = start_policy_engines(self.cfg, local=True)
            self.start_seconds = round(time.perf_counter() - t0, 1)
            log(f"engine up in {self.start_seconds}s")
        return self.engine


def build_dataset(cfg: Any, cache: Path, engine: Engine) -> Path:
    """The arm's dataset, built once per config hash (sources + labelling) and reused after."""
    from tasks.build import build

    out = cache / "datasets" / f"{cfg.name.rsplit('-s', 1)[0]}-{cfg.config_hash()}"
    # Always through build: it reuses a shard only when its completion record's key and sha256 still match
    # (and starts no engine then), so a damaged or stale cached dataset is rebuilt, not trusted by its name.
    t0 = time.perf_counter()
    report = build(cfg, out, engine)
    if report.shards_built:
        CACHE["datasets_built"] += 1
        log(f"built {out.name} ({report.shards_built} shards) in {time.perf_counter() - t0:.0f}s")
    else:
        CACHE["datasets_reused"] += 1
    return out


def train_cached(cfg: Any, dataset: Path, cache: Path) -> Path:
    """A PRM trained on ``dataset`` (Ray Train), once per (dataset version, train hash)."""
    from cluster.train import train_on_ray

    version = json.loads((dataset / "manifest.json").read_text())["dataset_version"]
    run = cache / "runs" / f"{version}-{cfg.train.train_hash()}"
    if not (run / "train_summary.json").is_file():
        t0 = time.perf_counter()
        train_on_ray(cfg, dataset, run)
        CACHE["prms_trained"] += 1
        log(f"trained {run.name} in {time.perf_counter() - t0:.0f}s")
    else:
        CACHE["prms_reused"] += 1
    return run / "model"


def dataset_cost(dataset: Path) -> dict[str, int]:
    """The dataset's generated tokens, in total and by stage, from its manifest's sum of the shards' records."""
    from tasks.cost import COST_STAGES, ShardCost
    from tasks.store.dataset import read_manifest

    cost = ShardCost.from_dict(read_manifest(dataset).get("extra", {}).get("cost", {}))
    return {"generated_tokens": cost.generated_tokens, **{stage: getattr(cost, stage) for stage in COST_STAGES}}


def dataset_size(dataset: Path) -> dict[str, int]:
    import pyarrow.parquet as pq

    from tasks.prm.training import dataset_shards

    shards, _ = dataset_shards(dataset)
    rows = steps = 0
    problems: set[str] = set()
    for path in shards:
        t = pq.read_table(path, columns=["labels", "problem_id"])
        rows += t.num_rows
        steps += sum(len(x) for x in t.column("labels").to_pylist())
        problems |= set(t.column("problem_id").to_pylist())
    return {"rows": rows, "steps": steps, "problems": len(problems)}


def evaluate(model_dir: Path, ruler: Any, ns: list[int], cache: Path) -> dict[str, Any]:
    """Ruler figures of a checkpoint, cached by the weights' sha256 and the ruler subset."""
    from tasks.evaluation.ruler import evaluate_ruler
    from tasks.prm.model import load_prm
    from tasks.store.dataset import sha256_file

    key = content_key([sha256_file(model_dir / "model.safetensors"), ruler.manifest["content_hash"],
                       len(ruler.problem_ids), ns])
    path = cache / "evals" / f"{key}.json"
    if path.is_file():
        CACHE["evals_reused"] += 1
        return json.loads(path.read_text())
    CACHE["evals_run"] += 1
    t0 = time.perf_counter()
    report = evaluate_ruler(load_prm(model_dir), ruler, ns)
    bon = report["best_of_n"]
    out = {"step_auroc": report["steps"]["step_auroc"], "step_accuracy": report["steps"]["step_accuracy"],
           **{f"bon{n}_{sel}": bon["accuracy"][sel][i] for i, n in enumerate(bon["ns"])
              for sel in ("min_step", "last_step", "random", "majority")},
           **{f"bon{n}_pass": bon["oracle_any_correct"][i] for i, n in enumerate(bon["ns"])},
           "eval_seconds": round(time.perf_counter() - t0, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


def run_static_arm(arm: str, seed: int, base: dict, args: argparse.Namespace, engine: Engine, ruler: Any,
                   ns: list[int]) -> dict[str, Any]:
    from configs.schema import parse_config

    cfg = parse_config(arm_config(base, arm, seed, args), f"bench_e2e {arm} seed {seed}")
    if args.cached_only and not _static_cached(cfg, args.cache):
        log(f"{arm} seed {seed}: not in the cache, left out (--cached-only)")
        return None
    dataset = build_dataset(cfg, args.cache, engine)
    model = train_cached(cfg, dataset, args.cache)
    cost = dataset_cost(dataset)
    point = {"arm": arm, "seed": seed, "tokens": cost["generated_tokens"], "cost": cost, **dataset_size(dataset),
             "dataset": str(dataset), "checkpoint": str(model), **evaluate(model, ruler, ns, args.cache)}
    log(f"{arm} seed {seed}: {point['tokens']:,} tokens, {point['problems']} problems, "
        f"AUROC {point['step_auroc']:.3f}, BoN@{ns[-1]} {point[f'bon{ns[-1]}_min_step']:.3f}")
    return point


def _static_cached(cfg: Any, cache: Path) -> bool:
    """True when the arm's dataset and its trained PRM are both in the cache."""
    dataset = cache / "datasets" / f"{cfg.name.rsplit('-s', 1)[0]}-{cfg.config_hash()}"
    if not (dataset / "manifest.json").is_file():
        return False
    version = json.loads((dataset / "manifest.json").read_text())["dataset_version"]
    return (cache / "runs" / f"{version}-{cfg.train.train_hash()}" / "train_summary.json").is_file()


def run_active_arm(arm: str, seed: int, base: dict, args: argparse.Namespace, engine: Engine, ruler: Any,
                   ns: list[int]) -> list[dict[str, Any]]:
    from cluster.active_run import ray_train_fn
    from configs.schema import parse_config
    from tasks.active.loop import ActiveLoop, pin_payload

    cfg = parse_config(arm_config(base, arm, seed, args), f"bench_e2e {arm} seed {seed}")
    out = args.cache / "active" / f"{arm}-s{seed}-{content_key([pin_payload(cfg), cfg.active.model_dump()])}"
    t0 = time.perf_counter()
    if args.cached_only:  # the rounds a run finished so far, without running more
        from tasks.active.loop import ActiveResult, read_rounds

        pool = json.loads((out / "pool" / "pool.json").read_text()) if (out / "pool" / "pool.json").is_file() else {}
        rounds = read_rounds(out) if out.is_dir() else []
        result = ActiveResult(out, rounds, "cached_only" if len(rounds) < args.rounds else "rounds", "", pool)
    else:
        result = ActiveLoop(cfg, out, engine, ray_train_fn(cfg), eval_fn=None).run()
    log(f"{arm} seed {seed}: {len(result.rounds)} rounds ({result.stop_reason}) in {time.perf_counter() - t0:.0f}s")
    points, problems = [], 0
    for rec in result.rounds:
        problems += int(rec["selected"])
        point = {"arm": arm, "seed": seed, "round": rec["round"], "tokens": int(rec["cumulative_label_tokens"]),
                 "pool_tokens": int(result.pool.get("pool_tokens") or 0), "problems": problems,
                 "selected": rec["selected"], "uncertain": rec["uncertain"], "unlabelled": rec["unlabelled"],
                 "labelled_rows": rec["labelled_rows"], "labelled_steps": rec["labelled_steps"],
                 "round_label_tokens": rec["label_tokens"], "train_loss": rec["train_loss"],
                 "checkpoint": rec["checkpoint"], "stop_reason": result.stop_reason,
                 **evaluate(Path(rec["checkpoint"]), ruler, ns, args.cache)}
        log(f"{arm} seed {seed} round {rec['round']}: {point['tokens']:,} tokens, {problems} problems, "
            f"AUROC {point['step_auroc']:.3f}, BoN@{ns[-1]} {point[f'bon{ns[-1]}_min_step']:.3f}")
        points.append(point)
    return points


# -- summary --------------------------------------------------------------------------------------------------


def curves(points: list[dict[str, Any]], metrics: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Per arm, its points averaged over seeds: static arms by N (one point each), active arms by round."""
    out: dict[str, list[dict[str, Any]]] = {}
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for p in points:
        family, _, n = p["arm"].partition("-")
        groups.setdefault((family, p.get("round", int(n) if n else 0)), []).append(p)
    for (family, step), ps in sorted(groups.items()):
        row = {"family": family, "step": step, "arm": ps[0]["arm"], "seeds": [p["seed"] for p in ps],
               "tokens": statistics.mean(p["tokens"] for p in ps),
               "problems": statistics.mean(p["problems"] for p in ps)}
        if "pool_tokens" in ps[0]:
            row["pool_tokens"] = statistics.mean(p["pool_tokens"] for p in ps)
        for m in metrics:
            vals = [p[m] for p in ps if p.get(m) is not None]
            row[m] = {"mean": statistics.mean(vals) if vals else None, "min": min(vals, default=None),
                      "max": max(vals, default=None), "values": vals}
        out.setdefault(family, []).append(row)
    return out


def first_reaching(curve: list[dict[str, Any]], metric: str, target: float) -> dict[str, Any] | None:
    """The cheapest point of a curve whose seed-mean ``metric`` is at least ``target``."""
    ok = [r for r in curve if r[metric]["mean"] is not None and r[metric]["mean"] >= target]
    return min(ok, key=lambda r: r["tokens"]) if ok else None


def headline(cur: dict[str, list[dict[str, Any]]], metric: str, edu_arm: str,
             floor: float | None = None) -> dict[str, Any]:
    """The two ratios of the issue, on one metric: tokens vs Math-Shepherd N=8, and ActPRM's share of the labels.

    ``floor``: what a scorer-free choice reaches on this metric (best-of-N: the random pick). When the quality to
    match is below it, matching it says nothing about the labels: the goals are reported as None, with a note.
    """
    out: dict[str, Any] = {"metric": metric}
    ms8 = next((r for r in cur.get("ms", []) if r["arm"] == "ms-8"), None)
    act = cur.get("actprm", [])
    if ms8 and act and ms8[metric]["mean"] is not None:
        target = ms8[metric]["mean"]
        hit = first_reaching(act, metric, target)
        out["ms8"] = {"tokens": ms8["tokens"], metric: target}
        scored = [{"round": r["step"], "tokens": r["tokens"], metric: r[metric]["mean"]}
                  for r in act if r[metric]["mean"] is not None]
        out["actprm_best"] = max(scored, key=lambda x: x[metric], default=None)
        if hit:
            out["actprm_reaches_ms8"] = {"round": hit["step"], "tokens": hit["tokens"],
                                         "tokens_with_pool": hit["tokens"] + hit.get("pool_tokens", 0),
                                         metric: hit[metric]["mean"]}
            out["token_ratio_ms8_over_actprm"] = ms8["tokens"] / max(1.0, hit["tokens"])
            out["token_ratio_with_pool"] = ms8["tokens"] / max(1.0, hit["tokens"] + hit.get("pool_tokens", 0))
        else:
            out["actprm_reaches_ms8"] = None
        out["goal_20x_met"] = bool(hit) and out["token_ratio_ms8_over_actprm"] >= 20
    full = next((r for r in cur.get("edu", []) if r["arm"] == edu_arm), None)
    if full and act and full[metric]["mean"] is not None:
        hit = first_reaching(act, metric, full[metric]["mean"])
        out["full_data"] = {"arm": edu_arm, "tokens": full["tokens"], "problems": full["problems"],
                            metric: full[metric]["mean"]}
        if hit:
            out["actprm_reaches_full"] = {"round": hit["step"], "tokens": hit["tokens"], "problems": hit["problems"],
                                          metric: hit[metric]["mean"]}
            out["label_share_problems"] = hit["problems"] / max(1.0, full["problems"])
            out["label_share_tokens"] = hit["tokens"] / max(1.0, full["tokens"])
            out["goal_30pct_met"] = out["label_share_problems"] <= 0.30
        else:
            out["actprm_reaches_full"] = None
            out["goal_30pct_met"] = False
    if floor is not None:
        for key, ref in (("goal_20x_met", out.get("ms8")), ("goal_30pct_met", out.get("full_data"))):
            if ref is not None and ref[metric] < floor and key in out:
                out[key] = None
                out.setdefault("note", []).append(f"{key}: the quality to match ({ref[metric]:.3f}) is below the "
                                                  f"scorer-free {floor:.3f} on {metric}; no goal can be judged")
    return out


COLORS = {"ms": "tab:blue", "edu": "tab:green", "actprm": "tab:red", "random": "tab:gray"}
LABELS = {"ms": "Math-Shepherd (newline, N = 4/8/16)", "edu": "EDU (full pool)", "actprm": "EDU + ActPRM",
          "random": "EDU + random selection"}


def plot(cur: dict[str, list[dict[str, Any]]], metrics: list[tuple[str, str]], refs: dict[str, float],
         path: Path, title: str) -> None:
    """One panel per metric: seed mean with min-max bars per labeller, log x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(6.2 * len(metrics), 4.6))
    for ax, (metric, name) in zip(axes, metrics, strict=True):
        for family, rows in cur.items():
            rows = [r for r in rows if r[metric]["mean"] is not None]
            if not rows:
                continue
            rows = sorted(rows, key=lambda r: r["tokens"])
            x = [r["tokens"] for r in rows]
            y = [r[metric]["mean"] for r in rows]
            lo = [r[metric]["mean"] - r[metric]["min"] for r in rows]
            hi = [r[metric]["max"] - r[metric]["mean"] for r in rows]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, color=COLORS.get(family), label=LABELS.get(family,
                        family), linestyle="-" if len(rows) > 1 else "none")
            if family == "ms":
                for r in rows:
                    ax.annotate(r["arm"].replace("ms-", "N="), (r["tokens"], r[metric]["mean"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        for ref_name, value in refs.items():
            if ref_name.startswith(metric + ":"):
                ax.axhline(value, color="black", linestyle=":", linewidth=0.8)
                ax.text(0.01, value, ref_name.split(":", 1)[1], fontsize=7, va="bottom",
                        transform=ax.get_yaxis_transform())
        ax.set_xlabel("generated labelling tokens (policy solutions + branches + rollouts)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/toy-e2e.yaml", help="base config: policy, EDU, train, active")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--problems", type=int, default=48, help="pool size: problems every arm labels (at most)")
    ap.add_argument("--ms-ns", default="4,8,16")
    ap.add_argument("--edu-n", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed-size", type=int, default=6, help="problems labelled at random in round 0")
    ap.add_argument("--per-round", type=int, default=6, help="problems labelled per later round")
    ap.add_argument("--arms", default="ms,edu,actprm,random")
    ap.add_argument("--ruler-problems", type=int, default=64)
    ap.add_argument("--bon", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "bench-e2e-cache")
    ap.add_argument("--ci", action="store_true", help="CI size: seed 0, pool 24, N in {4, 8}, 2 rounds of 6, "
                    "ruler 32 (overrides those flags)")
    ap.add_argument("--cached-only", action="store_true", help="summarize what the cache holds; build and train "
                    "nothing (missing points are listed in the JSON)")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    if args.ci:
        args.seeds, args.problems, args.ms_ns, args.rounds = "0", 24, "4,8", 2
        args.seed_size = args.per_round = 6
        args.ruler_problems = 32

    import ray
    import torch
    import yaml

    from configs.schema import ToySource, parse_config
    from tasks.evaluation.ruler import load_ruler
    from tasks.sources.toy_world import generate_problems

    torch.set_num_threads(2)
    started = time.perf_counter()
    base = yaml.safe_load((REPO / args.config).read_text())
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    ns = sorted({1, args.bon})
    ruler = load_ruler().limited(args.ruler_problems)
    full_ruler_ids = load_ruler().problem_ids
    for s in seeds:  # the pool must not hold a ruler problem (the PRM would be measured on its training data)
        src = {**base["sources"][0], "num_problems": args.problems, "seed": POOL_SEED_BASE + s}
        overlap = {p.problem_id for p in generate_problems(ToySource(**src))} & full_ruler_ids
        if overlap:
            raise SystemExit(f"seed {s}: the pool (toy seed {POOL_SEED_BASE + s}) holds {len(overlap)} ruler "
                             "problem(s); pick other --seeds")
    args.cache.mkdir(parents=True, exist_ok=True)
    engine = Engine(parse_config(arm_config(base, f"edu-{args.edu_n}", seeds[0], args)))
    if not args.cached_only:  # our own local Ray for Ray Train (never another session's cluster)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 namespace="bench-e2e", _temp_dir=str(Path("/tmp") / f"ray-e2e-{os.getpid()}"))
    load0 = os.getloadavg()
    points: list[dict[str, Any]] = []
    missing: list[str] = []
    try:
        for s in seeds:
            static = [f"ms-{n}" for n in args.ms_ns.split(",")] if "ms" in arms else []
            static += [f"edu-{args.edu_n}"] if "edu" in arms else []
            for arm in static:
                point = run_static_arm(arm, s, base, args, engine, ruler, ns)
                if point is None:
                    missing.append(f"{arm} seed {s}")
                else:
                    points.append(point)
            for arm in ("actprm", "random"):
                if arm in arms:
                    got = run_active_arm(arm, s, base, args, engine, ruler, ns)
                    points += got
                    if len(got) < args.rounds:
                        missing.append(f"{arm} seed {s}: {args.rounds - len(got)} of {args.rounds} rounds")
    finally:
        if ray.is_initialized():
            ray.shutdown()
    metrics = ["step_auroc", f"bon{args.bon}_min_step", f"bon{args.bon}_last_step"]
    cur = curves(points, metrics)
    ref = next((p for p in points if f"bon{args.bon}_random" in p), {})
    refs = {f"bon{args.bon}_min_step:random pick": ref.get(f"bon{args.bon}_random"),
            f"bon{args.bon}_min_step:majority vote": ref.get(f"bon{args.bon}_majority"),
            "step_auroc:chance": 0.5}
    refs = {k: v for k, v in refs.items() if v is not None}
    results = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_e2e.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_at_start": [round(x, 1) for x in load0],
                    "load_average_at_end": [round(x, 1) for x in os.getloadavg()]},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "base_config": args.config, "pool_seed_base": POOL_SEED_BASE,
        "ruler": {"problems": len(ruler.problem_ids), "trajectories": len(ruler.rows),
                  "content_hash": ruler.manifest["content_hash"]},
        "tokens_counted": "generated_tokens of the labelled datasets' cost records: policy solutions of the "
                          "labelled problems + EDU branch continuations + rollouts (prompt tokens not counted); "
                          "active arms: cumulative label tokens of the rounds, the pool's own generation in "
                          "pool_tokens",
        "engine_start_seconds": engine.start_seconds,
        "points": points,
        "missing": missing,
        "cache": dict(CACHE),
        "curves": cur,
        "headline": {m: headline(cur, m, f"edu-{args.edu_n}", ref.get(f"bon{args.bon}_random") if m.startswith("bon")
                                 else 0.5) for m in metrics[:2]},
        "references": refs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.plot:
        title = (f"toy world, pool {args.problems} problems, seeds {args.seeds}; ruler {len(ruler.problem_ids)} "
                 f"held-out problems x 16; mean and min-max over seeds")
        plot(cur, [("step_auroc", "step AUROC vs exact truth"),
                   (f"bon{args.bon}_min_step", f"best-of-{args.bon} accuracy (min-step)")], refs, args.plot, title)
        results["plot"] = str(args.plot)
    text = json.dumps(results, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    print_summary(results)


def print_summary(results: dict[str, Any]) -> None:
    """The markdown table and the headline lines (what run_all copies into REPORT.md)."""
    metrics = list(next(iter(results["curves"].values()))[0].keys()) if results["curves"] else []
    metrics = [m for m in metrics if m.startswith(("step_auroc", "bon"))]
    print("| labeller | point | problems | generated tokens | " + " | ".join(metrics) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(metrics))
    for family, rows in results["curves"].items():
        for r in rows:
            cells = []
            for m in metrics:
                v = r[m]
                spread = f" ({v['min']:.3f}-{v['max']:.3f})" if len(v["values"]) > 1 else ""
                cells.append("-" if v["mean"] is None else f"{v['mean']:.3f}{spread}")
            point = r["arm"] if family in ("ms", "edu") else f"round {r['step']}"
            print(f"| {LABELS.get(family, family)} | {point} | {r['problems']:.0f} | {r['tokens']:,.0f} | "
                  + " | ".join(cells) + " |")
    for metric, h in results["headline"].items():
        print(f"\n{metric}: " + json.dumps(h, default=str))
    if results.get("cache"):
        print("\ncache (active rounds not counted): " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                                                  for k, v in results["cache"].items()))
    if results.get("missing"):
        print("\nmissing (not in the cache): " + "; ".join(results["missing"]))


if __name__ == "__main__":
    main()
