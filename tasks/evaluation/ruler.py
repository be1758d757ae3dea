"""The toy ruler: one fixed, seeded, held-out set of policy trajectories with exact per-step truth.

Every "labels per token" comparison from issue 13 on is measured on this set, so it is defined once
(`TOY_RULER`, a frozen spec: problem seed and knobs, policy, sampling seed), written once (Parquet + a
manifest holding the spec, its hash and a content hash) and shipped in ``assets/toy-ruler``. Loading
checks both hashes; a set that differs from the spec's is refused.

Held out:
- its problems come from their own toy seed with 3-6 steps, and at build time every problem that any
  shipped config (configs/*.yaml) or the toy policy's own training/validation sets would generate is
  excluded (by problem_id);
- `check_disjoint` compares its problem_ids with a training dataset's and refuses any overlap, so a PRM
  trained on a dataset that happens to contain a ruler problem is never scored on it.

Trajectories: `samples_per_problem` temperature-1.0 samples of the shipped toy policy per problem, through
the transformers engine (cluster/hf_engine.py; each request seeded, so the same spec samples the same
tokens on the same machine). A trajectory is cut at newlines, each step keeping its newline, so the steps
concatenate back to the text. The truth of step i is `tasks.sources.toy_world.prefix_is_correct` of the text up
to and including step i, with that step's line taken as finished (a newline appended when it has none):
the last line is judged whole, so `Answer: 3` where the answer is 32 is wrong, not "a prefix of right".
The truth is a prefix property: once a step is wrong, every later step is too.

Ruler v2 (`TOY_RULER_V2`, shipped in ``assets/toy-ruler-v2``, issue 21) is the same spec sampled by
``assets/toy-policy-v2``, the toy world v2 policy that also makes confident misconceptions
(tasks/sources/misconceptions.py); the same problems and the same exact truth, so v1 and v2 figures compare.

The reference scorers that validate the evaluation on it live in tasks/evaluation/reference_scorers.py; the
bootstrap intervals in tasks/evaluation/metrics.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from configs.schema import REPO_ROOT, ToySource, resolve_path
from tasks.evaluation.best_of_n import SELECTORS, Candidate, best_of_n
from tasks.evaluation.metrics import accuracy, auroc, first_error_f1, within_position_auroc, within_position_auroc_ci
from tasks.evaluation.scorers import DEFAULT_THRESHOLD, EvaluationError, ScoresLike, StepScorer
from tasks.generation import GenerationRequest
from tasks.io import MANIFEST_NAME, atomic_write_bytes, atomic_write_json, sha256_bytes, shard_files
from tasks.sources.problems import Problem
from tasks.sources.toy_world import check_solution, extract_answer, generate_problems, prefix_is_correct

RULER_FILE = "ruler.parquet"
DEFAULT_RULER_DIR = "assets/toy-ruler"
DEFAULT_BON_NS = (1, 2, 4, 8, 16)

# What the shipped toy policy saw while training (scripts/train_policy.py defaults): never ruler problems.
POLICY_TRAINING_SOURCES = (
    ToySource(num_problems=30000, seed=1000003, min_steps=1, max_steps=6),
    ToySource(num_problems=200, seed=1000033, min_steps=2, max_steps=6, split="val"),
)


@dataclass(frozen=True)
class RulerSpec:
    """Everything that decides the ruler's content. Change any field and the version must change too."""

    version: str = "toy-ruler-v1"
    num_problems: int = 256
    problem_seed: int = 20261123
    min_steps: int = 3
    max_steps: int = 6
    max_operand: int = 9
    max_multiplier: int = 5
    max_value: int = 99
    samples_per_problem: int = 16
    temperature: float = 1.0
    max_new_tokens: int = 96
    sample_seed: int = 515
    policy_path: str = "assets/toy-policy"
    prompt_template: str = "{question}\n"
    backend: str = "transformers"

    def source(self, num_problems: int | None = None) -> ToySource:
        """The toy source its problems are drawn from (before exclusions)."""
        return ToySource(num_problems=num_problems or self.num_problems, seed=self.problem_seed,
                         min_steps=self.min_steps, max_steps=self.max_steps, max_operand=self.max_operand,
                         max_multiplier=self.max_multiplier, max_value=self.max_value, split="ruler")

    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


TOY_RULER = RulerSpec()
# Toy world v2 (issue 21): the same problems and sampling seed, sampled by the policy that also makes confident
# misconceptions (tasks/sources/misconceptions.py); the truth is the same exact checker.
TOY_RULER_V2 = replace(TOY_RULER, version="toy-ruler-v2", policy_path="assets/toy-policy-v2")
DEFAULT_RULER_V2_DIR = "assets/toy-ruler-v2"
# The shipped rulers by name and directory: each must be exactly its spec.
SHIPPED_RULERS = {"v1": (DEFAULT_RULER_DIR, TOY_RULER), "v2": (DEFAULT_RULER_V2_DIR, TOY_RULER_V2)}


def shipped_spec(ruler_dir: str | Path) -> RulerSpec | None:
    """The spec of the shipped ruler at `ruler_dir`, or None for another directory (checked by its own hashes)."""
    for path, spec in SHIPPED_RULERS.values():
        if resolve_path(ruler_dir) == resolve_path(path):
            return spec
    return None


# -- steps and truth ------------------------------------------------------------------------------------

_LINE_RE = re.compile(r"[^\n]*\n|[^\n]+")


def cut_at_newlines(text: str) -> list[str]:
    """Steps of a text: each line with its newline; ''.join(steps) == text. Empty text has no steps."""
    return _LINE_RE.findall(text)


def step_truth(problem: Problem, steps: Sequence[str]) -> list[bool]:
    """Exact truth per step: the text through step i, its last line taken as finished, is a correct prefix."""
    truth, prefix = [], ""
    for step in steps:
        prefix += step
        truth.append(prefix_is_correct(problem, prefix if prefix.endswith("\n") else prefix + "\n"))
    return truth


# -- building -------------------------------------------------------------------------------------------


def reserved_problem_ids(config_dir: Path = REPO_ROOT / "configs") -> set[str]:
    """problem_ids the ruler must never hold: the toy policy's training/validation problems and every toy
    source of every shipped config."""
    from configs.schema import load_config

    sources: list[ToySource] = list(POLICY_TRAINING_SOURCES)
    for path in sorted(config_dir.glob("*.yaml")):
        cfg = load_config(path, check_paths=False)
        sources += [s for s in cfg.sources if isinstance(s, ToySource)]
    return {p.problem_id for src in sources for p in generate_problems(src)}


def ruler_problems(spec: RulerSpec, exclude: set[str]) -> tuple[list[Problem], int]:
    """`spec.num_problems` problems from the spec's source, skipping ids in `exclude`; and how many were skipped.

    Problems are drawn in the source's seeded order from a pool 4x the size, so the result depends only
    on the spec and on `exclude`.
    """
    pool = generate_problems(spec.source(4 * spec.num_problems))
    seen: set[str] = set()
    kept: list[Problem] = []
    skipped = 0
    for p in pool:
        if p.problem_id in exclude:
            skipped += 1
            continue
        if p.problem_id in seen:
            continue
        seen.add(p.problem_id)
        kept.append(p)
        if len(kept) == spec.num_problems:
            return kept, skipped
    raise EvaluationError(f"only {len(kept)} distinct problems outside the reserved ones; lower num_problems")


def sample_ruler_rows(spec: RulerSpec, problems: Sequence[Problem], engine: Any,
                      progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Sample `samples_per_problem` solutions per problem with `engine` (an Engine with a `tokenize`); judge them."""
    rows: list[dict[str, Any]] = []
    for index, problem in enumerate(problems):
        prompt = spec.prompt_template.format(question=problem.question)
        req = GenerationRequest(prompt_token_ids=engine.tokenize(prompt), n=spec.samples_per_problem,
                                temperature=spec.temperature, max_new_tokens=spec.max_new_tokens,
                                seed=spec.sample_seed * 1_000_003 + index, request_id=problem.problem_id)
        (result,) = engine.generate([req], stage="generate")
        for k, sample in enumerate(result.samples):
            steps = cut_at_newlines(sample.text)
            check = check_solution(problem, sample.text)
            rows.append({
                "ruler_version": spec.version,
                "problem_id": problem.problem_id,
                "question": problem.question,
                "answer": problem.answer,
                "sample_index": k,
                "prompt": prompt,
                "completions": steps,
                "step_truth": step_truth(problem, steps),
                "final_answer": extract_answer(sample.text),
                "final_correct": bool(check.final_correct),
                "first_error": int(check.first_error),
                "finish_reason": sample.finish_reason,
                "generated_tokens": len(sample.token_ids),
            })
        if progress:
            progress(1)
    return rows


RULER_SCHEMA = pa.schema([
    pa.field("ruler_version", pa.string(), nullable=False),
    pa.field("problem_id", pa.string(), nullable=False),
    pa.field("question", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("completions", pa.list_(pa.string()), nullable=False),
    pa.field("step_truth", pa.list_(pa.bool_()), nullable=False),
    pa.field("final_answer", pa.string()),
    pa.field("final_correct", pa.bool_(), nullable=False),
    pa.field("first_error", pa.int32(), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("generated_tokens", pa.int32(), nullable=False),
])


def content_hash(rows: Iterable[dict[str, Any]]) -> str:
    """sha256 of the rows as canonical JSON (one line per row, sorted keys): independent of Parquet bytes."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def write_ruler(rows: list[dict[str, Any]], spec: RulerSpec, out_dir: str | Path, extra: dict | None = None) -> dict:
    """Write ruler.parquet and manifest.json (spec, spec hash, content hash, file sha256, counts)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=RULER_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    atomic_write_bytes(out / RULER_FILE, data)
    steps = [t for r in rows for t in r["step_truth"]]
    manifest = {
        "ruler_version": spec.version,
        "spec": asdict(spec),
        "spec_hash": spec.spec_hash(),
        "content_hash": content_hash(rows),
        "file": RULER_FILE,
        "file_sha256": sha256_bytes(data),
        "problems": len({r["problem_id"] for r in rows}),
        "trajectories": len(rows),
        "steps": len(steps),
        "correct_steps": sum(steps),
        "final_correct": sum(r["final_correct"] for r in rows),
        "stopped_by_length": sum(r["finish_reason"] == "length" for r in rows),
        "empty_trajectories": sum(not r["completions"] for r in rows),
        **(extra or {}),
    }
    atomic_write_json(out / MANIFEST_NAME, manifest, indent=1)
    return manifest


def build_ruler(out_dir: str | Path, spec: RulerSpec, engine: Any,
                progress: Callable[[int], None] | None = None) -> dict:
    """Generate the ruler of `spec` into `out_dir` with `engine` (the caller builds it: see `prm-factory ruler`).

    `engine` is a tasks.generation.Engine with a `tokenize`; the shipped ruler was sampled by
    cluster.hf_engine.HFEngine, so only that backend reproduces it. Returns the manifest.
    """
    t0 = time.time()
    exclude = reserved_problem_ids()
    problems, skipped = ruler_problems(spec, exclude)
    rows = sample_ruler_rows(spec, problems, engine, progress)
    return write_ruler(rows, spec, out_dir, {"excluded_reserved_problems": skipped,
                                            "build_seconds": round(time.time() - t0, 1)})


# -- loading and guarding -------------------------------------------------------------------------------


@dataclass
class Ruler:
    """A loaded, verified ruler: its rows (in file order) and manifest."""

    rows: list[dict[str, Any]]
    manifest: dict[str, Any]
    path: Path = field(default_factory=Path)

    @property
    def problem_ids(self) -> set[str]:
        return {r["problem_id"] for r in self.rows}

    def limited(self, problems: int | None) -> Ruler:
        """The rows of its first `problems` problems (file order), for quick CPU runs."""
        if problems is None:
            return self
        keep: list[str] = []
        for r in self.rows:
            if r["problem_id"] not in keep:
                keep.append(r["problem_id"])
        chosen = set(keep[:problems])
        return Ruler([r for r in self.rows if r["problem_id"] in chosen], self.manifest, self.path)


def load_ruler(ruler_dir: str | Path = DEFAULT_RULER_DIR, spec: RulerSpec | None = TOY_RULER) -> Ruler:
    """Read and verify a ruler: file sha256, content hash and (unless spec is None) the spec hash."""
    root = resolve_path(ruler_dir)
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise EvaluationError(f"no ruler at {root} (missing {MANIFEST_NAME}); build it with `prm-factory ruler`")
    manifest = json.loads(mpath.read_text())
    data = (root / manifest.get("file", RULER_FILE)).read_bytes()
    if sha256_bytes(data) != manifest.get("file_sha256"):
        raise EvaluationError(f"{root / RULER_FILE} does not match its manifest's sha256 (modified or corrupt)")
    rows = pq.read_table(pa.BufferReader(data)).to_pylist()
    if content_hash(rows) != manifest.get("content_hash"):
        raise EvaluationError(f"{root}: rows do not match the manifest's content hash")
    if spec is not None and manifest.get("spec_hash") != spec.spec_hash():
        raise EvaluationError(f"{root} was built from spec {manifest.get('spec_hash')} "
                              f"({manifest.get('ruler_version')}), not {spec.spec_hash()} ({spec.version}): "
                              "comparisons need the same ruler")
    return Ruler(rows, manifest, root)


def dataset_problem_ids(dataset_dir: str | Path) -> set[str]:
    """The problem_ids of a dataset version (only that column is read from its shards)."""
    root = Path(dataset_dir)
    paths = shard_files(root)
    if not paths:
        raise EvaluationError(f"{root} holds no dataset shards (shards/part-*.parquet)")
    return {pid for p in paths for pid in pq.read_table(p, columns=["problem_id"]).column(0).to_pylist()}


def check_disjoint(ruler: Ruler, training_ids: set[str], what: str = "the training dataset") -> None:
    """Refuse (EvaluationError) when any ruler problem is in the training data."""
    overlap = sorted(ruler.problem_ids & training_ids)
    if overlap:
        raise EvaluationError(f"{len(overlap)} ruler problem(s) are in {what} (e.g. {overlap[:3]}): a PRM trained on "
                              f"them cannot be measured on this ruler; rebuild the dataset without them")


# -- evaluating -----------------------------------------------------------------------------------------


def score_ruler(scorer: StepScorer, ruler: Ruler, batch_size: int = 16) -> list[ScoresLike | None]:
    """One scores object per row (None for an empty trajectory, which has no step to score)."""
    idx = [i for i, r in enumerate(ruler.rows) if r["completions"]]
    scored = scorer.score([ruler.rows[i]["prompt"] for i in idx], [ruler.rows[i]["completions"] for i in idx],
                          batch_size=batch_size)
    if len(scored) != len(idx):
        raise EvaluationError(f"scorer returned {len(scored)} results for {len(idx)} trajectories")
    out: list[ScoresLike | None] = [None] * len(ruler.rows)
    for i, s in zip(idx, scored, strict=True):
        out[i] = s
    return out


def ruler_step_metrics(ruler: Ruler, scores: Sequence[ScoresLike | None],
                       threshold: float = DEFAULT_THRESHOLD, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Step metrics against the exact truth; unscored (truncated) steps are left out and counted.

    The headline is within-position AUROC (with a 95% bootstrap interval over problems) and first-error F1:
    neither can be won by position alone. Step AUROC over all steps is reported beside them, never alone.
    """
    per_traj_scores: list[list[float]] = []
    per_traj_truth: list[list[bool]] = []
    unscored = truncated = 0
    for row, sc in zip(ruler.rows, scores, strict=True):
        truth = list(row["step_truth"])
        mean = [] if sc is None else [float(x) for x in sc.mean]
        if len(mean) > len(truth):
            raise EvaluationError(f"{len(mean)} scores for {len(truth)} steps (problem {row['problem_id']})")
        truncated += bool(sc is not None and sc.truncated)
        unscored += len(truth) - len(mean)
        per_traj_scores.append(mean)
        per_traj_truth.append(truth)
    # A NaN is no score (a step past the scorer's context, or a scorer that failed on it): left out, counted.
    pairs = [(s, t) for traj, truth in zip(per_traj_scores, per_traj_truth, strict=True)
             for s, t in zip(traj, truth, strict=False) if not math.isnan(s)]
    unscored += sum(len(traj) for traj in per_traj_scores) - len(pairs)
    flat_scores, flat_truth = [s for s, _ in pairs], [t for _, t in pairs]
    value = auroc(flat_scores, flat_truth) if flat_scores else math.nan
    within = within_position_auroc(per_traj_scores, per_traj_truth)
    # first-error F1 judges whole trajectories: only those scored to the end, every step
    complete = [(s, t) for s, t in zip(per_traj_scores, per_traj_truth, strict=True)
                if t and len(s) == len(t) and not any(math.isnan(x) for x in s)]
    f1 = first_error_f1([s for s, _ in complete], [t for _, t in complete], threshold)
    return {
        "ruler_version": ruler.manifest.get("ruler_version"),
        "content_hash": ruler.manifest.get("content_hash"),
        "problems": len(ruler.problem_ids),
        "trajectories": len(ruler.rows),
        "steps": len(flat_scores),
        "correct_steps": sum(flat_truth),
        "unscored_steps": unscored,
        "truncated_trajectories": truncated,
        "within_position_auroc": None if math.isnan(within["mean"]) else within["mean"],
        "within_position_auroc_ci": within_position_auroc_ci([r["problem_id"] for r in ruler.rows], per_traj_scores,
                                                             per_traj_truth, n_boot, seed),
        "first_error_f1": f1["f1"],
        "first_error": {**f1, "judged_trajectories": len(complete)},
        "step_auroc": None if math.isnan(value) else value,
        "step_accuracy": accuracy(flat_scores, flat_truth, threshold) if flat_scores else None,
        "positions": within["positions"],
        "threshold": threshold,
    }


def ruler_candidates(ruler: Ruler, scores: Sequence[ScoresLike | None]) -> list[list[Candidate]]:
    """Per problem (file order), its samples as best-of-N candidates: step scores, extracted answer, outcome."""
    by_problem: dict[str, list[Candidate]] = {}
    for row, sc in zip(ruler.rows, scores, strict=True):
        by_problem.setdefault(row["problem_id"], []).append(
            Candidate([] if sc is None else list(sc.mean), row["final_answer"], bool(row["final_correct"])))
    return list(by_problem.values())


def evaluate_ruler(scorer: StepScorer, ruler: Ruler, bon_ns: Sequence[int] | None = DEFAULT_BON_NS,
                   threshold: float = DEFAULT_THRESHOLD, batch_size: int = 16, seed: int = 0,
                   n_boot: int = 1000) -> dict[str, Any]:
    """Score the ruler once; step metrics and (unless bon_ns is None/empty) best-of-N accuracy per selector,
    each with 95% bootstrap intervals over problems."""
    scores = score_ruler(scorer, ruler, batch_size)
    report: dict[str, Any] = {"steps": ruler_step_metrics(ruler, scores, threshold, n_boot, seed)}
    if bon_ns:
        res = best_of_n(ruler_candidates(ruler, scores), list(bon_ns), tuple(SELECTORS), seed, n_boot)
        report["best_of_n"] = asdict(res)
    return report
