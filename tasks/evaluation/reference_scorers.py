"""Reference scorers on the toy ruler (tasks/evaluation/ruler.py): scorers with no training that validate the
evaluation itself and bound what a trained PRM must beat.

`OracleScorer` recomputes the truth from the prompt and the steps (AUROC 1 by construction if the pipeline keeps
scores aligned with steps), `ConstantScorer` scores every step the same (AUROC exactly 0.5), `PositionScorer`
scores by position alone, and `PolicyConfidenceScorer` reads a causal LM's confidence in the policy's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from configs.schema import resolve_path
from tasks.evaluation.ruler import TOY_RULER, Ruler, step_truth
from tasks.evaluation.scorers import EvaluationError, StepScorer
from tasks.sources.problems import Problem
from tasks.sources.prompts import PromptTemplateError, question_from_prompt


@dataclass
class ReferenceScores:
    """Per-step scores of a reference scorer (same fields as a PRM's StepScores)."""

    mean: list[float]
    std: list[float]
    truncated: bool = False


class OracleScorer:
    """Scores 1.0 for a step that is truly correct and 0.0 otherwise, recomputed from the prompt and steps.

    Only for toy-world prompts written with `prompt_template`. It is the best any PRM can do on the ruler.
    """

    name = "oracle"

    def __init__(self, prompt_template: str = TOY_RULER.prompt_template):
        self.prompt_template = prompt_template

    def score(self, prompts: list[str], completions: list[list[str]], batch_size: int = 16) -> list[ReferenceScores]:
        out = []
        for prompt, steps in zip(prompts, completions, strict=True):
            try:
                question = question_from_prompt(prompt, self.prompt_template)
            except PromptTemplateError as err:
                raise EvaluationError(str(err)) from None
            problem = Problem.make("toy", question, "")  # the truth is read back from the question itself
            truth = step_truth(problem, steps)
            out.append(ReferenceScores([float(t) for t in truth], [0.0] * len(truth)))
        return out


class ConstantScorer:
    """Scores every step `value` (default 0.5): no information, AUROC exactly 0.5."""

    name = "constant"

    def __init__(self, value: float = 0.5):
        self.value = value

    def score(self, prompts: list[str], completions: list[list[str]], batch_size: int = 16) -> list[ReferenceScores]:
        return [ReferenceScores([self.value] * len(steps), [0.0] * len(steps)) for steps in completions]


class PositionScorer:
    """Earlier steps score higher, ``1 / (1 + index)``, whatever they say: a content-free reference.

    Errors persist, so later steps are wrong more often and this alone gets a step AUROC near 0.7 on the ruler;
    within-position AUROC gives it exactly 0.5. A metric it does well on measures position, not quality.
    """

    name = "position"

    def score(self, prompts: list[str], completions: list[list[str]], batch_size: int = 16) -> list[ReferenceScores]:
        return [ReferenceScores([1.0 / (1 + j) for j in range(len(steps))], [0.0] * len(steps))
                for steps in completions]


class PolicyConfidenceScorer:
    """The sampling policy's own confidence, with no training: a step's score is the running minimum, over the
    steps so far, of the smallest probability the policy gave a token of the step (at temperature 1).

    It reads the policy that sampled the trajectories (the ruler's ``spec.policy_path``). Where the policy's
    errors are sampling slips (an unlikely token drawn at T=1), it is close to an oracle; it cannot see an error
    the policy makes with confidence. The prompt and each step are tokenized piece by piece, as the PRM does.

    The same scorer over another model (``name="model-confidence"``) is that model's confidence in the policy's
    tokens: a model that knows the world's rules makes it a near-oracle for free, which a trained PRM must be
    compared with. In the toy world such a model exists (the v1 policy knows the true rules that the v2 policy
    breaks); in real math none does.
    """

    def __init__(self, policy_path: str | Path, device: str = "cpu", name: str = "policy-confidence"):
        self.name = name
        path = resolve_path(policy_path)
        if not (path / "config.json").is_file():
            where = ("the ruler's manifest names it as spec.policy_path" if name == "policy-confidence"
                     else "given as --model")
            raise EvaluationError(f"{name} needs a causal LM directory; no model at {path} ({where})")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
        self.device = device
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 2048))

    def score(self, prompts: list[str], completions: list[list[str]], batch_size: int = 16) -> list[ReferenceScores]:
        torch = self.torch
        out: list[ReferenceScores] = []
        for start in range(0, len(prompts), batch_size):
            batch = []
            for prompt, steps in zip(prompts[start:start + batch_size], completions[start:start + batch_size],
                                     strict=True):
                ids = self.tokenizer.encode(prompt, add_special_tokens=False)
                spans = []
                for step in steps:
                    piece = self.tokenizer.encode(step, add_special_tokens=False) if step else []
                    spans.append((len(ids), len(ids) + len(piece)))
                    ids += piece
                batch.append((ids[: self.max_length], spans))
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (ids, _) in enumerate(batch):
                input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[i, : len(ids)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            # probability of token t given the tokens before it, for t >= 1
            probs = torch.softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None].to(self.device))
            probs = probs[..., 0].cpu()
            for i, (ids, spans) in enumerate(batch):
                running, mean, truncated = 1.0, [], False
                for lo, hi in spans:
                    if hi > len(ids):  # past the policy's context: unscored
                        truncated = True
                        break
                    step_min = min((float(probs[i, t - 1]) for t in range(max(lo, 1), hi)), default=1.0)
                    running = min(running, step_min)
                    mean.append(running)
                out.append(ReferenceScores(mean, [0.0] * len(mean), truncated))
        return out


def reference_scorer(name: str, ruler: Ruler | None = None, device: str = "cpu",
                     model: str | Path | None = None) -> StepScorer:
    """A reference scorer by name: oracle, constant, position, policy-confidence (which reads the policy
    named in `ruler`'s manifest; a ruler is needed for it), or model-confidence (`model`'s confidence in the
    policy's tokens)."""
    if (model is not None) != (name == "model-confidence"):
        raise EvaluationError("a model (--model PATH) goes with the model-confidence scorer, and only with it")
    if name == "model-confidence":
        return PolicyConfidenceScorer(model, device, name=name)
    if name == "policy-confidence":
        if ruler is None:
            raise EvaluationError("--scorer policy-confidence reads the policy that sampled the ruler: give a ruler")
        policy = ruler.manifest.get("spec", {}).get("policy_path")
        if not policy:
            raise EvaluationError(f"{ruler.path}: the ruler's manifest names no policy (spec.policy_path)")
        return PolicyConfidenceScorer(policy, device)
    simple = {"oracle": OracleScorer, "constant": ConstantScorer, "position": PositionScorer}
    if name not in simple:
        raise EvaluationError(f"unknown reference scorer {name!r}; known: {list(REFERENCE_SCORERS)}")
    return simple[name]()


REFERENCE_SCORERS = ("oracle", "constant", "position", "policy-confidence", "model-confidence")
