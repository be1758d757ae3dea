"""The PRM learner, measured apart from the labels: recipes trained on exact truth, judged on the toy ruler.

    python benchmarks/study_prm_recipe.py --problems 1024 --recipes baseline,tokens,tokens-logprob

Data: toy problems from their own seed (any that the ruler holds are dropped), `--samples` policy samples each,
labelled by the truth labeller (tasks/labelling/truth_labeller.py, exact truth per step) through the transformers
engine in this process; cached under runs/study/ by a content key. `--labeller tree` labels the same problems the
factory's way (EDU tree + ER-PRM rollouts) instead, with configs/toy.yaml's labelling sections.

Training: the trainer in one process (tasks/prm/fit.py, the epoch loop Ray Train runs; tasks/prm/training.py's
held-out split), for each recipe in turn. A recipe is a set of `train:` overrides. Every epoch is scored on
the held-out problems (within-position AUROC against their labels); the best epoch is kept and judged on the
ruler's first `--ruler-problems` problems: within-position AUROC, first-error F1, best-of-8 against majority vote,
each with a 95% bootstrap interval over problems, step AUROC beside them. The free references (position,
policy-confidence) are measured on the same ruler slice in the same run.

Every try, good or bad, is appended to `--out` (benchmarks/results/prm_recipes.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

from tasks.evaluation.summary import ruler_figures  # noqa: E402

# Named recipes: overrides of the schema's `train:` defaults (configs/schema.py TrainConfig; tasks/prm/model.py says
# what each knob means). Not of configs/toy.yaml's section: that now holds the winning recipe, and "baseline" must
# stay the recipe that was landed before the study.
RECIPES: dict[str, dict[str, Any]] = {
    "baseline": {},  # the landed defaults: end token, lambda 0.5 on the summed pull, lr 1e-3, no shuffle
    "end-nopull": {"pull_lambda": 0.0, "shuffle": True},
    "end-meanpull": {"pull_reduction": "mean", "shuffle": True},
    "end-logprob": {"pull_reduction": "mean", "shuffle": True, "token_features": "logprob"},
    "tokens": {"reads": "tokens", "pull_reduction": "mean", "shuffle": True},
    "tokens-logprob": {"reads": "tokens", "pull_reduction": "mean", "shuffle": True, "token_features": "logprob"},
    "tokens-frozen": {"reads": "tokens", "pull_reduction": "mean", "shuffle": True, "train_backbone": False},
    "tokens-lr3e-4": {"reads": "tokens", "pull_reduction": "mean", "shuffle": True, "lr": 3e-4},
    "tokens-frozen-logprob": {"reads": "tokens", "pull_reduction": "mean", "shuffle": True, "train_backbone": False,
                              "token_features": "logprob"},
    "tokens-logprob-lr1e-4": {"reads": "tokens", "pull_reduction": "mean", "shuffle": True, "lr": 1e-4,
                             "token_features": "logprob"},
    "tokens-frozen-logprob-e8": {"reads": "tokens", "pull_reduction": "mean", "shuffle": True, "epochs": 8,
                                 "train_backbone": False, "token_features": "logprob"},
    "tokens-frozen-dist": {"reads": "tokens", "pull_reduction": "mean", "shuffle": True, "train_backbone": False,
                           "token_features": "distribution"},
    "tokens-frozen-dist-e8": {"reads": "tokens", "pull_reduction": "mean", "shuffle": True, "epochs": 8,
                              "train_backbone": False, "token_features": "distribution"},
    "end-frozen-logprob": {"pull_reduction": "mean", "shuffle": True, "train_backbone": False,
                           "token_features": "logprob"},
}


# --world: the config whose policy samples the training data, and the ruler (and its spec) it is judged on. In v2
# the policy also makes confident misconceptions (tasks/sources/misconceptions.py); the PRM's backbone is that
# world's policy.
WORLDS = {"v1": ("toy.yaml", "v1"), "v2": ("toy-v2.yaml", "v2")}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def content_key(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / WORLDS[args.world][0]).read_text())
    cfg["name"] = "study"
    cfg["sources"] = [{"kind": "toy", "num_problems": args.problems, "seed": args.problem_seed, "min_steps": 2,
                       "max_steps": 6}]
    cfg["policy"]["backend"] = "transformers"
    cfg["partition"] = {**cfg["partition"], "method": args.partition, "entropy_source": "exact"}
    cfg["labels"] = {**cfg["labels"], "labeller": args.labeller, "truth_samples": args.samples}
    return cfg


def labelled_rows(args: argparse.Namespace, ruler_ids: set[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The training rows (cached by content key) and what making them cost."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from configs.schema import parse_config
    from tasks.sources.toy_world import generate_problems

    cfg = parse_config(base_config(args))
    key = content_key({"labelling": cfg.labelling_hash(), "sources": cfg.model_dump(mode="json")["sources"]})
    cache = REPO / "runs" / "study" / f"rows-{args.labeller}-{args.partition}-{args.problems}x{args.samples}-{key}"
    if (cache / "rows.parquet").is_file():
        meta = json.loads((cache / "meta.json").read_text())
        log(f"data: {meta['rows']} rows from the cache {cache.name}")
        return pq.read_table(cache / "rows.parquet").to_pylist(), meta
    import torch
    from transformers import AutoTokenizer

    from cluster.hf_engine import HFEngine
    from tasks.cost import total_cost
    from tasks.labelling.labellers import make_labeller

    torch.set_num_threads(args.threads)
    problems = [p for p in generate_problems(cfg.sources[0]) if p.problem_id not in ruler_ids]
    engine = HFEngine(str(REPO / cfg.policy.model_path), dtype="float32", seed=0)
    labeller = make_labeller(cfg, engine, AutoTokenizer.from_pretrained(str(REPO / cfg.policy.model_path)))
    rows, costs, t0 = [], [], time.perf_counter()
    for start in range(0, len(problems), 64):
        result = labeller.label(problems[start:start + 64])
        rows += result.rows
        costs.append(result.cost)
        log(f"data: {min(start + 64, len(problems))}/{len(problems)} problems, {len(rows)} rows")
    meta = {"rows": len(rows), "problems": len(problems), "dropped_ruler_problems": args.problems - len(problems),
            "labeller": args.labeller, "partition": args.partition, "samples": args.samples,
            "labelling_hash": cfg.labelling_hash(), "cost": total_cost(costs).to_dict(),
            "seconds": round(time.perf_counter() - t0, 1)}
    cache.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), cache / "rows.parquet")
    (cache / "meta.json").write_text(json.dumps(meta, indent=1))
    return rows, meta


def heldout_quality(scorer: Any, rows: list[dict[str, Any]]) -> float:
    from tasks.evaluation.metrics import within_position_auroc

    scores = scorer.score([r["prompt"] for r in rows], [r["completions"] for r in rows])
    return within_position_auroc([s.mean for s in scores], [r["labels"] for r in rows])["mean"]


def train_recipe(name: str, overrides: dict[str, Any], rows: list[dict[str, Any]], args: argparse.Namespace,
                 ruler: Any) -> dict[str, Any]:
    import torch

    from configs.schema import TrainConfig
    from tasks.evaluation.ruler import evaluate_ruler
    from tasks.prm.fit import fit
    from tasks.prm.training import is_held_out

    torch.set_num_threads(args.threads)
    import yaml

    policy = yaml.safe_load((REPO / "configs" / WORLDS[args.world][0]).read_text())["policy"]["model_path"]
    train = TrainConfig(**{"model_path": policy, "epochs": args.epochs, "seed": args.seed, **overrides})
    heldout = [r for r in rows if is_held_out(r["problem_id"], 0.1, args.seed)]
    train_rows = [r for r in rows if not is_held_out(r["problem_id"], 0.1, args.seed)]
    best, best_state, history = -1.0, None, []

    def keep_best(record: dict[str, Any], fitted: Any) -> None:
        nonlocal best, best_state
        quality = heldout_quality(fitted, heldout)
        history.append({"epoch": record["epoch"], "train_bce": round(record["train_bce"], 4),
                        "heldout_within_position_auroc": round(quality, 4)})
        log(f"{name} epoch {record['epoch']}: train BCE {history[-1]['train_bce']}, held-out within-position AUROC "
            f"{quality:.3f}")
        if quality > best:
            best, best_state = quality, {k: v.detach().clone() for k, v in fitted.model.state_dict().items()}

    t0 = time.perf_counter()
    scorer = fit(train, train_rows, args.seed, name=name, dataset_version="study", on_epoch=keep_best)
    scorer.model.load_state_dict(best_state)
    train_seconds = time.perf_counter() - t0
    report = evaluate_ruler(scorer, ruler, [1, 8], n_boot=args.n_boot)
    return {"recipe": name, "overrides": overrides, "train": train.model_dump(mode="json"),
            "train_rows": len(train_rows), "heldout_rows": len(heldout), "history": history,
            "best_epoch": max(history, key=lambda h: h["heldout_within_position_auroc"])["epoch"],
            "train_seconds": round(train_seconds, 1),
            "trajectories_per_s": round(len(train_rows) * train.epochs / train_seconds, 1),
            "ruler": ruler_figures(report)}


def plot_ceiling(results: dict[str, Any], recipe: str, png: Path) -> None:
    """Within-position AUROC (95% CI) and best-of-8 of `recipe` on truth labels vs training problems, with the
    free references as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest = {t["setup"]["problems"]: t["ruler"] for t in results["tries"]  # a later try of a size replaces it
              if t["recipe"] == recipe and t["setup"]["labeller"] == "truth" and t["setup"]["partition"] == "newline"
              and t["setup"].get("world", "v1") == "v1"}
    points = sorted(latest.items())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    xs = [p for p, _ in points]
    for ax, key, ci_key, title in ((axes[0], "within_position_auroc", "within_position_auroc_ci",
                                    "within-position AUROC"), (axes[1], "bon8_min_step", "bon8_min_step_ci",
                                                               "best-of-8 (min step)")):
        ys = [r[key] for _, r in points]
        lo = [r[ci_key][0] for _, r in points]
        hi = [r[ci_key][1] for _, r in points]
        ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo, strict=True)],
                                  [b - y for y, b in zip(ys, hi, strict=True)]], marker="o", capsize=3,
                    label=f"{recipe} on exact truth")
        for name, ref in results.get("references", {}).items():
            if "-v2" in name:
                continue
            ax.axhline(ref[key], linestyle="--", color="grey" if "position@" in name else "tab:red",
                       label=name.split("@")[0])
        if key == "bon8_min_step" and points:
            ax.axhline(points[0][1]["bon8_majority"], linestyle=":", color="black", label="majority vote")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training problems (x4 samples)")
        ax.set_title(title + " on the toy ruler")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", choices=sorted(WORLDS), default="v1", help="v2: the policy with misconceptions, "
                    "judged on ruler v2")
    ap.add_argument("--problems", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--problem-seed", type=int, default=4242)
    ap.add_argument("--labeller", choices=["truth", "tree"], default="truth")
    ap.add_argument("--partition", choices=["newline", "edu"], default="newline")
    ap.add_argument("--recipes", default="baseline,tokens,tokens-logprob")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--ruler-problems", type=int, default=128)
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--references", action="store_true", help="also measure position and policy-confidence")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "prm_recipes.json")
    ap.add_argument("--plot", type=Path, help="only plot --out's ceiling curve (truth labels, newline cuts, the "
                    "recipe of --recipes) against the number of training problems into this PNG")
    args = ap.parse_args()
    if args.plot:
        plot_ceiling(json.loads(args.out.read_text()), args.recipes.split(",")[0], args.plot)
        return

    from tasks.evaluation.reference_scorers import reference_scorer
    from tasks.evaluation.ruler import SHIPPED_RULERS, evaluate_ruler, load_ruler

    full = load_ruler(REPO / SHIPPED_RULERS[WORLDS[args.world][1]][0], SHIPPED_RULERS[WORLDS[args.world][1]][1])
    ruler = full.limited(args.ruler_problems)
    rows, meta = labelled_rows(args, full.problem_ids)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"tries": [], "references": {}}
    setup = {"world": args.world, "problems": args.problems, "problem_seed": args.problem_seed,
             "samples": args.samples, "labeller": args.labeller,
             "partition": args.partition, "ruler_problems": args.ruler_problems, "epochs": args.epochs,
             "seed": args.seed, "data": meta}
    if args.references:
        for name in ("position", "policy-confidence"):
            report = evaluate_ruler(reference_scorer(name, ruler), ruler, [1, 8], n_boot=args.n_boot)
            key = f"{name}@ruler{'' if args.world == 'v1' else '-v2-'}{args.ruler_problems}"
            results["references"][key] = ruler_figures(report)
            log(f"reference {name}: {results['references'][key]}")
    for name in args.recipes.split(","):
        entry = {**train_recipe(name, RECIPES[name], rows, args, ruler), "setup": setup,
                 "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        r = entry["ruler"]
        log(f"{name}: within-position AUROC {r['within_position_auroc']:.3f} {r['within_position_auroc_ci']}, "
            f"F1 {r['first_error_f1']}, BoN@8 {r['bon8_min_step']:.3f} vs majority {r['bon8_majority']:.3f} "
            f"(diff CI {r['bon8_min_step_minus_majority_ci']})")
        results["tries"].append(entry)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
