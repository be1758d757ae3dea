"""The prompt a policy sees for a question: the one place a config's `prompt_template` is rendered.

Two kinds of template (configs.schema.PolicyConfig):

- ``"chat"``: the tokenizer's own chat template (``tokenizer.chat_template``, shipped with instruct models
  such as Qwen2.5-Math-Instruct) renders ``[system?, user: question]`` with the assistant turn opened, so the
  markup is exactly the model's, not a hand-copied imitation;
- any other string: a ``str.format`` template in which ``{question}`` is replaced by the question.

The result is text. Callers encode it with ``add_special_tokens=False``: a chat template already writes the
special tokens it wants (a BOS, ``<|im_start|>``), and adding a BOS again would change the prompt.
"""

from __future__ import annotations

from typing import Any

from configs.schema import CHAT_TEMPLATE


class PromptTemplateError(ValueError):
    """The prompt cannot be rendered (a chat template asked of a tokenizer that has none)."""


def render_prompt(template: str, question: str, tokenizer: Any = None, system_prompt: str | None = None) -> str:
    """The policy's prompt for `question` under `template` (``"chat"`` or a ``{question}`` format string)."""
    if template != CHAT_TEMPLATE:
        return template.format(question=question)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or "the policy's tokenizer"
        raise PromptTemplateError(
            f"prompt_template: chat needs a tokenizer with a chat template, and {name} has none; "
            "write a '{question}' template instead"
        )
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def question_from_prompt(prompt: str, template: str) -> str:
    """The question a ``str.format`` template rendered into `prompt` (the inverse of `render_prompt` for such a
    template, which has exactly one ``{question}``); PromptTemplateError when `prompt` does not follow it.

    Used where only the rendered prompt is stored (dataset rows, the ruler) and the question is needed back, e.g.
    to read a toy problem's exact truth. A chat template is not inverted: the question is not recoverable from it
    without the tokenizer.
    """
    head, _, tail = template.partition("{question}")
    head, tail = head.format(), tail.format()  # undo the doubling of literal braces
    if not (prompt.startswith(head) and prompt.endswith(tail)) or len(prompt) < len(head) + len(tail):
        raise PromptTemplateError(f"prompt does not follow the template {template!r}: {prompt[:80]!r}")
    return prompt[len(head) : len(prompt) - len(tail)]
