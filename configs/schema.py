"""The factory's configuration: pydantic models validated from YAML before any engine or Ray starts.

Every model forbids unknown keys, so a typo fails loudly with the field's path. Relative paths in a
config are resolved against the repository root (the folder holding ``pyproject.toml``), so a config
means the same thing from any working directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from configs.paths import REPO_ROOT, resolve_path  # noqa: F401  (REPO_ROOT: imported from here across the repo)

CHAT_TEMPLATE = "chat"  # prompt_template value: render with the tokenizer's chat template (tasks/sources/prompts.py)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _checking_paths(info: ValidationInfo) -> bool:
    """False when validated with context {"check_paths": False} (a config meant for another machine)."""
    return not isinstance(info.context, dict) or info.context.get("check_paths", True)


def _local_model_exists(model_path: str, info: ValidationInfo) -> str:
    """A model_path that reads as a local directory must hold an HF model. A hub id is checked against the
    cache by FactoryConfig (that needs `offline`), or by the preflight online."""
    from configs.models import classify_model_path

    ref = classify_model_path(model_path)
    if _checking_paths(info) and ref.kind == "local" and not (ref.local_dir / "config.json").is_file():
        raise ValueError(f"no HF model at {model_path} (expected {ref.local_dir / 'config.json'})")
    return model_path


class ToySource(_Strict):
    """Generated multi-step arithmetic problems whose every step can be checked exactly."""

    kind: Literal["toy"] = "toy"
    num_problems: int = Field(64, ge=1)
    seed: int = Field(0, description="problem seed: which problems the generator draws (same seed, same problems)")
    min_steps: int = Field(2, ge=1, le=16)
    max_steps: int = Field(8, ge=1, le=16)
    max_operand: int = Field(9, ge=1, le=999, description="operands of + and - are drawn from 1..max_operand")
    max_multiplier: int = Field(5, ge=2, le=99, description="multipliers are drawn from 2..max_multiplier")
    max_value: int = Field(99, ge=10, le=10**6, description="no intermediate value leaves 0..max_value")
    split: str = "train"
    license: str | None = Field(None, description="the source data's license (an SPDX id such as MIT), written into "
                                "exported dataset cards; not hashed (it does not change the rows)")

    # A field validator (not a model validator) so the error's path names the field: sources.0.toy.max_steps.
    @field_validator("max_steps")
    @classmethod
    def _steps_ordered(cls, v: int, info: ValidationInfo) -> int:
        min_steps = info.data.get("min_steps")
        if min_steps is not None and min_steps > v:
            raise ValueError(f"min_steps ({min_steps}) must be <= max_steps ({v})")
        return v


class FileSource(_Strict):
    """Problems read from a file: GSM8K / MATH JSONL, ProcessBench JSON, or the user's own JSONL/Parquet."""

    kind: Literal["gsm8k", "math", "processbench", "jsonl", "parquet"]
    path: str
    split: str = "train"
    limit: int | None = Field(None, ge=1)
    # For the user's own files: which columns hold the question and the answer.
    question_field: str = "question"
    answer_field: str = "answer"
    license: str | None = Field(None, description="the source data's license (an SPDX id such as MIT), written into "
                                "exported dataset cards; not hashed (it does not change the rows)")

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: str, info: ValidationInfo) -> str:
        if _checking_paths(info) and not resolve_path(v).exists():
            raise ValueError(f"file not found: {v} (resolved to {resolve_path(v)})")
        return v


Source = Annotated[ToySource | FileSource, Field(discriminator="kind")]


class PolicyConfig(_Strict):
    """The policy model that writes solutions and rollouts."""

    model_path: str = Field(description="a local HF-format model directory or a Hugging Face model id")
    backend: Literal["vllm", "transformers"] = "vllm"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    max_model_len: int = Field(512, ge=16)
    # The prompt sent to the policy: "chat" renders the question with the tokenizer's own chat template (after
    # `system_prompt`, if any); any other string is a str.format template where {question} is the problem text.
    prompt_template: str = "{question}\n"
    system_prompt: str | None = Field(None, description="system message of the chat template (prompt_template: chat)")
    # vLLM engine knobs (ignored by the transformers backend).
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0)
    enforce_eager: bool = False
    # Reuse the KV cache of shared prompt prefixes (rollouts from one step prefix share it). A cost control.
    prefix_caching: bool = True
    seed: int = Field(0, description="engine seed: the engine's default sampling seed (requests carry their own, "
                      "from the run's labelling seed)")

    @model_validator(mode="before")
    @classmethod
    def _default_context_fits_the_model(cls, data: object) -> object:
        """An unset max_model_len is 512, or the model's own context when that is shorter (a 256-token toy model).

        Only when the model's config.json can be read here; a config for another machine keeps 512.
        """
        if not isinstance(data, dict) or "max_model_len" in data or not isinstance(data.get("model_path"), str):
            return data
        try:
            hf_config = json.loads((resolve_path(data["model_path"]) / "config.json").read_text())
            context = int(hf_config.get("max_position_embeddings") or 0)
        except (OSError, ValueError, TypeError, AttributeError):
            return data
        default = cls.model_fields["max_model_len"].default
        return {**data, "max_model_len": context} if 16 <= context < default else data

    @field_validator("model_path")
    @classmethod
    def _model_exists(cls, v: str, info: ValidationInfo) -> str:
        return _local_model_exists(v, info)

    @field_validator("prompt_template")
    @classmethod
    def _template_has_question(cls, v: str) -> str:
        if v == CHAT_TEMPLATE:
            return v
        if "{question}" not in v:
            raise ValueError("prompt_template must contain '{question}'")
        try:  # it is filled with str.format: a literal brace (as in \boxed{}) must be written {{ }}
            v.format(question="")
        except (KeyError, IndexError, ValueError) as err:
            msg = f"prompt_template is filled with str.format; write literal braces as {{{{ }}}} ({err!r})"
            raise ValueError(msg) from None
        return v

    @field_validator("system_prompt")
    @classmethod
    def _system_prompt_needs_chat(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("prompt_template", CHAT_TEMPLATE) != CHAT_TEMPLATE:
            raise ValueError("system_prompt is used by prompt_template: chat only; write it into the template instead")
        return v


class ClusterConfig(_Strict):
    """Where the engines run (cluster/connect.py has the rule): no address starts a Ray of the run's own on
    127.0.0.1 (or joins this checkout's `prm-factory cluster up` instance); `host:port`, `ray://host:port` or
    `auto` joins that cluster, probed for `connect_timeout_s` first."""

    address: str | None = None
    connect_timeout_s: float = Field(30.0, gt=0, description="how long a given address may take to answer "
                                     "before the run stops, naming it (also how long a joined cluster may be "
                                     "unreachable before the driver gives up)")
    num_engines: int = Field(1, ge=1)
    cpus_per_engine: float = Field(1.0, ge=0)
    gpus_per_engine: float = Field(0.0, ge=0)
    max_in_flight: int = Field(4, ge=1, description="requests one engine actor accepts at once (backpressure)")
    request_timeout_s: float = Field(600.0, gt=0)
    max_restarts: int = Field(2, ge=0)
    namespace: str = "prm-factory"
    # How the engines' placement group lays its bundles (one per engine) over the nodes: PACK fills few nodes,
    # SPREAD spreads them best effort, STRICT_SPREAD puts each engine on its own node (fails to place when
    # there are fewer nodes than engines). Ray's placement-group strategies.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"] = "PACK"
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor-parallel ranks per engine: the engine's "
                                      "bundle holds that many GPUs (gpus_per_engine must equal it) or, on CPU, "
                                      "at least that many CPUs (one core bound per rank)")

    @model_validator(mode="after")
    def _bundle_holds_every_rank(self) -> ClusterConfig:
        tp = self.tensor_parallel_size
        if tp > 1 and self.gpus_per_engine > 0 and self.gpus_per_engine != tp:
            raise ValueError(f"gpus_per_engine ({self.gpus_per_engine:g}) must equal tensor_parallel_size ({tp}): "
                             "each tensor-parallel rank runs on one GPU of the engine's bundle")
        if tp > 1 and self.gpus_per_engine == 0 and self.cpus_per_engine < tp:
            raise ValueError(f"cpus_per_engine ({self.cpus_per_engine:g}) must be at least tensor_parallel_size "
                             f"({tp}): on CPU each tensor-parallel rank is bound to one core of the engine's bundle")
        return self


class PartitionConfig(_Strict):
    """How a solution is cut into steps. EDU defaults are ours (the paper has no public code)."""

    method: Literal["edu", "newline", "fixed"] = "edu"
    tau: float = Field(1.0, ge=0, description="entropy threshold in nats for an anchor")
    min_step_tokens: int = Field(4, ge=1)
    max_anchors: int = Field(8, ge=1)
    # Only cut where the previous token ends with one of these strings (None: anywhere).
    boundary_whitelist: list[str] | None = None
    fixed_chunk_tokens: int = Field(16, ge=1, description="step length of the 'fixed' baseline")
    # exact: full-distribution entropy (transformers); topk_lower/topk_upper: vLLM top-k bounds. Left out of a
    # config, it follows policy.backend (FactoryConfig._default_entropy_source): the defaults always agree.
    entropy_source: Literal["exact", "topk_lower", "topk_upper"] = "exact"
    top_logprobs: int = Field(20, ge=1, le=20)


class TreeConfig(_Strict):
    """EDU branching: at each anchor keep the token the policy sampled and add the best other tokens.

    Why not a literal top-1/top-2: with width 2 both give the same pair whenever the sampled token is ranked
    1st or 2nd; when it is ranked lower, top-1/top-2 needs two new branches and drops the sampled path,
    which is the one completion that is a policy sample from the anchor's prefix (the only tree leaf that
    counts in successes/rollouts). Keeping it costs one branch per anchor and keeps that sample
    (benchmarks/README.md has the rank measurements).
    """

    enabled: bool = True
    branch_width: int = Field(2, ge=1, le=8, description="tokens tried per anchor: the sampled one plus "
                              "branch_width - 1 forced alternatives, best first (most probable other tokens)")
    max_depth: int = Field(3, ge=0)
    max_leaves: int = Field(16, ge=1)
    max_tree_tokens: int = Field(4096, ge=1)


class RolloutConfig(_Strict):
    """ER-PRM rollouts from every step prefix (paper defaults: N=16, T=1.0, 1024 new tokens)."""

    n: int = Field(16, ge=1, description="policy samples per step prefix (N): the tree leaf sampled from the "
                   "prefix, if any, plus fresh rollouts up to N; leaves behind a forced branch token never count")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(1024, ge=1)
    early_stop_hard: bool = Field(False, description="stop a prefix's rollouts at its first success: hard labels "
                                  "only; steps get origin 'early_stop', real counts and null soft/ER labels")
    binary_search: bool = Field(False, description="OmegaPRM bisection for the first bad step: probed prefixes get "
                                "N rollouts, the rest origin 'estimated' (rule label, null soft/ER)")
    # No `seed` here: every request's seed derives from the top-level `seed`, the problem and the prefix.


class LabelConfig(_Strict):
    """ER-PRM label: (1/eta) ln(1 - k/N + (k/N) e^eta), between soft (eta->0) and hard (eta->inf).

    ``labeller``: ``tree`` (the factory's: EDU tree + rollouts, tasks/labelling/tree_labeller.py) or ``truth``
    (toy world only: ``truth_samples`` policy samples per problem, cut by the partition method, each step labelled
    by the toy world's exact checker, tasks/labelling/truth_labeller.py). ``truth`` is an upper bound that no real
    run has: it measures what the PRM learner can do with perfect labels, never a labelling method.
    """

    eta: float = Field(1.0, gt=0)
    labeller: Literal["tree", "truth"] = "tree"
    truth_samples: int = Field(4, ge=1, le=64, description="policy samples per problem (labeller: truth)")


class DatasetConfig(_Strict):
    """Where and how the Parquet dataset is written."""

    out_dir: str = "runs/toy/dataset"
    problems_per_shard: int = Field(16, ge=1)
    # Bad source rows go to <out_dir>/quarantine.jsonl, beside the shards they were left out of.


class TrainConfig(_Strict):
    """The PRM trainer: an ActPRM-style (arXiv 2504.10559) ensemble of heads on a causal-LM backbone, on Ray Train.

    Defaults train on the toy world with the shipped toy policy as backbone on 2 CPU workers.
    ``lr``/``batch_size`` here suit that few-MB backbone; the paper's run used lr 1e-5, batch 64 (GPU configs).
    """

    model_path: str = Field("assets/toy-policy", description="a local HF-format backbone directory or a Hugging Face "
                            "model id (resolved like policy.model_path, honouring `offline`); in a factory config, "
                            "unset means the policy's model_path")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every worker holds the whole model (DistributedDataParallel); fsdp: FSDP2 "
        "fully_shard per decoder layer and on the root, each worker holding 1/num_workers of the parameters, "
        "gradients and AdamW states (and writing its own shard of each epoch checkpoint)")
    precision: Literal["fp32", "bf16-mixed", "fp16-mixed"] = Field(
        "fp32", description="the weights and AdamW states are always float32; bf16-mixed / fp16-mixed compute in "
        "bf16 / fp16 (fsdp: MixedPrecisionPolicy with float32 gradient reduction; ddp: autocast; fp16 adds loss "
        "scaling)")
    dtype: str | None = Field(None, exclude=True, description="removed: the trained weights are float32; only "
                              "float32 is accepted here (bfloat16 weights do not train at small lr: use precision)")
    activation_checkpointing: bool = Field(False, description="recompute each decoder layer's activations in the "
                                           "backward pass instead of keeping them (less memory, ~1/3 more compute)")
    grad_accum_steps: int = Field(1, ge=1, description="batches per worker summed into one optimizer step; the "
                                  "global batch is batch_size x num_workers x grad_accum_steps trajectories")
    max_length: int | None = Field(None, ge=8, description="token cap per trajectory (None: the backbone's context)")
    num_heads: int = Field(8, ge=1, le=64, description="ensemble heads E")
    head_hidden: list[int] = Field([128, 128], min_length=1, max_length=4, description="hidden widths of each head")
    target: Literal["labels", "soft_labels", "er_labels"] = Field(
        "labels", description="training target column: hard, soft (k/N) or ER-PRM labels; null steps are masked")
    pull_lambda: float = Field(0.5, ge=0, description="weight of ||head - head_init||^2 (ActPRM, lambda ~0.5)")
    pull_reduction: Literal["sum", "mean"] = Field("sum", description="the pull term over a head's parameters: "
                                                   "their squared distance summed, or its mean per parameter")
    head_init: Literal["uniform", "trunc-normal"] = Field(
        "uniform", description="the heads' initial weights, each head from its own seed: uniform, PyTorch Linear's "
        "U(+-1/sqrt(fan_in)) for weights and biases; trunc-normal, N(0, (1/(2 sqrt(fan_in)))^2) truncated at +-2 "
        "std with biases 0 (ActPRM's reference code, arXiv 2504.10559)")
    learning_probability: float = Field(
        1.0, description="in (0, 1]: each head trains on each trajectory of a batch with this probability, "
        "independently per head (a diverse ensemble: every head sees its own share of the data, ActPRM arXiv "
        "2504.10559); 1 trains every head on every trajectory")
    reads: Literal["end", "tokens"] = Field("end", description="what the heads read: each step's end token, or "
                                            "every token with a step's score the product of its tokens' "
                                            "(tasks/prm/model.py ProcessRewardModel)")
    token_features: Literal["none", "logprob", "distribution"] = Field(
        "none", description="logprob: each token's log-probability under the backbone's LM head is a head input "
        "too; distribution: also its gap to the likeliest token's and the distribution's entropy")
    shuffle: bool = Field(False, description="a new order of the training rows every epoch")
    keep: Literal["last", "best"] = Field("last", description="the model a run ends with: its last epoch, or the "
                                          "epoch with the best held-out within-position AUROC (every epoch's "
                                          "checkpoint is then kept)")
    train_backbone: bool = True
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1, description="trajectories per worker per batch (grad_accum_steps batches make "
                            "one optimizer step)")
    epochs: int = Field(3, ge=1)
    num_workers: int = Field(2, ge=1, description="Ray Train workers (gloo on CPU, NCCL on GPU)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="share of problems held out (by problem_id hash)")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=0, description="worker-group restarts Ray Train may do inside one run")
    gpu_memory_gb: float | None = Field(None, gt=0, description="memory of one training GPU in GB (1e9 bytes); "
                                        "validate and doctor refuse a train section (and vLLM engines) that the "
                                        "memory planner (cluster/memory_plan.py) says do not fit it")
    seed: int = Field(0, description="training seed: head initialisation, batch order and which problems are held "
                      "out for evaluation")

    @field_validator("dtype", mode="before")
    @classmethod
    def _no_low_precision_weights(cls, v: object) -> None:
        """The trained weights are float32 (`precision` sets the compute): `dtype: float32` is accepted as before,
        bfloat16 / float16 weights are refused, saying why."""
        if v in (None, "float32", "fp32"):
            return None
        mixed = {"bfloat16": "bf16-mixed", "bf16": "bf16-mixed", "float16": "fp16-mixed", "fp16": "fp16-mixed"}
        if v in mixed:
            raise ValueError(
                f"{v} would train {v} weights directly, and AdamW's small updates round away in them (a bfloat16 "
                f"weight of 0.02 minus 1e-5 is 0.02 again: after a few steps at lr 1e-5 most weights have not "
                f"changed). Drop dtype and set precision: {mixed[v]} (float32 master weights and AdamW states, {v} "
                "compute)")
        raise ValueError(f"{v!r} is not a training dtype; drop dtype (the weights are float32) and choose the compute "
                         "with precision: fp32 | bf16-mixed | fp16-mixed")

    @field_validator("learning_probability")
    @classmethod
    def _learning_probability_range(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"learning_probability must be in (0, 1], got {v}: it is the chance that a head trains "
                             "on a trajectory (1: every head on every trajectory; 0 would train no head on anything)")
        return v

    @field_validator("model_path")
    @classmethod
    def _backbone_exists(cls, v: str, info: ValidationInfo) -> str:
        return _local_model_exists(v, info)

    @property
    def global_batch(self) -> int:
        """Trajectories per optimizer step over all workers: batch_size x num_workers x grad_accum_steps."""
        return self.batch_size * self.num_workers * self.grad_accum_steps

    def train_hash(self) -> str:
        """A stable hash of the trainer section (a resumed run must have the same one). Fields added later are
        hashed only when they differ from their default, so a run written before them keeps its hash."""
        dump = {**self.model_dump(mode="json"), **_REMOVED_TRAIN_FIELDS}
        dump.pop("gpu_memory_gb", None)  # what the memory planner checks against; it changes no weight
        for name, default in _LATER_TRAIN_DEFAULTS.items():
            if dump.get(name) == default:
                dump.pop(name)
        return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


# Fields removed from the schema, still hashed at their old defaults: a dataset built before the removal with
# the defaults keeps its config hash and shard keys (a refresh reuses its shards, a build resumes in its dir).
# rollouts.seed was never read (request seeds derive from the top-level seed); dataset.quarantine_dir was
# never read either (the quarantine is <out_dir>/quarantine.jsonl). Neither can change a key any more.
_REMOVED_ROLLOUT_FIELDS = {"seed": 0}
_LATER_TRAIN_DEFAULTS = {"pull_reduction": "sum", "reads": "end", "token_features": "none", "shuffle": False,
                         "keep": "last", "strategy": "ddp", "precision": "fp32", "activation_checkpointing": False,
                         "grad_accum_steps": 1, "head_init": "uniform", "learning_probability": 1.0}
# train.dtype (the trained weights' dtype) became `precision` (the compute's; the weights are float32): a run written
# before with the float32 it always trained in keeps its train hash.
_REMOVED_TRAIN_FIELDS = {"dtype": "float32"}
_REMOVED_DATASET_FIELDS = {"quarantine_dir": None}


class SelectionConfig(_Strict):
    """ActPRM's confidence thresholds (arXiv 2504.10559; tasks/active/selection.py has the rules) and how the
    uncertain trajectories are picked.

    ``preset``: ``paper`` (delta_pred 0.95, delta_std 0.005, as the paper states) or ``actprm_code`` (0.9 / 0.01,
    the authors' released code). Giving ``delta_pred`` and ``delta_std`` replaces the preset (both or neither).
    ``calibrate_trusted_share`` replaces both: after the seed set is labelled and trained on, the seed-set PRM
    scores the seed set's trajectories and the thresholds are set so that this share of them is trusted
    (tasks.active.selection.calibrate_thresholds), then held for the rest of the run.
    """

    preset: Literal["paper", "actprm_code"] = "paper"
    delta_pred: float | None = Field(None, description="confident iff mean >= delta_pred or mean <= 1 - delta_pred "
                                     "(and std <= delta_std); in (0.5, 1)")
    delta_std: float | None = Field(None, description="largest ensemble std of a confident step; in [0, 0.5]")
    error_threshold: float = Field(0.5, gt=0, lt=1, description="a step with mean score below this is a "
                                   "predicted error; steps after a trajectory's first one do not matter")
    calibrate_trusted_share: float | None = Field(
        None, gt=0, lt=1, description="set delta_pred and delta_std on the seed set so that this share of its "
        "trajectories is trusted (a gate that fires); None: the preset or the explicit thresholds")
    pick: Literal["top_k", "uniform", "by_std", "std_per_token", "inverse_cost"] = Field(
        "top_k", description="which uncertain trajectories a round keeps when more are uncertain than it may label: "
        "the largest stds first (top_k, deterministic), or a seeded draw, uniform, weighted by std, by std per "
        "expected labelling token (std_per_token: the trajectory's tokens x steps as its cost), or by 1 / that "
        "cost alone (inverse_cost, std_per_token's control); rounds only; streaming keeps every uncertain one")

    @field_validator("delta_pred")
    @classmethod
    def _delta_pred_range(cls, v: float | None) -> float | None:
        if v is not None and not 0.5 < v < 1.0:
            raise ValueError(f"delta_pred must be in (0.5, 1), got {v}: a step is confident when its mean is >= "
                             "delta_pred or <= 1 - delta_pred, so 0.5 trusts every mean and 1 trusts almost none")
        return v

    @field_validator("delta_std")
    @classmethod
    def _delta_std_range(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 0.5:
            raise ValueError(f"delta_std must be in [0, 0.5], got {v}: it bounds the ensemble's std of probabilities, "
                             "which is never negative and at most 0.5")
        return v

    @model_validator(mode="after")
    def _both_or_neither(self) -> SelectionConfig:
        if (self.delta_pred is None) != (self.delta_std is None):
            raise ValueError("give both delta_pred and delta_std (they replace the preset), or neither")
        if self.calibrate_trusted_share is not None and self.delta_pred is not None:
            raise ValueError("calibrate_trusted_share sets delta_pred and delta_std: give it or them, not both")
        return self


class ActiveConfig(_Strict):
    """The ActPRM active-labelling loop (`prm-factory active`, the `active_learning` flow; tasks/active/loop.py).

    The pool is the config's ``sources`` (the first ``pool_size`` problems ingested): one policy solution per
    problem, generated with the labeller's own seeded request and cut by ``partition``, with no rollouts. Round
    0 has no PRM yet: it labels ``seed_size`` problems drawn at random. Every later round scores the unlabelled
    pool with the last round's PRM ensemble, keeps the uncertain trajectories (``selection``; or, with
    ``selector: random``, as many drawn at random: the baseline at the same budget), labels them with the
    build's labeller (EDU tree + ER-PRM rollouts) and trains on everything labelled so far.
    """

    rounds: int = Field(3, ge=1, description="rounds R, round 0 (the random seed set) included")
    label_token_budget: int | None = Field(None, ge=1, description="stop once this many tokens were generated "
                                           "to label (tree + rollouts: the shard cost record's generated_tokens); "
                                           "None: no budget")
    pool_size: int | None = Field(None, ge=1, description="problems of the sources that form the pool "
                                  "(None: all of them)")
    selector: Literal["uncertainty", "random"] = "uncertainty"
    selection: SelectionConfig = SelectionConfig()
    seed_size: int = Field(8, ge=1, description="problems labelled in round 0, drawn at random (no PRM yet)")
    max_selected: int | None = Field(None, ge=1, description="most problems labelled per round after round 0 "
                                     "(the most uncertain first; None: every uncertain one)")
    warm_start: bool = Field(True, description="round r > 0 starts training from round r-1's weights "
                             "(a fresh run dir); off: from the backbone and fresh heads")
    ruler_problems: int | None = Field(16, ge=1, description="held-out AUROC per round on the first K problems "
                                       "of the toy ruler (None: all; toy sources only)")
    seed: int = Field(0, description="seed of the random draws (round 0, and every round with selector random)")
    schedule: Literal["rounds", "streaming"] = Field(
        "rounds", description="rounds: label, retrain on everything so far, rescore the pool, repeat; streaming (the "
        "reference's schedule): one pass over the pool in batches of batch_size, the current PRM gates each batch, "
        "only its uncertain part is labelled and trained on, warm-started, with no retraining on earlier batches "
        "(the first batch, with no PRM yet, is labelled whole; rounds, seed_size and max_selected do not apply)")
    batch_size: int = Field(64, ge=1, description="problems per streaming batch (the reference's 64)")
    scorer: Literal["transformers", "vllm"] = Field(
        "transformers", description="where later rounds score the pool with the last round's PRM: in the driver "
        "(transformers), or in a vLLM scoring actor of the Ray pool that serves the PRM's backbone while its "
        "ensemble heads read the hidden states (vllm; the same means and stds, measured within 1e-5 per step)")

    @model_validator(mode="after")
    def _streaming_continues_the_model(self) -> ActiveConfig:
        if self.schedule == "streaming" and not self.warm_start:
            raise ValueError("schedule streaming trains each batch on top of the last one's weights: it needs "
                             "warm_start true")
        return self


class FactoryConfig(_Strict):
    """One factory run: sources -> partition -> rollouts -> labels -> dataset."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = Field(0, description="labelling seed: every generation request's seed derives from it and the "
                      "problem id, so a shard relabelled anywhere gives the same rows")
    # Offline: models given by hub id come from the local Hugging Face cache only; nothing is downloaded.
    # Off: an id missing from the cache is downloaded by each node that loads it. Does not change the rows.
    offline: bool = False
    sources: list[Source] = Field(min_length=1)
    policy: PolicyConfig
    cluster: ClusterConfig = ClusterConfig()
    partition: PartitionConfig = PartitionConfig()
    tree: TreeConfig = TreeConfig()
    rollouts: RolloutConfig = RolloutConfig()
    labels: LabelConfig = LabelConfig()
    dataset: DatasetConfig = DatasetConfig()
    train: TrainConfig = TrainConfig()
    active: ActiveConfig = ActiveConfig()

    @model_validator(mode="after")
    def _hub_model_cached_when_offline(self, info: ValidationInfo) -> FactoryConfig:
        from configs.models import ModelNotFoundError, classify_model_path, resolve_model

        # Offline, a hub id must be in the cache: checked here (on disk, milliseconds). Online, the id is
        # looked up by the preflight before Ray starts (configs.models.check_model), not by validation.
        if not (_checking_paths(info) and self.offline):
            return self
        for field, model_path in (("policy.model_path", self.policy.model_path),
                                  ("train.model_path", self.train.model_path)):
            if classify_model_path(model_path).kind == "hub":
                try:
                    resolve_model(model_path, offline=True)
                except ModelNotFoundError as err:
                    raise ValueError(f"{field}: {err}") from None
        return self

    @model_validator(mode="before")
    @classmethod
    def _train_on_the_policy(cls, data: object) -> object:
        """An unset train.model_path is the policy's: a PRM of this world's data reads it with this world's policy
        as backbone. (It was assets/toy-policy whatever the policy; configs whose policy is that keep their train
        hash, the path hashed being the same.)"""
        if not isinstance(data, dict):
            return data
        policy, train = data.get("policy"), data.get("train", {})
        if not isinstance(policy, dict) or not isinstance(train, dict) or "model_path" in train:
            return data
        if not isinstance(policy.get("model_path"), str):
            return data
        return {**data, "train": {**train, "model_path": policy["model_path"]}}

    @model_validator(mode="before")
    @classmethod
    def _default_entropy_source(cls, data: object) -> object:
        """An unset partition.entropy_source follows the backend: 'exact' (transformers), else 'topk_lower'."""
        if not isinstance(data, dict):
            return data
        policy, partition = data.get("policy"), data.get("partition", {})
        if not isinstance(policy, dict) or not isinstance(partition, dict) or "entropy_source" in partition:
            return data
        backend = policy.get("backend", PolicyConfig.model_fields["backend"].default)
        source = "exact" if backend == "transformers" else "topk_lower"
        return {**data, "partition": {**partition, "entropy_source": source}}

    @model_validator(mode="after")
    def _tensor_parallel_splits_the_heads(self) -> FactoryConfig:
        """vLLM splits the attention heads over the ranks: tensor_parallel_size must divide their number (read
        from the policy's config.json, or configs/architectures.py for a known hub id not on this machine)."""
        from configs.architectures import read_architecture

        tp = self.cluster.tensor_parallel_size
        if tp == 1:
            return self
        if self.policy.backend != "vllm":
            raise ValueError(f"cluster.tensor_parallel_size {tp} needs policy.backend 'vllm' (the transformers "
                             "engine runs on one device)")
        arch = read_architecture(self.policy.model_path)
        if arch is not None and arch.num_heads % tp:
            raise ValueError(f"cluster.tensor_parallel_size {tp} does not divide the {arch.num_heads} attention heads "
                             f"of {self.policy.model_path} (vLLM gives each rank an equal share of the heads)")
        return self

    @model_validator(mode="after")
    def _truth_needs_the_toy_world(self) -> FactoryConfig:
        if self.labels.labeller == "truth" and any(src.kind != "toy" for src in self.sources):
            raise ValueError("labels.labeller 'truth' needs the exact step truth, which only the toy world has: "
                             "every source must be kind 'toy'")
        return self

    @model_validator(mode="after")
    def _entropy_source_matches_backend(self) -> FactoryConfig:
        src, backend = self.partition.entropy_source, self.policy.backend
        if src == "exact" and backend != "transformers":
            raise ValueError("partition.entropy_source 'exact' needs policy.backend 'transformers' "
                             "(vLLM returns top-k logprobs: use 'topk_lower' or 'topk_upper')")
        if src != "exact" and backend == "transformers":
            raise ValueError(f"partition.entropy_source '{src}' is for vLLM; the transformers backend gives 'exact'")
        return self

    @property
    def branching(self) -> bool:
        """Whether labelling grows EDU trees: branches exist only at EDU anchors, with more than one token tried."""
        return self.tree.enabled and self.partition.method == "edu" and self.tree.branch_width > 1

    def config_hash(self) -> str:
        """A stable hash of the config that makes the dataset (for its manifest and caching).

        The trainer and active-loop sections are left out: they do not change what `build` writes.
        """
        dump = self.model_dump(mode="json", exclude={"train", "active"})
        dump["cluster"].pop("connect_timeout_s")  # how long to wait for Ray: it changes no row
        if dump["cluster"]["tensor_parallel_size"] == 1:  # a field added later: old hashes stay valid
            dump["cluster"].pop("tensor_parallel_size")
        for source in dump["sources"]:
            source.pop("license", None)  # metadata for the dataset card: the same rows under any license
        _drop_default_labeller(dump["labels"])
        dump["rollouts"].update(_REMOVED_ROLLOUT_FIELDS)
        dump["dataset"].update(_REMOVED_DATASET_FIELDS)
        blob = json.dumps(dump, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def labelling_hash(self) -> str:
        """A hash of what decides a problem's rows (policy, partition, tree, rollouts, labels, seed).

        Sources, cluster layout, dataset location and name are left out: a shard of the same problems
        labelled under the same labelling hash has the same rows, so a refresh can reuse it.
        """
        part = self.model_dump(mode="json", include={"seed", "policy", "partition", "tree", "rollouts", "labels"})
        if part["policy"].get("system_prompt") is None:  # a field added later: old hashes stay valid
            part["policy"].pop("system_prompt", None)
        _drop_default_labeller(part["labels"])
        part["rollouts"].update(_REMOVED_ROLLOUT_FIELDS)
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


def _drop_default_labeller(labels: dict) -> None:
    """labels.labeller and truth_samples came later: with the tree labeller they are not hashed, so every config
    and dataset written before keeps its hashes and shard keys."""
    if labels.get("labeller") == "tree":
        labels.pop("labeller", None)
        labels.pop("truth_samples", None)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def parse_config(data: dict, source: str = "<dict>", check_paths: bool = True) -> FactoryConfig:
    """Validate a config mapping; raises ConfigError naming every bad field.

    check_paths=False skips the existence checks of data files and model directories (a config for another
    machine); everything else is still validated.
    """
    try:
        return FactoryConfig.model_validate(data, context={"check_paths": check_paths})
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, check_paths: bool = True) -> FactoryConfig:
    """Read and validate a YAML config file (check_paths: see parse_config): the one config loader.

    A relative path names a file in the current directory when there is one there, else in the repository
    (``configs/toy.yaml`` works from anywhere, and in a Prefect worker whatever its directory).
    """
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.is_file():
        p = resolve_path(p)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML in {p}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {p}: the top level must be a mapping, got {type(data).__name__}")
    return parse_config(data, str(p), check_paths)
