"""Engines benchmark: raw vLLM vs the Ray actor pool, prefix caching on vs off, and entropy bounds vs exact.

    python benchmarks/bench_engines.py            # prints a table, writes benchmarks/results/engines.json

Workload (the rollout shape of ER-PRM): 32 step prefixes of one problem (a long shared stem + a distinct
step), N=16 rollouts each (`n=16` in one request), temperature 1.0, top-20 logprobs, fixed new-token budget.
Raw vLLM (in this process) and the actor pool (one vLLM engine in a Ray actor) are both started and warmed
up, then timed in turn, raw, pool, raw, pool, ... (`--repeats` pairs), so that a burst of load from other
jobs on the shared machine hits both sides of a pair alike: the headline is the median of the per-pair
ratios, and every pair is listed. The Ray boundary is profiled on the same results: pickling the Sample
lists (what crossed before) against packing them into numpy arrays and unpacking them (what crosses now).
Prefix caching off is a separate engine, timed afterwards. Entropy: every position of the first
`--entropy-samples` vLLM samples is teacher-forced through the transformers engine; the exact entropy must lie
inside vLLM's top-20 bounds (within 1e-4 nats, the float32 difference of two forward passes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

from configs.env import set_offline_env

set_offline_env()

REPO = Path(__file__).resolve().parent.parent

BOUND_TOL = 1e-4


def model_path() -> str:
    from configs.paths import SHIPPED_POLICY, shipped_policy_ready

    if not shipped_policy_ready():  # figures for a random model would be meaningless: refuse
        raise SystemExit(f"the shipped policy is missing: {SHIPPED_POLICY} (restore it from git)")
    return str(SHIPPED_POLICY)


def machine_context() -> dict:
    """What else the machine was doing: the figures are only comparable with this in view."""
    load1, load5, load15 = os.getloadavg()
    return {"cpus": os.cpu_count(), "load_avg_1_5_15": [round(load1, 2), round(load5, 2), round(load15, 2)]}


def workload(tokenize, args) -> list:
    from tasks.generation import GenerationRequest

    stem = tokenize("Tom has 12 apples. He buys 7 more, gives 5 away, then doubles what he has. " * 3)
    stem = stem[: args.stem_tokens]
    return [
        GenerationRequest(
            prompt_token_ids=stem + tokenize(f"step {i}: {i % 9}+{i % 7}={i % 9 + i % 7}\n"),
            n=args.n,
            temperature=1.0,
            max_new_tokens=args.max_new_tokens,
            top_logprobs=20,
            seed=1000 + i,
            request_id=f"p{i}",
        )
        for i in range(args.prefixes)
    ]


def rate(generate, requests) -> tuple[float, list]:
    """Generated tokens per second of one call, and its results."""
    t0 = time.perf_counter()
    results = generate(requests)
    return sum(r.generated_tokens for r in results) / (time.perf_counter() - t0), results


def timed(generate, requests, repeats: int) -> tuple[list, list[float]]:
    """Results of the last of `repeats` timed calls (after a warm-up) and the tokens/s of each."""
    generate(requests[:2])  # warm-up: compile paths, first allocations
    rates, last = [], []
    for _ in range(repeats):
        r, last = rate(generate, requests)
        rates.append(r)
    return last, rates


def boundary_profile(results) -> dict:
    """What crossing the Ray boundary costs for one batch of results: pickled Sample lists vs numpy arrays."""
    import pickle

    from tasks.generation import pack_results, unpack_results

    def best_of(fn, times: int = 5) -> float:
        spent = []
        for _ in range(times):
            t0 = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - t0)
        return min(spent)

    blob = pickle.dumps(results, protocol=5)
    packed = pack_results(results)
    buffers: list = []
    packed_blob = pickle.dumps(packed, protocol=5, buffer_callback=buffers.append)  # Ray's out-of-band path
    assert unpack_results(packed) == results
    return {
        "generated_tokens": sum(r.generated_tokens for r in results),
        "lists_pickle_s": best_of(lambda: pickle.dumps(results, protocol=5)),
        "lists_unpickle_s": best_of(lambda: pickle.loads(blob)),
        "lists_bytes": len(blob),
        # The transformers actor's path (pack_results of its Sample lists); a vLLM actor fills the arrays
        # straight from vLLM's outputs (VLLMEngine.generate_packed) and packs nothing.
        "arrays_pack_from_lists_s": best_of(lambda: pack_results(results)),
        "arrays_unpack_s": best_of(lambda: unpack_results(packed)),
        "arrays_pickle_s": best_of(lambda: pickle.dumps(packed, protocol=5, buffer_callback=lambda b: None)),
        "arrays_bytes_in_band": len(packed_blob),
        "arrays_bytes_out_of_band": sum(b.raw().nbytes for b in buffers),
    }


def entropy_check(results, requests, path: str, max_samples: int) -> dict:
    from cluster.hf_engine import HFEngine

    hf = HFEngine(path)
    inside = inside_strict = positions = 0
    widths = []
    samples = [(req, s) for req, res in zip(requests, results, strict=True) for s in res.samples][:max_samples]
    for req, s in samples:
        exact = hf.score(req.prompt_token_ids, s.token_ids, temperature=req.temperature, top_p=req.top_p)
        for lo, hi, h in zip(s.entropy, s.entropy_upper, exact.entropy, strict=True):
            positions += 1
            inside += lo - BOUND_TOL <= h <= hi + BOUND_TOL
            inside_strict += lo <= h <= hi
            widths.append(hi - lo)
    return {
        "positions": positions,
        "inside": inside / positions,
        "inside_strict": inside_strict / positions,
        "mean_width": statistics.fmean(widths),
        "max_width": max(widths),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", type=int, default=32)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--stem-tokens", type=int, default=160)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="raw/pool pairs (and caching-off runs)")
    parser.add_argument("--entropy-samples", type=int, default=128)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    parser.add_argument("--json-out", type=Path, default=REPO / "benchmarks" / "results" / "engines.json")
    args = parser.parse_args()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    context_start = machine_context()

    import ray

    from cluster.connect import start_own
    from cluster.engines import start_policy_engines
    from cluster.vllm_engine import VLLMEngine
    from configs.schema import parse_config

    path = model_path()
    rows: dict[str, dict] = {}
    common = dict(dtype="float32", max_model_len=256, gpu_memory_utilization=0.3, seed=0)

    def counts(results) -> dict:
        return {"cached_prompt_tokens": sum(r.cached_prompt_tokens for r in results),
                "prompt_tokens": sum(r.prompt_tokens for r in results)}

    engine = VLLMEngine(path, enable_prefix_caching=True, **common)
    tokenizer = engine.tokenizer
    requests = workload(lambda text: tokenizer.encode(text, add_special_tokens=False), args)
    start_own(namespace="prm-factory", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    cfg = parse_config(
        {
            "name": "bench",
            "sources": [{"kind": "toy"}],
            "policy": {"model_path": path, "backend": "vllm", "max_model_len": 256, "dtype": "float32"},
            "cluster": {"num_engines": 1, "cpus_per_engine": 1, "max_in_flight": 4, "namespace": "prm-factory-bench"},
            "partition": {"entropy_source": "topk_lower"},
        }
    )
    pool = start_policy_engines(cfg)
    pairs = []
    try:
        engine.generate(requests[:2])  # warm-up: compile paths, first allocations
        pool.generate(requests[:2])
        for _ in range(args.repeats):
            raw_rate, raw_results = rate(engine.generate, requests)
            pool_rate, pool_results = rate(pool.generate, requests)
            pairs.append({"raw_tokens_per_s": raw_rate, "pool_tokens_per_s": pool_rate,
                          "pool_over_raw": pool_rate / raw_rate, "load_avg_1": round(os.getloadavg()[0], 2)})
    finally:
        pool.shutdown()
        ray.shutdown()
    rows["vllm raw, prefix caching on"] = {
        "tokens_per_s": statistics.median(p["raw_tokens_per_s"] for p in pairs),
        "runs": [p["raw_tokens_per_s"] for p in pairs], **counts(raw_results)}
    rows["vllm in Ray actor pool (1 engine), caching on"] = {
        "tokens_per_s": statistics.median(p["pool_tokens_per_s"] for p in pairs),
        "runs": [p["pool_tokens_per_s"] for p in pairs], **counts(pool_results)}
    boundary = boundary_profile(raw_results)
    entropy = entropy_check(raw_results, requests, path, args.entropy_samples)
    engine.shutdown()
    del engine

    engine = VLLMEngine(path, enable_prefix_caching=False, **common)
    results, rates = timed(engine.generate, requests, args.repeats)
    rows["vllm raw, prefix caching off"] = {
        "tokens_per_s": statistics.median(rates), "runs": rates, **counts(results)}
    engine.shutdown()
    del engine

    raw = rows["vllm raw, prefix caching on"]["tokens_per_s"]
    summary = {
        "model": path,
        "workload": f"{args.prefixes} prefixes x n={args.n}, {args.stem_tokens}-token shared stem, "
        f"{args.max_new_tokens} new tokens, T=1.0, top-20 logprobs",
        "engines": rows,
        "pool_over_raw": statistics.median(p["pool_over_raw"] for p in pairs),
        "pairs": pairs,
        "ray_boundary": boundary,
        "caching_on_over_off": raw / rows["vllm raw, prefix caching off"]["tokens_per_s"],
        "entropy": entropy,
        "measured": {
            "started": started,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine_start": context_start,
            "machine_end": machine_context(),
            "note": "shared machine: other jobs (tests, builds of parallel sessions) may run during the "
            "measurement; load averages show how busy. Raw and pool runs alternate; pool_over_raw is the median "
            "of the per-pair ratios, tokens_per_s the median of the runs; compare ratios measured in the same "
            "run, not absolute tokens/s across runs.",
        },
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"\nmodel: {path}\nworkload: {summary['workload']}\n")
    print(f"{'engine':<48} {'tokens/s (median)':>18} {'runs':>36} {'cached/prompt tokens':>22}")
    for name, row in rows.items():
        runs = " ".join(f"{r:.0f}" for r in row["runs"])
        print(
            f"{name:<48} {row['tokens_per_s']:>18.0f} {runs:>36} "
            f"{row['cached_prompt_tokens']:>10}/{row['prompt_tokens']:<11}"
        )
    ratios = " ".join(f"{p['pool_over_raw']:.3f}" for p in pairs)
    print(f"\nRay actor pool / raw vLLM tokens/s: median {summary['pool_over_raw']:.3f} of pairs {ratios} "
          f"(target >= 0.95, goal 0.97)")
    b = boundary
    print(f"Ray boundary, {b['generated_tokens']} tokens: Sample lists pickle {b['lists_pickle_s'] * 1e3:.0f} ms + "
          f"unpickle {b['lists_unpickle_s'] * 1e3:.0f} ms ({b['lists_bytes'] / 1e6:.1f} MB); numpy arrays: unpack "
          f"{b['arrays_unpack_s'] * 1e3:.0f} ms (raw vLLM pays it too), pack from lists (transformers actors only) "
          f"{b['arrays_pack_from_lists_s'] * 1e3:.0f} ms, "
          f"({b['arrays_bytes_out_of_band'] / 1e6:.1f} MB out of band, "
          f"pickled in {b['arrays_pickle_s'] * 1e3:.1f} ms)")
    print(f"prefix caching on / off tokens/s:   {summary['caching_on_over_off']:.3f}")
    print(
        f"entropy: exact HF entropy inside vLLM top-20 bounds at {entropy['inside']:.1%} of "
        f"{entropy['positions']} positions (tolerance {BOUND_TOL:g} nats; {entropy['inside_strict']:.1%} with none); "
        f"mean bound width {entropy['mean_width']:.4f} nats (max {entropy['max_width']:.4f})"
    )


if __name__ == "__main__":
    main()
