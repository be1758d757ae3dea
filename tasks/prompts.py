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
