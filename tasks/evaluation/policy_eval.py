"""How good is the policy on held-out toy problems: answer accuracy, where its first errors fall, its entropy.

One temperature-1.0 sample per problem with transformers (batched `generate`, left padding, CPU), judged
exactly by `tasks.sources.toy_world.check_solution`. Held-out problems come from the config's first toy source
with the evaluation seed instead of the source's own; the shipped policy was trained on seed 1000003 and
early-stopped on seed 1000033 (scripts/train_policy.py), so any other seed gives problems it did not train
on (short chains may still coincide by chance: the toy world holds only a few thousand 2-step problems).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

from configs.schema import FactoryConfig, ToySource, resolve_path
from tasks.labelling.entropy import entropy_from_logprobs
from tasks.sources.problems import Problem
from tasks.sources.prompts import render_prompt
from tasks.sources.toy_world import check_solution, generate_problems

TRAINING_SEEDS = (1000003, 1000033)  # train / early-stopping seeds of the shipped policy


@dataclass
class PolicyEvalReport:
    """Figures of one evaluation. `first_errors` maps first-error index -> count (-1: fully correct,
    == number of lines: stopped before the answer line); `first_error_by_position` folds those indices into
    'step k', 'answer' (the answer line), 'extra'/'missing' so chains of different lengths compare."""

    model_path: str
    seed: int
    problems: int
    accuracy: float
    fully_correct: float
    first_errors: dict[int, int]
    first_error_by_position: dict[str, int]
    mean_entropy: float
    mean_generated_tokens: float
    seconds: float
    examples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def eval_problems(cfg: FactoryConfig, num_problems: int, seed: int) -> list[Problem]:
    """`num_problems` problems from the config's first toy source, generated with `seed` (split 'eval')."""
    toy = next((s for s in cfg.sources if isinstance(s, ToySource)), None)
    if toy is None:
        raise ValueError(f"config {cfg.name!r} has no toy source to evaluate on")
    return generate_problems(toy.model_copy(update={"num_problems": num_problems, "seed": seed, "split": "eval"}))


def _position_name(problem: Problem, first_error: int, n_lines: int) -> str:
    n_ops = len(problem.meta["ops"]) if "ops" in problem.meta else None
    if first_error == -1:
        return "none"
    if first_error == n_lines:
        return "missing answer"
    if n_ops is not None and first_error == n_ops:
        return "answer line"
    if n_ops is not None and first_error > n_ops:
        return "extra line"
    return f"step {first_error}"


def evaluate_policy(
    model_path: str,
    problems: list[Problem],
    prompt_template: str = "{question}\n",
    seed: int = 7,
    batch_size: int = 50,
    max_new_tokens: int = 96,
    threads: int = 2,
    show_progress: bool = True,
    keep_examples: int = 5,
) -> PolicyEvalReport:
    """Sample one solution per problem at temperature 1.0 (no top-k/top-p) and judge it step by step.

    Entropy is exact: `H_t = -sum_v p_v log p_v` (nats) from the raw logits at every generated token up
    to and including EOS, averaged over all such tokens.
    """
    import torch
    from rich.progress import Progress
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.time()
    path = str(resolve_path(model_path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    correct = fully = 0
    first_errors: dict[int, int] = {}
    by_position: dict[str, int] = {}
    entropy_sum = 0.0
    token_count = 0
    examples: list[dict] = []
    with Progress(disable=not show_progress, transient=True) as progress:
        bar = progress.add_task("sampling", total=len(problems))
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            prompts = [render_prompt(prompt_template, p.question, tokenizer) for p in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
            new_ids = out.sequences[:, enc["input_ids"].shape[1] :]
            logits = torch.stack(out.logits, dim=1).float()  # (batch, new tokens, vocab)
            entropy = entropy_from_logprobs(torch.log_softmax(logits, dim=-1))
            # Count tokens up to and including the first EOS; later positions are padding.
            is_eos = new_ids == tokenizer.eos_token_id
            after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
            live = ~after_eos
            entropy_sum += float(entropy[live].sum())
            token_count += int(live.sum())
            texts = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
            for problem, text in zip(chunk, texts, strict=True):
                check = check_solution(problem, text)
                correct += check.final_correct
                fully += check.first_error == -1
                first_errors[check.first_error] = first_errors.get(check.first_error, 0) + 1
                name = _position_name(problem, check.first_error, len(check.steps))
                by_position[name] = by_position.get(name, 0) + 1
                if len(examples) < keep_examples and check.first_error != -1:
                    examples.append({"question": problem.question, "solution": text, "first_error": check.first_error})
            progress.advance(bar, len(chunk))

    n = len(problems)
    return PolicyEvalReport(
        model_path=model_path,
        seed=seed,
        problems=n,
        accuracy=correct / n if n else math.nan,
        fully_correct=fully / n if n else math.nan,
        first_errors=dict(sorted(first_errors.items())),
        first_error_by_position=dict(sorted(by_position.items(), key=_position_order)),
        mean_entropy=entropy_sum / token_count if token_count else math.nan,
        mean_generated_tokens=token_count / n if n else math.nan,
        seconds=round(time.time() - t0, 1),
        examples=examples,
    )


def _position_order(item: tuple[str, int]) -> tuple[int, int]:
    name = item[0]
    if name.startswith("step "):
        return (1, int(name.split()[1]))
    return ({"none": 0, "answer line": 2, "missing answer": 3, "extra line": 4}.get(name, 5), 0)
