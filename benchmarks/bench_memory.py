"""Peak memory of a toy build as the number of problems grows (issue 12, item 9).

Runs `prm-factory build --local` (engine in the same process: one process holds everything) on the toy
world at each size, with the cheapest labelling (newline steps, no tree, N = 1, 32 new tokens, 16 problems
per shard), and samples the build process's /proc status every 0.5 s: peak RSS (VmHWM), the largest RSS in
the last quarter of the run (while shards are labelled and written) and the RSS at the end; plus wall time,
rows and shards. Shards are written one at a time and never held together, so RSS should not grow with
the number of problems.

    python benchmarks/bench_memory.py --sizes 500 2000 --json-out benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def config(problems: int) -> dict:
    return {
        "name": f"bench-memory-{problems}",
        "seed": 5,
        "sources": [{"kind": "toy", "num_problems": problems, "seed": 5, "min_steps": 2, "max_steps": 3}],
        "policy": {"model_path": "assets/toy-policy", "backend": "transformers", "max_model_len": 128},
        "partition": {"method": "newline"},
        "tree": {"enabled": False},
        "rollouts": {"n": 1, "max_new_tokens": 32},
        "dataset": {"problems_per_shard": 16},
    }


def _status_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a live process, in KiB, from /proc."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return fields


def measure(problems: int, work: Path, interval_s: float = 0.5) -> dict:
    path = work / f"cfg-{problems}.yaml"
    path.write_text(yaml.safe_dump(config(problems)))
    out = work / f"ds-{problems}"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "prm_factory.cli", "build", "--config", str(path), "--out",
                             str(out), "--local", "--json"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    samples: list[tuple[float, dict[str, int]]] = []
    while proc.poll() is None:  # sampled from outside: the build process runs as users run it
        status = _status_kib(proc.pid)
        if status:
            samples.append((time.perf_counter() - start, status))
        time.sleep(interval_s)
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"build of {problems} problems failed:\n{stderr[-3000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    rss = [s["VmRSS"] for _, s in samples if "VmRSS" in s]
    late = rss[len(rss) * 3 // 4:]  # the last quarter of the run: shards being labelled and written
    return {"problems": problems, "seconds": round(seconds, 1), "rows": summary["rows"], "shards": summary["shards"],
            "quarantined": summary["quarantined"], "rejected": summary["rejected"],
            "generated_tokens": summary["cost"]["generated_tokens"],
            "peak_rss_mib": round(max(s.get("VmHWM", 0) for _, s in samples) / 1024, 1),
            "rss_last_quarter_max_mib": round(max(late) / 1024, 1),
            "rss_at_end_mib": round(rss[-1] / 1024, 1), "samples": len(rss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        runs = [measure(n, Path(tmp)) for n in args.sizes]
    result = {"benchmark": "memory", "command": " ".join(["python", "benchmarks/bench_memory.py", "--sizes",
                                                           *map(str, args.sizes)]),
              "cpu_count": os.cpu_count(), "runs": runs,
              "note": "RSS of the one build process (engine in process, OMP_NUM_THREADS=1), sampled every 0.5 s"}
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
