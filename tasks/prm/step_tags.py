"""The step-tag rule the served ensemble (``prm-factory export --format vllm-ensemble``) scores by.

A request is a prompt and its steps, as text. A step is a line: every step but the last ends with the step tag
(``STEP_TAG``, a newline) and holds no other; the last step may end with it or at the end of the text. The
prompt is tokenized with the tokenizer's special tokens and each step without, and the ids are joined, exactly as
``tasks.prm.model.encode_trajectory`` does for the checkpoint, so the server scores the same tokens as
``score --engine transformers``. A step is scored at its last token: its tag, or the text's last token.

``tag_trajectory`` runs on the server (the plugin's IO processor) and refuses, naming the step, a step that does
not follow the rule: one whose tag is merged with its neighbours by the tokenizer, one with a tag inside it, an
empty one, or a text past the server's context. ``step_ends`` recovers the steps' ends from the ids and the
prompt's length alone, which is all the model sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

STEP_TAG = "\n"


class StepTagError(ValueError):
    """A trajectory that does not follow the step-tag rule; the message names the step and why."""


@dataclass
class TaggedTrajectory:
    input_ids: list[int]
    prompt_tokens: int


def tag_trajectory(tokenizer: Any, tag_id: int, prompt: str, steps: Sequence[str], max_length: int
                   ) -> TaggedTrajectory:
    """The ids of prompt + steps and the prompt's length; StepTagError naming the first step that breaks the rule."""
    if not isinstance(prompt, str) or not isinstance(steps, (list, tuple)) or not all(isinstance(s, str)
                                                                                       for s in steps):
        raise StepTagError("needs 'prompt' (a string) and 'steps' (a list of strings)")
    if not steps:
        raise StepTagError("no steps to score")
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    prompt_tokens = len(ids)
    if prompt_tokens == 0:
        raise StepTagError("the prompt has no tokens")
    last = len(steps) - 1
    for j, step in enumerate(steps):
        piece = list(tokenizer(step, add_special_tokens=False)["input_ids"]) if step else []
        if not piece:
            raise StepTagError(f"step {j} is empty")
        inner = piece[:-1]
        if tag_id in inner or (j < last and piece[-1] != tag_id):
            raise StepTagError(f"step {j} ({step[-40:]!r}) does not end on the step tag {STEP_TAG!r} (token "
                               f"{tag_id}) with no other tag inside it: a step is a line, every step but the last "
                               "ends with its newline")
        ids.extend(piece)
    if len(ids) > max_length:
        raise StepTagError(f"{len(ids)} tokens, past the server's context of {max_length}")
    return TaggedTrajectory(ids, prompt_tokens)


def step_ends(input_ids: Sequence[int], tag_id: int, prompt_tokens: int) -> list[int]:
    """The index of each step's last token: every tag after the prompt, and the text's last token when it is none."""
    ends = [i for i in range(prompt_tokens, len(input_ids)) if input_ids[i] == tag_id]
    if input_ids and input_ids[-1] != tag_id:
        ends.append(len(input_ids) - 1)
    return ends
