"""What Prefect costs: the same tiny toy build through `prm-factory build` (no Prefect) and through the deployment.

Both paths run as fresh processes against the same warm engine (one named Ray actor, started before timing),
so the difference is orchestration: the worker's poll and flow-run subprocess, the Prefect engine, the task
runs and their persisted results, the report artifacts. Also measured: Prefect's per-task overhead, from a
flow of no-op tasks with the shard task's options (INPUTS + TASK_SOURCE cache, persisted results).

    python benchmarks/bench_orchestration.py [--problems 16] [--per-shard 2] [--reps 2] [--json out.json]

Starts its own Prefect server (PREFECT_HOME in a temp dir), worker and Ray; stops all of them at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from configs.schema import REPO_ROOT

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(string.digits + string.ascii_letters + " \n+-*/=()?.,:;'!#")


def make_tiny_policy(
    out_dir: Path, *, max_position_embeddings: int = 256, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> Path:
    """Write a random tiny LlamaForCausalLM + char tokenizer into `out_dir`; returns `out_dir`. It has the shipped
    policy's shape (Llama, head_dim 32, a WordLevel character tokenizer, float32 safetensors) and stands in for it
    while it is missing: the timings are orchestration's, not the model's."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=hidden_size // 32,
        head_dim=32,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform next-token distributions; a larger output scale makes them peaked
    # and varied, so entropies spread over a realistic range (some near 0, some near log V).
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def write_config(tmp: Path, model_path: str, problems: int, per_shard: int, backend: str) -> Path:
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bench-orch",
        "sources": [{"kind": "toy", "num_problems": problems, "seed": 7, "min_steps": 2, "max_steps": 4}],
        "policy": {"model_path": model_path, "backend": backend, "max_model_len": 128},
        "cluster": {"num_engines": 1, "cpus_per_engine": 1, "request_timeout_s": 300},
        "partition": {"method": "edu", "tau": 1.0, "min_step_tokens": 3, "max_anchors": 3,
                      "entropy_source": "exact" if backend == "transformers" else "topk_lower"},
        "tree": {"branch_width": 2, "max_depth": 1, "max_leaves": 3},
        "rollouts": {"n": 4, "max_new_tokens": 24},
        "dataset": {"out_dir": str(tmp / "dataset"), "problems_per_shard": per_shard},
    }))
    return path


def time_cli(config: Path, out: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("prm-factory")), "build", "--config", str(config),
                    "--out", str(out), "--json"], env=env, check=True, capture_output=True, cwd=REPO_ROOT)
    return time.perf_counter() - t0


def time_deployment(config: Path, out: Path) -> tuple[float, dict]:
    from prefect.deployments import run_deployment

    t0 = time.perf_counter()
    run = run_deployment("build-dataset/build-dataset", parameters={"config_path": str(config), "out_dir": str(out)},
                         timeout=600, poll_interval=0.5)
    wall = time.perf_counter() - t0
    if not run.state.is_completed():
        raise RuntimeError(f"deployment run ended {run.state}")
    return wall, phases(run)


def phases(run) -> dict:
    """Where a deployment run's time went: before the flow started, and per task (Prefect's own timestamps)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])), limit=200)
    by_name: dict[str, float] = {}
    for t in tasks:
        if t.start_time and t.end_time:
            name = "label-shard" if t.name.startswith("shard-") else t.name.rsplit("-", 1)[0]
            by_name[name] = by_name.get(name, 0.0) + (t.end_time - t.start_time).total_seconds()
    return {
        "created_to_flow_start_s": (run.start_time - run.created).total_seconds(),
        "flow_run_s": run.total_run_time.total_seconds() if run.total_run_time else None,
        "task_seconds": {k: round(v, 2) for k, v in sorted(by_name.items())},
    }


def per_task_overhead(n_tasks: int = 20) -> dict[str, float]:
    """Seconds per task run of a flow of no-op tasks, sequential, with and without the shard task's options."""
    from prefect import flow, task
    from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

    @task(cache_policy=INPUTS + TASK_SOURCE, persist_result=True, retries=2)
    def cached_noop(config_path: str, out_dir: str, index: int, key: str) -> dict:
        return {"index": index}

    @task(cache_policy=NO_CACHE, persist_result=False)
    def plain_noop(index: int) -> int:
        return index

    @flow
    def many(n: int, cached: bool, salt: str) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            if cached:
                cached_noop.submit("c.yaml", salt, i, f"k{i}").result()
            else:
                plain_noop.submit(i).result()
        return time.perf_counter() - t0

    salt = str(time.time())
    many(2, True, salt + "warm")
    return {"cached_persisted_s": many(n_tasks, True, salt) / n_tasks,
            "plain_s": many(n_tasks, False, salt) / n_tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    home = tmp / "prefect-home"
    home.mkdir()
    os.environ["PREFECT_HOME"] = str(home)  # before Prefect is imported: results and DB stay in tmp

    import ray
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cluster.connect import start_own
    from cluster.engines import start_policy_engines
    from cluster.prefect_stack import deploy, prefect_env, start_server, start_worker
    from configs.paths import SHIPPED_POLICY, shipped_policy_ready
    from configs.schema import load_config

    model = str(SHIPPED_POLICY) if shipped_policy_ready() else str(make_tiny_policy(tmp / "policy"))
    config = write_config(tmp, model, args.problems, args.per_shard, args.backend)
    cfg = load_config(config)
    start_own(namespace="prm-factory", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    pool = start_policy_engines(cfg)  # warm engine for both paths (returns once it has loaded the model)
    server, api_url = start_server(home, ui=False)
    env = prefect_env(home, api_url, RAY_ADDRESS=ray.get_runtime_context().gcs_address,
                      PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="2")
    worker = None
    try:
        deploy(env)
        worker = start_worker(env, home / "logs")
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            cli, dep, runs = [], [], []
            for rep in range(args.reps):  # alternate, so load from other processes hits both alike
                cli.append(time_cli(config, tmp / f"cli-{rep}", env))
                wall, info = time_deployment(config, tmp / f"dep-{rep}")
                dep.append(wall)
                runs.append(info)
                print(f"rep {rep}: cli {cli[-1]:.1f}s, deployment {dep[-1]:.1f}s", flush=True)
            overhead = per_task_overhead()
        shards = -(-args.problems // args.per_shard)
        result = {
            "problems": args.problems, "shards": shards, "reps": args.reps, "backend": args.backend,
            "cli_s": cli, "deployment_s": dep, "deployment_runs": runs,
            "cli_median_s": statistics.median(cli), "deployment_median_s": statistics.median(dep),
            "ratio": statistics.median(dep) / statistics.median(cli),
            "extra_s_per_shard": (statistics.median(dep) - statistics.median(cli)) / shards,
            "per_task_overhead_s": overhead, "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
        }
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
        pool.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
