"""``PRMFactoryEnsembleForProcessReward``: a checkpoint's whole PRM as a vLLM pooling model.

It is the checkpoint's backbone (vLLM's own Llama or Qwen2 decoder, so attention, batching and the KV cache are
vLLM's), its token features from the backbone's LM head (the next actual token's log-probability, its gap to the
argmax, the entropy: ``tasks.prm.model.lm_token_features``), its E heads (``tasks.prm.model.EnsembleHeads``) and
its step rule (``tasks.prm.step_tags``). The pooler returns, for each step, one row
``[mean, std, p_1 .. p_E]``: the ensemble mean, the population std over the heads, and each head's probability,
computed by the same functions ``score --engine transformers`` runs (``read_steps``).

The pooler needs each request's prompt length (where the steps begin) and its steps' last tokens, which no token
says for sure. The plugin's IO processor (``prm_factory.vllm_io``) tokenizes every request and passes them in
``PoolingParams.extra_kwargs`` as ``[prompt length, end_1 .. end_S]`` (-1: a step cut off by the context, scored
NaN), keyed by a digest of the request's token ids; the pooler finds its own entry by the same digest. A request
without one (not sent through the IO processor) gets an empty result, which the IO processor reports as an error.

vLLM imports this module only in its own processes (``prm_factory.vllm_plugin.register`` names it lazily).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Set
from typing import Any

import numpy as np
import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.pooler import Pooler, PoolingParamsUpdate
from vllm.model_executor.layers.pooler.tokwise.methods import AllPool
from vllm.v1.pool.metadata import PoolingMetadata

from prm_factory.vllm_plugin import ARCHITECTURE
from tasks.prm.model import EnsembleHeads, lm_token_features, read_steps

# PoolingParams.extra_kwargs[EXTRA_KEY]: {ids_digest(ids): [prompt length, each step's last token or -1]}
EXTRA_KEY = "prm_factory_steps"
BACKBONES = ("llama", "qwen2")  # model_type -> vLLM's decoder of that name (_decoder)


def ids_digest(ids: Iterable[int]) -> str:
    """A request's key in ``extra_kwargs``: the digest of its token ids, computed alike on both sides."""
    return hashlib.blake2b(np.asarray(list(ids), dtype=np.int64).tobytes(), digest_size=16).hexdigest()


def _decoder(vllm_config: VllmConfig, prefix: str) -> nn.Module:
    kind = vllm_config.model_config.hf_config.model_type
    if kind == "llama":
        from vllm.model_executor.models.llama import LlamaModel

        return LlamaModel(vllm_config=vllm_config, prefix=prefix)
    if kind == "qwen2":
        from vllm.model_executor.models.qwen2 import Qwen2Model

        return Qwen2Model(vllm_config=vllm_config, prefix=prefix)
    raise ValueError(f"{ARCHITECTURE} serves {BACKBONES} backbones, not model_type {kind!r}")


class EnsembleStepPooler(Pooler):
    """Every token's hidden state of a finished request (vLLM's ``AllPool``, which also joins chunked prefills),
    then the token features, the heads and the step rule: one ``[mean, std, p_1 .. p_E]`` row per step."""

    def __init__(self, model: PRMFactoryEnsembleForProcessReward):
        super().__init__()
        self.gather = AllPool()
        self.model = [model]  # a list, so the model is not registered as this module's child (no cycle)

    def get_supported_tasks(self) -> Set[str]:
        return {"plugin"}

    def get_pooling_updates(self, task: Any) -> PoolingParamsUpdate:
        return PoolingParamsUpdate(requires_token_ids=True)

    def forward(self, hidden_states: torch.Tensor, pooling_metadata: PoolingMetadata) -> list[torch.Tensor | None]:
        model = self.model[0]
        states = self.gather(hidden_states, pooling_metadata)
        out: list[torch.Tensor | None] = []
        for hidden, ids, params in zip(states, pooling_metadata.get_prompt_token_ids_cpu(),
                                       pooling_metadata.pooling_params, strict=True):
            if hidden is None:  # a chunked prefill not finished yet
                out.append(None)
                continue
            ids = ids.to(torch.int64)
            layout = ((params.extra_kwargs or {}).get(EXTRA_KEY) or {}).get(ids_digest(ids.tolist()))
            if not layout:
                out.append(hidden.new_zeros((0, 2 + model.num_heads), dtype=torch.float32))
                continue
            out.append(model.score_steps(hidden, ids, int(layout[0]), [int(e) for e in layout[1:]]))
        return out


class PRMFactoryEnsembleForProcessReward(nn.Module):
    """The backbone's decoder, its LM head's weights (the input embedding when tied) and the E heads."""

    is_pooling_model = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        spec = config.prm_factory
        self.config = config
        self.num_heads = int(spec["num_heads"])
        self.reads, self.token_features = spec["reads"], spec["token_features"]
        self.vocab_size = int(config.vocab_size)
        self.model = _decoder(vllm_config, "model" if not prefix else f"{prefix}.model")
        width = int(config.hidden_size) + int(spec["token_feature_width"])
        self.heads = EnsembleHeads(width, self.num_heads, list(spec["head_hidden"]), 0).float()
        tied = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = None if tied or self.token_features == "none" else nn.Parameter(
            torch.empty(self.vocab_size, int(config.hidden_size)), requires_grad=False)
        self.pooler = EnsembleStepPooler(self)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors: Any = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    @torch.no_grad()
    def score_steps(self, hidden: torch.Tensor, ids: torch.Tensor, prompt_tokens: int, ends: list[int]
                    ) -> torch.Tensor:
        """[S, 2 + E] for one request: its hidden states [T, H], token ids [T], prompt length and its steps' last
        tokens (-1: cut off by the context; its row is NaN)."""
        hidden = hidden.float().unsqueeze(0)
        ids = ids.to(hidden.device).unsqueeze(0)
        states = hidden
        if self.token_features != "none":
            weight = self.lm_head if self.lm_head is not None else self.model.embed_tokens.weight
            # vLLM pads the embedding's rows to a multiple of 64; the padding is no token.
            states = torch.cat([hidden, lm_token_features(hidden, ids, weight[:self.vocab_size].float(),
                                                          self.token_features)], dim=-1)
        completion = torch.zeros_like(ids, dtype=torch.bool)
        completion[:, prompt_tokens:] = True
        index = torch.tensor([ends], dtype=torch.long, device=hidden.device)
        probs = torch.sigmoid(read_steps(self.heads, self.reads, states, index, completion).float())[0].double()
        rows = torch.cat([probs.mean(-1, keepdim=True), probs.std(-1, unbiased=False, keepdim=True), probs], dim=-1)
        cut = torch.tensor([e < 0 for e in ends], dtype=torch.bool, device=rows.device)
        return rows.masked_fill(cut.unsqueeze(-1), float("nan")).float().cpu()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """``model.*``: the decoder (vLLM's loader stacks q/k/v and gate/up); ``lm_head.weight``; ``heads.*``."""
        own = dict(self.named_parameters())
        decoder: list[tuple[str, torch.Tensor]] = []
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.startswith("model."):
                decoder.append((name[len("model."):], tensor))
            elif name in own:
                own[name].data.copy_(tensor.to(own[name].dtype))
                loaded.add(name)
            else:
                raise ValueError(f"{ARCHITECTURE}: unexpected tensor {name!r} in the export")
        loaded |= {f"model.{n}" for n in self.model.load_weights(decoder)}
        return loaded
