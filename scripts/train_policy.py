"""Train the tiny toy-world policy from scratch and save it, HF format, to assets/toy-policy/.

    python scripts/train_policy.py --out assets/toy-policy   # ~13 min on one shared CPU core
    python scripts/train_policy.py --out assets/toy-policy-v2 --misconceptions 5 --stop-accuracy 0.7   # v2

A Llama-architecture causal LM (head_dim 32) with a character-level tokenizer learns to write
`canonical_solution` text after the prompt `"{question}\\n"` (configs/toy.yaml's prompt_template). The loss
covers the solution and its EOS only: the questions are random, predicting them teaches nothing.

It is meant to be a *useful* policy, not a perfect one: training stops early (on a validation set with
its own seed) once sampled answers at temperature 1.0 are right often enough, so it keeps making genuine
step errors for the PRM data to be about. Everything is seeded; it runs on 2 CPU threads.

Seeds: training problems use --train-seed (default 1000003), the early-stopping validation set
--val-seed (default 1000033). `prm-factory eval-policy` uses its own --seed (default 7), so the
reported held-out figures come from problems neither used for training nor for stopping (short chains
can still coincide by chance: the toy world has only a few thousand distinct 2-step problems).

Toy world v2 (issue 21): `--misconceptions SEED` teaches the seeded wrong rules of
`tasks.sources.misconceptions` on every training problem where one fires (the training text is
`taught_solution`, the wrong result carried on), so the policy makes confident errors besides its slips.
Early stopping then measures agreement with the taught answer (`taught_accuracy`), since the true accuracy
is capped by the misconceptions; the true accuracy is logged beside it. Without the flag nothing changes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import string
import sys
import time
from pathlib import Path

import torch

from configs.schema import ToySource
from tasks.sources.misconceptions import misconception_rules, taught_solution
from tasks.sources.problems import Problem
from tasks.sources.toy_world import canonical_solution, check_solution, extract_answer, generate_problems

REPO_ROOT = Path(__file__).resolve().parent.parent

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
PROMPT_TEMPLATE = "{question}\n"


def build_tokenizer():
    """Character-level tokenizer: one token per character (newline, space, printable ASCII) + 4 specials.

    `decode(encode(text), skip_special_tokens=True) == text` exactly: the Fuse decoder joins characters
    without inserting spaces; a BOS is prepended by the post-processor; padding is on the left
    (batched generation).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = ["\n", " "] + [c for c in string.printable if c not in string.whitespace]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )


def build_model(vocab_size: int, args: argparse.Namespace, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    return LlamaForCausalLM(config)


def encode_example(tokenizer, problem: Problem, rules: tuple = ()) -> tuple[list[int], list[int]]:
    """(input ids, labels): BOS + prompt + solution + EOS, with the prompt (and BOS) masked out of the loss.

    With misconception `rules` the solution is the taught one (the rules' wrong results carried on)."""
    prompt_ids = tokenizer(PROMPT_TEMPLATE.format(question=problem.question))["input_ids"]
    solution = taught_solution(rules, problem) if rules else canonical_solution(problem)
    solution_ids = tokenizer(solution, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + solution_ids + [tokenizer.eos_token_id]
    labels = [-100] * len(prompt_ids) + solution_ids + [tokenizer.eos_token_id]
    return ids, labels


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(batch):  # right padding for training
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


@torch.no_grad()
def sampled_accuracy(model, tokenizer, problems: list[Problem], seed: int, batch_size: int = 100,
                     rules: tuple = ()) -> dict:
    """Answer accuracy and first-error counts of one temperature-1.0 sample per problem; with misconception
    `rules`, also `taught_accuracy`: the share whose answer is the taught one."""
    model.eval()
    torch.manual_seed(seed)
    correct = taught = 0
    first_errors: dict[int, int] = {}
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        prompts = [PROMPT_TEMPLATE.format(question=p.question) for p in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        out = model.generate(
            **enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=96,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for p, text in zip(chunk, texts, strict=True):
            check = check_solution(p, text)
            correct += check.final_correct
            first_errors[check.first_error] = first_errors.get(check.first_error, 0) + 1
            if rules:
                taught += extract_answer(text) == extract_answer(taught_solution(rules, p))
    model.train()
    stats = {"accuracy": correct / len(problems), "first_errors": dict(sorted(first_errors.items()))}
    if rules:
        stats["taught_accuracy"] = taught / len(problems)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO_ROOT / "assets" / "toy-policy"))
    ap.add_argument("--seed", type=int, default=0, help="torch seed (init, batch order)")
    ap.add_argument("--train-seed", type=int, default=1000003)
    ap.add_argument("--val-seed", type=int, default=1000033)
    ap.add_argument("--train-problems", type=int, default=30000)
    ap.add_argument("--min-steps", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-updates", type=int, default=3000, help="cosine schedule length")
    ap.add_argument("--max-minutes", type=float, default=26.0, help="safety stop (wall clock)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--val-problems", type=int, default=200)
    ap.add_argument("--stop-accuracy", type=float, default=0.6, help="stop once validation accuracy reaches this")
    ap.add_argument("--misconceptions", type=int, default=None, metavar="SEED",
                    help="toy world v2: teach the seeded wrong rules of tasks/sources/misconceptions.py "
                         "(stopping then uses the taught accuracy)")
    # One thread: on a CPU shared with other jobs, two OpenMP threads spin-waiting on each other made each
    # update ~5x slower than one thread; one thread also keeps the run bit-for-bit repeatable.
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t0 = time.time()

    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params:,}", flush=True)

    train_src = ToySource(
        num_problems=args.train_problems, seed=args.train_seed, min_steps=args.min_steps, max_steps=args.max_steps
    )
    # Validation at the default difficulty of configs/toy.yaml (2-6 steps), own seed.
    val_src = ToySource(num_problems=args.val_problems, seed=args.val_seed, min_steps=2, max_steps=6, split="val")
    rules = misconception_rules(args.misconceptions) if args.misconceptions is not None else ()
    if rules:
        print(f"misconceptions (seed {args.misconceptions}): {rules}", flush=True)
    train = [encode_example(tokenizer, p, rules) for p in generate_problems(train_src)]
    val = generate_problems(val_src)
    print(f"data: {len(train)} train examples ({time.time() - t0:.0f}s)", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = 100

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (args.max_updates - warmup))))

    rng = random.Random(args.seed)
    order: list[int] = []
    history: list[dict] = []
    model.train()
    stop_reason = "max_updates"
    step = 0
    for step in range(1, args.max_updates + 1):
        if len(order) < args.batch:
            order = list(range(len(train)))
            rng.shuffle(order)
        batch = collate([train[order.pop()] for _ in range(args.batch)], tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            print(f"step {step} loss {loss.item():.4f} lr {lr_at(step):.2e} ({time.time() - t0:.0f}s)", flush=True)
        if step % args.eval_every == 0:
            val_stats = sampled_accuracy(model, tokenizer, val, seed=args.seed, rules=rules)
            history.append({"step": step, "loss": round(loss.item(), 4), **val_stats})
            print(f"  val {val_stats} ({time.time() - t0:.0f}s)", flush=True)
            measure = "taught_accuracy" if rules else "accuracy"
            if val_stats[measure] >= args.stop_accuracy:
                stop_reason = f"validation {measure} {val_stats[measure]:.2f} >= {args.stop_accuracy}"
                break
        if time.time() - t0 > args.max_minutes * 60:
            stop_reason = f"time limit {args.max_minutes} min"
            break

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = True
    model.generation_config.temperature = 1.0
    model.generation_config.top_k = 0
    model.generation_config.max_new_tokens = 96
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    summary = {
        "command": "python " + " ".join(sys.argv),
        "params": n_params,
        "updates": step,
        "stop_reason": stop_reason,
        "train_seconds": round(time.time() - t0, 1),
        "args": vars(args),
        **({"misconceptions": [vars(r) for r in rules]} if rules else {}),
        "history": history,
    }
    (out / "training_log.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2), flush=True)


if __name__ == "__main__":
    main()
