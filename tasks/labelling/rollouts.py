"""ER-PRM rollouts from step prefixes (arXiv 2412.11006), with the cost controls the config can switch on.

- plain: every step prefix is topped up to N outcomes in one request with n = N - (tree leaves that are
  policy samples from it: the one leaf that generated the prefix's future by sampling), so a prefix costs
  one prefill and the N samples share its KV cache;
- early_stop_hard: rollouts go out in waves (N/4, N/4, N/2) and a prefix stops as soon as one succeeds:
  enough for the hard label k > 0, cheaper on the many prefixes that are clearly fine. The stopping rule
  biases k/n upward, so these steps are marked "early_stop": real counts, hard label, null soft/ER;
- binary_search (OmegaPRM, arXiv 2406.06592): for each trajectory that ended wrong, find its first bad
  step by bisection, rolling out only the probed prefixes (about log2 M instead of M; they are "rollout"
  steps with N samples); steps before it are labelled positive and steps from it on negative by rule,
  marked "estimated" (real counts: only the tree's own sample, if any; null soft/ER). A trajectory whose
  own answer is right reached the answer from each of its prefixes, so all its steps are positive by rule.
Every request's seed derives from the problem and the prefix, so the same shard gives the same rows.

A strategy sees only what it needs: a ``generate(requests, stage)`` callable (the labeller's engine, which
counts the cost), the rollout config, the run seed, the end-of-sequence ids and a decode function
(``RolloutContext``). It never sees the labeller, so this module imports nothing of tasks/labelling/tree_labeller.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from configs.schema import RolloutConfig
from tasks.generation import GenerationRequest, GenerationResult
from tasks.sources.answers import check_answer
from tasks.sources.problems import Problem

PrefixKey = tuple[str, tuple[int, ...]]  # (problem_id, the prefix's token ids)
# The engine call a strategy gets: a batch of requests and the stage that tags its cost ("rollout").
Generate = Callable[[list[GenerationRequest], str], list[GenerationResult]]


def request_seed(*parts: object) -> int:
    """A 31-bit seed derived from the parts, stable across processes and runs."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


class Leaf(Protocol):
    """What a strategy reads of a generated solution (tasks.labelling.tree_labeller.Trajectory has it)."""

    token_ids: list[int]
    final_correct: bool


@dataclass(frozen=True)
class LeafSteps:
    """One solution to label: its problem, the leaf, and the start index of each of its steps."""

    problem: Problem
    leaf: Leaf
    bounds: list[int]

    @property
    def num_steps(self) -> int:
        """Steps before the last one: the last step is the whole solution, labelled by its outcome."""
        return len(self.bounds) - 1

    def prefix(self, step: int) -> PrefixKey:
        """The prefix that ends with step `step` (< num_steps): the state a rollout from that step starts in."""
        return self.problem.problem_id, tuple(self.leaf.token_ids[: self.bounds[step + 1]])


@dataclass(frozen=True)
class RolloutContext:
    """All a rollout strategy may use: the engine call, the config, and plain data about the tokenizer."""

    generate: Generate
    config: RolloutConfig
    seed: int  # the run's seed (FactoryConfig.seed): request seeds derive from it
    eos_token_ids: list[int]
    decode: Callable[[list[int]], str]  # token ids -> text without special tokens


@dataclass
class RolloutLedger:
    """What the rollouts did: which prefixes were rolled out, their token cost, forced (rule) labels."""

    rolled: set[PrefixKey] = field(default_factory=set)
    tokens: dict[PrefixKey, int] = field(default_factory=dict)
    sharers: dict[PrefixKey, int] = field(default_factory=dict)
    # (index of the solution in the plans, step) -> the binary search's label for that step
    forced: dict[tuple[int, int], bool] = field(default_factory=dict)
    early_stop: bool = False  # counts were drawn under the stop-at-first-success rule


def _roll(ctx: RolloutContext, problems: dict[str, Problem], prompts: dict[str, list[int]],
          wanted: dict[PrefixKey, int], prefix_stats: dict[PrefixKey, list[int]], ledger: RolloutLedger,
          wave: int) -> None:
    """One batch: `wanted[key]` fresh rollouts from each prefix; adds outcomes to prefix_stats."""
    keys = [key for key, n in wanted.items() if n > 0]
    rc = ctx.config
    requests = [
        GenerationRequest(
            prompt_token_ids=prompts[pid] + list(prefix),
            n=wanted[(pid, prefix)],
            temperature=rc.temperature,
            top_p=rc.top_p,
            max_new_tokens=max(1, rc.max_new_tokens - len(prefix)),
            top_logprobs=0,
            entropy=False,  # a rollout is judged by its final answer only
            seed=request_seed(ctx.seed, pid, "rollout", wave, *prefix),
            stop_token_ids=ctx.eos_token_ids,
        )
        for pid, prefix in keys
    ]
    results = ctx.generate(requests, "rollout") if requests else []
    for (pid, prefix), res in zip(keys, results, strict=True):
        problem = problems[pid]
        head = ctx.decode(list(prefix))
        wins = sum(
            s.finish_reason == "stop" and check_answer(problem.source, head + s.text, problem.answer)
            for s in res.samples
        )
        stats = prefix_stats[(pid, prefix)]
        stats[0] += wins
        stats[1] += len(res.samples)
        ledger.rolled.add((pid, prefix))
        ledger.tokens[(pid, prefix)] = ledger.tokens.get((pid, prefix), 0) + res.generated_tokens


def run_rollouts(ctx: RolloutContext, plans: Sequence[LeafSteps], prompts: dict[str, list[int]],
                 prefix_stats: dict[PrefixKey, list[int]]) -> RolloutLedger:
    """Roll out from the step prefixes of every planned solution; prefix_stats is updated in place."""
    rc = ctx.config
    n_target = rc.n
    problems = {plan.problem.problem_id: plan.problem for plan in plans}
    ledger = RolloutLedger()
    for plan in plans:
        for step in range(plan.num_steps):
            key = plan.prefix(step)
            ledger.sharers[key] = ledger.sharers.get(key, 0) + 1

    if rc.binary_search:
        _binary_search(ctx, plans, prompts, prefix_stats, ledger, problems)
        return ledger

    if not rc.early_stop_hard:
        wanted = {key: max(0, n_target - stats[1]) for key, stats in prefix_stats.items()}
        _roll(ctx, problems, prompts, wanted, prefix_stats, ledger, wave=0)
        return ledger

    ledger.early_stop = True
    quarter = max(1, n_target // 4)
    waves = [quarter, quarter, n_target]  # the last wave tops up to N whatever is left
    for wave, size in enumerate(waves):
        wanted = {}
        for key, (k, n) in prefix_stats.items():
            if k > 0 or n >= n_target:
                continue
            wanted[key] = min(size, n_target - n)
        if not wanted:
            break
        _roll(ctx, problems, prompts, wanted, prefix_stats, ledger, wave=wave)
    return ledger


def _binary_search(ctx: RolloutContext, plans: Sequence[LeafSteps], prompts: dict[str, list[int]],
                   prefix_stats: dict[PrefixKey, list[int]], ledger: RolloutLedger,
                   problems: dict[str, Problem]) -> None:
    """Bisect each wrong solution for its first bad step; all solutions advance one probe per batch."""
    n_target = ctx.config.n
    # Search state per plan: steps lo..hi-1 are undecided; `first_bad` is the answer once lo == hi.
    search: list[list[int]] = []
    for i, plan in enumerate(plans):
        m = plan.num_steps
        if plan.leaf.final_correct:
            for step in range(m):
                ledger.forced[(i, step)] = True
            search.append([m, m])
        else:
            search.append([0, m])
    wave = 0
    while True:
        probes: dict[int, PrefixKey] = {}
        for i, (lo, hi) in enumerate(search):
            if lo < hi:
                probes[i] = plans[i].prefix((lo + hi) // 2)
        if not probes:
            break
        wanted = {key: max(0, n_target - prefix_stats[key][1]) for key in set(probes.values())}
        _roll(ctx, problems, prompts, wanted, prefix_stats, ledger, wave=wave)
        for i, key in probes.items():
            lo, hi = search[i]
            mid = (lo + hi) // 2
            if prefix_stats[key][0] > 0:
                search[i] = [mid + 1, hi]
            else:
                search[i] = [lo, mid]
        wave += 1
    for i, plan in enumerate(plans):
        if plan.leaf.final_correct:
            continue
        first_bad = search[i][0]
        for step in range(plan.num_steps):
            if plan.prefix(step) in ledger.rolled:
                continue  # rolled out: its own outcomes label it
            ledger.forced[(i, step)] = step < first_bad
