"""Export a dataset version in the layouts other PRM trainers read, with a dataset card that says what it holds.

Three formats (``FORMATS``), one row per trajectory, each written to ``OUT/data/<split>-00000-of-00001.<ext>``
(Parquet by default, JSON Lines with ``file_format="jsonl"``) beside ``OUT/README.md``, a Hugging Face dataset card
whose front matter lists the files per split (so ``datasets.load_dataset(OUT)`` finds them):

- ``math-shepherd`` (Math-Shepherd, OpenRLHF's ``train_prm``): ``input`` is the prompt and the steps, each step
  followed by the step tag (``MATH_SHEPHERD_TAG``, a space and the Cyrillic ``ки``, as in Math-Shepherd);
  ``label`` is the same text with the tag's ``ки`` replaced by ``+`` (good step) or ``-`` (bad); ``value`` is the
  list of those ``+``/``-`` (OpenRLHF: ``--input_key input --label_key value --placeholder_token ки
  --reward_tokens + -``). The steps are written verbatim with no separator of their own: removing every tag from
  ``input`` gives the trajectory exactly as stored (``prompt + "".join(completions)``).
- ``qwen-prm`` (Qwen2.5-Math-PRM): ``query`` (the prompt), ``steps``, ``response`` (every step followed by
  ``<extra_0>``: Qwen's ``"<extra_0>".join(steps) + "<extra_0>"``) and ``labels`` (0/1 per step, read at each
  ``<extra_0>``).
- ``trl-stepwise`` (TRL's stepwise supervision, ``trl.experimental.prm.PRMTrainer``): ``prompt``, ``completions``,
  ``labels`` (bool per step). TRL 1.13's ``PRMTrainer.tokenize_row`` casts each label with ``int()``: a bool
  becomes 0/1, a float soft or ER label would be truncated toward zero (``int(0.75) == 0``: every step short of
  1.0 would train as bad) and a null would raise. So ``labels`` is always boolean here, and ``soft_labels`` /
  ``er_labels`` ride along as extra columns that PRMTrainer drops before its loss (``remove_columns``).

Every format also keeps ``problem_id``, ``source``, ``soft_labels`` and ``er_labels`` (as stored, null where the
label rule has none) so a row can be traced back and soft targets stay available to trainers that read them.

**Which label.** The exported good/bad verdict of a step comes from one column (``LABEL_COLUMNS``): ``labels``
(the stored hard label, the default; Math-Shepherd's hard estimation 1[k > 0]) or ``soft_labels`` / ``er_labels``
with a ``threshold`` (default ``DEFAULT_THRESHOLD``): good when the value is >= the threshold. A step whose soft /
ER label is null (early-stop and rule-estimated steps: no fixed-size sample behind it) keeps its hard label; the
card counts those steps.

**Bad input.** A directory that does not verify against its manifest, a dataset without rows, a split name that is
no Hugging Face split name, an unknown format, label column or file format, a threshold outside (0, 1], an OUT
that is the dataset (or holds it), and an OUT that exists and is not empty (unless ``force``): ``ExportError``,
nothing written. A tag-based format refuses a row whose prompt or step contains the tag's marker (``ки``,
``<extra_0>``), or whose text would form one where a step meets the next: the reader would find a label where
there is no step end. Nothing is escaped; the error names the row, the problem and the step (math-shepherd takes
another tag: ``step_tag``).

**Atomic.** Everything is written into a hidden temp directory beside OUT, fsynced, then renamed to OUT (with
``force``, an existing OUT is moved aside first and removed after): OUT holds a whole export or none. A temp
directory (or a moved-aside old OUT) that a killed export left beside OUT is removed by the next export to the same
OUT (one writer per OUT).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from tasks.io import atomic_write_bytes, atomic_write_text, fsync_dir
from tasks.labelling.label_rule import EARLY_STOP_ORIGIN, ESTIMATED_ORIGIN, FINAL_ORIGIN, SAMPLED_ORIGINS
from tasks.store.dataset import BUILD_MARKER, INGEST_REPORT, read_dataset, read_manifest, verify_dataset
from tasks.store.report import step_counts

FORMATS = ("math-shepherd", "qwen-prm", "trl-stepwise")
LABEL_COLUMNS = ("labels", "soft_labels", "er_labels")
FILE_FORMATS = ("parquet", "jsonl")
DEFAULT_THRESHOLD = 0.5
MATH_SHEPHERD_TAG = " ки"  # Math-Shepherd's step tag: a space, then the placeholder token OpenRLHF labels
QWEN_STEP_TOKEN = "<extra_0>"  # Qwen2.5-Math-PRM's step separator, a special token of its tokenizer
CARD_NAME = "README.md"
DATA_DIR = "data"
# Hugging Face split names (datasets.splits: "Split name should match '^\w+(\.\w+)*$'"). A split names a file
# under data/, so the rule also keeps a row's split from naming a path (no '/', no '..').
_SPLIT_NAME = re.compile(r"\w+(\.\w+)*")
_COLUMNS = ("prompt", "completions", "labels", "soft_labels", "er_labels", "step_origin", "rollouts", "eta",
            "problem_id", "source", "split", "partitioner", "partitioner_params")
# The cost record's fields (tasks.cost.ShardCost.to_dict), as the card names them.
_COST_ROWS = (("generate_tokens", "generated: root solutions"), ("branch_tokens", "generated: tree branches"),
              ("rollout_tokens", "generated: rollouts"), ("generated_tokens", "generated in all"),
              ("prompt_tokens", "prompt (prefill) tokens, not in the generated ones"),
              ("cached_prompt_tokens", "prompt tokens served from the prefix cache"), ("requests", "engine requests"))
_EXTRA_FIELDS = [pa.field("problem_id", pa.string()), pa.field("source", pa.string()),
                 pa.field("soft_labels", pa.list_(pa.float64())), pa.field("er_labels", pa.list_(pa.float64()))]
SCHEMAS = {
    "math-shepherd": pa.schema([pa.field("input", pa.string()), pa.field("label", pa.string()),
                                pa.field("value", pa.list_(pa.string())), *_EXTRA_FIELDS]),
    "qwen-prm": pa.schema([pa.field("query", pa.string()), pa.field("steps", pa.list_(pa.string())),
                           pa.field("response", pa.string()), pa.field("labels", pa.list_(pa.int64())),
                           *_EXTRA_FIELDS]),
    "trl-stepwise": pa.schema([pa.field("prompt", pa.string()), pa.field("completions", pa.list_(pa.string())),
                               pa.field("labels", pa.list_(pa.bool_())), *_EXTRA_FIELDS]),
}


class ExportError(ValueError):
    """A dataset, an option or an output directory the export refuses; the message names which and why."""


@dataclass
class ExportSummary:
    """What an export wrote: the format, the label choice, counts, and the files (relative to ``out``)."""

    out: Path
    format: str
    file_format: str
    label: str
    threshold: float | None
    step_tag: str | None
    rows: int
    steps: int
    good_steps: int
    null_fallback_steps: int
    rows_per_split: dict[str, int]
    files: dict[str, str] = field(default_factory=dict)  # split -> path relative to `out`

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "out": str(self.out)}


# -- labels -------------------------------------------------------------------------------------------


def check_label_choice(label: str, threshold: float | None) -> float | None:
    """The threshold to use for `label` (None for the hard ``labels``); ExportError for a bad pair."""
    if label not in LABEL_COLUMNS:
        raise ExportError(f"--label must be one of {list(LABEL_COLUMNS)}, got {label!r}")
    if label == "labels":
        if threshold is not None:
            raise ExportError("--threshold applies to soft_labels and er_labels; `labels` is already good/bad")
        return None
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    if not 0 < threshold <= 1:
        raise ExportError(f"--threshold must be in (0, 1], got {threshold:g}")
    return threshold


def step_verdicts(row: dict[str, Any], label: str, threshold: float | None) -> tuple[list[bool], int]:
    """Good (True) or bad per step from column `label` (>= `threshold` for soft / ER), and how many steps fell back
    to the hard label because their soft / ER label is null."""
    hard = [bool(x) for x in row["labels"]]
    if label == "labels":
        return hard, 0
    assert threshold is not None
    verdicts, fallback = [], 0
    for value, h in zip(row[label], hard, strict=True):
        if value is None:
            verdicts.append(h)
            fallback += 1
        else:
            verdicts.append(value >= threshold)
    return verdicts, fallback


# -- the formats --------------------------------------------------------------------------------------


def check_step_tag(step_tag: str) -> str:
    """The marker of a Math-Shepherd step tag (the tag without surrounding whitespace); ExportError when unusable."""
    marker = step_tag.strip()
    if not marker:
        raise ExportError(f"--step-tag must hold a non-space marker, got {step_tag!r}")
    if step_tag.count(marker) != 1 or "+" in marker or "-" in marker:
        raise ExportError(f"--step-tag {step_tag!r}: its marker {marker!r} must occur once and hold no '+' or '-' "
                          "(the label text puts + or - in its place)")
    return marker


def _check_marker(i: int, row: dict[str, Any], marker: str, text: str) -> None:
    """Refuse a row whose tagged `text` holds `marker` anywhere but right after each step."""
    if text.count(marker) == len(row["completions"]):
        return
    where = "its prompt" if marker in row["prompt"] else next(
        (f"step {j}" for j, step in enumerate(row["completions"]) if marker in step), None)
    what = f"{where} contains" if where else "its text, where a step meets the next, forms"
    raise ExportError(f"row {i} (problem {row['problem_id']}): {what} the step tag's marker {marker!r}; the reader "
                      "would find a label where no step ends. Such rows are refused, not escaped"
                      + (" (choose another --step-tag)" if marker != QWEN_STEP_TOKEN else ""))


def math_shepherd_record(i: int, row: dict[str, Any], good: Sequence[bool], step_tag: str) -> dict[str, Any]:
    """``input``: prompt, then each step followed by `step_tag`; ``label``: the tags' markers replaced by + / -;
    ``value``: the + / - list."""
    marker = check_step_tag(step_tag)
    text = row["prompt"] + "".join(step + step_tag for step in row["completions"])
    _check_marker(i, row, marker, text)
    signs = ["+" if g else "-" for g in good]
    label = row["prompt"] + "".join(step + step_tag.replace(marker, sign)
                                    for step, sign in zip(row["completions"], signs, strict=True))
    return {"input": text, "label": label, "value": signs}


def qwen_prm_record(i: int, row: dict[str, Any], good: Sequence[bool]) -> dict[str, Any]:
    """``query``, ``steps``, ``response`` (each step followed by ``<extra_0>``) and 0/1 ``labels``."""
    response = "".join(step + QWEN_STEP_TOKEN for step in row["completions"])
    _check_marker(i, row, QWEN_STEP_TOKEN, row["prompt"] + response)
    return {"query": row["prompt"], "steps": list(row["completions"]), "response": response,
            "labels": [int(g) for g in good]}


def trl_stepwise_record(row: dict[str, Any], good: Sequence[bool]) -> dict[str, Any]:
    """``prompt``, ``completions`` and boolean ``labels``: TRL's stepwise supervision. No tag: TRL appends its
    ``step_separator`` itself and places each label by the step's tokens, so no text can collide."""
    return {"prompt": row["prompt"], "completions": list(row["completions"]), "labels": list(good)}


def export_record(fmt: str, i: int, row: dict[str, Any], good: Sequence[bool], step_tag: str | None
                  ) -> dict[str, Any]:
    """Row `i` of the dataset in format `fmt`, with the traceability columns every format keeps."""
    if fmt == "math-shepherd":
        record = math_shepherd_record(i, row, good, step_tag or MATH_SHEPHERD_TAG)
    elif fmt == "qwen-prm":
        record = qwen_prm_record(i, row, good)
    else:
        record = trl_stepwise_record(row, good)
    return {**record, "problem_id": row["problem_id"], "source": row["source"],
            "soft_labels": row["soft_labels"], "er_labels": row["er_labels"]}


# -- the export ---------------------------------------------------------------------------------------


def _check_out(src: Path, out: Path, force: bool) -> None:
    s, o = src.resolve(), out.resolve()
    if o == s or o in s.parents:
        raise ExportError(f"--out {out} is the dataset or a directory holding it; choose another --out")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty; choose a new --out, or replace it with --force")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _file_bytes(schema: pa.Schema, records: list[dict[str, Any]], file_format: str) -> bytes:
    if file_format == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(records, schema=schema), buf, compression="zstd")
    return buf.getvalue().to_pybytes()


def export_dataset(src_dir: str | Path, out_dir: str | Path, fmt: str, *, label: str = "labels",
                   threshold: float | None = None, file_format: str = "parquet", step_tag: str | None = None,
                   force: bool = False) -> ExportSummary:
    """Write the verified dataset at `src_dir` in format `fmt` to `out_dir`, with its card; see the module docstring.

    Every check runs before anything is written; ExportError names what is refused.
    """
    src, out = Path(src_dir), Path(out_dir)
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
    if file_format not in FILE_FORMATS:
        raise ExportError(f"--file-format must be one of {list(FILE_FORMATS)}, got {file_format!r}")
    if step_tag is not None and fmt != "math-shepherd":
        raise ExportError(f"--step-tag is math-shepherd's; {fmt} has a fixed layout")
    threshold = check_label_choice(label, threshold)
    if fmt == "math-shepherd":
        step_tag = MATH_SHEPHERD_TAG if step_tag is None else step_tag
        check_step_tag(step_tag)
    problems = verify_dataset(src)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ExportError(f"{src} is not a verified dataset: {problems[0]}{more}; see `prm-factory verify {src}`")
    _check_out(src, out, force)
    manifest = read_manifest(src)
    rows = read_dataset(src, verify=False).select(list(_COLUMNS)).to_pylist()
    if not rows:
        raise ExportError(f"{src} holds no rows: nothing to export")
    bad_splits = sorted({r["split"] for r in rows if _SPLIT_NAME.fullmatch(r["split"]) is None})
    if bad_splits:
        raise ExportError(f"split names {bad_splits} are not Hugging Face split names (letters, digits, _ and "
                          "dots between them)")

    by_split: dict[str, list[dict[str, Any]]] = {}
    verdicts: list[list[bool]] = []
    fallback = 0
    for i, row in enumerate(rows):
        good, fell_back = step_verdicts(row, label, threshold)
        fallback += fell_back
        verdicts.append(good)
        by_split.setdefault(row["split"], []).append(export_record(fmt, i, row, good, step_tag))

    files = {split: f"{DATA_DIR}/{split}-00000-of-00001.{file_format}" for split in sorted(by_split)}
    summary = ExportSummary(out, fmt, file_format, label, threshold, step_tag, len(rows),
                            sum(len(g) for g in verdicts), sum(sum(g) for g in verdicts), fallback,
                            {split: len(records) for split, records in sorted(by_split.items())}, files)
    card = dataset_card(src, manifest, rows, verdicts, summary)

    for leftover in out.parent.glob(f".{out.name}.export-*-*"):  # a killed export's temp or moved-aside directory
        shutil.rmtree(leftover, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        (tmp / DATA_DIR).mkdir(parents=True)
        for split, rel in files.items():
            atomic_write_bytes(tmp / rel, _file_bytes(SCHEMAS[fmt], by_split[split], file_format))
        atomic_write_text(tmp / CARD_NAME, card)
        fsync_dir(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; a non-empty `out` (the caller checked `force`) is moved aside first."""
    old = None
    if out.is_dir() and any(out.iterdir()):
        old = out.parent / f".{out.name}.export-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)  # over an empty directory, or onto a free name
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old)


# -- the dataset card ---------------------------------------------------------------------------------


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"


def _card_license(sources: list[dict[str, Any]]) -> str:
    """The card's license: the sources' one license, in the lower case the Hub uses, or "unknown" when a source
    states none or two sources differ."""
    stated = {(s.get("license") or "").lower() for s in sources}
    return stated.pop() if len(stated) == 1 and "" not in stated else "unknown"


def _source_origin(source: dict[str, Any] | None) -> str:
    if source is None:
        return "not recorded (no build config in this dataset directory)"
    if source.get("kind") == "toy":
        return (f"generated by prm-factory's toy world (tasks/sources/toy_world.py): {source.get('num_problems')} "
                f"problems, seed {source.get('seed')}, {source.get('min_steps')}-{source.get('max_steps')} "
                "operations")
    limit = f", first {source['limit']} rows" if source.get("limit") else ""
    return f"file `{source.get('path')}` read as {source.get('kind')}{limit}"


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _layout(summary: ExportSummary) -> list[str]:
    data = f"`{DATA_DIR}/<split>-00000-of-00001.{summary.file_format}`"
    extra = ("Every row also keeps `problem_id`, `source`, `soft_labels` and `er_labels` (as stored: null where the "
             "label rule has none) for tracing and for trainers that read soft targets.")
    if summary.format == "math-shepherd":
        tag, marker = summary.step_tag or MATH_SHEPHERD_TAG, (summary.step_tag or MATH_SHEPHERD_TAG).strip()
        return [
            f"Math-Shepherd / OpenRLHF layout, one row per trajectory in {data}:", "",
            f"- `input`: the prompt, then every step followed by the step tag `{json.dumps(tag, ensure_ascii=False)}` "
            "(as a JSON string: mind its whitespace). Steps "
            "are written verbatim, with no separator of their own: removing every tag gives the trajectory exactly "
            "as the policy wrote it.",
            f"- `label`: the same text with each tag's `{marker}` replaced by `+` (good step) or `-` (bad step).",
            "- `value`: the list of those `+` / `-`, one per step.",
            f"- OpenRLHF: `--input_key input --label_key value --placeholder_token {marker} --reward_tokens + -`. "
            f"OpenRLHF labels the tokens whose id is the placeholder's, so the tokenizer must encode every tag as "
            "that one token.",
            f"- A row whose prompt or step contains `{marker}` (or whose steps would form it where they meet) is "
            "refused at export, never escaped: its reader would find a label where no step ends.",
            "", extra,
        ]
    if summary.format == "qwen-prm":
        return [
            f"Qwen2.5-Math-PRM layout, one row per trajectory in {data}:", "",
            "- `query`: the prompt as the policy saw it (the config's prompt template applied).",
            "- `steps`: the steps; `response`: every step followed by `<extra_0>` (Qwen's "
            "`\"<extra_0>\".join(steps) + \"<extra_0>\"`).",
            "- `labels`: 1 (good) or 0 (bad) per step, the target at each `<extra_0>` token.",
            "- A row whose prompt or step contains `<extra_0>` (or whose steps would form it where they meet) is "
            "refused at export, never escaped.",
            "", extra,
        ]
    return [
        f"TRL stepwise-supervision layout (`trl.experimental.prm.PRMTrainer`), one row per trajectory in {data}:", "",
        "- `prompt`, `completions` (the steps), `labels` (one bool per step).",
        "- TRL appends its `step_separator` (PRMConfig, default `\"\\n\"`) to every step and puts the step's label "
        "on the separator's last token; no text can collide with it.",
        "- **Soft and ER labels do not survive TRL's cast.** TRL 1.13's `PRMTrainer.tokenize_row` reads only "
        "`prompt`, `completions` and `labels` and casts each label with `int()`: a bool becomes 0/1, a float soft "
        "or ER label would be truncated toward zero (`int(0.75) == 0`: every step short of 1.0 would train as bad) "
        "and a null would raise `TypeError`. So `labels` here is always boolean (see Labels for which column fed "
        "it). `soft_labels` and `er_labels` are kept as extra columns, but PRMTrainer drops every column before "
        "its loss (`remove_columns`): to train on soft or ER targets, use a trainer that reads them (prm-factory's "
        "own: `train.target: soft_labels | er_labels`).",
        "", extra,
    ]


def dataset_card(src: Path, manifest: dict[str, Any], rows: list[dict[str, Any]], verdicts: list[list[bool]],
                 summary: ExportSummary) -> str:
    """The export's ``README.md``: YAML front matter (files per split, the figures) and the sections. Every figure
    is read from the dataset directory (manifest, rows, ``build.json``, ``ingest.json``); what is not recorded
    there is said to be not recorded."""
    extra = manifest.get("extra", {}) if isinstance(manifest.get("extra"), dict) else {}
    build = _read_json(src / BUILD_MARKER)
    config = build.get("config") if build and build.get("config_hash") == manifest.get("config_hash") else None
    ingest = _read_json(src / INGEST_REPORT)
    name = extra.get("name") or (build or {}).get("name") or src.name

    counts = step_counts(rows)
    origins: Counter[str] = counts["step_origin"]
    by_origin = [(o, v) for r, g in zip(rows, verdicts, strict=True) for o, v in zip(r["step_origin"], g, strict=True)]
    final = [v for o, v in by_origin if o == FINAL_ORIGIN]
    non_final = [v for o, v in by_origin if o != FINAL_ORIGIN]
    stored_good = counts["hard_labels"]["good"] + counts["final_labels"]["good"]
    null_soft = sum(x is None for r in rows for x in r["soft_labels"])
    sampled_n = Counter(n for r in rows for o, n in zip(r["step_origin"], r["rollouts"], strict=True)
                        if o in SAMPLED_ORIGINS)
    etas = sorted({r["eta"] for r in rows})
    partitioners = ", ".join(f"`{p}` {params}" for p, params in sorted({(r["partitioner"], r["partitioner_params"])
                                                                        for r in rows}))
    cost = extra.get("cost") if isinstance(extra.get("cost"), dict) else None
    rollouts = (config or {}).get("rollouts") or {}
    sampling = ""
    if {"temperature", "top_p", "max_new_tokens"} <= set(rollouts):
        sampling = (f" (temperature {rollouts['temperature']:g}, top-p {rollouts['top_p']:g}, at most "
                    f"{rollouts['max_new_tokens']:,} new tokens)")

    front = {
        "pretty_name": f"{name} ({summary.format})",
        "license": _card_license((config or {}).get("sources") or []),
        "tags": ["process-reward-model", "step-labels", summary.format, "prm-factory"],
        "size_categories": [_size_category(summary.rows)],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": split, "path": rel} for split, rel in summary.files.items()]}],
        "prm_factory": {
            "format": summary.format, "label_column": summary.label, "threshold": summary.threshold,
            "step_tag": summary.step_tag, "dataset_version": manifest.get("dataset_version"),
            "config_hash": manifest.get("config_hash"), "code_version": manifest.get("code_version"),
            "schema_version": manifest.get("schema_version"), "parents": manifest.get("parents", []),
            "rows": summary.rows, "steps": summary.steps, "good_steps": summary.good_steps,
            "bad_steps": summary.steps - summary.good_steps, "rows_per_split": summary.rows_per_split,
            "generated_tokens": cost.get("generated_tokens") if cost else None,
        },
    }
    which = ("`labels`, the stored hard label" if summary.label == "labels" else
             f"`{summary.label}` >= {summary.threshold:g} (good) or < {summary.threshold:g} (bad); the "
             f"{summary.null_fallback_steps:,} steps whose `{summary.label}` is null keep their hard `labels` value")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
        f"# {name}: step-labelled PRM data ({summary.format})", "",
        f"Exported by `prm-factory export-dataset` from dataset version `{manifest.get('dataset_version')}`, built "
        f"from config hash `{manifest.get('config_hash')}` by prm-factory {manifest.get('code_version')}. Each row "
        f"is one trajectory: a prompt and the policy's solution cut into steps (partitioner: {partitioners}; `edu` "
        "is EDU-PRM's entropy rule, arXiv 2503.22233), each step labelled as Labels says (ER-PRM, arXiv "
        "2412.11006).", "",
        "## Layout", "", *_layout(summary), "",
        "## Counts", "",
        "| what | value |", "|---|---|",
        f"| rows (trajectories) | {summary.rows:,} |",
        f"| rows per split | {', '.join(f'{s}: {n:,}' for s, n in summary.rows_per_split.items())} |",
        f"| steps | {summary.steps:,} |",
        f"| problems / quarantined at ingest | {_fmt(extra.get('problems'))} / {_fmt(extra.get('quarantined'))} |",
        f"| exported labels: good / bad | {summary.good_steps:,} / {summary.steps - summary.good_steps:,} |",
        f"| non-final steps: good / bad | {sum(non_final):,} / {len(non_final) - sum(non_final):,} |",
        f"| final steps (the outcome): good / bad | {sum(final):,} / {len(final) - sum(final):,} |",
        f"| stored hard `labels`: good / bad | {stored_good:,} / {summary.steps - stored_good:,} |",
        f"| step origins | {', '.join(f'{o}: {n:,}' for o, n in sorted(origins.items()))} |",
        "",
        "## Labels", "",
        f"The exported good/bad label is {which}.", "",
        "What the dataset's label columns estimate, per step (`tasks/labelling/label_rule.py`): from the step's "
        "prefix, N completions are sampled from the policy and k of them reach the right final answer "
        "(`successes` k of `rollouts` N, both stored).", "",
        "- `labels` (hard): 1[k > 0], the step can still reach the right answer (Math-Shepherd's hard estimation).",
        "- `soft_labels`: k / N, the fraction of samples from the step that reach it (Math-Shepherd's soft "
        "estimation).",
        "- `er_labels`: ER-PRM's entropy-regularised (1/η) ln(1 − k/N + (k/N) e^η), between soft (η → 0) and hard "
        f"(η → ∞); η in this dataset: {', '.join(f'{e:g}' for e in etas)}.",
        "",
        "Which samples, by step origin:", "",
        f"- `rollout` / `tree` ({sum(origins[o] for o in SAMPLED_ORIGINS):,} steps): N samples of the policy "
        f"`{extra.get('policy_model', '–')}`{sampling} from the step's prefix (the generation tree's leaves that "
        "continued from it by sampling, plus fresh rollouts); N per step in this dataset: "
        f"{', '.join(f'{n} ({c:,} steps)' for n, c in sorted(sampled_n.items())) or '–'}.",
        f"- `final` ({origins[FINAL_ORIGIN]:,} steps): the whole solution; every label is the outcome, whether the "
        "final answer is right (1.0 / 0.0 for soft and ER).",
        f"- `early_stop` ({origins[EARLY_STOP_ORIGIN]:,}) and `estimated` ({origins[ESTIMATED_ORIGIN]:,} steps): "
        "samples drawn until the first success, or the binary search's rule verdict: hard label only, soft and "
        f"ER null ({null_soft:,} steps with a null soft/ER label in all).",
    ]
    if origins.get("truth"):
        lines.append(f"- `truth` ({origins['truth']:,} steps): the toy world's exact checker (an upper bound used to "
                     "measure the learner, not a labelling method).")
    lines += ["", "## Sources", "",
              "| # | kind | origin | split | kept | quarantined | license |", "|---|---|---|---|---|---|---|"]
    per_source = (ingest or {}).get("per_source") or []
    config_sources = (config or {}).get("sources") or []
    for i in range(max(len(per_source), len(config_sources))):
        counts = per_source[i] if i < len(per_source) else {}
        source = config_sources[i] if i < len(config_sources) else None
        lines.append(f"| {i} | {(source or counts).get('kind', '–')} | {_source_origin(source)} | "
                     f"{(source or {}).get('split', '–')} | {_fmt(counts.get('kept'))} | "
                     f"{_fmt(counts.get('quarantined'))} | {(source or {}).get('license') or 'not recorded'} |")
    if not per_source and not config_sources:
        lines.append("| – | – | not recorded (no build config or ingest report in this dataset directory) | – | – "
                     "| – | – |")
    row_sources = ", ".join(f"{s}: {n:,} rows" for s, n in sorted(Counter(r["source"] for r in rows).items()))
    policy = extra.get("policy_model", "–")
    lines += ["", f"Rows per `source`: {row_sources}. The steps are generations of the policy `{policy}`, whose "
              "license is not recorded in the dataset; a source's license is the one its config states "
              "(`sources[].license`), and the card's `license` is that license when every source states the same "
              "one, else `unknown`. Check both before you publish or train on this data.", ""]
    lines += ["## Cost (generated tokens)", ""]
    if cost:
        lines += ["Summed from each shard's cost record (a shard reused from a parent version counts what it cost "
                  "when it was labelled).", "", "| what | count |", "|---|---|"]
        lines += [f"| {what} (`{key}`) | {_fmt(cost[key])} |" for key, what in _COST_ROWS if key in cost]
    else:
        lines.append("Not recorded in this dataset's manifest.")
    lines += ["", "## Provenance", "",
              f"- dataset version `{manifest.get('dataset_version')}` (sha256 over its shards), schema version "
              f"{manifest.get('schema_version')}, created {manifest.get('created_at')}; parents: "
              f"{', '.join(f'`{p}`' for p in manifest.get('parents', [])) or 'none'}",
              f"- config hash `{manifest.get('config_hash')}`, prm-factory code version "
              f"`{manifest.get('code_version')}`"]
    if config is not None:
        lines += ["", "The config (from the build's `build.json`):", "", "```yaml",
                  yaml.safe_dump(config, sort_keys=True, allow_unicode=True).rstrip(), "```"]
    else:
        lines.append("- the config itself is not stored in this dataset directory (a relabelled or active-loop "
                     "version); its hash is above")
    return "\n".join(lines) + "\n"
