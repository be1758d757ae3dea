"""A PRM checkpoint against the free references, on the toy ruler and on fresh policy samples no one tuned on.

    python benchmarks/bench_toy_prm.py --checkpoint assets/toy-prm --json-out benchmarks/results/toy_prm.json

Two sets, each with exact per-step truth:
- the toy ruler (assets/toy-ruler: 256 problems x 16 samples), where recipes were compared;
- a fresh set (`FRESH`: 200 problems x 8 samples from their own seeds, sampled by the toy policy with the
  transformers engine, built once into runs/fresh-ruler/ and verified by its hashes after), checked disjoint from
  the ruler and from the checkpoint's training problems.

On each, the checkpoint and the references that need no training (constant, position: earlier steps higher,
policy-confidence: the sampling policy's own token probabilities) are scored by the same code as `prm-factory
eval`: within-position AUROC and first-error F1 first, best-of-8 against majority vote with 95% bootstrap
intervals over problems, step AUROC beside them.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

from prm_factory import set_offline_env  # noqa: E402

set_offline_env()

REFERENCES = ("constant", "position", "policy-confidence")


def fresh_spec() -> Any:
    from tasks.evaluation.ruler import TOY_RULER

    return replace(TOY_RULER, version="toy-fresh-v1", num_problems=200, problem_seed=20261202,
                   samples_per_problem=8, sample_seed=8128)


def fresh_ruler(out: Path) -> Any:
    """The fresh set: built once (about a minute on 2 cores), then loaded and verified like the ruler."""
    from tasks.evaluation.ruler import build_ruler, check_disjoint, load_ruler

    spec = fresh_spec()
    if not (out / "manifest.json").is_file():
        import torch

        from cluster.hf_engine import HFEngine

        torch.set_num_threads(1)
        print(f"building the fresh set {spec.version} into {out}", flush=True)
        build_ruler(out, spec, HFEngine(str(REPO / spec.policy_path), dtype="float32", seed=spec.sample_seed))
    fresh = load_ruler(out, spec)
    check_disjoint(fresh, load_ruler().problem_ids, "the toy ruler")
    return fresh


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--fresh-dir", type=Path, default=REPO / "runs" / "fresh-ruler")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    from tasks.evaluation.reference_scorers import reference_scorer
    from tasks.evaluation.ruler import check_disjoint, evaluate_ruler, load_ruler
    from tasks.evaluation.summary import ruler_figures
    from tasks.prm.model import load_prm, training_problem_ids

    sets = {"ruler": load_ruler(), "fresh": fresh_ruler(args.fresh_dir)}
    trained_on, what = training_problem_ids(args.checkpoint)
    if trained_on is None:
        raise SystemExit(f"{what}: cannot check that the sets are held out from it")
    prm = load_prm(args.checkpoint)
    out: dict[str, Any] = {"checkpoint": str(args.checkpoint), "prm_config_hash": prm.config["config_hash"],
                           "dataset_version": prm.config.get("dataset_version"), "sets": {}}
    for set_name, ruler in sets.items():
        check_disjoint(ruler, trained_on, what)
        rows = {}
        for name in ("checkpoint", *REFERENCES):
            t0 = time.perf_counter()
            scorer = prm if name == "checkpoint" else reference_scorer(name, ruler)
            rows[name] = {**ruler_figures(evaluate_ruler(scorer, ruler, [1, 8], n_boot=args.n_boot)),
                          "seconds": round(time.perf_counter() - t0, 1)}
            r = rows[name]
            print(f"{set_name:6s} {name:18s} within-position AUROC {r['within_position_auroc']:.3f} "
                  f"{[round(x, 3) for x in r['within_position_auroc_ci']]}  F1 {r['first_error_f1']:.3f}  "
                  f"BoN@8 {r['bon8_min_step']:.3f} (majority {r['bon8_majority']:.3f}, diff CI "
                  f"{[round(x, 3) for x in r['bon8_min_step_minus_majority_ci']]})  step AUROC {r['step_auroc']:.3f}",
                  flush=True)
        m = ruler.manifest
        out["sets"][set_name] = {"version": m["ruler_version"], "problems": m["problems"],
                                 "trajectories": m["trajectories"], "content_hash": m["content_hash"], "rows": rows}
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
