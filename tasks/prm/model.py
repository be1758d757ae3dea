"""The process reward model: a causal-LM backbone plus an ensemble of E small heads (ActPRM, arXiv 2504.10559).

A trajectory is a dataset row's ``prompt`` followed by its ``completions`` (the steps), joined exactly as
the rows store them: the text is ``prompt + completions[0] + completions[1] + ...``. Each piece is
tokenized on its own (the prompt with the tokenizer's special tokens, the steps without) and the token
ids are concatenated, so every step ends on a known token even with a BPE tokenizer that would merge
across a step boundary. Head ``e`` reads the backbone's last hidden state at each step's END token and
gives ``p_e = sigmoid(head_e(h))``; a step's score is ``mean_e p_e`` and its uncertainty ``std_e p_e``
(population std over the E heads).

Bad input, and what happens to it (choices of ours, counted where they happen):

- **Too long**: a trajectory with more tokens than ``max_length`` (the config's cap, at most the
  backbone's context) keeps its first ``max_length`` tokens, so the question is never cut; steps whose end
  token falls beyond the cap get ``NaN`` scores and are left out of the loss. ``StepScores.truncated`` and
  ``EncodedTrajectory.truncated`` say so; the trainer and ``score`` count them.
- **Empty step** (no tokens): it is scored at the previous token (nothing was added, so nothing changed)
  and left out of the loss (no evidence of its own).
- **Missing labels**: a target that is null (None/NaN; issue 10 leaves soft and ER labels null for steps
  labelled by rule) is masked out of every head's BCE. A row without a single usable target adds nothing.

Loss (ours, following the ActPRM description): with ``m`` the mask of usable steps,
``L = (1/E) sum_e [ BCE_e + lambda * ||theta_e - theta_e^0||^2 ]``, where ``BCE_e`` is the mean binary
cross-entropy of head ``e``'s logits against the (hard, soft or ER) targets over the masked steps and
``theta_e^0`` is head ``e``'s initial weights (kept as buffers, saved with the checkpoint, so a resumed
run pulls toward the same point). Heads get different init seeds, so the ensemble starts spread out.

A diverse ensemble (ActPRM's reference code, sail-sg/ActivePRM): ``head_init`` "trunc-normal" draws the heads'
weights from a normal truncated at 2 std instead of PyTorch Linear's uniform range, and a per-head data mask
(``ensemble_loss``'s ``head_mask``; the trainer's ``learning_probability``) lets each head train on its own random
share of the rows, so the heads see different data as well as starting from different points.

Checkpoints are a directory: ``model.safetensors`` (backbone, heads, initial heads), ``prm_config.json``
(backbone, E, widths, target, hash) and ``backbone/`` (the backbone's HF config and tokenizer), so a
checkpoint loads without the original backbone directory. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.labelling.entropy import entropy_from_logprobs

PRM_CONFIG_NAME = "prm_config.json"
WEIGHTS_NAME = "model.safetensors"
BACKBONE_DIR = "backbone"
TRAINING_PROBLEMS_NAME = "training_problems.json"  # the problem ids a checkpoint was trained on (eval's check)
FORMAT = "prm-factory/ensemble-prm/v1"
# Keys of prm_config.json that define the model's shape and meaning; the hash covers exactly these.
MODEL_KEYS = ("backbone", "hidden_size", "num_heads", "head_hidden", "target", "max_length", "seed")
# Keys added later, with the value every checkpoint written before them has: hashed only when they differ from it,
# so older checkpoints keep their hash. What they mean: ProcessRewardModel (head_init: EnsembleHeads).
READS = ("end", "tokens")
# token_features -> how many numbers each token adds to its hidden state (ProcessRewardModel's docstring).
TOKEN_FEATURE_WIDTH = {"none": 0, "logprob": 1, "distribution": 3}
TOKEN_FEATURES = tuple(TOKEN_FEATURE_WIDTH)
HEAD_INITS = ("uniform", "trunc-normal")  # EnsembleHeads' docstring
LATER_MODEL_KEYS = {"reads": "end", "token_features": "none", "head_init": "uniform"}
# reads "tokens": a token's head logit starts near +TOKEN_LOGIT_OFFSET, i.e. a token is "fine" with p ~ 0.99, so a
# fresh model's prefix probability (a product over tokens) starts high instead of at 0.5 ** tokens.
TOKEN_LOGIT_OFFSET = 5.0


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged, or written for another config."""


@dataclass
class StepScores:
    """One trajectory's per-step ensemble mean and std (NaN for steps cut off by truncation)."""

    mean: list[float]
    std: list[float]
    truncated: bool


@dataclass
class EncodedTrajectory:
    """Token ids of prompt + steps, and the index of each step's end token (-1: cut off by truncation)."""

    input_ids: list[int]
    step_ends: list[int]
    empty_steps: list[bool]
    truncated: bool
    prompt_tokens: int = 0  # the first completion token's index


def prm_config_hash(prm_config: dict[str, Any]) -> str:
    """Hash of the model-defining keys of a prm_config (what a checkpoint must match to be loaded)."""
    part = {k: prm_config.get(k) for k in MODEL_KEYS}
    part.update({k: prm_config[k] for k, default in LATER_MODEL_KEYS.items() if prm_config.get(k, default) != default})
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


def encode_trajectory(tokenizer: Any, prompt: str, steps: Sequence[str], max_length: int) -> EncodedTrajectory:
    """Tokenize prompt and steps piece by piece; cut at ``max_length`` tokens (see the module docstring)."""
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    prompt_tokens = len(ids)
    ends: list[int] = []
    empty: list[bool] = []
    for step in steps:
        piece = tokenizer(step, add_special_tokens=False)["input_ids"] if step else []
        ids.extend(piece)
        empty.append(len(piece) == 0)
        ends.append(len(ids) - 1)
    truncated = len(ids) > max_length
    if truncated:
        ids = ids[:max_length]
        ends = [e if e < max_length else -1 for e in ends]
    return EncodedTrajectory(ids, ends, empty, truncated, min(prompt_tokens, len(ids)))


def collate(encoded: Sequence[EncodedTrajectory], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids/attention_mask [B, T], step_ends [B, S] (-1 where no step), and
    completion_mask [B, T] (True at the steps' tokens, False at the prompt's and at padding)."""
    width = max(len(e.input_ids) for e in encoded)
    steps = max(1, max(len(e.step_ends) for e in encoded))
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    step_ends = torch.full((len(encoded), steps), -1, dtype=torch.long)
    completion = torch.zeros((len(encoded), width), dtype=torch.bool)
    for i, e in enumerate(encoded):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        attention[i, : len(e.input_ids)] = 1
        completion[i, e.prompt_tokens : len(e.input_ids)] = True
        if e.step_ends:
            step_ends[i, : len(e.step_ends)] = torch.tensor(e.step_ends, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "step_ends": step_ends, "completion_mask": completion}


def target_tensor(targets: Sequence[Sequence[float | bool | None] | None], encoded: Sequence[EncodedTrajectory],
                  steps: int) -> torch.Tensor:
    """[B, S] float targets with NaN wherever the step is masked: null label, empty step, cut off, padding."""
    out = torch.full((len(encoded), steps), math.nan, dtype=torch.float32)
    for i, (row, e) in enumerate(zip(targets, encoded, strict=True)):
        if row is None:
            continue
        if len(row) != len(e.step_ends):
            raise ValueError(f"row {i}: {len(row)} targets for {len(e.step_ends)} steps")
        for j, y in enumerate(row):
            if y is None or e.step_ends[j] < 0 or e.empty_steps[j]:
                continue
            y = float(y)
            if not math.isnan(y):
                if not 0.0 <= y <= 1.0:
                    raise ValueError(f"row {i} step {j}: target {y} is outside [0, 1]")
                out[i, j] = y
    return out


class EnsembleHeads(nn.Module):
    """E independent MLP heads evaluated as one batched matmul per layer; their initial weights kept as buffers.

    Layer l of head e is ``x -> relu(x @ W_l[e] + b_l[e])`` (no relu after the last layer, width 1).
    Head e is initialised from its own seed ``seed * 1_000_003 + e``, so the heads differ from the first step:
    ``init="uniform"``, weights and biases from PyTorch Linear's default range U(-1/sqrt(fan_in), 1/sqrt(fan_in));
    ``"trunc-normal"``, weights from N(0, std^2) truncated at +-2 std with std = 1/(2 sqrt(fan_in)), biases 0.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_hidden: Sequence[int], seed: int = 0,
                 init: str = "uniform") -> None:
        super().__init__()
        if init not in HEAD_INITS:
            raise ValueError(f"head init must be one of {HEAD_INITS}, got {init!r}")
        self.num_heads = num_heads
        widths = [hidden_size, *head_hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            self.weights.append(nn.Parameter(torch.empty(num_heads, fan_in, fan_out)))
            self.biases.append(nn.Parameter(torch.empty(num_heads, fan_out)))
        with torch.no_grad():
            for e in range(num_heads):
                gen = torch.Generator().manual_seed(seed * 1_000_003 + e)
                for w, b in zip(self.weights, self.biases, strict=True):
                    if init == "trunc-normal":
                        std = 0.5 / math.sqrt(w.shape[1])
                        nn.init.trunc_normal_(w[e], std=std, a=-2 * std, b=2 * std, generator=gen)
                        b[e].zero_()
                        continue
                    bound = 1.0 / math.sqrt(w.shape[1])
                    w[e].copy_(torch.rand(w.shape[1:], generator=gen) * 2 * bound - bound)
                    b[e].copy_(torch.rand(b.shape[1:], generator=gen) * 2 * bound - bound)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            self.register_buffer(f"init_weight_{i}", w.detach().clone())
            self.register_buffer(f"init_bias_{i}", b.detach().clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] hidden states -> [N, E] logits."""
        x = hidden.unsqueeze(0).expand(self.num_heads, -1, -1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b.unsqueeze(1), x, w)
            if i < last:
                x = torch.relu(x)
        return x.squeeze(-1).transpose(0, 1)

    def pull(self, reduction: str = "sum") -> torch.Tensor:
        """[E] squared distance of each head's weights from its initial weights: summed over the head's
        parameters, or (``reduction="mean"``) their mean, which does not grow with the head's size."""
        total = torch.zeros(self.num_heads, device=self.weights[0].device)
        count = 0
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            # The initial weights in the weights' own dtype: under FSDP's bf16 compute the heads arrive as bf16
            # copies, and an unmoved head must still be at distance 0 (float32: the same numbers as before).
            w0 = getattr(self, f"init_weight_{i}").to(w.dtype)
            b0 = getattr(self, f"init_bias_{i}").to(b.dtype)
            total = total + (w - w0).float().pow(2).sum(dim=(1, 2)) + (b - b0).float().pow(2).sum(dim=1)
            count += w[0].numel() + b[0].numel()
        return total / count if reduction == "mean" else total


def ensemble_loss(logits: torch.Tensor, targets: torch.Tensor, pull: torch.Tensor, pull_lambda: float,
                  bce_weight: float | torch.Tensor = 1.0, pull_weight: float = 1.0,
                  head_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``(1/E) sum_e [mean BCE_e over usable steps + lambda * pull_e]``; logits [N, E], targets [N] (NaN: masked).

    ``head_mask`` [N, E] (bool; None: all True): head e trains on step n only where it is True, so ``BCE_e`` is the
    mean over head e's own kept usable steps, and a head without one gets BCE 0 (and no BCE gradient). The pull is
    not masked.

    Returns the loss and its parts (``bce``, ``pull``, ``steps``; unweighted; ``bce_term``: the BCE part as it enters
    the loss, ``mean_e bce_weight_e * BCE_e``). With no usable step the BCE part is 0. ``bce_weight`` (a float, or
    [E] per head) / ``pull_weight`` scale the two terms: a piece of an accumulated batch weighs each head's BCE by
    its share of that head's usable steps in the batch and its pull by 1/pieces (``tasks.prm.training.train_step``).
    """
    mask = ~torch.isnan(targets)
    steps = int(mask.sum())
    if steps:
        y = targets[mask].unsqueeze(1).expand(-1, logits.shape[1]).to(logits.dtype)
        bce = nn.functional.binary_cross_entropy_with_logits(logits[mask], y, reduction="none")
        if head_mask is None:
            bce_per_head = bce.mean(0)
        else:
            keep = head_mask[mask]
            bce_per_head = torch.where(keep, bce, 0.0).sum(0) / keep.sum(0).clamp(min=1)
    else:
        bce_per_head = logits.sum(0) * 0.0  # keeps the graph (DDP needs every parameter to get a gradient)
    bce_term = bce_weight * bce_per_head
    loss = (bce_term + (pull_weight * pull_lambda) * pull).mean()
    return loss, {"bce": float(bce_per_head.detach().mean()), "pull": float(pull.detach().mean()), "steps": steps,
                  "bce_term": float(bce_term.detach().mean())}


class ProcessRewardModel(nn.Module):
    """Backbone (HF ``AutoModel``: the decoder without its LM head) + ``EnsembleHeads``.

    What the heads read (``reads``):

    - ``"end"``: the hidden state at each step's end token; a step's logit is the head's output there, each step
      judged on its own.
    - ``"tokens"``: every completion token. Head e gives token t a logit ``l_t`` (plus ``TOKEN_LOGIT_OFFSET``),
      read as P(token t keeps the solution right | the text before it is right). A prefix is right iff every
      token so far is, so the probability that the text up to token t is right is ``prod_{s <= t} sigmoid(l_s)``
      (the chain rule over tokens), and a step's score is that product at its end token. This matches how
      correctness works (a wrong step makes every later step wrong), and it is defined at every token, so a PRM
      trained on steps cut one way (EDU anchors mid-line) scores steps cut another way (newlines) with the same
      meaning.

    ``token_features``: ``"logprob"`` adds to each token's hidden state the backbone's own log-probability of that
    token given the tokens before it (its LM head on the previous position): how surprised the language model is.
    With the toy policy as backbone that is the sampling policy's confidence; with another backbone it is that
    model's surprise, which the PRM still reads for free. ``"distribution"`` adds two more numbers from the same
    next-token distribution: the token's log-probability minus the most likely token's (0 when the token was the
    LM's first choice, negative when something else was likelier) and the distribution's entropy. A token at
    p = 0.3 that was the first choice is usually right; one at p = 0.3 beside a first choice at 0.6 is usually a
    slip, and the log-probability alone cannot tell the two apart.
    """

    def __init__(self, backbone: nn.Module, num_heads: int, head_hidden: Sequence[int], seed: int = 0,
                 reads: str = "end", token_features: str = "none", lm_head: nn.Module | None = None,
                 head_init: str = "uniform") -> None:
        super().__init__()
        if reads not in READS or token_features not in TOKEN_FEATURES:
            raise ValueError(f"reads must be one of {READS} and token_features one of {TOKEN_FEATURES}, got "
                             f"{reads!r}, {token_features!r}")
        self.backbone = backbone
        self.reads, self.token_features = reads, token_features
        hidden = int(backbone.config.hidden_size) + TOKEN_FEATURE_WIDTH[token_features]
        self.heads = EnsembleHeads(hidden, num_heads, head_hidden, seed, head_init)
        # An untied LM head is a module of its own; a tied one is the input embedding (no second copy is saved).
        self.lm_head = lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, step_ends: torch.Tensor,
                completion_mask: torch.Tensor | None = None, pull: str | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Per-step logits [B, S, E]; rows of ``step_ends`` equal to -1 give garbage logits (mask them).

        ``pull`` ("sum" or "mean", training): also return the heads' pull toward their initial weights
        (``EnsembleHeads.pull``), computed here so that a distributed wrapper sees it inside its forward (FSDP
        gathers the heads' parameters for the forward only)."""
        logits = self.read(self.token_states(input_ids, attention_mask), step_ends, completion_mask)
        return logits if pull is None else (logits, self.heads.pull(pull))

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, H'] what the heads read at every token: the backbone's last hidden state, then the token features.
        With a frozen backbone they depend on the text alone, so a trainer may compute them once per row and train
        the heads on them (``tasks.prm.training.train_step``'s ``states``)."""
        return self.states_from_hidden(self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                                     use_cache=False).last_hidden_state, input_ids)

    def states_from_hidden(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``token_states`` from the backbone's last hidden states [B, T, H] computed elsewhere."""
        if self.token_features != "none":
            hidden = torch.cat([hidden, self._token_features(hidden, input_ids)], dim=-1)
        return hidden.to(self.heads.weights[0].dtype)

    def read(self, hidden: torch.Tensor, step_ends: torch.Tensor, completion_mask: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Per-step logits [B, S, E] from ``token_states`` (right-padded; padding is never read)."""
        return read_steps(self.heads, self.reads, hidden, step_ends, completion_mask)

    def _token_features(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.lm_head.weight if self.lm_head is not None else self.backbone.get_input_embeddings().weight
        return lm_token_features(hidden, input_ids, weight, self.token_features)


def read_steps(heads: EnsembleHeads, reads: str, hidden: torch.Tensor, step_ends: torch.Tensor,
               completion_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-step logits [B, S, E] of ``heads`` reading ``token_states`` [B, T, H'] the way ``reads`` says
    (ProcessRewardModel's docstring); shared with the vLLM plugin model (prm_factory/vllm_model.py)."""
    index = step_ends.clamp(min=0)
    b, t, h = hidden.shape
    if reads == "end":
        at_ends = torch.gather(hidden, 1, index.unsqueeze(-1).expand(-1, -1, h))  # [B, S, H]
        return heads(at_ends.reshape(-1, h)).reshape(b, index.shape[1], -1)
    if completion_mask is None:
        raise ValueError("reads 'tokens' needs the completion mask (collate makes it)")
    # The heads run on the steps' tokens only: the prompt's and the padding's add nothing to any step (they
    # are 0 in the sum) and are most of a batch's tokens, so skipping them makes training and scoring faster.
    keep = completion_mask.reshape(-1).bool()
    # float32 whatever the compute dtype: the product over a step's tokens is a sum of many small logs
    fine = hidden.new_zeros(b * t, heads.num_heads, dtype=torch.float32)
    fine[keep] = nn.functional.logsigmoid(heads(hidden.reshape(-1, h)[keep]).float() + TOKEN_LOGIT_OFFSET)
    fine = fine.reshape(b, t, -1)
    log_p = torch.gather(fine.cumsum(dim=1), 1, index.unsqueeze(-1).expand(-1, -1, fine.shape[-1]))
    log_p = log_p.clamp(max=-1e-6)  # p < 1, so log(1 - p) is finite
    return log_p - torch.log(-torch.expm1(log_p))  # the logit of p = exp(log_p)


def lm_token_features(hidden: torch.Tensor, input_ids: torch.Tensor, lm_weight: torch.Tensor, kind: str
                      ) -> torch.Tensor:
    """[B, T, k] from the backbone's LM head (``lm_weight`` [V, H]) on the previous position (0 at t = 0, which has
    no context): log p(token t | tokens < t), and for "distribution" also that minus the largest log-probability,
    and the entropy of the distribution."""
    logp = torch.log_softmax((hidden[:, :-1] @ lm_weight.t()).float(), dim=-1)
    taken = torch.gather(logp, -1, input_ids[:, 1:].unsqueeze(-1)).clamp(min=-30.0)
    if kind == "distribution":
        margin = (taken - logp.max(dim=-1, keepdim=True).values).clamp(min=-30.0)
        entropy = entropy_from_logprobs(logp).unsqueeze(-1)
        taken = torch.cat([taken, margin, entropy], dim=-1)
    return torch.cat([torch.zeros_like(taken[:, :1]), taken], dim=1).to(hidden.dtype)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_backbone(model_path: str | Path, dtype: str = "float32") -> nn.Module:
    """The HF decoder (hidden states only) from a local directory."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(model_path), dtype=_DTYPES[dtype])


def backbone_context(model_path: str | Path) -> int:
    """The backbone's context length (``max_position_embeddings``) from its HF config."""
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(str(model_path)), "max_position_embeddings", 2048))


def make_prm_config(backbone: str, hidden_size: int, num_heads: int, head_hidden: Sequence[int], target: str,
                    max_length: int, seed: int, reads: str = "end", token_features: str = "none",
                    head_init: str = "uniform", **extra: Any) -> dict[str, Any]:
    """A prm_config dict with its hash (``extra``: provenance such as the train config and dataset version)."""
    cfg = {"format": FORMAT, "backbone": str(backbone), "hidden_size": int(hidden_size), "num_heads": int(num_heads),
           "head_hidden": [int(w) for w in head_hidden], "target": target, "max_length": int(max_length),
           "seed": int(seed), "reads": reads, "token_features": token_features, "head_init": head_init, **extra}
    cfg["config_hash"] = prm_config_hash(cfg)
    return cfg


def build_prm(prm_config: dict[str, Any], dtype: str = "float32") -> ProcessRewardModel:
    """A fresh model (pretrained backbone, newly initialised heads) for a prm_config."""
    backbone = load_backbone(prm_config["backbone"], dtype)
    return ProcessRewardModel(backbone, prm_config["num_heads"], prm_config["head_hidden"], prm_config["seed"],
                              **_shape_options(prm_config, lambda: _pretrained_lm_head(prm_config["backbone"], dtype),
                                               backbone))


def _shape_options(prm_config: dict[str, Any], lm_head: Any, backbone: nn.Module) -> dict[str, Any]:
    """ProcessRewardModel's later options from a prm_config; `lm_head()` makes an untied LM head when needed."""
    options = {k: prm_config.get(k, default) for k, default in LATER_MODEL_KEYS.items()}
    tied = getattr(backbone.config, "tie_word_embeddings", True)
    options["lm_head"] = lm_head() if options["token_features"] != "none" and not tied else None
    return options


def _pretrained_lm_head(model_path: str | Path, dtype: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_path), dtype=_DTYPES[dtype]).get_output_embeddings()


def save_checkpoint(model: ProcessRewardModel, prm_config: dict[str, Any], out_dir: str | Path,
                    tokenizer: Any = None, extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model.safetensors (+ optional extra tensors such as optimizer state), prm_config.json, backbone/."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if extra_tensors:
        tensors.update({k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()})
    # Tied embeddings etc. can share storage; safetensors refuses shared tensors, so give each its own copy.
    seen: set[int] = set()
    for k, v in tensors.items():
        if v.untyped_storage().data_ptr() in seen:
            tensors[k] = v.clone()
        seen.add(tensors[k].untyped_storage().data_ptr())
    save_file(tensors, str(out / WEIGHTS_NAME), metadata=weights_metadata(prm_config))
    return save_checkpoint_files(model.backbone.config, prm_config, out, tokenizer)


def weights_metadata(prm_config: dict[str, Any]) -> dict[str, str]:
    """The metadata a checkpoint's model.safetensors carries."""
    return {"format": FORMAT, "config_hash": prm_config["config_hash"]}


def save_checkpoint_files(backbone_config: Any, prm_config: dict[str, Any], out_dir: str | Path,
                          tokenizer: Any = None) -> Path:
    """A checkpoint's files other than its weights: prm_config.json and backbone/ (HF config, tokenizer). A
    sharded (FSDP) epoch checkpoint has these beside its shards; its weights are consolidated at the end."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / PRM_CONFIG_NAME).write_text(json.dumps(prm_config, indent=2, sort_keys=True) + "\n")
    backbone_config.save_pretrained(out / BACKBONE_DIR)
    if tokenizer is not None:
        tokenizer.save_pretrained(out / BACKBONE_DIR)
    return out


def is_checkpoint(path: str | Path) -> bool:
    """A native checkpoint (or a training run holding one in ``model/``), as opposed to an export
    (``tasks.prm.export``: a Hugging Face directory with no prm_config.json)."""
    return any((Path(path) / sub / PRM_CONFIG_NAME).is_file() for sub in (".", "model"))


def find_checkpoint_dir(checkpoint: str | Path) -> Path:
    """The directory holding prm_config.json: the path itself, or ``<run>/model`` for a training run dir."""
    p = Path(checkpoint)
    for candidate in (p, p / "model"):
        if (candidate / PRM_CONFIG_NAME).is_file():
            return candidate
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    raise CheckpointError(f"{p} is not a PRM checkpoint (no {PRM_CONFIG_NAME} in it or in {p / 'model'})")


def read_prm_config(checkpoint: str | Path) -> dict[str, Any]:
    """The checkpoint's prm_config.json, checked against its own hash."""
    path = find_checkpoint_dir(checkpoint) / PRM_CONFIG_NAME
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if cfg.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {cfg.get('format')!r} is not {FORMAT!r}")
    if cfg.get("config_hash") != prm_config_hash(cfg):
        raise CheckpointError(f"{path}: config_hash {cfg.get('config_hash')} does not match its content "
                              f"({prm_config_hash(cfg)}); the file was edited")
    return cfg


def load_state_into(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load exactly the model's keys, failing with one clear line on any missing, extra or reshaped tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    reshaped = sorted(k for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape))
    if missing or reshaped:
        detail = "; ".join(
            ([f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}"] if missing else [])
            + [f"{k}: checkpoint {tuple(tensors[k].shape)} vs config {tuple(own[k].shape)}" for k in reshaped[:3]])
        raise CheckpointError(f"{where} does not fit the model its config describes: {detail}")
    model.load_state_dict({k: tensors[k] for k in own}, strict=True)


@dataclass
class LoadedPRM:
    """A PRM ready to score: model in eval mode, its tokenizer, its prm_config and token cap."""

    model: ProcessRewardModel
    tokenizer: Any
    config: dict[str, Any]
    max_length: int
    device: str = "cpu"
    truncations: int = field(default=0)

    def score(self, prompts: list[str], completions: list[list[str]], batch_size: int = 16) -> list[StepScores]:
        """Per-step ensemble mean and std for each (prompt, steps); truncated trajectories are counted."""
        return score_trajectories(self.model, self.tokenizer, prompts, completions, self.max_length,
                                  batch_size=batch_size, device=self.device, counter=self)

    def format_prompt(self, question: str) -> str:
        """A bare question as the PRM saw prompts in training: the training config's prompt template, rendered
        (tasks.sources.prompts.render_prompt). A checkpoint written before the template was recorded gets the
        question as it is."""
        from tasks.sources.prompts import render_prompt

        template = self.config.get("prompt_template")
        if template is None:
            return question
        return render_prompt(template, question, self.tokenizer, self.config.get("system_prompt"))


def pad_token_id(tokenizer: Any) -> int:
    """The pad id, else EOS, else 0 (padding is masked out; any id works)."""
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0


@torch.no_grad()
def step_probs(model: ProcessRewardModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, S, E] head probabilities for a collated batch (in the model's current mode)."""
    return torch.sigmoid(model(batch["input_ids"], batch["attention_mask"], batch["step_ends"],
                               batch.get("completion_mask")).float())


def score_trajectories(model: ProcessRewardModel, tokenizer: Any, prompts: Sequence[str],
                       completions: Sequence[Sequence[str]], max_length: int, *, batch_size: int = 16,
                       device: str = "cpu", counter: Any = None) -> list[StepScores]:
    """Score trajectories with a bare model (the trainer's eval and ``LoadedPRM.score`` share this path)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completion lists")
    was_training = model.training
    model.eval()
    pad = pad_token_id(tokenizer)
    out: list[StepScores] = []
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = [encode_trajectory(tokenizer, p, list(c), max_length)
                       for p, c in zip(prompts[start:start + batch_size], completions[start:start + batch_size],
                                       strict=True)]
            batch = {k: v.to(device) for k, v in collate(encoded, pad).items()}
            out.extend(ensemble_scores(step_probs(model, batch), encoded, counter))
    finally:
        model.train(was_training)
    return out


def ensemble_scores(probs: torch.Tensor, encoded: Sequence[EncodedTrajectory], counter: Any = None
                    ) -> list[StepScores]:
    """Each trajectory's StepScores from [B, S, E] head probabilities: the mean and population std over heads,
    NaN for steps cut off by truncation (``counter.truncations`` counts the truncated trajectories)."""
    probs = probs.cpu().double()
    mean, std = probs.mean(-1), probs.std(-1, unbiased=False)
    out = []
    for i, e in enumerate(encoded):
        n = len(e.step_ends)
        cut = torch.tensor([end < 0 for end in e.step_ends], dtype=torch.bool)
        out.append(StepScores(mean[i, :n].masked_fill(cut, math.nan).tolist(),
                              std[i, :n].masked_fill(cut, math.nan).tolist(), e.truncated))
        if counter is not None and e.truncated:
            counter.truncations += 1
    return out


def load_prm(checkpoint: str | Path, device: str = "cpu", *, expect_hash: str | None = None) -> LoadedPRM:
    """Load a checkpoint directory (or a training run dir holding ``model/``) for scoring.

    Raises ``CheckpointError`` when it is missing or damaged, when its weights do not fit its config, or
    when ``expect_hash`` is given and the checkpoint was written for another config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    ckpt = find_checkpoint_dir(checkpoint)
    cfg = read_prm_config(ckpt)
    if expect_hash is not None and cfg["config_hash"] != expect_hash:
        raise CheckpointError(f"{ckpt} was written for config {cfg['config_hash']}, expected {expect_hash} "
                              f"(backbone {cfg['backbone']}, {cfg['num_heads']} heads {cfg['head_hidden']}, "
                              f"target {cfg['target']})")
    if not (ckpt / WEIGHTS_NAME).is_file() or not (ckpt / BACKBONE_DIR / "config.json").is_file():
        raise CheckpointError(f"{ckpt} lacks {WEIGHTS_NAME} or {BACKBONE_DIR}/config.json (an incomplete checkpoint)")
    hf_config = AutoConfig.from_pretrained(str(ckpt / BACKBONE_DIR))
    if int(hf_config.hidden_size) != cfg["hidden_size"]:
        raise CheckpointError(f"{ckpt}: backbone hidden size {hf_config.hidden_size} but the PRM config says "
                              f"{cfg['hidden_size']}")
    backbone = AutoModel.from_config(hf_config)
    model = ProcessRewardModel(backbone, cfg["num_heads"], cfg["head_hidden"], cfg["seed"],
                               **_shape_options(cfg, lambda: nn.Linear(hf_config.hidden_size, hf_config.vocab_size,
                                                                        bias=False), backbone))
    try:
        tensors = load_file(str(ckpt / WEIGHTS_NAME))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{ckpt / WEIGHTS_NAME} cannot be read: {err}") from None
    load_state_into(model, tensors, str(ckpt / WEIGHTS_NAME))
    tok_dir = ckpt / BACKBONE_DIR if (ckpt / BACKBONE_DIR / "tokenizer_config.json").is_file() else cfg["backbone"]
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    model.to(device).eval()
    return LoadedPRM(model, tokenizer, cfg, int(cfg["max_length"]), device)


def training_problem_ids(checkpoint: str | Path) -> tuple[set[str] | None, str]:
    """The problem ids the checkpoint was trained on (the trainer stores them, with the dataset version), and a
    phrase saying where from; (None, why) for a checkpoint that does not record them."""
    ckpt = find_checkpoint_dir(checkpoint)
    path = ckpt / TRAINING_PROBLEMS_NAME
    if not path.is_file():
        return None, f"{ckpt} does not record its training problems (written before they were recorded)"
    try:
        data = json.loads(path.read_text())
        ids = set(data["problem_ids"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is damaged: {err}") from None
    return ids, f"the checkpoint's training dataset (version {data.get('dataset_version')})"
