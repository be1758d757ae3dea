"""The plugin's IO processor: the ``/pooling`` request and response of a served ensemble export.

Request (``POST /pooling``)::

    {"data": {"rows": [{"prompt": "...", "steps": ["line 1\\n", "line 2\\n", "Answer: 7"]}, ...]}}

Response: ``{"data": {"rows": [...], "checkpoint_config_hash": ..., "step_tag": "\\n"}}`` with one entry per
request row, in order: ``{"step_means": [...], "step_stds": [...], "head_probs": [[p_1 .. p_E], ...]}``, or
``{"error": "..."}`` for a row that breaks the step-tag rule (``tasks.prm.step_tags``) or does not fit the
context. The other rows of the request are scored all the same; a request none of whose rows can be scored is
refused whole (HTTP 400, each row's reason in the message).

The server's own tokenizer makes the ids, piece by piece as the checkpoint does; clients send text only. The
prompts' lengths and the steps' last tokens reach the pooler through ``PoolingParams.extra_kwargs``
(``prm_factory.vllm_model``).

A row with ``"free_steps": true`` is scored by the checkpoint's own rule instead (``tasks.prm.model
.encode_trajectory``): steps of any cut (mid-line, as EDU partitions them), each at its last token, an empty one
at the token before it, and a text past the context cut there with its cut-off steps null. This is what
``score --engine vllm`` sends, so that it scores every file ``score --engine transformers`` scores, the same way.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from vllm.config import VllmConfig
from vllm.inputs import TokensPrompt
from vllm.outputs import PoolingRequestOutput
from vllm.plugins.io_processors.interface import IOProcessor
from vllm.pooling_params import PoolingParams

from prm_factory.vllm_model import EXTRA_KEY, ids_digest
from tasks.prm.model import encode_trajectory
from tasks.prm.step_tags import STEP_TAG, StepTagError, step_ends, tag_trajectory

OFFLINE = "offline"  # the request id of LLM.encode's calls, which pass none
MAX_OPEN_REQUESTS = 65536


class EnsembleStepsIO(IOProcessor):
    def __init__(self, vllm_config: VllmConfig, renderer: Any):
        super().__init__(vllm_config, renderer)
        self.spec = vllm_config.model_config.hf_config.prm_factory
        self.tag_id = int(self.spec["step_tag_id"])
        self.max_length = int(vllm_config.model_config.max_model_len)
        self.tokenizer = renderer.get_tokenizer()
        self._lock = threading.Lock()
        # request id -> each row's error (None: scored), until post_process; capped, since a request aborted on the
        # way (a client gone) never reaches post_process
        self._rows: OrderedDict[str, list[str | None]] = OrderedDict()
        self._pending: dict[str, list[int]] = {}  # the last pre_process's layouts, for merge_pooling_params

    def parse_data(self, data: object) -> list[dict[str, Any]]:
        rows = data.get("rows") if isinstance(data, dict) else None
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
            raise ValueError('data must be {"rows": [{"prompt": str, "steps": [str, ...]}, ...]} with at least '
                             "one row")
        return rows

    def pre_process(self, prompt: list[dict[str, Any]], request_id: str | None = None, **kwargs: Any
                    ) -> Sequence[TokensPrompt]:
        errors: list[str | None] = []
        prompts: list[TokensPrompt] = []
        lengths: dict[str, list[int]] = {}
        for i, row in enumerate(prompt):
            try:
                ids, layout = self._layout(row)
            except StepTagError as err:
                errors.append(f"row {i}: {err}")
                continue
            key = ids_digest(ids)
            if lengths.get(key, layout) != layout:
                errors.append(f"row {i}: the same tokens as an earlier row of this request, split into prompt and "
                              "steps elsewhere; send it in another request")
                continue
            lengths[key] = layout
            errors.append(None)
            prompts.append(TokensPrompt(prompt_token_ids=ids))
        if not prompts:
            raise ValueError("no row can be scored: " + "; ".join(e for e in errors if e))
        with self._lock:
            self._rows[request_id or OFFLINE] = errors
            while len(self._rows) > MAX_OPEN_REQUESTS:
                self._rows.popitem(last=False)
            self._pending = lengths
        return prompts

    def _layout(self, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        """A row's token ids and ``[prompt length, each step's last token (-1: cut off)]``."""
        prompt, steps = row.get("prompt"), row.get("steps")
        if not row.get("free_steps"):
            tagged = tag_trajectory(self.tokenizer, self.tag_id, prompt, steps, self.max_length)
            return tagged.input_ids, [tagged.prompt_tokens, *step_ends(tagged.input_ids, self.tag_id,
                                                                       tagged.prompt_tokens)]
        if not isinstance(prompt, str) or not isinstance(steps, list) or not all(isinstance(x, str) for x in steps):
            raise StepTagError("needs 'prompt' (a string) and 'steps' (a list of strings)")
        if not steps:
            raise StepTagError("no steps to score")
        encoded = encode_trajectory(self.tokenizer, prompt, steps, self.max_length)
        return encoded.input_ids, [encoded.prompt_tokens, *encoded.step_ends]

    def merge_pooling_params(self, params: PoolingParams | None = None) -> PoolingParams:
        params = params or PoolingParams(task="plugin")
        params.task = "plugin"
        params.extra_kwargs = {**(params.extra_kwargs or {}), EXTRA_KEY: dict(self._pending)}
        return params

    def post_process(self, model_output: Sequence[PoolingRequestOutput], request_id: str | None = None,
                     **kwargs: Any) -> dict[str, Any]:
        with self._lock:
            errors = self._rows.pop(request_id or OFFLINE)
        outputs = iter(model_output)
        rows: list[dict[str, Any]] = []
        for error in errors:
            if error is not None:
                rows.append({"error": error})
                continue
            data = next(outputs).outputs.data
            if data.shape[0] == 0:
                rows.append({"error": "the model found no prompt length for this row (sent without the IO "
                                      "processor?)"})
                continue
            rows.append({"step_means": _nulls(data[:, 0].tolist()), "step_stds": _nulls(data[:, 1].tolist()),
                         "head_probs": [_nulls(p) for p in data[:, 2:].tolist()]})
        return {"rows": rows, "checkpoint_config_hash": self.spec.get("checkpoint_config_hash"),
                "step_tag": STEP_TAG}


def _nulls(values: list[float]) -> list[float | None]:
    """NaN (a step cut off by the context) as null: JSON has no NaN."""
    return [None if math.isnan(v) else v for v in values]
