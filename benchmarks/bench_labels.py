"""Label quality per generated token on the toy world, measured against the exact step truth.

One run, one engine, side by side:
- Math-Shepherd-style baseline (newline steps, N fresh rollouts per step) for N in {4, 8, 16};
- EDU-PRM trees (entropy anchors, top-1/top-2 branching; value of a prefix = leaves under it, optionally
  topped up to N) for a sweep of tau;
- ER-PRM labels for eta in {0.1, 1, 2, 5, 10} from the stored counts (no new rollouts);
- the cost controls: early stop for hard labels, OmegaPRM binary search, prefix caching on vs off.

Truth of a step = `tasks.toy_world.prefix_is_correct(problem, text up to the end of the step)`; the last
step (final-answer correctness, exact by construction) is left out of every figure.

    python benchmarks/bench_labels.py --problems 48 --seed 4242 --json-out benchmarks/results/labels.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prm_factory import set_offline_env  # noqa: E402 - needs the repo on sys.path first

set_offline_env()

ETAS = (0.1, 1.0, 2.0, 5.0, 10.0)


def base_config(args, **sections) -> dict:
    cfg = {
        "name": "bench-labels",
        "seed": args.seed,
        "sources": [{"kind": "toy", "num_problems": args.problems, "seed": args.seed, "min_steps": 2,
                     "max_steps": 6}],
        "policy": {"model_path": "assets/toy-policy", "backend": args.engine, "max_model_len": 256},
        "partition": {"method": "newline",
                      "entropy_source": "exact" if args.engine == "transformers" else "topk_lower"},
        "tree": {"enabled": False},
        "rollouts": {"n": 8, "temperature": 1.0, "max_new_tokens": 96},
        "labels": {"eta": 1.0},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def quality(rows, problems_by_id) -> dict:
    """Accuracy/AUROC/Brier of hard, soft and ER labels of every non-final step against the prefix truth."""
    import numpy as np

    from tasks.labels import er_label
    from tasks.metrics import accuracy, auroc, brier
    from tasks.toy_world import prefix_is_correct

    truth, hard, soft, ks, ns, estimated = [], [], [], [], [], []
    for row in rows:
        problem = problems_by_id[row["problem_id"]]
        prefix = ""
        for i, step in enumerate(row["completions"][:-1]):
            prefix += step
            truth.append(prefix_is_correct(problem, prefix))
            hard.append(float(row["labels"][i]))
            soft.append(row["soft_labels"][i])
            ks.append(row["successes"][i])
            ns.append(row["rollouts"][i])
            estimated.append(row["step_origin"][i] == "estimated")
    truth_arr = np.array(truth, dtype=bool)
    out = {"steps": len(truth), "truth_positive": float(truth_arr.mean()) if truth else float("nan"),
           "hard_acc": accuracy(hard, truth), "soft_acc": accuracy(soft, truth), "soft_auroc": auroc(soft, truth),
           "soft_brier": brier(soft, truth)}
    est = np.array(estimated, dtype=bool)
    for eta in ETAS:
        k, n = np.array(ks), np.array(ns)
        er = np.array(hard, dtype=float)  # estimated steps keep their rule label
        live = ~est & (n > 0)
        er[live] = er_label(k[live], n[live], eta)
        out[f"er{eta:g}_acc"] = accuracy(er, truth)
        out[f"er{eta:g}_auroc"] = auroc(er, truth)
        out[f"er{eta:g}_brier"] = brier(er, truth)
    return out


def run(label, cfg_dict, engine, tok, problems, by_id, results):
    from configs.schema import parse_config
    from tasks.labelling import ShardLabeller

    cfg = parse_config(cfg_dict)
    t0 = time.perf_counter()
    res = ShardLabeller(cfg, engine, tok).label(problems)
    wall = time.perf_counter() - t0
    q = quality(res.rows, by_id)
    entry = {"label": label, "wall_s": round(wall, 2), **res.cost.to_dict(), **q,
             "rows": len(res.rows), "tokens_per_step": res.cost.generated_tokens / max(1, q["steps"]),
             "rows_data": res.rows}
    results.append(entry)
    print(f"  {label:<34} tokens {res.cost.generated_tokens:>8,}  steps {q['steps']:>5}  "
          f"hard acc {q['hard_acc']:.3f}  soft AUROC {q['soft_auroc']:.3f}  ({wall:.0f}s)", flush=True)
    return entry


def matched_ratio(edu: dict, baselines: list[dict], metric: str = "hard_acc") -> tuple[dict | None, float | None]:
    """The cheapest baseline whose `metric` is at least the EDU run's, and its token ratio to the EDU run."""
    if not edu[metric] == edu[metric]:  # NaN: nothing labelled to compare
        return None, None
    good = [b for b in baselines if b[metric] >= edu[metric]]
    if not good:
        return None, None
    best = min(good, key=lambda b: b["generated_tokens"])
    return best, best["generated_tokens"] / max(1, edu["generated_tokens"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=48)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--engine", choices=["vllm", "transformers"], default="vllm")
    ap.add_argument("--taus", default="0.5,1.0,1.5,2.0")
    ap.add_argument("--ns", default="4,8,16")
    ap.add_argument("--skip-caching", action="store_true", help="skip the prefix caching on/off engines")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from cluster.actors import make_engine
    from configs.schema import ToySource, parse_config
    from tasks.toy_world import generate_problems

    problems = generate_problems(ToySource(num_problems=args.problems, seed=args.seed, min_steps=2, max_steps=6))
    by_id = {p.problem_id: p for p in problems}
    cfg0 = parse_config(base_config(args))
    tok = AutoTokenizer.from_pretrained(str(REPO / "assets" / "toy-policy"))
    t0 = time.perf_counter()
    engine = make_engine(cfg0.policy)
    print(f"engine {args.engine} up in {time.perf_counter() - t0:.0f}s; {len(problems)} problems, seed {args.seed}")
    results: list[dict] = []

    print("Math-Shepherd baseline (newline steps, N rollouts per step):")
    ns = [int(x) for x in args.ns.split(",")]
    baselines = [run(f"newline N={n}", base_config(args, rollouts={"n": n}), engine, tok, problems, by_id, results)
                 for n in ns]

    print("EDU trees (entropy anchors, branch width 2, depth 3):")
    edus = []
    for tau in [float(x) for x in args.taus.split(",")]:
        for top_up in (1, 4):
            edus.append(run(f"edu tau={tau:g} N={top_up}", base_config(
                args, partition={"method": "edu", "tau": tau, "min_step_tokens": 3, "max_anchors": 6},
                tree={"enabled": True, "branch_width": 2, "max_depth": 3, "max_leaves": 16},
                rollouts={"n": top_up}), engine, tok, problems, by_id, results))

    print("Cost controls (newline steps, N=8):")
    controls = [run("newline N=8 early-stop", base_config(args, rollouts={"n": 8, "early_stop_hard": True}),
                    engine, tok, problems, by_id, results),
                run("newline N=8 binary-search", base_config(args, rollouts={"n": 8, "binary_search": True}),
                    engine, tok, problems, by_id, results)]

    caching = {}
    if args.engine == "vllm" and not args.skip_caching:
        # Same rollouts, engine with and without prefix caching: tokens are equal, wall time is the saving.
        del engine
        for on in (True, False):
            cfg = parse_config(base_config(args, rollouts={"n": 16}))
            cfg = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"prefix_caching": on})})
            eng = make_engine(cfg.policy)
            entry = run(f"newline N=16 prefix caching {'on' if on else 'off'}", cfg.model_dump(mode="json"), eng,
                        tok, problems, by_id, results)
            caching["on" if on else "off"] = entry
            del eng

    print_report(baselines, edus, controls, caching)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        slim = [{k: v for k, v in r.items() if k != "rows_data"} for r in results]
        args.json_out.write_text(json.dumps({"args": vars(args) | {"json_out": str(args.json_out)},
                                             "results": slim}, indent=2, default=str))


def print_report(baselines, edus, controls, caching) -> None:
    print("\n## Label quality vs exact truth (non-final steps)")
    print("| run | generated tokens | labelled steps | tokens/step | truth positive | hard acc | soft AUROC | "
          "soft Brier |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in baselines + edus + controls:
        print(f"| {r['label']} | {r['generated_tokens']:,} | {r['steps']} | {r['tokens_per_step']:.1f} | "
              f"{r['truth_positive']:.3f} | {r['hard_acc']:.3f} | {r['soft_auroc']:.3f} | {r['soft_brier']:.3f} |")
    print("\n## ER-PRM labels by eta (accuracy at 0.5 / AUROC / Brier)")
    print("| run | soft | " + " | ".join(f"eta={e:g}" for e in ETAS) + " | hard |")
    print("|---|---|" + "---|" * len(ETAS) + "---|")
    for r in baselines + edus:
        cells = " | ".join(f"{r[f'er{e:g}_acc']:.3f} / {r[f'er{e:g}_auroc']:.3f} / {r[f'er{e:g}_brier']:.3f}"
                           for e in ETAS)
        print(f"| {r['label']} | {r['soft_acc']:.3f} / {r['soft_auroc']:.3f} / {r['soft_brier']:.3f} | {cells} | "
              f"{r['hard_acc']:.3f} |")
    print("\n## EDU vs baseline at matched quality (cheapest baseline at least as good; token ratio baseline/EDU)")
    print("| EDU run | tokens | hard acc | baseline (hard acc) | ratio | soft AUROC | baseline (AUROC) | ratio | "
          "tokens/step ratio |")
    print("|---|---:|---:|---|---:|---:|---|---:|---:|")
    for e in edus:
        cells = []
        for metric in ("hard_acc", "soft_auroc"):
            best, ratio = matched_ratio(e, baselines, metric)
            cells.append(f"{e[metric]:.3f} | " + (f"{best['label']} ({best[metric]:.3f}) | {ratio:.1f}x"
                                                   if best else "none reaches it | -"))
        per_step = min(b["tokens_per_step"] for b in baselines) / max(1e-9, e["tokens_per_step"])
        print(f"| {e['label']} | {e['generated_tokens']:,} | {cells[0]} | {cells[1]} | {per_step:.1f}x |")
    base8 = next((b for b in baselines if b["label"] == "newline N=8"), None)
    if base8:
        print("\n## Cost controls (vs newline N=8)")
        print("| control | rollout tokens | saving | hard acc |")
        print("|---|---:|---:|---:|")
        for c in [base8] + controls:
            saving = 1 - c["rollout_tokens"] / max(1, base8["rollout_tokens"])
            print(f"| {c['label']} | {c['rollout_tokens']:,} | {saving:.1%} | {c['hard_acc']:.3f} |")
    if caching:
        on, off = caching["on"], caching["off"]
        print(f"\nprefix caching: on {on['wall_s']:.1f}s vs off {off['wall_s']:.1f}s for the same "
              f"{on['generated_tokens']:,} generated tokens: {off['wall_s'] / max(1e-9, on['wall_s']):.2f}x faster; "
              f"cached prompt tokens {on['cached_prompt_tokens']:,} of {on['prompt_tokens']:,}")


if __name__ == "__main__":
    main()
