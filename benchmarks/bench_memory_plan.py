"""The memory planner's table (cluster/memory_plan.py, issue 34): per-GPU memory of the shipped real configs on 80 GB
GPUs, from the models' config.json numbers alone (configs/architectures.py; nothing is downloaded or loaded).

- training: configs/prm-qwen2.5-math-1.5b.yaml and -7b.yaml as shipped, and the same train section under each
  strategy (ddp, fsdp) x activation checkpointing (off, on), at the config's precision, micro-batch, context and
  workers; each row says whether it fits 90% of the GPU (cluster.memory_plan.RESERVED_FRACTION kept free);
- engines: configs/gsm8k-qwen2.5-72b.yaml's Qwen2.5-72B-Instruct policy (bf16, 4,096-token context) at
  tensor_parallel_size 1, 2, 4 and 8 against gpu_memory_utilization 0.9 x 80 GB, and the 7B policy of
  configs/gsm8k-qwen2.5-math.yaml at TP 1.

These are estimates of the planner, not measurements of a GPU.

    python benchmarks/bench_memory_plan.py --json-out benchmarks/results/memory_plan.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from cluster.memory_plan import GB, RESERVED_FRACTION, engine_memory, plan_config, train_memory
from configs.architectures import read_architecture
from configs.schema import REPO_ROOT, load_config

GPU_GB = 80
TRAIN_CONFIGS = ("prm-qwen2.5-math-1.5b.yaml", "prm-qwen2.5-math-7b.yaml")
ENGINE_CONFIGS = (("gsm8k-qwen2.5-72b.yaml", (1, 2, 4, 8)), ("gsm8k-qwen2.5-math.yaml", (1,)))


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def train_rows(gpu_bytes: int) -> list[dict]:
    usable = int(gpu_bytes * (1 - RESERVED_FRACTION))
    rows = []
    for name in TRAIN_CONFIGS:
        cfg = load_config(REPO_ROOT / "configs" / name, check_paths=False)
        arch = read_architecture(cfg.train.model_path)
        shipped = plan_config(cfg, gpu_bytes=gpu_bytes)
        assert shipped.ok, shipped.problems  # the shipped config fits, or the planner says why
        for strategy, ckpt in itertools.product(("ddp", "fsdp"), (False, True)):
            train = cfg.train.model_copy(update={"strategy": strategy, "activation_checkpointing": ckpt})
            plan = train_memory(arch, train)
            rows.append({"config": name, "model": cfg.train.model_path, "strategy": strategy,
                         "precision": train.precision, "activation_checkpointing": ckpt,
                         "shipped": (strategy, ckpt) == (cfg.train.strategy, cfg.train.activation_checkpointing),
                         "micro_batch": train.batch_size, "seq_len": plan.seq_len, "num_workers": train.num_workers,
                         "grad_accum_steps": train.grad_accum_steps,
                         "global_batch": train.batch_size * train.num_workers * train.grad_accum_steps,
                         "params": plan.params, "parts_gib": {k: gib(v) for k, v in plan.parts.items()},
                         "total_gib": gib(plan.total), "usable_gib": gib(usable), "fits": plan.total <= usable})
    return rows


def engine_rows(gpu_bytes: int) -> list[dict]:
    rows = []
    for name, sizes in ENGINE_CONFIGS:
        cfg = load_config(REPO_ROOT / "configs" / name, check_paths=False)
        arch = read_architecture(cfg.policy.model_path)
        for tp in sizes:
            if arch.num_heads % tp:
                continue
            plan = engine_memory(arch, cfg.policy.dtype, cfg.policy.max_model_len, tp,
                                 cfg.policy.gpu_memory_utilization, gpu_bytes)
            rows.append({"config": name, "model": cfg.policy.model_path, "dtype": cfg.policy.dtype,
                         "tensor_parallel_size": tp, "shipped": tp == cfg.cluster.tensor_parallel_size,
                         "max_model_len": plan.max_model_len, "params": plan.params,
                         "weights_gib": gib(plan.weights), "kv_cache_gib": gib(plan.kv_cache),
                         "total_gib": gib(plan.total), "budget_gib": gib(plan.budget), "fits": plan.fits,
                         "max_sequences": round(plan.max_sequences, 1)})
    return rows


def print_tables(result: dict) -> None:
    print(f"training per GPU on {GPU_GB} GB ({result['usable_fraction']:.0%} usable)")
    print(f"{'config':<28} {'strategy':<5} {'ckpt':<5} {'total GiB':>9} fits  parts (GiB)")
    for r in result["train"]:
        mark = " *" if r["shipped"] else ""
        parts = ", ".join(f"{k} {v}" for k, v in r["parts_gib"].items())
        print(f"{r['config']:<28} {r['strategy']:<5} {str(r['activation_checkpointing']).lower():<5} "
              f"{r['total_gib']:>9} {'yes' if r['fits'] else 'no ':<4}{mark} {parts}")
    print(f"\nvLLM engine per GPU on {GPU_GB} GB")
    for r in result["engines"]:
        print(f"{r['model']:<32} TP {r['tensor_parallel_size']}: weights {r['weights_gib']} + KV {r['kv_cache_gib']} "
              f"= {r['total_gib']} of {r['budget_gib']} GiB: {'fits' if r['fits'] else 'does not fit'}"
              f"{' *' if r['shipped'] else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    gpu_bytes = GPU_GB * GB
    result = {"gpu_gb": GPU_GB, "usable_fraction": 1 - RESERVED_FRACTION, "train": train_rows(gpu_bytes),
              "engines": engine_rows(gpu_bytes),
              "command": "python benchmarks/bench_memory_plan.py --json-out benchmarks/results/memory_plan.json"}
    print_tables(result)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
