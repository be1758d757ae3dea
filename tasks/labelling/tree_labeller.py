"""The tree labeller: a shard of problems -> step-labelled dataset rows (generate, partition, branch, roll out, label).

One procedure covers both methods we compare, one config switch apart:
- EDU-PRM (arXiv 2503.22233): cut each solution where the policy's next-token entropy is high and, at
  those anchors, keep the sampled token and branch with the best other tokens, so one tree holds many
  step prefixes (and the wrong turns a PRM must learn from);
- Math-Shepherd style baseline: newline (or fixed-size) steps, no branching, N rollouts per step prefix.

Step labels follow ER-PRM (arXiv 2412.11006) from (successes k, rollouts N), where the N outcomes are
completions the policy sampled from that exact prefix: the one tree leaf that continued from it by
sampling, plus fresh rollouts. A leaf with a forced branch token after the prefix is not a sample from it
and is never counted; the tree's own (biased) value estimate goes to `tree_value` instead. The last
step's label is the trajectory's own final-answer correctness. Work is batched across the whole shard in
rounds (roots, one round per branching depth, then all rollouts), so an engine sees few large batches, and
prompts are token IDs that share prefixes, so vLLM's prefix cache pays. Every request carries a seed derived from the
problem and the prefix, so a shard labelled twice yields the same rows (what crash-resume relies on).

The rollouts themselves are tasks/labelling/rollouts.py (given a narrow engine call, not this labeller); which labels
a step gets from its counts and origin is tasks/labelling/label_rule.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from configs.schema import FactoryConfig
from tasks.cost import ShardCost
from tasks.generation import Engine, GenerationRequest, GenerationResult, Sample
from tasks.labelling.label_rule import EARLY_STOP_ORIGIN, ESTIMATED_ORIGIN, FINAL_ORIGIN, step_labels
from tasks.labelling.partition import Partitioner, decode_steps, make_partitioner
from tasks.labelling.rollouts import LeafSteps, PrefixKey, RolloutContext, RolloutLedger, request_seed, run_rollouts
from tasks.sources.answers import check_answer
from tasks.sources.problems import Problem
from tasks.sources.prompts import render_prompt


class Tokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass
class Trajectory:
    """One complete solution (a leaf of the generation tree), with per-token entropy and alternatives."""

    token_ids: list[int]
    entropy: list[float]
    top_alternatives: list[list[tuple[int, float]]]
    finish_reason: str
    branch_at: int = 0  # first position this leaf does not share with the leaf it branched from
    depth: int = 0
    final_correct: bool = False
    text: str = ""
    token_logprobs: list[float] = field(default_factory=list)  # log p of each token under the policy
    # Positions of forced (not sampled) branch tokens on this leaf: its own at branch_at - 1 and its
    # ancestors'. Every other token is a policy sample given the tokens before it.
    forced_at: tuple[int, ...] = ()
    parent: Trajectory | None = field(default=None, repr=False, compare=False)

    def sampled_after(self, end: int) -> bool:
        """True when every token from position `end` on is a policy sample: then this leaf is one
        completion sampled from the prefix token_ids[:end]."""
        return all(pos < end for pos in self.forced_at)


@dataclass
class Rejected:
    """A problem that produced no row, and why (goes to the labelling quarantine)."""

    problem_id: str
    source: str
    reason: str


@dataclass
class ShardResult:
    rows: list[dict[str, Any]]
    cost: ShardCost
    rejected: list[Rejected] = field(default_factory=list)


def _entropy_track(sample: Sample, source: str) -> list[float]:
    if source == "topk_upper":
        if sample.entropy_upper is None:
            raise ValueError("entropy_source 'topk_upper' needs an engine that returns top-k bounds (vLLM)")
        return list(sample.entropy_upper)
    if source == "exact" and sample.entropy_kind != "exact":
        raise ValueError("entropy_source 'exact' needs the transformers backend; vLLM returns top-k bounds")
    return list(sample.entropy)


def tree_value(leaf: Trajectory, pos: int, children: dict[int, list[Trajectory]],
               memo: dict[tuple[int, int], float] | None = None) -> float:
    """The tree's estimate of P(right answer | leaf.token_ids[:pos]), for a leaf sampled from `pos` on.

    At the first anchor a >= pos where the tree branched off this leaf, the value is the mean of the
    sub-tree values of the tokens tried there (the leaf's own sampled token and each forced branch
    token), weighted by the policy's probability of that token; past the last such anchor it is the
    leaf's outcome. Tokens never tried at an anchor get no weight, so this is a biased estimate (the
    benchmark measures how biased): it lives in `tree_value`, never in successes/rollouts. `children` maps
    id(leaf) to the leaves that branched off it; `memo` caches values by (id(leaf), pos).
    """
    memo = {} if memo is None else memo
    key = (id(leaf), pos)
    if key in memo:
        return memo[key]
    kids = [c for c in children.get(id(leaf), []) if c.branch_at - 1 >= pos]
    if not kids:
        value = float(leaf.final_correct)
    else:
        anchor = min(c.branch_at - 1 for c in kids)
        tried = [(leaf.token_logprobs[anchor], tree_value(leaf, anchor + 1, children, memo))]
        tried += [(c.token_logprobs[anchor], tree_value(c, anchor + 1, children, memo))
                  for c in kids if c.branch_at - 1 == anchor]
        weights = [math.exp(lp) if math.isfinite(lp) else 0.0 for lp, _ in tried]
        total = sum(weights)
        value = (sum(w * v for w, (_, v) in zip(weights, tried, strict=True)) / total if total > 0
                 else sum(v for _, v in tried) / len(tried))
    memo[key] = value
    return value


class ShardLabeller:
    """Labels problems with one engine (or pool) and one config. Stateless between shards."""

    def __init__(self, cfg: FactoryConfig, engine: Engine, tokenizer: Tokenizer,
                 progress: Callable[[str, int], None] | None = None):
        self.cfg = cfg
        self.engine = engine
        self.tok = tokenizer
        self.partitioner: Partitioner = make_partitioner(cfg.partition)
        self.progress = progress or (lambda stage, n: None)
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.branching = cfg.branching

    # -- engine rounds ---------------------------------------------------------------------------

    def run(self, requests: list[GenerationRequest], stage: str, cost: ShardCost) -> list[GenerationResult]:
        """One engine round: `requests` through the engine, their tokens charged to `stage` in `cost`."""
        if not requests:
            return []
        results = self.engine.generate(requests, stage=stage)
        tokens = sum(r.generated_tokens for r in results)
        setattr(cost, f"{stage}_tokens", getattr(cost, f"{stage}_tokens") + tokens)
        cost.prompt_tokens += sum(r.prompt_tokens for r in results)
        cost.cached_prompt_tokens += sum(r.cached_prompt_tokens for r in results)
        cost.requests += len(requests)
        self.progress(stage, len(requests))
        return results

    def _solution_request(self, prompt_ids: list[int], prefix: list[int], seed: int) -> GenerationRequest:
        rc = self.cfg.rollouts
        return GenerationRequest(
            prompt_token_ids=prompt_ids + prefix,
            n=1,
            temperature=rc.temperature,
            top_p=rc.top_p,
            max_new_tokens=max(1, rc.max_new_tokens - len(prefix)),
            top_logprobs=self.cfg.partition.top_logprobs,
            seed=seed,
            stop_token_ids=self.eos,
        )

    # -- the procedure -----------------------------------------------------------------------------

    def label(self, problems: Sequence[Problem]) -> ShardResult:
        """Rows for every leaf of every problem's tree, each step labelled from (successes, rollouts)."""
        cost = ShardCost()
        prompts, trees = self.grow_trees(problems, cost)
        return self._label_rows(problems, prompts, trees, cost)

    def grow_trees(self, problems: Sequence[Problem], cost: ShardCost
                   ) -> tuple[dict[str, list[int]], dict[str, list[Trajectory]]]:
        """Prompt token IDs and the generation tree (its leaves, root first) of every problem, answers checked."""
        pol = self.cfg.policy
        prompts = {p.problem_id: self.tok.encode(render_prompt(pol.prompt_template, p.question, self.tok,
                                                               pol.system_prompt),
                                                 add_special_tokens=False) for p in problems}
        trees: dict[str, list[Trajectory]] = {}

        # Round 0: one root solution per problem.
        roots = self.run([self._solution_request(prompts[p.problem_id], [], request_seed(self.cfg.seed, p.problem_id,
                                                                                          "root"))
                           for p in problems], "generate", cost)
        for p, res in zip(problems, roots, strict=True):
            trees[p.problem_id] = [self.trajectory(res.samples[0], [], None, 0, 0)]

        # Rounds 1..depth: branch at anchors of the leaves made in the previous round.
        frontier = {pid: list(leaves) for pid, leaves in trees.items()}
        for depth in range(1, self.cfg.tree.max_depth + 1 if self.branching else 1):
            jobs: list[tuple[str, Trajectory, int, int]] = []
            for p in problems:
                leaves = trees[p.problem_id]
                budget_leaves = self.cfg.tree.max_leaves - len(leaves)
                budget_tokens = self.cfg.tree.max_tree_tokens - sum(len(t.token_ids) for t in leaves)
                for parent in frontier[p.problem_id]:
                    for anchor in self.boundaries(parent)[1:]:
                        if anchor < parent.branch_at:
                            continue  # shared with its parent: that parent already branched there
                        for alt in self._alternatives(parent, anchor):
                            if budget_leaves <= 0 or budget_tokens <= 0:
                                break
                            jobs.append((p.problem_id, parent, anchor, alt))
                            budget_leaves -= 1
                            budget_tokens -= len(parent.token_ids)
            if not jobs:
                break
            requests = [self._solution_request(prompts[pid], parent.token_ids[:anchor] + [alt],
                                               request_seed(self.cfg.seed, pid, "branch",
                                                            *parent.token_ids[:anchor], alt))
                        for pid, parent, anchor, alt in jobs]
            results = self.run(requests, "branch", cost)
            frontier = {pid: [] for pid in trees}
            for (pid, parent, anchor, alt), res in zip(jobs, results, strict=True):
                child = self.trajectory(res.samples[0], parent.token_ids[:anchor] + [alt], parent, anchor, depth)
                trees[pid].append(child)
                frontier[pid].append(child)

        by_id = {p.problem_id: p for p in problems}
        for pid, leaves in trees.items():
            for leaf in leaves:
                leaf.text = self.tok.decode(leaf.token_ids, skip_special_tokens=True)
                leaf.final_correct = leaf.finish_reason == "stop" and check_answer(by_id[pid].source, leaf.text,
                                                                                   by_id[pid].answer)
        return prompts, trees

    def trajectory(self, sample: Sample, prefix: list[int], parent: Trajectory | None, anchor: int,
                   depth: int) -> Trajectory:
        """`sample` as a tree node: after `prefix` (the branch at `anchor` of `parent`), or a root."""
        entropy = _entropy_track(sample, self.cfg.partition.entropy_source)
        if parent is None:
            head_entropy: list[float] = []
            head_alts: list[list[tuple[int, float]]] = []
            head_logprobs: list[float] = []
        else:
            # The branch token comes from the same distribution as the parent's token at `anchor`, but it
            # was chosen, not sampled: its position goes into forced_at.
            head_entropy = parent.entropy[: anchor + 1]
            head_alts = parent.top_alternatives[: anchor + 1]
            alt_logprob = dict(parent.top_alternatives[anchor]).get(prefix[anchor], math.nan)
            head_logprobs = parent.token_logprobs[:anchor] + [alt_logprob]
        return Trajectory(
            token_ids=prefix + list(sample.token_ids),
            entropy=head_entropy + entropy,
            top_alternatives=head_alts + [list(a) for a in sample.top_logprobs],
            finish_reason=sample.finish_reason,
            branch_at=anchor + 1 if parent is not None else 0,
            depth=depth,
            token_logprobs=head_logprobs + list(sample.logprobs),
            forced_at=(*parent.forced_at, anchor) if parent is not None else (),
            parent=parent,
        )

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        return [self.tok.decode([t], skip_special_tokens=False) for t in token_ids]

    def boundaries(self, traj: Trajectory) -> list[int]:
        n = len(traj.token_ids)
        if n and traj.token_ids[-1] in self.eos:
            n -= 1  # the end-of-sequence token is never a step of its own
        return self.partitioner.boundaries(self.token_texts(traj.token_ids[:n]), traj.entropy[:n])

    def _alternatives(self, traj: Trajectory, anchor: int) -> list[int]:
        """Tokens other than the one taken at `anchor`, best first, up to branch_width - 1."""
        taken = traj.token_ids[anchor]
        alts = [tid for tid, _ in traj.top_alternatives[anchor] if tid != taken and tid not in self.eos]
        return alts[: self.cfg.tree.branch_width - 1]

    # -- labels ------------------------------------------------------------------------------------
    #
    # Every step prefix gets (successes, rollouts) from the policy's samples from that exact prefix: first the
    # tree leaves that continued from it by sampling (no forced branch token after it), then fresh rollouts.
    # The label rule (tasks.labelling.label_rule.step_labels) turns each step's counts and origin into its labels.

    def _label_rows(self, problems: Sequence[Problem], prompts: dict[str, list[int]],
                    trees: dict[str, list[Trajectory]], cost: ShardCost) -> ShardResult:
        """Cut every leaf into steps, count the tree's samples per step prefix, roll out, label one row per leaf."""
        plans, rejected = self._plan_steps(problems, trees, cost)
        prefix_stats, tree_values = _tree_counts(problems, trees, plans)

        ledger = run_rollouts(self._rollout_context(cost), plans, prompts, prefix_stats)
        tree_tokens = {pid: sum(len(t.token_ids) - t.branch_at for t in leaves) for pid, leaves in trees.items()}
        rows = [self._row(i, plan, prompts, prefix_stats, tree_values, ledger,
                          tree_tokens[plan.problem.problem_id] / len(trees[plan.problem.problem_id]))
                for i, plan in enumerate(plans)]
        return ShardResult(rows, cost, rejected)

    def _plan_steps(self, problems: Sequence[Problem], trees: dict[str, list[Trajectory]], cost: ShardCost
                    ) -> tuple[list[LeafSteps], list[Rejected]]:
        """Every leaf cut into steps (in tree order); a leaf with no token at all is rejected instead."""
        plans: list[LeafSteps] = []
        rejected: list[Rejected] = []
        for p in problems:
            for leaf in trees[p.problem_id]:
                bounds = self.boundaries(leaf)
                if not bounds:
                    rejected.append(Rejected(p.problem_id, p.source, "empty generation: the policy wrote no tokens"))
                    continue
                cost.anchors += len(bounds) - 1
                cost.capped_partitions += bool(getattr(self.partitioner, "capped", False))
                plans.append(LeafSteps(p, leaf, bounds))
        return plans, rejected

    def _rollout_context(self, cost: ShardCost) -> RolloutContext:
        """What the rollout strategies get: this labeller's engine call (which books the cost), no more."""
        return RolloutContext(
            generate=lambda requests, stage: self.run(requests, stage, cost),
            config=self.cfg.rollouts,
            seed=self.cfg.seed,
            eos_token_ids=self.eos,
            decode=lambda token_ids: self.tok.decode(token_ids, skip_special_tokens=True),
        )

    def leaf_fields(self, p: Problem, leaf: Trajectory, bounds: Sequence[int]) -> dict[str, Any]:
        """The row fields every labeller fills the same way from a problem and a cut solution: its problem,
        policy, partitioner, η and the entropy at each step's first token."""
        cfg = self.cfg
        return {
            "eta": float(cfg.labels.eta),
            "step_entropies": [float(leaf.entropy[b]) if b < len(leaf.entropy) else math.nan for b in bounds],
            "entropy_kind": cfg.partition.entropy_source,
            "problem_id": p.problem_id,
            "source": p.source,
            "split": p.split,
            "policy_model": cfg.policy.model_path,
            "partitioner": self.partitioner.name,
            "partitioner_params": json.dumps(self.partitioner.params(), sort_keys=True),
        }

    def _row(self, index: int, plan: LeafSteps, prompts: dict[str, list[int]],
             prefix_stats: dict[PrefixKey, list[int]], tree_values: dict[PrefixKey, float], ledger: RolloutLedger,
             tree_share: float) -> dict[str, Any]:
        """The dataset row of plan `index`: its steps, their counts, origins and labels, and its cost share."""
        cfg = self.cfg
        p, leaf, bounds = plan.problem, plan.leaf, plan.bounds
        keys = [plan.prefix(step) for step in range(plan.num_steps)]
        origins, given = _step_origins(index, keys, ledger)
        # The last step is the whole solution: one sample (the leaf itself), labelled by its outcome.
        successes = [prefix_stats[key][0] for key in keys] + [int(leaf.final_correct)]
        rollouts = [prefix_stats[key][1] for key in keys] + [1]
        labels = step_labels(successes, rollouts, [*origins, FINAL_ORIGIN], cfg.labels.eta,
                             [*given, leaf.final_correct])
        rollout_tokens = 0.0
        for key in keys:  # this row's share of each prefix's rollouts
            rollout_tokens += ledger.tokens.get(key, 0) / max(1, ledger.sharers.get(key, 1))
        return {
            "prompt": render_prompt(cfg.policy.prompt_template, p.question, self.tok, cfg.policy.system_prompt),
            "completions": decode_steps(self.tok, leaf.token_ids, bounds),
            "labels": labels.hard_list(),
            "successes": successes,
            "rollouts": rollouts,
            "soft_labels": labels.soft_list(),
            "er_labels": labels.er_list(),
            "tree_value": [tree_values[key] for key in keys] + [float(leaf.final_correct)],
            **self.leaf_fields(p, leaf, bounds),
            "step_origin": [*origins, FINAL_ORIGIN],
            "answer": p.answer,
            "final_correct": bool(leaf.final_correct),
            "prompt_tokens": len(prompts[p.problem_id]),
            "completion_tokens": len(leaf.token_ids),
            # This row's share of what was generated to label it: its tree (split over leaves) + rollouts.
            "rollout_tokens": int(round(tree_share + rollout_tokens)),
            "tree_id": f"{p.problem_id}-{cfg.labelling_hash()[:8]}",
        }


def _tree_counts(problems: Sequence[Problem], trees: dict[str, list[Trajectory]], plans: Sequence[LeafSteps]
                 ) -> tuple[dict[PrefixKey, list[int]], dict[PrefixKey, float]]:
    """Per unique step prefix: [successes, samples] among the tree leaves that are policy samples from it
    (a leaf reaching the prefix's future through a chosen alternative token is not), and the tree's value."""
    prefix_stats: dict[PrefixKey, list[int]] = {}
    tree_values: dict[PrefixKey, float] = {}
    by_problem: dict[str, list[LeafSteps]] = {}
    for plan in plans:
        by_problem.setdefault(plan.problem.problem_id, []).append(plan)
    for p in problems:
        leaves = trees[p.problem_id]
        children: dict[int, list[Trajectory]] = {}
        for other in leaves:
            if other.parent is not None:
                children.setdefault(id(other.parent), []).append(other)
        memo: dict[tuple[int, int], float] = {}
        for plan in by_problem.get(p.problem_id, []):
            for step in range(plan.num_steps):
                key = plan.prefix(step)
                if key in prefix_stats:
                    continue
                end = plan.bounds[step + 1]
                head = plan.leaf.token_ids[:end]
                sampled = [o for o in leaves if o.sampled_after(end) and o.token_ids[:end] == head]
                prefix_stats[key] = [sum(o.final_correct for o in sampled), len(sampled)]
                # Exactly one leaf generated this prefix's future by sampling: the tree's value starts there.
                tree_values[key] = tree_value(sampled[0], end, children, memo) if sampled else math.nan
    return prefix_stats, tree_values


def _step_origins(index: int, keys: Sequence[PrefixKey], ledger: RolloutLedger) -> tuple[list[str], list[bool | None]]:
    """Where each non-final step's counts come from, and the binary search's label where it gave one."""
    origins: list[str] = []
    given: list[bool | None] = []
    for step, key in enumerate(keys):
        forced = ledger.forced.get((index, step))
        if forced is not None and key not in ledger.rolled:
            origins.append(ESTIMATED_ORIGIN)  # labelled by rule; its counts are what the tree gave, not N samples
            given.append(forced)
            continue
        # Early stop: counts drawn until the first success, k/n biased upward; only 1[k > 0] is kept.
        origins.append(EARLY_STOP_ORIGIN if ledger.early_stop else "rollout" if key in ledger.rolled else "tree")
        given.append(None)
    return origins, given
