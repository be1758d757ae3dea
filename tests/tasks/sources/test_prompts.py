"""Prompt rendering: str.format templates, and the tokenizer's own chat template (`prompt_template: chat`).

The chat tokenizer is the shipped toy tokenizer with a jinja chat template added and saved, so the template
travels in the tokenizer's files exactly as an instruct model's does. Its markup uses only characters of
the toy vocabulary, so the labeller can run on it end to end.
"""

from __future__ import annotations

import pytest

from configs.schema import REPO_ROOT, ConfigError, parse_config
from tasks.sources.prompts import PromptTemplateError, question_from_prompt, render_prompt

POLICY = REPO_ROOT / "assets" / "toy-policy"
CHAT_JINJA = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def plain_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(POLICY))


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory, plain_tokenizer):
    """The toy tokenizer with a chat template, saved and loaded again (as a model's tokenizer ships)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("chat-tokenizer")
    tok = AutoTokenizer.from_pretrained(str(POLICY))
    tok.chat_template = CHAT_JINJA
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(str(out))


def test_format_template_fills_the_question(plain_tokenizer):
    assert render_prompt("Q: {question}\nA:", "3+4=?", plain_tokenizer) == "Q: 3+4=?\nA:"
    assert render_prompt("{question}\n", "3+4=?") == "3+4=?\n"  # no tokenizer needed


def test_chat_template_comes_from_the_tokenizer(chat_tokenizer):
    assert chat_tokenizer.chat_template == CHAT_JINJA
    assert render_prompt("chat", "3+4=?", chat_tokenizer) == "User: 3+4=?\nAssistant:"
    with_system = render_prompt("chat", "3+4=?", chat_tokenizer, system_prompt="Be brief.")
    assert with_system == "System: Be brief.\nUser: 3+4=?\nAssistant:"


def test_chat_without_a_tokenizer_template_is_a_clear_error(plain_tokenizer):
    assert not plain_tokenizer.chat_template
    with pytest.raises(PromptTemplateError, match="needs a tokenizer with a chat template"):
        render_prompt("chat", "3+4=?", plain_tokenizer)


def _config(**policy) -> dict:
    return {
        "name": "chat-test",
        "sources": [{"kind": "toy", "num_problems": 2, "seed": 5, "min_steps": 2, "max_steps": 2}],
        "policy": {"model_path": str(POLICY), "backend": "transformers", "max_model_len": 256, **policy},
        "partition": {"method": "newline", "entropy_source": "exact"},
        "tree": {"enabled": False},
        "rollouts": {"n": 1, "max_new_tokens": 48},
    }


def test_config_accepts_chat_and_ties_system_prompt_to_it():
    cfg = parse_config(_config(prompt_template="chat", system_prompt="Be brief."))
    assert (cfg.policy.prompt_template, cfg.policy.system_prompt) == ("chat", "Be brief.")
    with pytest.raises(ConfigError, match="policy.system_prompt: .*prompt_template: chat only"):
        parse_config(_config(prompt_template="{question}\n", system_prompt="Be brief."))
    # The labelling hash of a config without a system prompt is what it was before the field existed.
    assert "system_prompt" not in parse_config(_config()).model_dump(exclude_none=True)["policy"]


def test_labeller_prompts_with_the_chat_template(chat_tokenizer):
    """The labeller sends and stores the chat-rendered prompt (one problem, no branching, N=1)."""
    from cluster.hf_engine import HFEngine
    from tasks.labelling.tree_labeller import ShardLabeller
    from tasks.sources.toy_world import generate_problems

    cfg = parse_config(_config(prompt_template="chat", system_prompt="Be brief."))
    problems = generate_problems(cfg.sources[0])[:1]
    engine = HFEngine(str(POLICY), seed=0)
    sent: list[list[int]] = []

    class Recording:  # the real engine; remembers what the labeller sent it
        def generate(self, requests, stage="generate"):
            sent.extend(r.prompt_token_ids for r in requests)
            return engine.generate(requests, stage)

    result = ShardLabeller(cfg, Recording(), chat_tokenizer).label(problems)
    assert result.rows
    expected = f"System: Be brief.\nUser: {problems[0].question}\nAssistant:"
    assert {row["prompt"] for row in result.rows} == {expected}
    prompt_ids = chat_tokenizer.encode(expected, add_special_tokens=False)
    assert sent[0] == prompt_ids  # the root solution's request: the chat prompt, no BOS added on top
    assert all(ids[: len(prompt_ids)] == prompt_ids for ids in sent)  # rollouts extend it


def test_question_from_prompt_inverts_templates():
    question = "Start at 7. Apply in order: +5, *3."
    assert question_from_prompt(question + "\n", "{question}\n") == question
    assert question_from_prompt("Q {x}: " + question + "\nA:", "Q {{x}}: {question}\nA:") == question
    with pytest.raises(PromptTemplateError, match="does not follow the template"):
        question_from_prompt("Problem: " + question, "{question}\n")
    assert question_from_prompt("{q}", "{question}") == "{q}"  # braces inside the question are the question's
