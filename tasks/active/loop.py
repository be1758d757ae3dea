"""The ActPRM active-labelling loop (arXiv 2504.10559): label only what the PRM ensemble is unsure about.

One run lives in one output directory, laid out and read back by tasks/active/run_dir.py.

**Pool.** The config's sources (the first ``active.pool_size`` problems ingested). Each problem's solution is
generated with the labeller's own seeded root request (``tasks.labelling.tree_labeller``: seed from the config
seed and the problem id), so labelling that problem later regenerates the same solution, and cut by the configured
partitioner. No branching, no rollouts: the pool costs one solution per problem (``pool_tokens``), which is not
labelling cost.

**Rounds** r = 0 .. R-1. Round 0 has no PRM: it labels ``seed_size`` problems drawn at random (seeded). Round
r > 0 scores every unlabelled pool trajectory with round r-1's PRM ensemble and keeps the uncertain ones
(tasks/active/selection.py), most uncertain first, at most ``max_selected``; ``selector: random`` instead draws
``max_selected`` (else ``seed_size``) at random, the baseline at the same budget. The chosen problems are
labelled by a ``Labeller`` (default: the build's ``ShardLabeller``, an EDU tree and ER-PRM rollouts), written as
shard r of a new dataset version whose lineage names the parent version, the round and the problem ids, and
the PRM is trained on the whole version (``TrainFn``: Ray Train in cluster/active_run.py), warm-started from round
r-1's weights. Its held-out figures come from the toy ruler (``tasks.evaluation.ruler``) when the sources are toy.

**Stops.** After R rounds; when the label-token budget is spent (checked before each round; a round after the
first is also cut to what the remaining budget buys at the average cost per problem so far, at least one
problem); when the pool has no unlabelled trajectory left; when the PRM is confident on every unlabelled
trajectory (nothing to label: no empty training run). An empty pool, or a budget below the estimated cost of
labelling one problem (``estimate_label_cost``), is an ``ActiveError`` before any engine starts.

**Resume.** A finished round is a line in rounds.jsonl and is never redone. An unfinished round resumes from
what it left: its selection.json (the same problems), its dataset version when the manifest was written (or
its round shard when only that was: the shard's completion record vouches for the bytes and its cost record
for the tokens), its Ray Train run dir (Ray Train resumes from the last epoch checkpoint). So a killed loop
buys no label twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow.parquet as pq

from configs.schema import FactoryConfig
from tasks.active.run_dir import (
    CALIBRATION_FILE,
    LABELS_DIR,
    POOL_DIR,
    PRM_DIR,
    ROUNDS_DIR,
    SELECTION_FILE,
    SUMMARY_FILE,
    ActiveError,
    PoolItem,
    append_round,
    check_out_dir,
    complete_version,
    read_pool,
    read_rounds,
    write_json,
    write_pool,
)
from tasks.active.selection import (
    SelectionParams,
    calibrate_thresholds,
    draw_uncertain,
    gate_stats,
    random_selection,
    select_uncertain,
    selection_diagnostics,
    selection_params,
)
from tasks.build import shard_key, write_labelled_shard, write_version_manifest
from tasks.cost import ShardCost
from tasks.labelling.partition import decode_steps
from tasks.labelling.tree_labeller import ShardResult, Trajectory
from tasks.sources.problems import Problem
from tasks.store.dataset import (
    MANIFEST_NAME,
    check_shard,
    read_manifest,
    read_provenance,
    sha256_file,
    shard_info,
    shard_path,
)
from tasks.store.versions import (
    ReusableShard,
    append_refresh_log,
    link_shard,
    next_version_id,
    version_dir,
    write_latest,
)

log = logging.getLogger(__name__)


class Labeller(Protocol):
    """What the loop needs of a labeller: rows (the dataset row schema, tasks/store/dataset.py) and their cost.

    ``ShardLabeller`` (EDU tree + ER-PRM rollouts) is the default. An LLM-judge labeller slots in by returning
    rows of the same schema with ``cost.generated_tokens`` counting the judge's tokens, which is what the
    budget is charged.
    """

    def label(self, problems: Sequence[Problem]) -> ShardResult: ...


# (dataset_dir, run_dir, init_from or None) -> the run summary (cluster.train.TrainResult.to_dict()).
TrainFn = Callable[[Path, Path, Path | None], dict[str, Any]]
# (checkpoint dir, labelled problem ids) -> held-out figures ({"step_auroc": ..., ...}); may return {}.
EvalFn = Callable[[Path, set[str]], dict[str, Any]]
# (event, payload): "pool", "round_start", "selected", "labelled", "trained", "round", "stop".
EventFn = Callable[[str, dict[str, Any]], None]


# -- pure pieces -----------------------------------------------------------------------------------------------


def estimate_label_cost(cfg: FactoryConfig) -> dict[str, Any]:
    """An estimate, from the config alone, of the tokens labelling one problem generates.

    ``leaves x rollouts.n x rollouts.max_new_tokens``: a tree of ``leaves`` solutions (1 without branching; with
    EDU branching ``tree.branch_width``, a tree that branched once), each with N generations (its own and the
    rollouts of its step prefixes) at the ``max_new_tokens`` cap. Real solutions stop earlier (the toy policy
    writes ~36 tokens), so the real cost is lower; the estimate guards against a budget that cannot buy one
    problem, before any engine starts.
    """
    leaves = min(cfg.tree.branch_width, cfg.tree.max_leaves) if cfg.branching and cfg.tree.max_depth > 0 else 1
    tokens = leaves * cfg.rollouts.n * cfg.rollouts.max_new_tokens
    how = (f"{leaves} tree leaves x {cfg.rollouts.n} rollouts x {cfg.rollouts.max_new_tokens} max_new_tokens")
    return {"tokens": tokens, "leaves": leaves, "how": how}


def check_budget(cfg: FactoryConfig) -> None:
    """ActiveError when ``active.label_token_budget`` cannot buy one problem's labels (see estimate_label_cost)."""
    budget = cfg.active.label_token_budget
    if budget is None:
        return
    est = estimate_label_cost(cfg)
    if budget < est["tokens"]:
        raise ActiveError(f"active.label_token_budget {budget:,} is below the estimated cost of labelling one "
                          f"problem, {est['tokens']:,} tokens ({est['how']}); raise the budget or lower "
                          "rollouts.n / rollouts.max_new_tokens")


def expected_label_cost(item: PoolItem) -> float:
    """A pool trajectory's expected labelling cost, up to a constant factor (all a draw weighted by gain per token
    needs): its tokens times its steps, as every cut point is rolled out to the end (and an EDU tree branches at
    them). In the toy world v2's EDU builds this tracks the tokens labelling a problem generated with correlation
    0.82 (1,024 problems each, seeds 3, 6, 7); the tokens alone 0.55."""
    return float(max(1, item.completion_tokens) * max(1, len(item.completions)))


def round_seed(seed: int, round_index: int) -> int:
    """The seed of a round's random draw: stable, and different per round."""
    return int(hashlib.sha256(f"active:{seed}:{round_index}".encode()).hexdigest()[:8], 16)


def budget_cap(budget: int | None, spent: int, labelled_problems: int) -> int | None:
    """How many problems the remaining budget buys at the average cost per problem so far (None: no cap).

    At least 1 while some budget is left (the round may overshoot; the next round then stops).
    """
    if budget is None or labelled_problems == 0 or spent <= 0:
        return None
    return max(1, int((budget - spent) // (spent / labelled_problems)))


def pool_steps(labeller: Any, leaf: Trajectory) -> list[str]:
    """A solution's step texts, cut exactly as ``ShardLabeller`` cuts the rows it labels."""
    return decode_steps(labeller.tok, leaf.token_ids, labeller.boundaries(leaf))


def stream_order(ids: Sequence[str], seed: int) -> list[str]:
    """The streaming schedule's pass over the pool: a seeded shuffle that depends on the ids, not their order."""
    return sorted(ids, key=lambda pid: (hashlib.sha256(f"stream:{seed}:{pid}".encode()).hexdigest(), pid))


def check_scored(scores: Sequence[Any], what: str) -> None:
    """ActiveError when not one of `scores` has a scored step: the gate would have nothing to go on."""
    if scores and all(all(math.isnan(m) for m in s.mean) for s in scores):
        raise ActiveError(f"{what}: the PRM scored no step of any of the {len(scores)} trajectories (every step "
                          "cut off by train.max_length, or no steps at all); nothing to gate, nothing labelled")


# -- the loop --------------------------------------------------------------------------------------------------


@dataclass
class ActiveResult:
    """What a run of the loop did: every finished round's record, why it stopped, the totals."""

    out_dir: Path
    rounds: list[dict[str, Any]]
    stop_reason: str
    message: str
    pool: dict[str, Any] = field(default_factory=dict)

    @property
    def label_tokens(self) -> int:
        return sum(int(r["label_tokens"]) for r in self.rounds)

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "stop_reason": self.stop_reason, "message": self.message,
                "rounds": self.rounds, "label_tokens": self.label_tokens,
                "pool": {k: v for k, v in self.pool.items() if k != "problem_ids"}}


class ActiveLoop:
    """Runs (or resumes) the rounds of one active run in ``out_dir``; see the module docstring.

    ``engine_factory`` starts the policy engines (called at most once, and only when a pool must be generated
    or labels bought); None: a loop that has no engine (a replay of labels already bought, e.g. the end-to-end
    benchmark's: the pool must be in OUT/pool and the labeller is given ``None`` for the engine; a pool that must
    be generated is an ActiveError); ``train_fn`` trains a PRM on a dataset version; ``eval_fn`` measures a
    checkpoint on a held-out set; ``labeller_factory`` makes the labeller for a round from (cfg, engine, tokenizer);
    ``scorer_factory`` opens a round's checkpoint to score the pool (``score(prompts, completions)``, and ``close()``
    if it has one; ``cluster.active_run.pool_scorer``), required by ``active.scorer: vllm``; None: ``load_prm`` here.
    """

    def __init__(self, cfg: FactoryConfig, out_dir: str | Path, engine_factory: Callable[[], Any] | None,
                 train_fn: TrainFn, eval_fn: EvalFn | None = None, *,
                 labeller_factory: Callable[[FactoryConfig, Any, Any], Labeller] | None = None,
                 on_event: EventFn | None = None, tokenizer_factory: Callable[[], Any] | None = None,
                 scorer_factory: Callable[[Path], Any] | None = None):
        if cfg.active.scorer == "vllm" and scorer_factory is None:
            raise ActiveError("active.scorer vllm needs a scorer factory (cluster.active_run.pool_scorer) to reach "
                              "the vLLM scoring actors")
        self._scorer_factory = scorer_factory
        self.cfg = cfg
        self.out = Path(out_dir)
        self._engine_factory = engine_factory
        self._engine: Any = None
        self._tokenizer: Any = None
        self._tokenizer_factory = tokenizer_factory
        self.train_fn = train_fn
        self.eval_fn = eval_fn
        self.labeller_factory = labeller_factory or _shard_labeller
        self.on_event = on_event or (lambda kind, payload: None)
        self._problems: dict[str, Problem] = {}
        self._pool: list[PoolItem] = []
        self._pool_meta: dict[str, Any] = {}

    # -- lazily started resources ---------------------------------------------------------------------------

    @property
    def engine(self) -> Any:
        if self._engine is None:
            if self._engine_factory is None:
                raise ActiveError(f"this loop has no policy engine (engine_factory None) but needs one: the pool in "
                                  f"{self.out / POOL_DIR} is missing or was written for another labelling config")
            self._engine = self._engine_factory()
        return self._engine

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self._tokenizer_factory is not None:
                self._tokenizer = self._tokenizer_factory()
            else:
                from tasks.build import load_tokenizer

                self._tokenizer = load_tokenizer(self.cfg)
        return self._tokenizer

    @property
    def engine_started(self) -> bool:
        return self._engine is not None

    # -- pool ------------------------------------------------------------------------------------------------

    def problems(self) -> list[Problem]:
        """The pool's problems: the sources, ingested (quarantine as in `build`), the first ``pool_size``."""
        from tasks.build import ingest

        problems = ingest(self.cfg).problems
        if self.cfg.active.pool_size is not None:
            problems = problems[: self.cfg.active.pool_size]
        if not problems:
            raise ActiveError("empty pool: the sources gave no usable problem (see the quarantine of "
                              "`prm-factory ingest`); nothing to label")
        return problems

    def pool(self, problems: Sequence[Problem]) -> tuple[list[PoolItem], dict[str, Any]]:
        """The pool's trajectories, generated once (reused from OUT/pool when written for this config)."""
        cached = read_pool(self.out, self.cfg.labelling_hash())
        if cached is not None and cached[1].get("problem_ids_in") == [p.problem_id for p in problems]:
            return cached
        from tasks.build import split_by_context

        started = time.perf_counter()
        fits, too_long = split_by_context(self.cfg, problems, self.tokenizer)
        # The labeller's own root request (same seed, same sampling): labelling a chosen problem regenerates this
        # solution. Branching off: the pool is one solution per problem.
        no_tree = self.cfg.model_copy(update={"tree": self.cfg.tree.model_copy(update={"enabled": False})})
        labeller = _shard_labeller(no_tree, self.engine, self.tokenizer)
        cost = ShardCost()
        _, trees = labeller.grow_trees(fits, cost) if fits else ({}, {})
        items: list[PoolItem] = []
        rejected = [{"problem_id": r.problem_id, "reason": r.reason} for r in too_long]
        for p in fits:
            leaf = trees[p.problem_id][0]
            steps = pool_steps(labeller, leaf)
            if not steps:
                rejected.append({"problem_id": p.problem_id, "reason": "empty generation: the policy wrote no tokens"})
                continue
            from tasks.sources.prompts import render_prompt

            pol = self.cfg.policy
            items.append(PoolItem(p.problem_id, p.source, render_prompt(pol.prompt_template, p.question,
                                                                         self.tokenizer, pol.system_prompt),
                                  steps, len(leaf.token_ids), leaf.finish_reason))
        meta = {"labelling_hash": self.cfg.labelling_hash(), "problem_ids_in": [p.problem_id for p in problems],
                "pool_tokens": cost.generated_tokens, "rejected": rejected,
                "seconds": round(time.perf_counter() - started, 2)}
        record = write_pool(self.out, items, meta)
        if not items:
            raise ActiveError(f"empty pool: none of the {len(problems)} problems gave a trajectory "
                              f"({len(rejected)} rejected, e.g. {rejected[:1]})")
        return items, record

    # -- one round's steps -----------------------------------------------------------------------------------

    def select(self, r: int, pool: Sequence[PoolItem], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Round r's selection (read back when a killed run wrote it already): problem ids and the figures."""
        path = self.out / ROUNDS_DIR / f"round-{r:03d}" / SELECTION_FILE
        if path.is_file():
            return json.loads(path.read_text())
        if self.cfg.active.schedule == "streaming":
            selection = self._select_batch(r, pool, records)
        else:
            selection = self._select_round(r, pool, records)
        # An empty selection stops the rounds (nothing to resume); a streaming batch the PRM trusts whole is a record.
        if selection["selected_problem_ids"] or (self.cfg.active.schedule == "streaming" and selection["unlabelled"]):
            write_json(path, selection)
        return selection

    def _select_round(self, r: int, pool: Sequence[PoolItem], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        act = self.cfg.active
        labelled = {pid for rec in records for pid in rec["selected_problem_ids"]}
        unlabelled = [item for item in pool if item.problem_id not in labelled]
        spent = sum(int(rec["label_tokens"]) for rec in records)
        cap = budget_cap(act.label_token_budget, spent, len(labelled))
        ids = [i.problem_id for i in unlabelled]
        scored_by, gate, stats, diagnostics = None, None, None, {}
        if r == 0 or act.selector == "random":
            k = act.seed_size if r == 0 else (act.max_selected or act.seed_size)
            k = k if cap is None else min(k, cap)
            sel = random_selection(ids, k, round_seed(act.seed, r))
            how = "random (round 0: no PRM yet)" if r == 0 else "random (baseline)"
        else:
            scored_by = self.out / ROUNDS_DIR / f"round-{r - 1:03d}" / PRM_DIR
            scores = self.score_pool(scored_by, unlabelled)
            check_scored(scores, f"round {r}: the pool")
            params, gate = self.gate_params(records)
            truths = self.step_truths(unlabelled)
            stats = gate_stats(scores, params, truths)
            limit = act.max_selected if cap is None else min(act.max_selected or cap, cap)
            pick = act.selection.pick
            if pick == "top_k":
                sel = select_uncertain(ids, scores, params, limit)
            else:
                weight = {"by_std": "std", "std_per_token": "std_per_token", "inverse_cost": "inverse_cost"}.get(
                    pick, "uniform")
                sel = draw_uncertain(ids, scores, params, limit, round_seed(act.seed, r), weight=weight,
                                     costs=[expected_label_cost(i) for i in unlabelled]
                                     if weight in ("std_per_token", "inverse_cost") else None)
            how = "uncertainty" if pick == "top_k" else f"uncertainty ({pick} draw)"
            chosen = set(sel.selected)
            diagnostics = selection_diagnostics(scores, truths, [i in chosen for i in ids], params.error_threshold)
        return {"round": r, "how": how, "unlabelled": len(unlabelled), "uncertain": sel.uncertain,
                "confident": sel.confident, "selected_problem_ids": list(sel.selected),
                "selected_digest": sel.digest(), "budget_cap": cap,
                "scored_by": str(scored_by) if scored_by else None,
                "params": asdict(sel.params) if sel.params else None, "gate": gate,
                **(stats.to_dict() if stats else {}), **diagnostics}

    def _select_batch(self, r: int, pool: Sequence[PoolItem], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Streaming batch r: the r-th slice of the seeded pass; the current PRM keeps its uncertain part (all of
        the first batch: no PRM yet). ``selector: random`` keeps as many, drawn at random from the batch."""
        act = self.cfg.active
        order = stream_order([i.problem_id for i in pool], act.seed)
        batch_ids = set(order[r * act.batch_size:(r + 1) * act.batch_size])
        batch = [i for i in pool if i.problem_id in batch_ids]
        ids = [i.problem_id for i in batch]
        spent = sum(int(rec["label_tokens"]) for rec in records)
        cap = budget_cap(act.label_token_budget, spent, sum(len(rec["selected_problem_ids"]) for rec in records))
        checkpoint = next((rec["checkpoint"] for rec in reversed(records) if rec.get("checkpoint")), None)
        gate, stats, params, diagnostics = None, None, None, {}
        if not batch:  # the pass is over
            chosen, uncertain, how = [], 0, "streaming (pass over)"
        elif checkpoint is None:
            chosen, uncertain, how = sorted(ids), len(ids), "streaming (first batch: no PRM yet, all labelled)"
        else:
            scores = self.score_pool(Path(checkpoint), batch)
            check_scored(scores, f"streaming batch {r}")
            params, gate = self.gate_params(records)
            truths = self.step_truths(batch)
            stats = gate_stats(scores, params, truths)
            gated = select_uncertain(ids, scores, params)
            uncertain = gated.uncertain
            if act.selector == "random":
                chosen = list(random_selection(ids, uncertain, round_seed(act.seed, r)).selected)
                how = "streaming random (as many as the gate left uncertain)"
            else:
                chosen, how = sorted(gated.selected), "streaming uncertainty"
        if cap is not None and len(chosen) > cap:
            chosen = list(random_selection(chosen, cap, round_seed(act.seed, r)).selected)
        if stats is not None:
            kept = set(chosen)
            diagnostics = selection_diagnostics(scores, truths, [i in kept for i in ids], params.error_threshold)
        digest = hashlib.sha256("\n".join(chosen).encode()).hexdigest()[:16]
        return {"round": r, "how": how, "unlabelled": len(batch), "uncertain": uncertain,
                "confident": len(batch) - uncertain, "selected_problem_ids": chosen, "selected_digest": digest,
                "budget_cap": cap, "scored_by": checkpoint, "params": asdict(params) if params else None,
                "gate": gate, **(stats.to_dict() if stats else {}), **diagnostics}

    def gate_params(self, records: Sequence[dict[str, Any]]) -> tuple[SelectionParams, dict[str, Any]]:
        """The gate's thresholds and how they were set: the config's (a preset or explicit values), or calibrated
        once on the seed set (round 0's problems, scored by round 0's PRM) to ``calibrate_trusted_share``, kept in
        OUT/calibration.json for the rest of the run."""
        sel = self.cfg.active.selection
        if sel.calibrate_trusted_share is None:
            params = selection_params(sel)
            how = f"preset {sel.preset}" if sel.delta_pred is None else "explicit thresholds"
            return params, {"how": how, "delta_pred": params.delta_pred, "delta_std": params.delta_std}
        path = self.out / CALIBRATION_FILE
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved["target_share"] == sel.calibrate_trusted_share:
                return SelectionParams(saved["delta_pred"], saved["delta_std"], sel.error_threshold), saved
        seed = records[0]
        by_id = {i.problem_id: i for i in self._pool}
        items = [by_id[pid] for pid in seed["selected_problem_ids"] if pid in by_id]
        scores = self.score_pool(Path(seed["checkpoint"]), items)
        try:
            cal = calibrate_thresholds(scores, sel.calibrate_trusted_share, sel.error_threshold)
        except ValueError as err:
            raise ActiveError(f"active.selection.calibrate_trusted_share: {err} (the seed set, round 0)") from None
        saved = {"how": f"calibrated on the seed set ({len(items)} trajectories, round 0's PRM) to a trusted share "
                        f"of {sel.calibrate_trusted_share}", "checkpoint": seed["checkpoint"], **cal.to_dict()}
        write_json(path, saved)
        return cal.params, saved

    def step_truths(self, items: Sequence[PoolItem]) -> list[list[bool] | None]:
        """Exact step truth of toy-world pool trajectories (None for other sources): what pseudo-label accuracy
        is measured against. Step i is right iff the text through it can still become the right solution."""
        from tasks.sources.toy_world import SOURCE, prefix_is_correct

        truths: list[list[bool] | None] = []
        for item in items:
            problem = self._problems.get(item.problem_id)
            if problem is None or item.source != SOURCE:
                truths.append(None)
                continue
            truths.append([prefix_is_correct(problem, "".join(item.completions[: i + 1]))
                           for i in range(len(item.completions))])
        return truths

    def score_pool(self, checkpoint: Path, items: Sequence[PoolItem]) -> list[Any]:
        """The checkpoint's ensemble scores (mean and std per step) of the pool items, from ``scorer_factory``'s
        scorer (closed after, when it can be), or in this process."""
        self.check_heads(checkpoint)
        prompts, completions = [i.prompt for i in items], [i.completions for i in items]
        if self._scorer_factory is None:
            from tasks.prm.model import load_prm

            return load_prm(checkpoint).score(prompts, completions)
        scorer = self._scorer_factory(checkpoint)
        try:
            return scorer.score(prompts, completions)
        finally:
            if hasattr(scorer, "close"):
                scorer.close()

    def check_heads(self, checkpoint: Path) -> None:
        """ActiveError when the checkpoint's ensemble is not the config's (another train.num_heads): its std is
        over another number of heads, so the thresholds mean something else. Checked before any labelling."""
        from tasks.prm.model import find_checkpoint_dir, read_prm_config

        heads = read_prm_config(find_checkpoint_dir(checkpoint))["num_heads"]
        if heads != self.cfg.train.num_heads:
            raise ActiveError(f"{checkpoint} is an ensemble of {heads} heads but train.num_heads is "
                              f"{self.cfg.train.num_heads}: the gate's std would be over other heads; use a "
                              "checkpoint of this config, or set train.num_heads to match")

    def label(self, r: int, selected: Sequence[str], problems: dict[str, Problem],
              records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Round r's labels as a new dataset version (shard r new, shards 0..r-1 linked from round r-1's version).

        Reuses what a killed run left: a complete version of this plan, or just its round shard.
        """
        cfg = self.cfg
        root = self.out / LABELS_DIR
        key = shard_key(cfg.labelling_hash(), selected)
        bought_before = [rec for rec in records if rec.get("version_id")]
        # Rounds: version r holds every label so far (shards 0..r-1 linked). Streaming: a batch's version holds
        # just its own shard (trained on alone, warm-started); its lineage still names the batch before.
        streaming = cfg.active.schedule == "streaming"
        keys = ([] if streaming else [rec["shard_key"] for rec in bought_before]) + [key]
        index = len(keys) - 1
        parent = bought_before[-1]["version_id"] if bought_before else None
        vid = complete_version(root, keys) or next_version_id(root, keys)
        vdir = version_dir(root, vid)
        bought = True
        if (vdir / MANIFEST_NAME).is_file():
            bought = False
        else:
            reused = self._link_parent(vdir, parent, keys[:-1])
            if check_shard(vdir, index, key) is None:
                bought = False  # written by a run that was killed before its manifest: the tokens were spent then
            else:
                engine = None if self._engine_factory is None else self.engine  # a replay needs no engine
                labeller = self.labeller_factory(cfg, engine, self.tokenizer)
                result = labeller.label([problems[pid] for pid in selected])
                write_labelled_shard(cfg, vdir, index, key, result, problems=len(selected),
                                     provenance={"active_round": r, "labeller": type(labeller).__name__})
            lineage = {"version": vid, "parent": parent, "round": r, "selected_problem_ids": list(selected),
                       "reused_shards": reused, "labelled_shards": [index]}
            earlier = 0 if streaming else sum(len(rec["selected_problem_ids"]) for rec in bought_before)
            write_version_manifest(
                cfg, vdir, range(index + 1), keys, parents=[parent] if parent else [],
                problems=earlier + len(selected), extra={"lineage": lineage})
            write_latest(root, vid)
            append_refresh_log(root, {"status": "active_round", "version": vid, "parents": [parent] if parent else [],
                                      "round": r, "labelled": len(selected)})
        manifest = read_manifest(vdir)
        shard = shard_path(vdir, index)
        cost = read_provenance(shard).get("cost", {})
        table = pq.read_table(shard, columns=["problem_id", "step_origin"])
        origins = table.column("step_origin").to_pylist()
        steps = sum(len(o) for o in origins)  # every step is a training target, the final (outcome) one too
        rollout_steps = sum(sum(1 for x in o if x != "final") for o in origins)
        return {"version_id": vid, "version_dir": str(vdir), "dataset_version": manifest["dataset_version"],
                "parent_version": parent, "shard_key": key, "shard_sha256": shard_info(vdir, index).sha256,
                "labelled_rows": table.num_rows, "labelled_steps": steps, "rollout_labelled_steps": rollout_steps,
                "labelled_problems": len(set(table.column("problem_id").to_pylist())),
                "rejected": int(read_provenance(shard).get("rejected", 0)), "bought_now": bought,
                "label_tokens": int(cost.get("generated_tokens", 0)),
                "rollout_tokens": int(cost.get("rollout_tokens", 0)),
                "tree_tokens": int(cost.get("generate_tokens", 0)) + int(cost.get("branch_tokens", 0))}

    def _link_parent(self, vdir: Path, parent: str | None, keys: Sequence[str]) -> list[dict[str, Any]]:
        if parent is None:
            return []
        pdir = version_dir(self.out / LABELS_DIR, parent)
        sha = {e["path"]: e["sha256"] for e in read_manifest(pdir)["shards"]}
        reused = []
        for i, k in enumerate(keys):
            rel = shard_path("", i).as_posix()
            how = "present" if check_shard(vdir, i, k) is None else link_shard(
                ReusableShard(i, k, i, pdir / rel, sha[rel]), vdir)
            reused.append({"index": i, "parent_index": i, "key": k, "how": how})
        return reused

    # -- the rounds ------------------------------------------------------------------------------------------

    def prepare(self) -> dict[str, Any]:
        """Check the budget and OUT, ingest, read the finished rounds, get the pool. Engines start only for a pool
        that is not on disk yet. Returns {"resumed", "rounds_done", "pool" (its record)}."""
        check_budget(self.cfg)  # before anything starts
        problems = self.problems()
        resumed = check_out_dir(self.out, self.cfg)
        records = read_rounds(self.out)
        self._check_records(records)
        self._problems = {p.problem_id: p for p in problems}
        self._pool, self._pool_meta = self.pool(problems)
        self.on_event("pool", {"trajectories": len(self._pool), "pool_tokens": self._pool_meta.get("pool_tokens"),
                               "resumed_rounds": len(records), "resumed": resumed})
        return {"resumed": resumed, "rounds_done": len(records), "pool": self._pool_meta}

    def stop_before(self, r: int, records: Sequence[dict[str, Any]]) -> tuple[str, str] | None:
        """(reason, message) when round r must not start: rounds done, or the budget spent; else None."""
        act = self.cfg.active
        spent = sum(int(rec["label_tokens"]) for rec in records)
        if act.label_token_budget is not None and spent >= act.label_token_budget:
            return "budget", (f"label-token budget spent: {spent:,} of {act.label_token_budget:,} tokens after "
                              f"{len(records)} rounds")
        if act.schedule == "rounds" and r >= act.rounds:
            return "rounds", f"{act.rounds} rounds done"
        return None

    def run_round(self, r: int) -> dict[str, Any]:
        """Round r (the next one, or a finished one: its record is returned as is, nothing redone).

        Returns the round's record, or {"stop": reason, "message": ...} when the round cannot buy anything
        (budget spent, pool exhausted, nothing uncertain, all rounds done).
        """
        records = read_rounds(self.out)
        if r < len(records):
            return records[r]
        if r > len(records):
            raise ActiveError(f"round {r} cannot run before round {len(records)}")
        stop = self.stop_before(r, records)
        if stop is not None:
            return {"stop": stop[0], "message": stop[1]}
        act, pool = self.cfg.active, self._pool
        spent = sum(int(rec["label_tokens"]) for rec in records)
        started = time.perf_counter()
        self.on_event("round_start", {"round": r})
        sel = self.select(r, pool, records)
        streaming = act.schedule == "streaming"
        if sel.get("gate_note"):
            log.warning("round %d: %s", r, sel["gate_note"])
        if not sel["selected_problem_ids"]:
            if sel["unlabelled"] == 0:
                if streaming:
                    return {"stop": "pool_exhausted", "message": f"one pass over the pool done in {r} batches"}
                return {"stop": "pool_exhausted", "message": f"round {r}: every pool trajectory is labelled already"}
            if streaming:  # the PRM trusts the whole batch: nothing labelled, no training, on to the next batch
                record = {**self._round_figures(r, sel, pool), **{k: None for k in _LABEL_KEYS},
                          "label_tokens": 0, "rollout_tokens": 0, "tree_tokens": 0, "labelled_rows": 0,
                          "labelled_steps": 0, "labelled_problems": 0, "cumulative_label_tokens": spent,
                          "checkpoint": sel["scored_by"], "trained": False,
                          "seconds": round(time.perf_counter() - started, 2)}
                append_round(self.out, record)
                self.on_event("round", record)
                return record
            return {"stop": "nothing_uncertain", "message": (
                f"round {r}: the round-{r - 1} PRM is confident on all {sel['unlabelled']} unlabelled trajectories "
                f"(delta_pred {sel['params']['delta_pred']}, delta_std {sel['params']['delta_std']}): nothing to "
                "label, no training run")}
        self.on_event("selected", sel)
        labels = self.label(r, sel["selected_problem_ids"], self._problems, records)
        self.on_event("labelled", {"round": r, **labels})
        run_dir = self.out / ROUNDS_DIR / f"round-{r:03d}" / PRM_DIR
        last_ckpt = next((rec["checkpoint"] for rec in reversed(records) if rec.get("checkpoint")), None)
        init_from = Path(last_ckpt) if act.warm_start and last_ckpt else None
        train = self.train_fn(Path(labels["version_dir"]), run_dir, init_from)
        self.on_event("trained", {"round": r, **train})
        model_dir = Path(train["model_dir"])
        labelled_ids = {pid for rec in records for pid in rec["selected_problem_ids"]}
        labelled_ids |= set(sel["selected_problem_ids"])
        evaluation = self.eval_fn(model_dir, labelled_ids) if self.eval_fn else {}
        last = train.get("last_eval") or (train.get("history") or [{}])[-1]
        record = {
            **self._round_figures(r, sel, pool),
            **{k: labels[k] for k in _LABEL_KEYS}, "trained": True,
            "cumulative_label_tokens": spent + labels["label_tokens"],
            "train_loss": last.get("train_loss"), "train_epochs": train.get("epochs"),
            "train_steps": train.get("global_step"), "train_seconds": train.get("seconds"),
            "warm_start_from": str(init_from) if init_from else None,
            "checkpoint": str(model_dir), "checkpoint_sha256": sha256_file(model_dir / "model.safetensors"),
            **{f"heldout_{k}": v for k, v in evaluation.items()},
            "seconds": round(time.perf_counter() - started, 2),
        }
        append_round(self.out, record)
        self.on_event("round", record)
        return record

    def _round_figures(self, r: int, sel: dict[str, Any], pool: Sequence[PoolItem]) -> dict[str, Any]:
        """A round's (or streaming batch's) selection figures, the gate's among them."""
        return {
            "round": r, "schedule": self.cfg.active.schedule,
            "selector": "random" if sel["how"].startswith(("random", "streaming random")) else "uncertainty",
            "how": sel["how"], "pool_size": len(pool), "unlabelled": sel["unlabelled"],
            "uncertain": sel["uncertain"], "confident": sel["confident"],
            "selected": len(sel["selected_problem_ids"]), "selected_problem_ids": sel["selected_problem_ids"],
            "selected_digest": sel["selected_digest"], "budget_cap": sel["budget_cap"], "gate": sel.get("gate"),
            **{k: sel.get(k) for k in ("trusted_share", "pseudo_label_acc", "pseudo_label_checked", "gate_note",
                                       "error_share_selected", "error_share_scored", "std_auroc_within_margin",
                                       "std_auroc_by_margin")},
        }

    def finish(self, stop: str, message: str) -> ActiveResult:
        """Write OUT/summary.json for this run and return the result."""
        result = ActiveResult(self.out, read_rounds(self.out), stop, message, self._pool_meta)
        write_json(self.out / SUMMARY_FILE, {**result.to_dict(), "engine_started": self.engine_started,
                                              "estimated_label_cost": estimate_label_cost(self.cfg)})
        self.on_event("stop", {"reason": stop, "message": message})
        return result

    def run(self) -> ActiveResult:
        """Run the remaining rounds; see the module docstring for the stops and the resume."""
        self.prepare()
        r = 0
        while True:
            outcome = self.run_round(r)
            if "stop" in outcome:
                return self.finish(outcome["stop"], outcome["message"])
            r += 1

    def _check_records(self, records: Sequence[dict[str, Any]]) -> None:
        """A finished round's labels must still be on disk as recorded (never re-bought, never silently changed)."""
        for rec in records:
            if rec.get("version_id") is None:  # a streaming batch the PRM trusted whole: nothing was bought
                continue
            vdir = version_dir(self.out / LABELS_DIR, rec["version_id"])
            try:
                version = read_manifest(vdir)["dataset_version"]
            except FileNotFoundError:
                raise ActiveError(f"round {rec['round']}'s labels {vdir} are gone; they will not be bought again: "
                                  "restore them, or start a new --out") from None
            if version != rec["dataset_version"]:
                raise ActiveError(f"round {rec['round']}'s labels {vdir} changed (dataset_version {version}, "
                                  f"recorded {rec['dataset_version']})")


_LABEL_KEYS = ("version_id", "dataset_version", "parent_version", "shard_key", "shard_sha256", "labelled_rows",
               "labelled_steps", "rollout_labelled_steps", "labelled_problems", "rejected", "label_tokens",
               "rollout_tokens", "tree_tokens", "bought_now")


def _shard_labeller(cfg: FactoryConfig, engine: Any, tokenizer: Any) -> Labeller:
    from tasks.labelling.labellers import make_labeller

    return make_labeller(cfg, engine, tokenizer)


def ruler_eval_fn(ruler_problems: int | None, bon_ns: Sequence[int] = (1, 8)) -> EvalFn:
    """Held-out figures on the toy ruler: step AUROC / accuracy against the exact truth and best-of-N (min score).

    Refuses (EvaluationError) a labelled set that shares a problem with the ruler.
    """

    def evaluate(model_dir: Path, labelled: set[str]) -> dict[str, Any]:
        from tasks.evaluation.ruler import check_disjoint, evaluate_ruler, load_ruler
        from tasks.prm.model import load_prm

        ruler = load_ruler().limited(ruler_problems)
        check_disjoint(ruler, labelled, "the labels bought by the active loop")
        report = evaluate_ruler(load_prm(model_dir), ruler, bon_ns=list(bon_ns))
        steps = report["steps"]
        out = {"ruler_problems": steps["problems"], "step_auroc": steps["step_auroc"],
               "step_accuracy": steps["step_accuracy"]}
        if "best_of_n" in report:  # best-of-N accuracy at the largest N, choosing by the minimum step score
            bon = report["best_of_n"]
            out[f"bon{bon['ns'][-1]}_min_step"] = bon["accuracy"]["min_step"][-1]
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}

    return evaluate


def format_round_line(record: dict[str, Any]) -> str:
    """One progress line per round (CLI and flow log)."""
    auroc = record.get("heldout_step_auroc")
    loss = record.get("train_loss")
    share, acc = record.get("trusted_share"), record.get("pseudo_label_acc")
    gate = "" if share is None else (f"; gate trusts {share:.1%}" + ("" if acc is None else
                                                                    f", pseudo-label acc {acc:.3f}"))
    err_sel, err_pool, std_auc = (record.get(k) for k in ("error_share_selected", "error_share_scored",
                                                           "std_auroc_within_margin"))
    if err_sel is not None:
        gate += f"; errors {err_sel:.0%} of picks vs {err_pool:.0%} of scored"
    if std_auc is not None:
        gate += f"; std AUROC within margin {std_auc:.3f}"
    note = f" [{record['gate_note']}]" if record.get("gate_note") else ""
    return (f"round {record['round']} ({record['how']}): pool {record['unlabelled']} unlabelled, "
            f"{record['uncertain']} uncertain, {record['selected']} labelled -> {record['labelled_rows']} rows, "
            f"{record['labelled_steps']} steps, {record['label_tokens']:,} tokens "
            f"({record['rollout_tokens']:,} rollout; {record['cumulative_label_tokens']:,} so far); "
            f"train loss {'-' if loss is None else f'{loss:.4f}'}, held-out AUROC "
            f"{'-' if auroc is None else f'{auroc:.3f}'}{gate}{note}")
