"""Evaluation figures on the toy ruler: step AUROC/accuracy and best-of-N accuracy vs N per selector.

Scorers: the two reference scorers (oracle = exact toy truth, constant = 0.5), which bound what any PRM can
reach on the ruler, and any trained PRM checkpoints given with --checkpoint (needs tasks.prm.model). With
--processbench DIR and a checkpoint, ProcessBench F1 per subset at --limit. With --smollm2-smoke, also
times the real-language smoke: preparing SmolLM2-135M from its GGUF and the 4-problem GSM8K build on vLLM.

    python benchmarks/bench_eval.py --json-out benchmarks/results/eval.json [--smollm2-smoke]
        [--checkpoint runs/prm/toy ...] [--processbench ../shared/data/processbench --limit 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from prm_factory import set_offline_env  # noqa: E402 - before anything reads the environment

set_offline_env()


def ruler_rows(scorer, name: str, ruler, ns: list[int]) -> dict:
    from tasks.evaluation.ruler import evaluate_ruler

    t0 = time.time()
    report = evaluate_ruler(scorer, ruler, ns)
    return {"scorer": name, **report, "seconds": round(time.time() - t0, 2)}


def smollm2_smoke() -> dict:
    """Prepare SmolLM2 (timed; a cached copy counts as such) and run the 4-problem build through the CLI."""
    from configs.schema import load_config, resolve_path
    from tasks.smollm2 import prepare_smollm2

    config = REPO / "configs" / "gsm8k-smollm2-smoke.yaml"
    target = resolve_path(load_config(config, check_paths=False).policy.model_path)
    was_there = (target / "prm_factory_prepared.json").is_file()
    t0 = time.time()
    prepare_smollm2(target)
    prepare_s = time.time() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        res = subprocess.run([sys.executable, "-m", "prm_factory.cli", "build", "--config", str(config), "--out",
                              f"{tmp}/ds", "--local", "--json"], capture_output=True, text=True, cwd=REPO)
        build_s = time.time() - t0
        if res.returncode != 0:
            return {"ok": False, "stderr_tail": res.stderr[-2000:]}
        # vLLM logs to stdout too (its shutdown lines come after ours): the summary is the last JSON line.
        summary = json.loads(next(line for line in reversed(res.stdout.splitlines()) if line.startswith("{")))
    return {"ok": True, "prepare_seconds": round(prepare_s, 1), "prepared_before": was_there,
            "build_seconds": round(build_s, 1), "rows": summary["rows"], "cost": summary["cost"],
            "backend": "vllm (in-process, --local)"}


def _load_prm(checkpoint: str):
    from tasks.prm.model import load_prm  # issue 13's trainer module; imported only when a checkpoint is given

    return load_prm(checkpoint)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ruler", default="assets/toy-ruler")
    ap.add_argument("--bon", default="1,2,4,8,16")
    ap.add_argument("--checkpoint", action="append", default=[], help="a PRM run directory (repeatable)")
    ap.add_argument("--processbench", default=None, help="ProcessBench directory (with --checkpoint)")
    ap.add_argument("--limit", type=int, default=20, help="ProcessBench samples per subset")
    ap.add_argument("--smollm2-smoke", action="store_true")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    from tasks.evaluation.reference_scorers import ConstantScorer, OracleScorer
    from tasks.evaluation.ruler import load_ruler

    ns = [int(x) for x in args.bon.split(",")]
    ruler = load_ruler(args.ruler)
    results: dict = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "ruler": {k: ruler.manifest[k] for k in ("ruler_version", "spec_hash", "content_hash", "problems",
                                                 "trajectories", "steps", "correct_steps", "final_correct")},
        "scorers": [ruler_rows(OracleScorer(), "oracle", ruler, ns), ruler_rows(ConstantScorer(), "constant", ruler,
                                                                                ns)],
    }
    if args.checkpoint:
        from tasks.evaluation.processbench import evaluate_processbench

        for ckpt in args.checkpoint:
            t0 = time.time()
            prm = _load_prm(ckpt)
            row = ruler_rows(prm, ckpt, ruler, ns)
            if args.processbench:
                row["processbench"] = evaluate_processbench(prm, args.processbench, limit=args.limit,
                                                            format_prompt=prm.format_prompt)
            row["seconds"] = round(time.time() - t0, 1)
            results["scorers"].append(row)
    else:
        results["prm"] = ("no checkpoint given: the PRM rows are in benchmarks/results/prm_eval.json "
                          "(benchmarks/bench_prm.py)")
    if args.smollm2_smoke:
        results["smollm2_smoke"] = smollm2_smoke()

    for row in results["scorers"]:
        st = row["steps"]
        print(f"{row['scorer']}: step AUROC {st['step_auroc']}, accuracy {st['step_accuracy']:.4f}", file=sys.stderr)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, indent=1) + "\n")
    else:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
