"""The GPU smoke: build, train, export and serve on one GPU, one JSON of figures at the end.

    bash scripts/gpu-smoke.sh [--gsm8k PATH] [--out DIR] [--results benchmarks/results/gpu.json]
    bash scripts/gpu-smoke.sh --dry-run        # CPU: the configs validate and the backbone maps onto Qwen2

Stages, each a `prm-factory` command in a subprocess, timed: prepare SmolLM2-135M-Instruct (scripts/
prepare_smollm2.py), `build` (CUDA vLLM in Ray actors), `train` (Ray Train, one GPU worker, NCCL, FSDP2 with
bf16-mixed precision: float32 master weights, bf16 compute; its per-worker state and peak GPU memory), `export`
(`--format qwen2-prm`: the Qwen2ForProcessRewardModel directory), `score --engine vllm` (CUDA vLLM pooling) on the
dataset's rows, and `score` (transformers) on the same rows for parity, then the trained checkpoint itself both
ways (the whole ensemble as the package's vLLM plugin model in CUDA vLLM; against transformers). The figures are
written to --results only when every stage ran on a GPU; a failed stage prints its command and the tail of its
output and exits 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "gpu-smoke.yaml"


def run(stage: str, cmd: list[str], figures: dict) -> str:
    print(f"[gpu-smoke] {stage}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    figures.setdefault("seconds", {})[stage] = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        print(f"[gpu-smoke] {stage} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}",
              file=sys.stderr)
        raise SystemExit(1)
    return proc.stdout


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gsm8k", type=Path, default=REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-smoke")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "gpu.json")
    ap.add_argument("--dry-run", action="store_true", help="CPU: validate the configs, start nothing")
    args = ap.parse_args()

    import yaml

    from configs.schema import parse_config
    from tasks.prm.export import qwen2_config

    raw = yaml.safe_load(CONFIG.read_text())
    raw["sources"][0]["path"] = str(args.gsm8k.resolve())
    cfg = parse_config(raw)  # a config error stops here, before anything starts
    if cfg.train.model_path != cfg.policy.model_path or not cfg.train.use_gpu or cfg.cluster.gpus_per_engine <= 0:
        raise SystemExit("configs/gpu-smoke.yaml must train on the policy's backbone, with use_gpu and GPU engines")
    if cfg.train.strategy != "fsdp" or cfg.train.precision != "bf16-mixed":
        raise SystemExit("configs/gpu-smoke.yaml must train with train.strategy fsdp and train.precision bf16-mixed "
                         f"(it has {cfg.train.strategy}, {cfg.train.precision})")
    args.out.mkdir(parents=True, exist_ok=True)
    config_path = args.out / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cli = [sys.executable, "-m", "prm_factory.cli"]
    if args.dry_run:
        from configs.schema import resolve_path

        backbone = resolve_path(cfg.train.model_path) / "config.json"
        if backbone.is_file():  # prepared here: the export's mapping accepts its architecture
            qwen2_config(json.loads(backbone.read_text()))
        out = subprocess.run(cli + ["validate", str(config_path)], cwd=REPO, capture_output=True, text=True)
        print(json.dumps({"dry_run": True, "config_hash": cfg.config_hash(), "validate_exit": out.returncode,
                          "backbone_maps_to_qwen2": True if backbone.is_file() else "not prepared here",
                          "gsm8k_exists": args.gsm8k.is_file()}))
        return out.returncode

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on CPU")
    figures: dict = {"gpu": torch.cuda.get_device_name(0), "config_hash": cfg.config_hash(),
                     "date": time.strftime("%Y-%m-%d")}
    run("prepare", [sys.executable, "scripts/prepare_smollm2.py"], figures)
    data, prm_run, export = args.out / "dataset", args.out / "prm", args.out / "export"
    build = last_json(run("build", cli + ["build", "--config", str(config_path), "--out", str(data), "--json"],
                          figures))
    figures["build"] = {k: build.get(k) for k in ("rows", "shards_built", "cost")}
    train = last_json(run("train", cli + ["train", "--config", str(config_path), "--dataset", str(data), "--out",
                                          str(prm_run), "--json"], figures))
    last = (train.get("history") or [{}])[-1]
    figures["train"] = {"history": train.get("history"), "global_step": train.get("global_step"),
                        "strategy": train.get("strategy"), "precision": train.get("precision"),
                        "state_bytes_per_worker": last.get("state_bytes_per_worker"),
                        "peak_gpu_mb": last.get("peak_gpu_mb"),
                        "consolidate_seconds": train.get("consolidate_seconds")}
    exported = last_json(run("export", cli + ["export", "--format", "qwen2-prm", "--checkpoint", str(prm_run),
                                              "--data", str(data), "--out",
                                              str(export), "--limit", "256", "--epochs", "2", "--force", "--json"],
                             figures))  # the student trains on the CPU: a short distillation keeps the smoke short
    figures["export"] = exported
    rows = args.out / "rows.jsonl"
    from tasks.store.dataset import read_dataset

    table = read_dataset(data)
    rows.write_text("".join(json.dumps({"prompt": p, "completions": c}) + "\n" for p, c in
                            zip(table.column("prompt").to_pylist(), table.column("completions").to_pylist(),
                                strict=True)))
    scored = last_json(run("score_vllm", cli + ["score", str(rows), "--checkpoint", str(export), "--out",
                                                str(args.out / "scored-vllm.jsonl"), "--engine", "vllm", "--json"],
                           figures))
    run("score_transformers", cli + ["score", str(rows), "--checkpoint", str(export), "--out",
                                     str(args.out / "scored-hf.jsonl"), "--device", "cuda", "--json"], figures)
    a = [json.loads(x)["step_scores"] for x in (args.out / "scored-vllm.jsonl").read_text().splitlines()]
    b = [json.loads(x)["step_scores"] for x in (args.out / "scored-hf.jsonl").read_text().splitlines()]
    figures["score"] = {"rows": scored["rows"], "vllm_vs_transformers_max_abs_diff":
                        max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))}
    # The checkpoint's whole ensemble in CUDA vLLM, as the package's plugin model.
    run("score_native_vllm", cli + ["score", str(rows), "--checkpoint", str(prm_run), "--out",
                                    str(args.out / "native-vllm.jsonl"), "--engine", "vllm", "--json"], figures)
    run("score_native_transformers", cli + ["score", str(rows), "--checkpoint", str(prm_run), "--out",
                                            str(args.out / "native-hf.jsonl"), "--device", "cuda", "--json"], figures)
    a = [json.loads(x) for x in (args.out / "native-vllm.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (args.out / "native-hf.jsonl").read_text().splitlines()]
    figures["score_native"] = {key: max(abs(x - y) for ra, rb in zip(a, b, strict=True)
                                        for x, y in zip(ra[key], rb[key], strict=True) if None not in (x, y))
                               for key in ("step_scores", "step_std")}
    figures["total_seconds"] = round(sum(figures["seconds"].values()), 1)
    args.results.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
