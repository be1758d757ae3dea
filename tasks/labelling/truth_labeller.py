"""The truth labeller (``labels.labeller: truth``): the learner's ceiling, not a labelling method.

For each toy problem it samples ``labels.truth_samples`` solutions from the policy (one request, a seed per
problem), cuts each with the configured partitioner (newline, EDU or fixed: the same cut as the tree labeller's)
and labels every step with the toy world's exact checker: a step is right iff the text up to its end can still be
completed into the right solution (``tasks.sources.toy_world.prefix_is_correct``); the last step is the outcome.
No tree, no rollouts: the only cost is the samples themselves.

No real run has labels like these. A PRM trained on them shows what the learner can do when the labels are
perfect (if it fails here, no label can succeed), and the gap to it shows what a labelling method loses.

Rows have the dataset's schema. Each step's origin is ``truth`` (tasks.labelling.label_rule): its hard, soft and
ER labels are all the checker's verdict, stored as 1 of 1 or 0 of 1 in (successes, rollouts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from configs.schema import FactoryConfig
from tasks.cost import ShardCost
from tasks.generation import Engine, GenerationRequest
from tasks.labelling.label_rule import FINAL_ORIGIN, TRUTH_ORIGIN, step_labels
from tasks.labelling.partition import decode_steps
from tasks.labelling.rollouts import request_seed
from tasks.labelling.tree_labeller import Rejected, ShardLabeller, ShardResult, Tokenizer, Trajectory
from tasks.sources.answers import check_answer
from tasks.sources.problems import Problem
from tasks.sources.prompts import render_prompt
from tasks.sources.toy_world import SOURCE, prefix_is_correct


class TruthLabeller:
    """Labels toy problems with exact truth. A tree labeller of the same config does its engine rounds, cost
    bookkeeping, cuts and per-leaf fields, so a truth row is cut and accounted exactly as a tree row."""

    def __init__(self, cfg: FactoryConfig, engine: Engine, tokenizer: Tokenizer,
                 progress: Callable[[str, int], None] | None = None):
        self.cfg = cfg
        self.tok = tokenizer
        self.tree = ShardLabeller(cfg, engine, tokenizer, progress)

    def boundaries(self, traj: Trajectory) -> list[int]:
        return self.tree.boundaries(traj)

    def label(self, problems: Sequence[Problem]) -> ShardResult:
        """One row per sampled solution, every step labelled by the exact checker."""
        not_toy = [p.problem_id for p in problems if p.source != SOURCE]
        if not_toy:
            raise ValueError(f"the truth labeller knows only the toy world's truth; problems {not_toy[:3]} are not "
                             "toy problems")
        cfg, pol, rc = self.cfg, self.cfg.policy, self.cfg.rollouts
        cost = ShardCost()
        prompts = {p.problem_id: self.tok.encode(render_prompt(pol.prompt_template, p.question, self.tok,
                                                               pol.system_prompt), add_special_tokens=False)
                   for p in problems}
        requests = [GenerationRequest(prompt_token_ids=prompts[p.problem_id], n=cfg.labels.truth_samples,
                                      temperature=rc.temperature, top_p=rc.top_p, max_new_tokens=rc.max_new_tokens,
                                      top_logprobs=cfg.partition.top_logprobs,
                                      seed=request_seed(cfg.seed, p.problem_id, "truth"),
                                      stop_token_ids=self.tree.eos)
                    for p in problems]
        results = self.tree.run(requests, "generate", cost)
        rows: list[dict[str, Any]] = []
        rejected: list[Rejected] = []
        for p, result in zip(problems, results, strict=True):
            for k, sample in enumerate(result.samples):
                leaf = self.tree.trajectory(sample, [], None, 0, 0)
                bounds = self.boundaries(leaf)
                if not bounds:
                    rejected.append(Rejected(p.problem_id, p.source, f"empty generation (sample {k}): the policy "
                                                                      "wrote no tokens"))
                    continue
                cost.anchors += len(bounds) - 1
                text = self.tok.decode(leaf.token_ids, skip_special_tokens=True)
                final_correct = sample.finish_reason == "stop" and check_answer(p.source, text, p.answer)
                rows.append(self._truth_row(p, k, leaf, bounds, final_correct, len(prompts[p.problem_id])))
        return ShardResult(rows, cost, rejected)

    def _truth_row(self, p: Problem, k: int, leaf: Any, bounds: list[int], final_correct: bool,
                   prompt_tokens: int) -> dict[str, Any]:
        cfg = self.cfg
        steps = decode_steps(self.tok, leaf.token_ids, bounds)
        truth = [prefix_is_correct(p, "".join(steps[: i + 1])) for i in range(len(steps) - 1)]
        origins = [TRUTH_ORIGIN] * len(truth) + [FINAL_ORIGIN]
        verdicts = [*truth, final_correct]
        labels = step_labels([int(v) for v in verdicts], [1] * len(verdicts), origins, cfg.labels.eta, verdicts)
        return {
            "prompt": render_prompt(cfg.policy.prompt_template, p.question, self.tok, cfg.policy.system_prompt),
            "completions": steps,
            "labels": labels.hard_list(),
            "successes": [int(v) for v in verdicts],
            "rollouts": [1] * len(verdicts),
            "soft_labels": labels.soft_list(),
            "er_labels": labels.er_list(),
            "tree_value": [float(v) for v in verdicts],
            **self.tree.leaf_fields(p, leaf, bounds),
            "step_origin": origins,
            "answer": p.answer,
            "final_correct": bool(final_correct),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(leaf.token_ids),
            "rollout_tokens": len(leaf.token_ids),  # the sample itself is all this row cost
            "tree_id": f"{p.problem_id}-{cfg.labelling_hash()[:8]}-s{k}",
        }

