"""Score a file of trajectories with a trained PRM: JSONL or Parquet in, the same format out.

The input needs the dataset's own ``prompt`` (str) and ``completions`` (list of str) columns; every other
column passes through untouched. Two columns are added: ``step_scores`` (the ensemble mean per step) and
``step_std`` (the spread across heads). Steps cut off by the backbone's context are NaN in Parquet and null
in JSONL; the summary counts the truncated rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.io import atomic_write_bytes, atomic_write_lines
from tasks.prm.model import LoadedPRM


class ScoreInputError(ValueError):
    """An input file that cannot be scored; the message names the row and the reason."""


def _check_rows(prompts: list[Any], completions: list[Any], where: str) -> None:
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        if not isinstance(p, str):
            raise ScoreInputError(f"{where} row {i}: 'prompt' must be a string, got {type(p).__name__}")
        if not isinstance(c, list) or not all(isinstance(s, str) for s in c):
            raise ScoreInputError(f"{where} row {i}: 'completions' must be a list of strings")
        if not c:
            raise ScoreInputError(f"{where} row {i}: 'completions' is empty (no step to score)")


def read_trajectories(path: str | Path) -> tuple[str, list[dict[str, Any]] | pa.Table, list[str], list[list[str]]]:
    """(format, the rows or table, prompts, completions) of a .jsonl or .parquet file."""
    p = Path(path)
    if not p.is_file():
        raise ScoreInputError(f"input file not found: {p}")
    if p.suffix == ".parquet":
        table = pq.read_table(p)
        missing = [c for c in ("prompt", "completions") if c not in table.column_names]
        if missing:
            raise ScoreInputError(f"{p} lacks column(s) {missing}")
        prompts, completions = table.column("prompt").to_pylist(), table.column("completions").to_pylist()
        _check_rows(prompts, completions, str(p))
        return "parquet", table, prompts, completions
    if p.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ScoreInputError(f"{p} line {n}: not JSON ({err.msg})") from None
            if not isinstance(row, dict) or "prompt" not in row or "completions" not in row:
                raise ScoreInputError(f"{p} line {n}: needs 'prompt' and 'completions'")
            rows.append(row)
        prompts, completions = [r["prompt"] for r in rows], [r["completions"] for r in rows]
        _check_rows(prompts, completions, str(p))
        return "jsonl", rows, prompts, completions
    raise ScoreInputError(f"{p}: give a .jsonl or .parquet file")


def score_file(prm: LoadedPRM, input_path: str | Path, output_path: str | Path, *, batch_size: int = 16,
               progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Score every row of ``input_path`` into ``output_path`` (same format); returns counts."""
    kind, data, prompts, completions = read_trajectories(input_path)
    scores = []
    for start in range(0, len(prompts), batch_size):
        scores.extend(prm.score(prompts[start:start + batch_size], completions[start:start + batch_size],
                                batch_size=batch_size))
        if progress:
            progress(min(batch_size, len(prompts) - start))
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "parquet":
        table = data.append_column("step_scores", pa.array([s.mean for s in scores], pa.list_(pa.float64())))
        table = table.append_column("step_std", pa.array([s.std for s in scores], pa.list_(pa.float64())))
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        atomic_write_bytes(out, buf.getvalue().to_pybytes())
    else:
        def clean(values: list[float]) -> list[float | None]:
            return [None if math.isnan(v) else v for v in values]

        atomic_write_lines(out, (json.dumps({**row, "step_scores": clean(s.mean), "step_std": clean(s.std)})
                                 for row, s in zip(data, scores, strict=True)))
    summary = {"input": str(input_path), "output": str(out), "format": kind, "rows": len(scores),
               "steps": sum(len(s.mean) for s in scores), "truncated_rows": sum(s.truncated for s in scores),
               "checkpoint_config_hash": prm.config["config_hash"]}
    truth_column = next((c for c in TRUTH_COLUMNS if c in _columns(kind, data)), None)
    if truth_column is not None:
        truth = data.column(truth_column).to_pylist() if kind == "parquet" else [r[truth_column] for r in data]
        summary["quality"] = step_quality([s.mean for s in scores], truth, truth_column)
    return summary


# Per-step columns a scored file may carry, most exact first: the ruler's exact truth, a dataset's hard labels.
TRUTH_COLUMNS = ("step_truth", "labels")


def _columns(kind: str, data: Any) -> set[str]:
    return set(data.column_names) if kind == "parquet" else (set(data[0]) if data else set())


def step_quality(scores: list[list[float]], truth: list[list[bool] | None], column: str) -> dict[str, Any]:
    """The scores against the file's own per-step truth or labels: within-position AUROC and first-error F1 first,
    step AUROC beside them (rows without a usable truth list, or of another length, are left out and counted)."""
    from tasks.evaluation.metrics import auroc, first_error_f1, within_position_auroc

    kept = [(s, [bool(x) for x in t]) for s, t in zip(scores, truth, strict=True)
            if isinstance(t, list) and len(t) == len(s) and None not in t and not any(math.isnan(x) for x in s)]
    flat_s = [x for s, _ in kept for x in s]
    flat_t = [y for _, t in kept for y in t]
    within = within_position_auroc([s for s, _ in kept], [t for _, t in kept])["mean"]
    step = auroc(flat_s, flat_t) if flat_s else math.nan
    return {"against": column, "rows": len(kept), "rows_left_out": len(scores) - len(kept),
            "within_position_auroc": None if math.isnan(within) else within,
            "first_error_f1": first_error_f1([s for s, _ in kept], [t for _, t in kept])["f1"] if kept else None,
            "step_auroc": None if math.isnan(step) else step}
