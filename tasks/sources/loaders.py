"""Problem loaders for files: GSM8K / MATH JSONL, ProcessBench JSON arrays, the user's own JSONL / Parquet.

Each loader reads every row and either keeps it as a `Problem` or quarantines it with a reason, so
`len(problems) + len(quarantined) == rows_read` always holds: a load never dies on one bad row and never drops
one silently. Whitespace-only JSONL lines are not rows. A file that cannot be read at all (missing, not a JSON
array, no such Parquet column) raises `SourceError`, naming the file.

Quarantine reasons (`QuarantineRow.reason`; the detail says which field and why):

    invalid_json        the line is not valid JSON
    missing_field       a required field is absent or null
    wrong_type          a field (or the row itself) has the wrong type
    invalid_value       ProcessBench: empty steps, or a label outside -1..len(steps)-1
    empty_question      the question is empty or whitespace
    unparseable_answer  no usable gold answer (GSM8K: no number after ####; MATH: empty / no \\boxed{}, or
                        beyond what the math checker decides in bounded time: `tasks.sources.answers.math_too_complex`)
    duplicate           a problem_id already kept (same source + same whitespace-normalised question; for
                        ProcessBench the same sample id); the first one is kept
    invalid_text        the line is not valid UTF-8, or a string holds a lone surrogate (JSON "\\ud800"):
                        text that cannot be written back as UTF-8 (Parquet, the tokenizer) is never kept
    too_long            the question is over MAX_QUESTION_CHARS, or the answer over MAX_ANSWER_CHARS

Fields other than the question and answer are metadata: a user's `id` is never used as a file name (a
problem's id is a hash, `tasks.sources.problems.problem_id`), so an id such as `../x` cannot point outside a folder.

ProcessBench has no gold answer: its rows are labelled solutions for evaluation. Each becomes a Problem with
answer="" and meta has_gold=False (plus id, generator, steps, label, final_answer_correct, subset). Several
ProcessBench samples share a question (other generators' solutions), so their problem_id hashes the sample id
with the question, and meta question_id holds the plain per-question id to group them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from configs.schema import FileSource, resolve_path
from tasks.sources.answers import gsm8k_gold, last_boxed, math_too_complex
from tasks.sources.problems import Problem, problem_id

MAX_RAW_CHARS = 2000
# Far above any real problem (GSM8K and MATH-500 questions are under 5,000 characters) and far below what
# would make one row hold up a whole shard; a policy's context rejects most long questions anyway.
MAX_QUESTION_CHARS = 32_768
MAX_ANSWER_CHARS = 1_000

REASONS = (
    "invalid_json",
    "missing_field",
    "wrong_type",
    "invalid_value",
    "empty_question",
    "unparseable_answer",
    "duplicate",
    "invalid_text",
    "too_long",
    "no_gold_answer",  # set by tasks.build.ingest: a problem rollouts cannot label (ProcessBench has no gold answer)
)


class SourceError(ValueError):
    """A source file that cannot be read at all; the message names the file."""


@dataclass(frozen=True)
class QuarantineRow:
    """A row that was not kept: where it came from, why (one of REASONS, plus a detail), and the raw row."""

    source: str
    # 1-based: the line of a JSONL file, the element of a JSON array, the row of a Parquet file;
    # 0: not known (no_gold_answer is found after loading)
    line: int
    reason: str
    raw: str  # the raw row, truncated to MAX_RAW_CHARS
    detail: str = ""
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadResult:
    """What a load produced: the kept problems and the quarantined rows."""

    problems: list[Problem] = field(default_factory=list)
    quarantined: list[QuarantineRow] = field(default_factory=list)

    @property
    def rows_read(self) -> int:
        return len(self.problems) + len(self.quarantined)


class _Reject(Exception):
    def __init__(self, reason: str, detail: str, raw: str | None = None) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.raw = reason, detail, raw


def raw_row(row: Any) -> str:
    """A row as quarantine text: JSON (strings as they are), truncated to MAX_RAW_CHARS, lone surrogates escaped."""
    text = row if isinstance(row, str) else json.dumps(row, ensure_ascii=False, default=str)
    text = text if len(text) <= MAX_RAW_CHARS else text[:MAX_RAW_CHARS] + "...[truncated]"
    # Lone surrogates cannot be written as UTF-8: escape them so the quarantine file can hold the row.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _lone_surrogate(value: Any, where: str = "row") -> str | None:
    """Where a string in `value` (nested lists/dicts, keys too) holds a lone surrogate; None if nowhere."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return f"{where} holds a lone surrogate {value[err.start]!a} at character {err.start}"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            found = _lone_surrogate(k, f"a key of {where}") or _lone_surrogate(v, f"field {k!a}")
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _lone_surrogate(v, f"{where}[{i}]")
            if found:
                return found
    return None


class _Collector:
    """Keeps problems (first of each problem_id), quarantines the rest, stops once `limit` problems are kept."""

    def __init__(self, kind: str, path: str, limit: int | None, seen: set[str] | None) -> None:
        self.kind, self.path, self.limit = kind, path, limit
        self.seen = set() if seen is None else seen
        self.result = LoadResult()

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.result.problems) >= self.limit

    def reject(self, line: int, reason: str, detail: str, row: Any) -> None:
        self.result.quarantined.append(QuarantineRow(self.kind, line, reason, raw_row(row), detail, self.path))

    def keep(self, line: int, problem: Problem, row: Any) -> None:
        if problem.problem_id in self.seen:
            self.reject(line, "duplicate", f"problem_id {problem.problem_id} already loaded; the first is kept", row)
            return
        self.seen.add(problem.problem_id)
        self.result.problems.append(problem)


def _required(row: Any, name: str, kind: type | tuple[type, ...] = str) -> Any:
    if not isinstance(row, dict):
        raise _Reject("wrong_type", f"row is a JSON {type(row).__name__}, expected an object")
    if name not in row or row[name] is None:
        raise _Reject("missing_field", f"field '{name}' is missing" if name not in row else f"field '{name}' is null")
    value = row[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _Reject("wrong_type", f"field '{name}' is a bool")
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _Reject("wrong_type", f"field '{name}' is {type(value).__name__}, expected {want}")
    return value


def _question(row: dict, name: str) -> str:
    question = _required(row, name)
    if not question.strip():
        raise _Reject("empty_question", f"field '{name}' is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise _Reject("too_long", f"field '{name}' has {len(question):,} characters (limit {MAX_QUESTION_CHARS:,})")
    return question


def _bounded_answer(answer: str, name: str, math: bool) -> str:
    if len(answer) > MAX_ANSWER_CHARS:
        raise _Reject("too_long", f"field '{name}' has {len(answer):,} characters (limit {MAX_ANSWER_CHARS:,})")
    why = math_too_complex(answer) if math else None
    if why is not None:
        raise _Reject("unparseable_answer", f"field '{name}': {why}")
    return answer


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed row or a _Reject for a line that is not UTF-8 JSON); whitespace-only lines are skipped.

    Read as bytes and decoded per line, strictly: a line with invalid UTF-8 is quarantined, never "repaired".
    """
    with path.open("rb") as f:
        for number, data in enumerate(f, start=1):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, _Reject("invalid_text", f"invalid UTF-8 at byte {err.start} of the line",
                                      data.decode("utf-8", "backslashreplace").rstrip("\n"))
                continue
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as err:
                yield number, _Reject("invalid_json", f"{err.msg} at column {err.colno}", text.rstrip("\n"))
            except RecursionError:
                yield number, _Reject("invalid_json", "nested too deeply to parse", text.rstrip("\n"))


def _collect(src: FileSource, rows: Iterable[tuple[int, Any]], make, seen: set[str] | None) -> LoadResult:
    out = _Collector(src.kind, src.path, src.limit, seen)
    for line, row in rows:
        if out.full:
            break
        if isinstance(row, _Reject):
            out.reject(line, row.reason, row.detail, row.raw)
            continue
        surrogate = _lone_surrogate(row)
        if surrogate is not None:
            out.reject(line, "invalid_text", surrogate, row)
            continue
        try:
            problem = make(row)
        except _Reject as rej:
            out.reject(line, rej.reason, rej.detail, row)
            continue
        out.keep(line, problem, row)
    return out.result


def _file(src: FileSource) -> Path:
    path = resolve_path(src.path)
    if not path.is_file():
        raise SourceError(f"{src.kind} source: file not found: {src.path} (resolved to {path})")
    return path


# ------------------------------------------------------------------------------------------------- per source


def load_gsm8k(src: FileSource, seen: set[str] | None = None) -> LoadResult:
    """GSM8K JSONL: `question`, `answer` ending in `#### n`; gold = n (no commas), the rationale goes to meta."""

    def make(row: Any) -> Problem:
        question = _question(row, "question")
        answer_field = _required(row, "answer")
        try:
            gold = gsm8k_gold(answer_field)
        except ValueError as err:
            raise _Reject("unparseable_answer", str(err)) from None
        gold = _bounded_answer(gold, "answer", math=False)
        rationale = answer_field.rsplit("####", 1)[0].strip()
        return Problem.make("gsm8k", question, gold, src.split, rationale=rationale)

    return _collect(src, _jsonl_rows(_file(src)), make, seen)


def load_math(src: FileSource, seen: set[str] | None = None) -> LoadResult:
    """MATH JSONL: `problem`, `answer` (MATH-500) or the last `\\boxed{}` of `solution` (original MATH files).

    `solution`, `subject` (or MATH's `type`), `level` and `unique_id` go to meta when present.
    """

    def make(row: Any) -> Problem:
        question = _question(row, "problem")
        solution = row.get("solution")
        if solution is not None and not isinstance(solution, str):
            raise _Reject("wrong_type", f"field 'solution' is {type(solution).__name__}, expected str")
        if row.get("answer") is not None:
            answer, answer_from = _required(row, "answer", (str, int, float)), "answer"
            answer = str(answer).strip()
        elif solution is not None:
            answer, answer_from = last_boxed(solution), "solution"
            if answer is None:
                raise _Reject("unparseable_answer", "no 'answer' field and no \\boxed{} in 'solution'")
        else:
            raise _Reject("missing_field", "field 'answer' is missing (and there is no 'solution' to take it from)")
        if not answer:
            raise _Reject("unparseable_answer", f"empty answer (from '{answer_from}')")
        answer = _bounded_answer(answer, answer_from, math=True)
        meta: dict[str, Any] = {"answer_from": answer_from}
        for key in ("solution", "subject", "level", "unique_id"):
            if row.get(key) is not None:
                meta[key] = row[key]
        if "subject" not in meta and row.get("type") is not None:
            meta["subject"] = row["type"]
        return Problem.make("math", question, answer, src.split, **meta)

    return _collect(src, _jsonl_rows(_file(src)), make, seen)


def load_processbench(src: FileSource, seen: set[str] | None = None) -> LoadResult:
    """ProcessBench JSON array: one labelled solution per element; answer="" and meta has_gold=False (no gold)."""
    path = _file(src)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SourceError(f"processbench source {src.path}: not valid UTF-8 JSON ({err})") from None
    if not isinstance(data, list):
        raise SourceError(f"processbench source {src.path}: expected a JSON array, got {type(data).__name__}")

    def make(row: Any) -> Problem:
        sample_id = _required(row, "id")
        question = _question(row, "problem")
        generator = _required(row, "generator")
        steps = _required(row, "steps", list)
        if not all(isinstance(s, str) for s in steps):
            raise _Reject("wrong_type", "field 'steps' must be a list of strings")
        if not steps:
            raise _Reject("invalid_value", "field 'steps' is empty")
        label = _required(row, "label", int)
        if not -1 <= label < len(steps):
            raise _Reject("invalid_value", f"label {label} outside -1..{len(steps) - 1} for {len(steps)} steps")
        final_answer_correct = _required(row, "final_answer_correct", bool)
        problem = Problem.make(
            "processbench", question, "", src.split, has_gold=False, id=sample_id, subset=path.stem,
            generator=generator, steps=steps, label=label, final_answer_correct=final_answer_correct,
            question_id=problem_id("processbench", question),
        )
        return replace(problem, problem_id=problem_id("processbench", f"{sample_id}\x00{question}"))

    return _collect(src, enumerate(data, start=1), make, seen)


def _user_problem(src: FileSource, row: Any) -> Problem:
    question = _question(row, src.question_field)
    answer = _required(row, src.answer_field, (str, int, float))
    if isinstance(answer, float) and not math.isfinite(answer):
        raise _Reject("unparseable_answer", f"field '{src.answer_field}' is {answer}")
    answer = _bounded_answer(str(answer).strip(), src.answer_field, math=False)
    if not answer:
        raise _Reject("unparseable_answer", f"field '{src.answer_field}' is empty")
    meta = {k: v for k, v in row.items() if k not in (src.question_field, src.answer_field)}
    # Not Problem.make(**meta): a user column named "source" or "split" would clash with its parameters.
    return Problem(problem_id(src.kind, question), src.kind, question, answer, src.split, meta)


def load_jsonl(src: FileSource, seen: set[str] | None = None) -> LoadResult:
    """The user's JSONL: `question_field` and `answer_field` (str or number); other fields go to meta."""
    return _collect(src, _jsonl_rows(_file(src)), lambda row: _user_problem(src, row), seen)


def load_parquet(src: FileSource, seen: set[str] | None = None) -> LoadResult:
    """The user's Parquet: like JSONL, read in record batches (a `limit` stops early); other columns go to meta."""
    import pyarrow.parquet as pq

    path = _file(src)
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise SourceError(f"parquet source {src.path}: cannot read ({err})") from None
    names = pf.schema_arrow.names
    for col in (src.question_field, src.answer_field):
        if col not in names:  # a config error, not a bad row: quarantining every row would hide it
            raise SourceError(f"parquet source {src.path}: no column '{col}' (columns: {', '.join(names)})")

    def rows() -> Iterator[tuple[int, Any]]:
        line = 0
        for batch in pf.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                line += 1
                yield line, row

    return _collect(src, rows(), lambda row: _user_problem(src, row), seen)


_LOADERS = {
    "gsm8k": load_gsm8k,
    "math": load_math,
    "processbench": load_processbench,
    "jsonl": load_jsonl,
    "parquet": load_parquet,
}


def load_source(src: FileSource, seen: set[str] | None = None) -> LoadResult:
    """Load one file source with the loader of its kind.

    `seen` (problem_ids already kept, updated in place) lets several sources share one duplicate check.
    Toy sources are generated, not loaded: use `tasks.sources.toy_world.generate_problems`.
    """
    loader = _LOADERS.get(getattr(src, "kind", ""))
    if loader is None:
        raise ValueError(f"load_source reads file sources {sorted(_LOADERS)}; got kind {getattr(src, 'kind', src)!r}"
                         " (toy sources come from tasks.sources.toy_world.generate_problems)")
    return loader(src, seen)


def write_quarantine(rows: Iterable[QuarantineRow], path: str | Path) -> Path:
    """Write quarantined rows as JSONL (one object per row, with its reason), atomically: temp file, fsync, rename."""
    from tasks.io import atomic_write_lines

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_lines(path, (json.dumps(row.to_dict(), ensure_ascii=False) for row in rows))
    return path


def load_sources(sources: Iterable[Any]) -> list[tuple[Any, LoadResult]]:
    """Every source of a config, in order, with one duplicate check across them all (the first copy is kept).

    File sources go through `load_source`; toy sources are generated by `tasks.sources.toy_world.generate_problems`.
    """
    seen: set[str] = set()
    loaded: list[tuple[Any, LoadResult]] = []
    for src in sources:
        if src.kind == "toy":
            from tasks.sources.toy_world import (
                generate_problems,  # the toy world pulls in its own machinery: only if used
            )

            out = _Collector("toy", "", None, seen)
            for line, problem in enumerate(generate_problems(src), start=1):
                out.keep(line, problem, problem.to_dict())
            loaded.append((src, out.result))
        else:
            loaded.append((src, load_source(src, seen)))
    return loaded


def write_problems(problems: Iterable[Problem], path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write problems as Parquet (problem_id, source, question, answer, split, meta as a JSON string), atomically.

    `provenance` goes into the file's schema metadata under b"prm_factory".
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.io import atomic_write_bytes, provenance_metadata

    rows = list(problems)
    schema = pa.schema(
        [(name, pa.string()) for name in ("problem_id", "source", "question", "answer", "split", "meta")],
        metadata=provenance_metadata(provenance or {}),
    )
    table = pa.table(
        {
            "problem_id": [p.problem_id for p in rows],
            "source": [p.source for p in rows],
            "question": [p.question for p in rows],
            "answer": [p.answer for p in rows],
            "split": [p.split for p in rows],
            "meta": [json.dumps(p.meta, ensure_ascii=False, default=str) for p in rows],
        },
        schema=schema,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue().to_pybytes())
    return path
