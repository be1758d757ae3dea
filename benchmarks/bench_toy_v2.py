"""Toy world v2 (issue 21): what confident misconceptions do to the free references, on ruler v2 against ruler v1.

For each shipped ruler (v1: the toy policy's samples; v2: the policy also taught the seeded wrong rules of
tasks/sources/misconceptions.py), on the same problems and the same exact truth:

- error kinds: each erroneous trajectory's first wrong line is a *misconception* when it writes a rule's wrong
  result from the right value before it (`misconception_at`, with the v2 policy's rules, read from its
  training log), else a *slip*; their counts and shares;
- entropy: the sampling policy's next-token entropy (full softmax, nats, T=1) at the first wrong character of
  each erroneous trajectory, per kind (mean, median, share at or above EDU's tau from configs/toy-v2.yaml),
  beside the share of all generated characters at or above tau: EDU cuts before high-entropy tokens, so this
  says whether it still cuts where the errors are;
- the free references policy-confidence and position: within-position AUROC (95% bootstrap CI over problems),
  step AUROC, first-error F1 and best-of-8 against majority vote.

    python benchmarks/bench_toy_v2.py [--json-out benchmarks/results/toy_v2.json] [--problems K]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from prm_factory import set_offline_env  # noqa: E402 - before anything reads the environment

set_offline_env()


def first_wrong_char(problem, text: str) -> int | None:
    """Index of the first character after which the text can no longer be completed into the true solution."""
    from tasks.sources.toy_world import prefix_is_correct

    for k in range(len(text)):
        if not prefix_is_correct(problem, text[: k + 1]):
            return k
    return None


def char_entropies(policy_path: str, prompts: list[str], texts: list[str], batch_size: int = 64) -> list[list[float]]:
    """Per text, the policy's next-token entropy (nats) before each of its characters (one token per character)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from configs.schema import resolve_path

    path = str(resolve_path(policy_path))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out: list[list[float]] = []
    for start in range(0, len(texts), batch_size):
        rows = []
        for prompt, text in zip(prompts[start:start + batch_size], texts[start:start + batch_size], strict=True):
            prompt_ids = tok(prompt)["input_ids"]  # with BOS, as the policy was trained and sampled
            text_ids = tok(text, add_special_tokens=False)["input_ids"]
            assert len(text_ids) == len(text), "the toy policy's tokenizer is one token per character"
            rows.append((prompt_ids + text_ids, len(prompt_ids)))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, _) in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        ent = -(logp.exp() * logp).sum(-1)
        for i, (row, n_prompt) in enumerate(rows):
            # the distribution that chose character k sits at position n_prompt + k - 1
            out.append(ent[i, n_prompt - 1: len(row) - 1].tolist())
    return out


def summary(values: list[float], tau: float) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": round(statistics.fmean(values), 4),
            "median": round(statistics.median(values), 4),
            "share_at_or_above_tau": round(sum(v >= tau for v in values) / len(values), 4)}


def error_kinds(ruler, rules, policy_path: str, tau: float) -> dict:
    """First errors classified slip / misconception, and the policy's entropy at each one's first wrong character."""
    from tasks.sources.misconceptions import misconception_at
    from tasks.sources.problems import Problem

    kinds: dict[str, list] = {"slip": [], "misconception": []}
    by_rule: dict[str, int] = {}
    for row in ruler.rows:
        if row["first_error"] < 0:
            continue
        problem = Problem.make("toy", row["question"], row["answer"])
        text = "".join(row["completions"])
        steps = row["completions"]
        idx = row["first_error"]
        rule = misconception_at(rules, problem, idx, steps[idx]) if idx < len(steps) else None
        kind = "misconception" if rule else "slip"
        if rule:
            key = f"{rule.kind} {rule.op}{rule.operand}"
            by_rule[key] = by_rule.get(key, 0) + 1
        kinds[kind].append((row["prompt"], text, first_wrong_char(problem, text)))
    everything = [(r["prompt"], "".join(r["completions"])) for r in ruler.rows if r["completions"]]
    all_ent = char_entropies(policy_path, [p for p, _ in everything], [t for _, t in everything])
    flat = [e for row in all_ent for e in row]
    lookup = {(p, t): e for (p, t), e in zip(everything, all_ent, strict=True)}
    errors = sum(len(v) for v in kinds.values())
    report = {"erroneous_trajectories": errors, "trajectories": len(ruler.rows), "by_rule": by_rule,
              "all_generated_chars": summary(flat, tau), "tau": tau}
    for kind, items in kinds.items():
        # an error that is the text stopping early has no wrong character: it counts, with no entropy
        ents = [lookup[(p, t)][k] for p, t, k in items if k is not None]
        report[kind] = {"count": len(items), "share": round(len(items) / errors, 4) if errors else None,
                        "entropy_at_first_wrong_char": summary(ents, tau)}
    return report


def reference_figures(ruler) -> dict:
    from tasks.evaluation.reference_scorers import PositionScorer, reference_scorer
    from tasks.evaluation.ruler import evaluate_ruler

    out = {}
    for name, scorer in (("policy-confidence", reference_scorer("policy-confidence", ruler)),
                         ("position", PositionScorer())):
        t0 = time.time()
        rep = evaluate_ruler(scorer, ruler, bon_ns=(8,))
        st, bon = rep["steps"], rep["best_of_n"]
        out[name] = {
            "within_position_auroc": st["within_position_auroc"],
            "within_position_auroc_ci": st["within_position_auroc_ci"],
            "step_auroc": st["step_auroc"], "first_error_f1": st["first_error_f1"],
            "best_of_8_min_step": bon["accuracy"]["min_step"][0],
            "best_of_8_min_step_minus_majority_ci": bon["diff_vs_majority"]["min_step"][0],
            "majority_of_8": bon["accuracy"]["majority"][0], "pass_at_8": bon["oracle_any_correct"][0],
            "seconds": round(time.time() - t0, 1),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json-out", default=str(REPO / "benchmarks" / "results" / "toy_v2.json"))
    ap.add_argument("--problems", type=int, default=None, help="only each ruler's first K problems (quick runs)")
    args = ap.parse_args()

    import torch

    from configs.schema import load_config, resolve_path
    from tasks.evaluation.ruler import SHIPPED_RULERS, load_ruler
    from tasks.sources.misconceptions import misconception_rules

    torch.set_num_threads(1)  # a tiny model on a shared 2-core machine
    t0 = time.time()
    tau = load_config(REPO / "configs" / "toy-v2.yaml", check_paths=False).partition.tau
    seed = json.loads((resolve_path(SHIPPED_RULERS["v2"][1].policy_path) / "training_log.json").read_text())[
        "args"]["misconceptions"]
    rules = misconception_rules(seed)
    result: dict = {
        "benchmark": "toy_v2", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "command": "python " + " ".join(sys.argv), "misconception_seed": seed,
        "misconceptions": [f"{r.kind} {r.op}{r.operand}" for r in rules], "rulers": {},
    }
    for name, (path, spec) in SHIPPED_RULERS.items():
        ruler = load_ruler(path, spec).limited(args.problems)
        policy = ruler.manifest["spec"]["policy_path"]
        print(f"{name}: {path} ({len(ruler.rows)} trajectories, policy {policy})", flush=True)
        result["rulers"][name] = {
            "path": path, "policy_path": policy, "content_hash": ruler.manifest["content_hash"],
            "problems": len(ruler.problem_ids), "trajectories": len(ruler.rows),
            "final_correct": sum(r["final_correct"] for r in ruler.rows),
            "error_kinds": error_kinds(ruler, rules, policy, tau),
            "references": reference_figures(ruler),
        }
        print(json.dumps(result["rulers"][name], indent=1), flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json_out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
