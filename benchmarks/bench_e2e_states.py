"""What caching the frozen backbone's token states saves in bench_e2e's PRM training, side by side in one run.

bench_e2e trains every point with the recipe of ``configs/toy-e2e.yaml`` (frozen backbone, token features). The
backbone's states then depend on the text alone, so ``tasks.prm.fit.fit`` with a ``states_cache`` computes them once
per row (``tasks.prm.training.row_states``) and the epochs train only the heads. This script trains the same rows,
same seed, both ways, one after the other, and reports the seconds and the ruler figures of each: the figures should
agree within float noise (the batches' padding differs, so the sums are taken in another order), the time should not.

    python -m benchmarks.bench_e2e_states --dataset runs/bench-e2e-cache/datasets/e2e-v2-edu-s0-... \
        --json-out benchmarks/results/e2e_states.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True, help="a labelled dataset (a bench_e2e build)")
    ap.add_argument("--world", default="v2", help="the world whose policy is the backbone and whose ruler judges")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--ruler-problems", type=int, default=128)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    import torch
    import yaml

    from benchmarks.lib import WORLDS, read_shards
    from configs.schema import TrainConfig
    from tasks.evaluation.ruler import SHIPPED_RULERS, evaluate_ruler, load_ruler
    from tasks.evaluation.summary import ruler_figures
    from tasks.prm.fit import fit

    torch.set_num_threads(2)
    rows = [r for shard, _ in read_shards(args.dataset) for r in shard]
    ruler = load_ruler(*SHIPPED_RULERS[WORLDS[args.world][1]]).limited(args.ruler_problems)
    base = yaml.safe_load((REPO / "configs" / "toy-e2e.yaml").read_text())
    train = TrainConfig(**{**base["train"], "model_path": WORLDS[args.world][0], "epochs": args.epochs,
                           "keep": "last"})
    result = {"dataset": str(args.dataset), "rows": len(rows), "world": args.world, "epochs": args.epochs,
              "seed": args.seed, "ruler_problems": args.ruler_problems, "runs": {}}
    for cached in (False, True):
        t0 = time.perf_counter()
        fitted = fit(train, rows, args.seed, name="states" if cached else "backbone", dataset_version="bench-e2e",
                     states_cache={} if cached else None)
        seconds = time.perf_counter() - t0
        fig = ruler_figures(evaluate_ruler(fitted, ruler, [1, 8], n_boot=args.n_boot))
        name = "states cached" if cached else "backbone every step"
        result["runs"][name] = {"train_seconds": round(seconds, 1), **fig}
        print(f"{name:20s} train {seconds:6.1f}s  within-position AUROC {fig['within_position_auroc']:.4f}  "
              f"F1 {fig['first_error_f1']:.4f}  BoN@8 {fig['bon8_min_step']:.4f}", flush=True)
    a, b = result["runs"]["backbone every step"], result["runs"]["states cached"]
    result["speedup"] = round(a["train_seconds"] / b["train_seconds"], 2)
    result["within_position_auroc_diff"] = b["within_position_auroc"] - a["within_position_auroc"]
    result["machine"] = "2-core CPU"
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    diff = result["within_position_auroc_diff"]
    print(f"speedup {result['speedup']}x; within-position AUROC, cached minus not: {diff:+.2e}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
