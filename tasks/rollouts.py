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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tasks.answers import check_answer
from tasks.generation import GenerationRequest
from tasks.problems import Problem

if TYPE_CHECKING:
    from tasks.labelling import ShardCost, ShardLabeller, Trajectory

PrefixKey = tuple[str, tuple[int, ...]]


@dataclass
class RolloutLedger:
    """What the rollouts did: which prefixes were rolled out, their token cost, forced (rule) labels."""

    rolled: set[PrefixKey] = field(default_factory=set)
    tokens: dict[PrefixKey, int] = field(default_factory=dict)
    sharers: dict[PrefixKey, int] = field(default_factory=dict)
    forced: dict[tuple[int, int], bool] = field(default_factory=dict)  # (id(leaf), step) -> label
    early_stop: bool = False  # counts were drawn under the stop-at-first-success rule


def _roll(labeller: ShardLabeller, problems: dict[str, Problem], prompts: dict[str, list[int]],
          wanted: dict[PrefixKey, int], prefix_stats: dict[PrefixKey, list[int]], ledger: RolloutLedger,
          cost: ShardCost, wave: int) -> None:
    """One batch: `wanted[key]` fresh rollouts from each prefix; adds outcomes to prefix_stats."""
    keys = [key for key, n in wanted.items() if n > 0]
    rc = labeller.cfg.rollouts
    from tasks.labelling import request_seed

    requests = [
        GenerationRequest(
            prompt_token_ids=prompts[pid] + list(prefix),
            n=wanted[(pid, prefix)],
            temperature=rc.temperature,
            top_p=rc.top_p,
            max_new_tokens=max(1, rc.max_new_tokens - len(prefix)),
            top_logprobs=0,
            seed=request_seed(labeller.cfg.seed, pid, "rollout", wave, *prefix),
            stop_token_ids=labeller.eos,
        )
        for pid, prefix in keys
    ]
    results = labeller._run(requests, "rollout", cost)
    for (pid, prefix), res in zip(keys, results, strict=True):
        problem = problems[pid]
        head = labeller.tok.decode(list(prefix), skip_special_tokens=True)
        wins = sum(
            s.finish_reason == "stop" and check_answer(problem.source, head + s.text, problem.answer)
            for s in res.samples
        )
        stats = prefix_stats[(pid, prefix)]
        stats[0] += wins
        stats[1] += len(res.samples)
        ledger.rolled.add((pid, prefix))
        ledger.tokens[(pid, prefix)] = ledger.tokens.get((pid, prefix), 0) + res.generated_tokens


def run_rollouts(labeller: ShardLabeller, plans: list[tuple[Problem, Trajectory, list[int]]],
                 prompts: dict[str, list[int]], prefix_stats: dict[PrefixKey, list[int]],
                 cost: ShardCost) -> RolloutLedger:
    """Roll out from the step prefixes of every planned trajectory; prefix_stats is updated in place."""
    rc = labeller.cfg.rollouts
    n_target = rc.n
    problems = {p.problem_id: p for p, _, _ in plans}
    ledger = RolloutLedger()
    for p, leaf, bounds in plans:
        for end in bounds[1:]:
            key = (p.problem_id, tuple(leaf.token_ids[:end]))
            ledger.sharers[key] = ledger.sharers.get(key, 0) + 1

    if rc.binary_search:
        _binary_search(labeller, plans, prompts, prefix_stats, ledger, cost, problems)
        return ledger

    if not rc.early_stop_hard:
        wanted = {key: max(0, n_target - stats[1]) for key, stats in prefix_stats.items()}
        _roll(labeller, problems, prompts, wanted, prefix_stats, ledger, cost, wave=0)
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
        _roll(labeller, problems, prompts, wanted, prefix_stats, ledger, cost, wave=wave)
    return ledger


def _binary_search(labeller: ShardLabeller, plans: list[tuple[Problem, Trajectory, list[int]]],
                   prompts: dict[str, list[int]], prefix_stats: dict[PrefixKey, list[int]],
                   ledger: RolloutLedger, cost: ShardCost, problems: dict[str, Problem]) -> None:
    """Bisect each wrong trajectory for its first bad step; all trajectories advance one probe per batch."""
    n_target = labeller.cfg.rollouts.n
    # Search state per plan: steps lo..hi-1 are undecided; `first_bad` is the answer once lo == hi.
    search: list[list[int]] = []
    for _, leaf, bounds in plans:
        m = len(bounds) - 1  # steps that are not the last (final) step
        if leaf.final_correct:
            for step in range(m):
                ledger.forced[(id(leaf), step)] = True
            search.append([m, m])
        else:
            search.append([0, m])
    wave = 0
    while True:
        probes: dict[int, PrefixKey] = {}
        for i, (lo, hi) in enumerate(search):
            if lo < hi:
                p, leaf, bounds = plans[i]
                mid = (lo + hi) // 2
                probes[i] = (p.problem_id, tuple(leaf.token_ids[: bounds[mid + 1]]))
        if not probes:
            break
        wanted = {key: max(0, n_target - prefix_stats[key][1]) for key in set(probes.values())}
        _roll(labeller, problems, prompts, wanted, prefix_stats, ledger, cost, wave=wave)
        for i, key in probes.items():
            lo, hi = search[i]
            mid = (lo + hi) // 2
            if prefix_stats[key][0] > 0:
                search[i] = [mid + 1, hi]
            else:
                search[i] = [lo, mid]
        wave += 1
    for i, (p, leaf, bounds) in enumerate(plans):
        if leaf.final_correct:
            continue
        first_bad = search[i][0]
        for step in range(len(bounds) - 1):
            key = (p.problem_id, tuple(leaf.token_ids[: bounds[step + 1]]))
            if key in ledger.rolled:
                continue  # rolled out: its own outcomes label it
            ledger.forced[(id(leaf), step)] = step < first_bad
