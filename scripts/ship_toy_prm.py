"""Copy a trained toy PRM run into assets/toy-prm and write the figures its test checks (expected.json).

    python scripts/ship_toy_prm.py --run runs/toy-prm/prm-1024 --out assets/toy-prm

Kept from RUN/model: the weights, prm_config.json, train_state.json, training_problems.json and the backbone's
config and tokenizer (the backbone's weights are the toy policy's, named in prm_config.json). Left out: the
optimizer state and the held-out scores (not needed to score, and megabytes). OUT/README.md is kept as it is.

expected.json: the shipped PRM's figures on the ruler's first `--ruler-problems` problems, measured here by the
same code as `prm-factory eval`; tests/tasks/prm/test_toy_prm.py checks the asset still gives them and that the
README states them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

KEEP = ("model.safetensors", "prm_config.json", "train_state.json", "training_problems.json")
KEEP_BACKBONE = ("config.json", "tokenizer.json", "tokenizer_config.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a `prm-factory train` run dir (its model/ is copied)")
    ap.add_argument("--out", type=Path, default=REPO / "assets" / "toy-prm")
    ap.add_argument("--ruler-problems", type=int, default=16)
    ap.add_argument("--n-boot", type=int, default=100)
    args = ap.parse_args()

    from tasks.evaluation.ruler import evaluate_ruler, load_ruler
    from tasks.prm.model import load_prm

    model = args.run / "model"
    missing = [name for name in KEEP if not (model / name).is_file()]
    if missing:
        sys.exit(f"{model} is not a finished run's model: missing {', '.join(missing)}")
    (args.out / "backbone").mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        shutil.copy2(model / name, args.out / name)
    for name in KEEP_BACKBONE:
        if (model / "backbone" / name).is_file():
            shutil.copy2(model / "backbone" / name, args.out / "backbone" / name)

    report = evaluate_ruler(load_prm(args.out), load_ruler().limited(args.ruler_problems), [8], n_boot=args.n_boot)
    steps = report["steps"]
    expected = {"ruler_problems": args.ruler_problems, "n_boot": args.n_boot,
                "within_position_auroc": steps["within_position_auroc"], "first_error_f1": steps["first_error_f1"],
                "step_auroc": steps["step_auroc"], "bon8_min_step": report["best_of_n"]["accuracy"]["min_step"][0]}
    (args.out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(json.dumps(expected, indent=1))


if __name__ == "__main__":
    main()
