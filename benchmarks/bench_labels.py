"""Label quality per generated token on the toy world, measured against the exact step truth.

One run, one engine, side by side:
- Math-Shepherd-style baseline (newline steps, N policy samples per step) for N in {4, 8, 16};
- EDU-PRM trees (entropy anchors; at each anchor the sampled token plus the best other token) for the same
  N (the one leaf sampled from a prefix plus fresh rollouts up to N) and a sweep of tau at the smallest N;
- ER-PRM labels for eta in {0.1, 1, 2, 5, 10} from the stored counts (no new rollouts);
- the tree's own estimate (`tree_value`): its bias against the prefix's N-sample soft label, and its
  quality against the truth;
- the cost controls: early stop for hard labels, OmegaPRM binary search, prefix caching on vs off;
- which rank the sampled token has at the anchors (where "sampled + best other" and top-1/top-2 differ).

Every labeller is scored on the same footing: hard accuracy on every non-final step; soft and ER metrics
only on steps whose soft label exists (N policy samples from the prefix); early-stop and rule-estimated
steps have no soft label (null) and are counted separately. Truth of a step =
`tasks.sources.toy_world.prefix_is_correct(problem, text up to the end of the step)`. The last step's label is an
outcome check (final answer right), not the step truth (a solution can reach the right answer through a
wrong line), so it is left out of every figure.

    python benchmarks/bench_labels.py --problems 32 --seed 4242 --taus 0.2,0.3,0.5 --skip-caching \
        --json-out benchmarks/results/labels.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from prm_factory import set_offline_env  # noqa: E402 - before anything reads the environment

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
    """Hard, soft, ER and tree-value metrics of every non-final step against the prefix truth.

    Hard accuracy covers every step; soft/ER/tree metrics only the steps with a soft label (N samples from
    the prefix); steps without one (early stop, binary-search rule) are counted in `unsampled_steps`.
    """
    import numpy as np

    from tasks.evaluation.metrics import accuracy, auroc, brier
    from tasks.labelling.label_rule import er_label
    from tasks.sources.toy_world import prefix_is_correct

    truth, hard, soft, ks, ns, tree = [], [], [], [], [], []
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
            tree.append(row["tree_value"][i])
    truth_arr = np.array(truth, dtype=bool)
    sampled = np.array([s is not None for s in soft], dtype=bool)
    t_s = truth_arr[sampled]
    soft_s = np.array([s for s in soft if s is not None], dtype=float)
    out = {"steps": len(truth), "soft_steps": int(sampled.sum()), "unsampled_steps": int((~sampled).sum()),
           "truth_positive": float(truth_arr.mean()) if truth else float("nan"),
           "hard_acc": accuracy(hard, truth),
           "hard_acc_unsampled": accuracy(np.array(hard)[~sampled], truth_arr[~sampled]) if (~sampled).any()
           else float("nan")}
    if sampled.any():
        tree_s = np.array(tree, dtype=float)[sampled]
        diff = tree_s - soft_s
        out |= {"soft_acc": accuracy(soft_s, t_s), "soft_auroc": auroc(soft_s, t_s), "soft_brier": brier(soft_s, t_s),
                "mean_soft_true_steps": float(soft_s[t_s].mean()) if t_s.any() else float("nan"),
                "tree_acc": accuracy(tree_s, t_s), "tree_auroc": auroc(tree_s, t_s), "tree_brier": brier(tree_s, t_s),
                # soft is an unbiased sample of the prefix's success rate, so mean(tree - soft) estimates the
                # tree estimate's bias; its standard error from the spread of the differences.
                "tree_bias": float(diff.mean()), "tree_bias_se": float(diff.std(ddof=1) / np.sqrt(len(diff)))
                if len(diff) > 1 else float("nan"),
                "tree_mean_abs_diff": float(np.abs(diff).mean())}
    else:
        out |= {k: float("nan") for k in ("soft_acc", "soft_auroc", "soft_brier", "mean_soft_true_steps", "tree_acc",
                                          "tree_auroc", "tree_brier", "tree_bias", "tree_bias_se",
                                          "tree_mean_abs_diff")}
    k, n = np.array(ks)[sampled], np.array(ns)[sampled]
    for eta in ETAS:
        er = er_label(k, n, eta) if sampled.any() else np.array([])
        out[f"er{eta:g}_acc"] = accuracy(er, t_s) if sampled.any() else float("nan")
        out[f"er{eta:g}_auroc"] = auroc(er, t_s) if sampled.any() else float("nan")
        out[f"er{eta:g}_brier"] = brier(er, t_s) if sampled.any() else float("nan")
    return out


def anchor_ranks(labeller, trees) -> dict:
    """Rank (1 = most probable) of the sampled token at every anchor where a leaf sampled it.

    With branch width 2, "sampled + best other" and "top-1 + top-2" try the same pair whenever the sampled
    token has rank 1 or 2; they differ only at rank >= 3, where top-1/top-2 needs two branches and drops
    the sampled path (the one policy sample from the prefix).
    """
    counts = {"rank1": 0, "rank2": 0, "rank3+": 0}
    for leaves in trees.values():
        for leaf in leaves:
            for a in labeller.boundaries(leaf)[1:]:
                if a < leaf.branch_at:
                    continue  # the parent's token there, counted on the parent
                order = [tid for tid, _ in leaf.top_alternatives[a]]
                tok = leaf.token_ids[a]
                rank = order.index(tok) + 1 if tok in order else len(order) + 1
                counts["rank1" if rank == 1 else "rank2" if rank == 2 else "rank3+"] += 1
    return counts


def run(label, cfg_dict, engine, tok, problems, by_id, results):
    from configs.schema import parse_config
    from tasks.cost import ShardCost
    from tasks.labelling.tree_labeller import ShardLabeller

    cfg = parse_config(cfg_dict)
    t0 = time.perf_counter()
    labeller = ShardLabeller(cfg, engine, tok)
    cost = ShardCost()
    prompts, trees = labeller.grow_trees(problems, cost)
    ranks = anchor_ranks(labeller, trees) if labeller.branching else None
    res = labeller._label_rows(problems, prompts, trees, cost)
    wall = time.perf_counter() - t0
    q = quality(res.rows, by_id)
    entry = {"label": label, "wall_s": round(wall, 2), **res.cost.to_dict(), **q,
             "rows": len(res.rows), "tokens_per_step": res.cost.generated_tokens / max(1, q["steps"]),
             "anchor_ranks": ranks, "rows_data": res.rows}
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
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--engine", choices=["vllm", "transformers"], default="vllm")
    ap.add_argument("--taus", default="0.2,0.3,0.5", help="tau sweep for EDU at the smallest N")
    ap.add_argument("--tau", type=float, default=0.2, help="EDU tau for the N sweep (configs/toy.yaml)")
    ap.add_argument("--ns", default="4,8,16")
    ap.add_argument("--skip-caching", action="store_true", help="skip the prefix caching on/off engines")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from cluster.engines import start_policy_engines
    from configs.schema import ToySource, parse_config
    from tasks.sources.toy_world import generate_problems

    problems = generate_problems(ToySource(num_problems=args.problems, seed=args.seed, min_steps=2, max_steps=6))
    by_id = {p.problem_id: p for p in problems}
    cfg0 = parse_config(base_config(args))
    tok = AutoTokenizer.from_pretrained(str(REPO / "assets" / "toy-policy"))
    t0 = time.perf_counter()
    engine = start_policy_engines(cfg0, local=True)
    print(f"engine {args.engine} up in {time.perf_counter() - t0:.0f}s; {len(problems)} problems, seed {args.seed}")
    results: list[dict] = []

    print("Math-Shepherd baseline (newline steps, N rollouts per step):")
    ns = [int(x) for x in args.ns.split(",")]
    baselines = [run(f"newline N={n}", base_config(args, rollouts={"n": n}), engine, tok, problems, by_id, results)
                 for n in ns]

    print("EDU trees (entropy anchors, sampled token + best other, width 2, depth 3):")

    def edu(tau: float, n: int) -> dict:
        return run(f"edu tau={tau:g} N={n}", base_config(
            args, partition={"method": "edu", "tau": tau, "min_step_tokens": 3, "max_anchors": 6},
            tree={"enabled": True, "branch_width": 2, "max_depth": 3, "max_leaves": 16},
            rollouts={"n": n}), engine, tok, problems, by_id, results)

    edus = [edu(args.tau, n) for n in ns]
    edus += [edu(tau, ns[0]) for tau in [float(x) for x in args.taus.split(",")] if tau != args.tau]

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
            eng = start_policy_engines(cfg, local=True)
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


def _f(x: float, fmt: str = ".3f") -> str:
    return "nan" if x != x else format(x, fmt)


def print_report(baselines, edus, controls, caching) -> None:
    print("\n## Label quality vs exact truth (non-final steps)")
    print("| run | generated tokens | steps | tokens/step | truth positive | hard acc | soft steps | soft acc | "
          "soft AUROC | soft Brier | mean soft on true steps | no soft label (hard acc) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in baselines + edus + controls:
        unsampled = (f"{r['unsampled_steps']} ({_f(r['hard_acc_unsampled'])})" if r["unsampled_steps"] else "0")
        print(f"| {r['label']} | {r['generated_tokens']:,} | {r['steps']} | {r['tokens_per_step']:.1f} | "
              f"{_f(r['truth_positive'])} | {_f(r['hard_acc'])} | {r['soft_steps']} | {_f(r['soft_acc'])} | "
              f"{_f(r['soft_auroc'])} | {_f(r['soft_brier'])} | {_f(r['mean_soft_true_steps'])} | {unsampled} |")
    print("\n## ER-PRM labels by eta, steps with a soft label (accuracy at 0.5 / AUROC / Brier)")
    print("| run | soft | " + " | ".join(f"eta={e:g}" for e in ETAS) + " |")
    print("|---|---|" + "---|" * len(ETAS))
    for r in baselines + edus:
        cells = " | ".join(f"{_f(r[f'er{e:g}_acc'])} / {_f(r[f'er{e:g}_auroc'])} / {_f(r[f'er{e:g}_brier'])}"
                           for e in ETAS)
        print(f"| {r['label']} | {_f(r['soft_acc'])} / {_f(r['soft_auroc'])} / {_f(r['soft_brier'])} | {cells} |")
    print("\n## Tree value estimate (tree_value) vs the N-sample soft label and vs the truth")
    print("| run | steps | bias (mean tree - soft) ± SE | mean abs diff | tree acc | tree AUROC | tree Brier | "
          "soft AUROC | soft Brier |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in edus:
        print(f"| {r['label']} | {r['soft_steps']} | {r['tree_bias']:+.3f} ± {_f(r['tree_bias_se'])} | "
              f"{_f(r['tree_mean_abs_diff'])} | {_f(r['tree_acc'])} | {_f(r['tree_auroc'])} | {_f(r['tree_brier'])} | "
              f"{_f(r['soft_auroc'])} | {_f(r['soft_brier'])} |")
    print("\n## Rank of the sampled token at EDU anchors (where sampled+best-other and top-1/top-2 differ: rank 3+)")
    print("| run | rank 1 | rank 2 | rank 3+ |")
    print("|---|---:|---:|---:|")
    for r in edus:
        c = r["anchor_ranks"] or {}
        total = max(1, sum(c.values()))
        print(f"| {r['label']} | " + " | ".join(f"{c.get(k, 0)} ({c.get(k, 0) / total:.1%})"
                                                  for k in ("rank1", "rank2", "rank3+")) + " |")
    print("\n## EDU vs baseline at matched quality (cheapest baseline at least as good; token ratio baseline/EDU)")
    print("| EDU run | tokens | hard acc | baseline (hard acc) | ratio | soft AUROC | baseline (AUROC) | ratio | "
          "tokens/step ratio |")
    print("|---|---:|---:|---|---:|---:|---|---:|---:|")
    for e in edus:
        cells = []
        for metric in ("hard_acc", "soft_auroc"):
            best, ratio = matched_ratio(e, baselines, metric)
            cells.append(f"{_f(e[metric])} | " + (f"{best['label']} ({best[metric]:.3f}) | {ratio:.1f}x"
                                                   if best else "none reaches it | -"))
        per_step = min(b["tokens_per_step"] for b in baselines) / max(1e-9, e["tokens_per_step"])
        print(f"| {e['label']} | {e['generated_tokens']:,} | {cells[0]} | {cells[1]} | {per_step:.1f}x |")
    base8 = next((b for b in baselines if b["label"] == "newline N=8"), None)
    if base8:
        print("\n## Cost controls (vs newline N=8)")
        print("| control | rollout tokens | saving | hard acc | steps without soft label |")
        print("|---|---:|---:|---:|---:|")
        for c in [base8] + controls:
            saving = 1 - c["rollout_tokens"] / max(1, base8["rollout_tokens"])
            print(f"| {c['label']} | {c['rollout_tokens']:,} | {saving:.1%} | {_f(c['hard_acc'])} | "
                  f"{c['unsampled_steps']} of {c['steps']} |")
    if caching:
        on, off = caching["on"], caching["off"]
        print(f"\nprefix caching: on {on['wall_s']:.1f}s vs off {off['wall_s']:.1f}s for the same "
              f"{on['generated_tokens']:,} generated tokens: {off['wall_s'] / max(1e-9, on['wall_s']):.2f}x faster; "
              f"cached prompt tokens {on['cached_prompt_tokens']:,} of {on['prompt_tokens']:,}")


if __name__ == "__main__":
    main()
