"""Rollouts without logprobs: what a rollout saves by not asking vLLM for per-token logprobs and entropy.

    python benchmarks/bench_rollouts.py     # prints the pairs, writes benchmarks/results/rollouts.json

A rollout is judged by its final answer alone (`tasks.labelling.rollouts`), so its requests set
``GenerationRequest.entropy`` False and the vLLM engine asks for no logprobs. With them, vLLM decodes each of the
top-20 alternatives at every generated token in the calling process, and the engine turns them into entropy
bounds: CPU that competes with sampling, on a 2-core machine as on a GPU host whose driver process is the
bottleneck.

Workload (Math-Shepherd's shape, the largest share of the labelling's tokens): the step prefixes of toy problems'
policy solutions (newline steps), N rollouts each (``n`` in one request), temperature 1.0, stopped at end of text,
each request seeded. One engine (in this process, prefix caching on), warmed up, then the same requests timed with
and without logprobs in turn (``--repeats`` pairs, the order alternating), so a burst of other load hits both sides
of a pair alike; the headline is the median of the per-pair ratios. The samples must be the same both ways (same
seeds): the script fails otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
from configs.env import set_offline_env  # noqa: E402 - before anything reads the environment

set_offline_env()


def workload(engine, args) -> list:
    """Rollout requests from every newline-step prefix of one policy solution per toy problem."""
    from configs.schema import ToySource
    from tasks.generation import GenerationRequest
    from tasks.sources.toy_world import generate_problems

    problems = generate_problems(ToySource(num_problems=args.problems, seed=args.seed, min_steps=2, max_steps=6))
    eos = [engine.tokenizer.eos_token_id]
    prompts = [engine.tokenize(f"{p.question}\n") for p in problems]
    solutions = engine.generate([GenerationRequest(pt, n=1, max_new_tokens=96, seed=args.seed + i,
                                                   stop_token_ids=eos) for i, pt in enumerate(prompts)])
    requests = []
    for i, (pt, res) in enumerate(zip(prompts, solutions, strict=True)):
        steps = res.samples[0].text.split("\n")
        for j in range(1, len(steps)):
            prefix = engine.tokenize("\n".join(steps[:j]) + "\n")
            requests.append(GenerationRequest(pt + prefix, n=args.n, max_new_tokens=96, seed=10_000 + 100 * i + j,
                                              stop_token_ids=eos, request_id=f"{i}-{j}"))
    return requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=32, help="toy problems; every step prefix of one solution each")
    ap.add_argument("--n", type=int, default=16, help="rollouts per prefix")
    ap.add_argument("--repeats", type=int, default=5, help="pairs (with, without) timed")
    ap.add_argument("--seed", type=int, default=7300)
    ap.add_argument("--json-out", type=Path, default=REPO / "benchmarks" / "results" / "rollouts.json")
    args = ap.parse_args()

    from cluster.vllm_engine import VLLMEngine

    started = datetime.now(UTC).isoformat(timespec="seconds")
    load0 = os.getloadavg()
    engine = VLLMEngine(str(REPO / "assets" / "toy-policy"), dtype="float32", max_model_len=256,
                        gpu_memory_utilization=0.3, seed=0)
    try:
        with_lp = workload(engine, args)
        without = [replace(r, entropy=False) for r in with_lp]
        engine.generate(with_lp[:2])  # warm-up
        pairs = []
        for k in range(args.repeats):
            timed = {}
            for name, reqs in (("with", with_lp), ("without", without))[:: 1 if k % 2 == 0 else -1]:
                cpu0, t0 = time.process_time(), time.perf_counter()
                results = engine.generate(reqs)
                seconds = time.perf_counter() - t0
                tokens = sum(r.generated_tokens for r in results)
                timed[name] = {"tokens": tokens, "seconds": round(seconds, 3),
                               "tokens_per_s": round(tokens / seconds, 1),
                               "this_process_cpu_s": round(time.process_time() - cpu0, 3),
                               "samples": [[s.token_ids for s in r.samples] for r in results]}
            if timed["with"]["samples"] != timed["without"]["samples"]:
                raise SystemExit("the samples differ with and without logprobs: the comparison is void")
            for side in timed.values():
                del side["samples"]
            pairs.append({**timed, "without_over_with": round(timed["without"]["tokens_per_s"]
                                                               / timed["with"]["tokens_per_s"], 3),
                          "load_avg_1": round(os.getloadavg()[0], 2)})
            print(f"pair {k}: with logprobs {timed['with']['tokens_per_s']:.0f} tokens/s, without "
                  f"{timed['without']['tokens_per_s']:.0f} ({pairs[-1]['without_over_with']:.2f}x); this process's "
                  f"CPU {timed['with']['this_process_cpu_s']:.1f} s vs {timed['without']['this_process_cpu_s']:.1f} s",
                  flush=True)
    finally:
        engine.shutdown()
    summary = {
        "workload": f"{len(with_lp)} rollout requests (every newline-step prefix of one policy solution of each "
                    f"of {args.problems} toy problems) x n={args.n}, up to 96 new tokens, T=1.0, seeded, end-of-text "
                    "stop",
        "tokens_generated_per_call": pairs[0]["with"]["tokens"],
        "without_over_with": statistics.median(p["without_over_with"] for p in pairs),
        "same_samples": True,
        "pairs": pairs,
        "measured": {"started": started, "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                     "cpus": os.cpu_count(), "load_avg_at_start": [round(x, 2) for x in load0],
                     "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"rollouts without logprobs / with: {summary['without_over_with']:.2f}x tokens/s (median of "
          f"{len(pairs)} pairs), same samples")


if __name__ == "__main__":
    main()
