"""Per-GPU memory of a config's PRM training and of its vLLM engines, estimated from the models' config.json alone.

Nothing here loads weights or imports torch: `validate` and `doctor` call it to refuse a config that would run out
of memory an hour in, before any worker or engine starts. Byte counts are exact for what they count; what they
leave out is said below and in each line's note.

**Parameters** (decoder-only Llama / Qwen2 layout, configs.architectures.Architecture): per decoder layer
``h·q + 2·h·kv + q·h`` attention projections (``q = heads·head_dim``, ``kv = kv_heads·head_dim``; plus ``q + 2·kv``
biases for Qwen2), ``3·h·i`` SwiGLU MLP and ``2·h`` RMSNorm weights; ``V·h`` embeddings and a final ``h`` norm.
The PRM's backbone is the decoder without its LM head (tasks/prm/model.py, ``AutoModel``); an untied LM head is
added when ``token_features`` reads it. The ensemble heads: ``E·Σ(fan_in·fan_out + fan_out)`` over the widths
``[h + token features, *head_hidden, 1]``. A vLLM engine holds the causal LM (the LM head too, when untied).

**Training state per GPU.** ``m = 4`` bytes per master weight (the trained weights and AdamW's states are always
float32: configs/schema.py refuses training bf16 weights directly), ``c`` bytes per computed value (fp32: 4;
``*-mixed``: 2).

- ddp: every GPU holds all weights ``P·m``, the gradients ``T·m`` (``T`` trainable parameters), AdamW's two
  states ``2·T·m`` and DDP's gradient buckets ``T·m`` (torch DDP copies gradients into buckets of its own unless
  ``gradient_as_bucket_view``; Ray Train's ``prepare_model`` keeps that default). Mixed precision runs under
  autocast, which caches a 16-bit copy of every matmul weight during the forward: ``2·`` (decoder-layer matmul
  weights + LM head).
- fsdp (FSDP2 ``fully_shard`` per decoder layer and on the root): weights, gradients and AdamW states are sharded
  over ``num_workers``: ``(P·m + T·m + 2·T·m) / N``. Unsharded working copies on top: the root's parameters
  (embeddings, final norm, LM head) all-gathered at ``c`` for the whole step, two decoder layers' parameters at
  ``c`` (the one computing and the one prefetched) and one layer's unsharded gradient before its reduce-scatter
  (``c``, plus 4 for the fp32 reduce copy under mixed precision).

**Activations** (micro-batch ``b = train.batch_size``, ``s = train.max_length`` or the backbone's context), after
the per-layer estimate of Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
(arXiv 2205.05198, section 4.1: ``sbh·(34 + 5·a·s/h)`` bytes per layer for a GPT layer at 16 bits), adapted:

- no dropout (Qwen2 and Llama train with none): the masks' ``sbh`` and ``a·s²·b`` bytes go;
- PyTorch's SDPA (flash / memory-efficient) keeps no ``a·s²`` score or softmax matrix: the ``5·a·s/h`` term goes;
- what a Qwen2 / Llama layer keeps for its backward, per token: the two RMSNorm inputs (``2h``, the residual
  stream, at ``r`` bytes), the q/k/v projections' input (``h``), q, k and v (``q + 2·kv``, grouped-query
  attention), the attention output that o_proj reads (``q``), the MLP input (``h``) and the SwiGLU MLP's four
  ``i``-wide tensors (gate and up outputs, SiLU output, their product): ``2h·r + (2h + 2q + 2kv + 4i)·c`` bytes.
  ``r = 4`` under DDP with autocast (the fp32 embedding output keeps the residual stream fp32), else ``c``;
- plus the embedding output and the final hidden state, ``2·b·s·h·r``.

Without checkpointing every layer's activations are kept: ``L · b·s·(per token)``. With per-layer activation
checkpointing a layer keeps only its input (``b·s·h·r``) and one layer's full activations are alive while it is
recomputed in the backward: ``L·b·s·h·r + b·s·(per token)``. ``token_features`` (logprob / distribution) adds
the LM-head logits over the vocabulary, ``b·s·V·(c + 4)`` (the matmul output and its fp32 log-softmax). A frozen
backbone (``train_backbone: false``) keeps one layer's activations at a time. Left out: RMSNorm's internal fp32
upcasts, RoPE's intermediate copies, SDPA's log-sum-exp (``a·s`` floats), the heads' own activations (a few MB),
the CUDA context, NCCL buffers and allocator fragmentation; `RESERVED_FRACTION` of the GPU is kept free for them.

**vLLM engine per GPU**: the causal LM's weights at the engine dtype, split over ``tensor_parallel_size``, plus the
KV cache of one ``max_model_len`` sequence: ``layers × 2 × kv_heads per rank × head_dim × dtype bytes × tokens``
(vLLM splits KV heads over the ranks and replicates them when there are fewer heads than ranks; it refuses to
start when one full-length sequence does not fit). Both must fit in ``gpu_memory_utilization × GPU memory``;
vLLM's own profiling activations and CUDA graphs take from the same budget and are not counted.
"""

from __future__ import annotations

import itertools
import math
import shutil
import subprocess
from dataclasses import asdict, dataclass, field

from configs.architectures import Architecture, read_architecture
from configs.schema import FactoryConfig, TrainConfig

GB = 10**9  # train.gpu_memory_gb is in GB
# Kept free of the training estimate: the CUDA context, NCCL buffers, the caching allocator's fragmentation and
# what the estimate leaves out (module docstring). A choice, not a measurement.
RESERVED_FRACTION = 0.10
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": None}
# tasks/prm/model.py TOKEN_FEATURE_WIDTH (the planner does not import torch); tests check the two agree.
TOKEN_FEATURE_WIDTH = {"none": 0, "logprob": 1, "distribution": 3}


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a decoder-only model (module docstring)."""

    layer: int  # one decoder layer
    layer_matmul: int  # its matmul weights (what autocast copies to 16 bits)
    embeddings: int
    final_norm: int
    lm_head: int  # 0 when tied to the embeddings

    def total(self, num_layers: int, with_lm_head: bool) -> int:
        return self.embeddings + num_layers * self.layer + self.final_norm + (self.lm_head if with_lm_head else 0)


def param_counts(arch: Architecture) -> ParamCounts:
    h, q, kv, i = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim, \
        arch.intermediate_size
    matmul = h * q + 2 * h * kv + q * h + 3 * h * i
    bias = q + 2 * kv if arch.attention_bias else 0
    return ParamCounts(layer=matmul + bias + 2 * h, layer_matmul=matmul, embeddings=arch.vocab_size * h,
                       final_norm=h, lm_head=0 if arch.tie_word_embeddings else arch.vocab_size * h)


def head_params(hidden_size: int, train: TrainConfig) -> int:
    """The ensemble heads' parameters: E MLPs on the hidden state (plus token features)."""
    widths = [hidden_size + TOKEN_FEATURE_WIDTH[train.token_features], *train.head_hidden, 1]
    return train.num_heads * sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))


@dataclass
class TrainPlan:
    """The estimate for one setting of the train section: bytes per GPU by part."""

    strategy: str
    precision: str
    activation_checkpointing: bool
    batch_size: int
    grad_accum_steps: int
    seq_len: int
    num_workers: int
    params: int
    trainable: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def train_memory(arch: Architecture, train: TrainConfig, seq_len: int | None = None) -> TrainPlan:
    """Per-GPU bytes of `train` (its strategy, precision, checkpointing, micro-batch, workers) on `arch`."""
    s = seq_len or train.max_length or arch.max_position_embeddings
    b, n, L = train.batch_size, train.num_workers, arch.num_layers
    h, q, kv, i = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim, \
        arch.intermediate_size
    mixed = train.precision != "fp32"
    m = 4
    c = 2 if mixed else 4
    counts = param_counts(arch)
    lm_head = counts.lm_head if train.token_features != "none" else 0
    backbone = counts.embeddings + L * counts.layer + counts.final_norm
    heads = head_params(h, train)
    params = backbone + lm_head + heads
    trainable = (backbone + lm_head if train.train_backbone else 0) + heads
    parts: dict[str, int] = {}
    if train.strategy == "ddp":
        parts["weights"] = params * m
        parts["gradients"] = trainable * m
        parts["optimizer"] = 2 * trainable * m
        parts["ddp_buckets"] = trainable * m
        if mixed:
            parts["autocast_copies"] = 2 * (L * counts.layer_matmul + lm_head)
    else:
        parts["weights"] = math.ceil(params * m / n)
        parts["gradients"] = math.ceil(trainable * m / n)
        parts["optimizer"] = math.ceil(2 * trainable * m / n)
        root = counts.embeddings + counts.final_norm + lm_head
        parts["gathered_weights"] = (root + 2 * counts.layer) * c
        parts["gathered_gradients"] = counts.layer * (c + (4 if mixed else 0)) if train.train_backbone else 0
    r = 4 if (mixed and train.strategy == "ddp") else c
    per_token_layer = 2 * h * r + (2 * h + 2 * q + 2 * kv + 4 * i) * c
    outer = 2 * b * s * h * r
    if not train.train_backbone:
        act = b * s * per_token_layer + outer
    elif train.activation_checkpointing:
        act = L * b * s * h * r + b * s * per_token_layer + outer
    else:
        act = L * b * s * per_token_layer + outer
    if train.token_features != "none":
        act += b * s * arch.vocab_size * (c + 4)
    parts["activations"] = act
    return TrainPlan(train.strategy, train.precision, train.activation_checkpointing, b, train.grad_accum_steps, s,
                     n, params, trainable, parts)


@dataclass
class EnginePlan:
    """One vLLM engine's bytes per GPU against its budget."""

    dtype: str
    tensor_parallel_size: int
    max_model_len: int
    gpu_memory_utilization: float
    params: int
    weights: int
    kv_cache: int  # one max_model_len sequence
    kv_bytes_per_token: int
    budget: int | None

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget

    @property
    def max_sequences(self) -> float | None:
        """Full-length sequences whose KV cache fits beside the weights (vLLM's concurrency at max_model_len)."""
        if self.budget is None:
            return None
        return max(0.0, (self.budget - self.weights) / self.kv_cache)


def engine_dtype_bytes(arch: Architecture, dtype: str) -> int:
    """Bytes per weight of an engine; ``auto`` is the checkpoint's dtype, 16 bits for a float32 checkpoint (vLLM
    serves those in half precision on GPU)."""
    if dtype == "auto":
        return 2 if arch.torch_dtype in (None, "float32") else DTYPE_BYTES.get(str(arch.torch_dtype)) or 2
    return DTYPE_BYTES[dtype]


def engine_memory(arch: Architecture, dtype: str, max_model_len: int, tensor_parallel_size: int,
                  gpu_memory_utilization: float, gpu_bytes: int | None) -> EnginePlan:
    """Per-GPU bytes of one vLLM engine serving `arch` over `tensor_parallel_size` GPUs."""
    nbytes = engine_dtype_bytes(arch, dtype)
    counts = param_counts(arch)
    params = counts.total(arch.num_layers, with_lm_head=True)
    tp = tensor_parallel_size
    kv_heads_per_rank = max(1, arch.num_kv_heads // tp)
    kv_token = arch.num_layers * 2 * kv_heads_per_rank * arch.head_dim * nbytes
    budget = None if gpu_bytes is None else int(gpu_memory_utilization * gpu_bytes)
    return EnginePlan(dtype, tp, max_model_len, gpu_memory_utilization, params, math.ceil(params * nbytes / tp),
                      kv_token * max_model_len, kv_token, budget)


# ---------------------------------------------------------------------------------------------- a config's plan


def detect_gpu_bytes() -> int | None:
    """Memory of the smallest GPU nvidia-smi reports on this machine (no torch import); None without one."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
        sizes = [int(float(line)) * 2**20 for line in out.split() if line.strip()]  # MiB
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return min(sizes) if sizes else None


@dataclass
class MemoryReport:
    """What validate and doctor print: the train and engine estimates, whether they fit, and what would."""

    gpu_bytes: int | None
    gpu_source: str  # "train.gpu_memory_gb" | "detected GPU" | "none"
    train: dict | None = None
    engine: dict | None = None
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _settings_that_fit(arch: Architecture, train: TrainConfig, usable: int) -> tuple[str, TrainPlan] | None:
    """The smallest change to strategy, activation_checkpointing and the micro-batch (global batch kept) that fits.

    Candidates with fewer changed settings come first; among those the larger micro-batch (faster), then the
    smaller estimate."""
    per_worker = train.batch_size * train.grad_accum_steps
    splits = [(bs, per_worker // bs) for bs in range(per_worker, 0, -1) if per_worker % bs == 0]
    found = []
    for strategy, ckpt, (bs, accum) in itertools.product(("ddp", "fsdp"), (False, True), splits):
        if train.num_workers == 1 and strategy == "fsdp" and train.strategy == "ddp":
            continue  # sharding over one worker saves nothing
        trial = train.model_copy(update={"strategy": strategy, "activation_checkpointing": ckpt, "batch_size": bs,
                                         "grad_accum_steps": accum})
        plan = train_memory(arch, trial)
        if plan.total > usable:
            continue
        changes = []
        if strategy != train.strategy:
            changes.append(f"strategy: {strategy}")
        if ckpt != train.activation_checkpointing:
            changes.append(f"activation_checkpointing: {str(ckpt).lower()}")
        if bs != train.batch_size:
            changes.append(f"batch_size: {bs} and grad_accum_steps: {accum}")
        found.append((len(changes), -bs, plan.total, " and ".join(changes), plan))
    if not found:
        return None
    best = min(found, key=lambda f: f[:3])
    return best[3], best[4]


def _train_dict(plan: TrainPlan, usable: int | None) -> dict:
    return {**asdict(plan), "total": plan.total, "usable": usable,
            "fits": None if usable is None else plan.total <= usable}


def _engine_dict(plan: EnginePlan) -> dict:
    return {**asdict(plan), "total": plan.total, "fits": plan.fits, "max_sequences": plan.max_sequences}


def plan_config(cfg: FactoryConfig, gpu_bytes: int | None = None, detect: bool = True,
                architectures: dict[str, Architecture] | None = None) -> MemoryReport:
    """Plan `cfg`'s training (when it trains on GPUs) and its vLLM engines (when they run on GPUs).

    The GPU's memory: `gpu_bytes` when given, else ``train.gpu_memory_gb``, else the detected GPU (`detect`);
    with none, the estimates are still made and the check says it was skipped. `architectures` maps a model_path
    to its Architecture (config.json values given by the caller); others are read with read_architecture.
    """
    if gpu_bytes is not None:
        source = "given"
    elif cfg.train.gpu_memory_gb is not None:
        gpu_bytes, source = int(cfg.train.gpu_memory_gb * GB), "train.gpu_memory_gb"
    else:
        gpu_bytes = detect_gpu_bytes() if detect else None
        source = "detected GPU" if gpu_bytes is not None else "none"
    report = MemoryReport(gpu_bytes, source)
    known = architectures or {}

    def arch_of(model_path: str) -> Architecture | None:
        return known.get(model_path) or read_architecture(model_path)

    train = cfg.train
    if not train.use_gpu:
        report.notes.append("train: not planned (train.use_gpu is false: it trains on CPU)")
    elif (arch := arch_of(train.model_path)) is None:
        report.notes.append(f"train: cannot plan: no config.json for {train.model_path} (not a local directory, "
                            "not in the HF cache, not in configs/architectures.py KNOWN_ARCHITECTURES)")
    else:
        usable = None if gpu_bytes is None else int(gpu_bytes * (1 - RESERVED_FRACTION))
        plan = train_memory(arch, train)
        report.train = {**_train_dict(plan, usable), "architecture": arch.source}
        if usable is not None and plan.total > usable:
            fix = _settings_that_fit(arch, train, usable)
            report.train["fits_with"] = fix[0] if fix else None
            how = (f"fits with {fix[0]} ({gib(fix[1].total)})" if fix else
                   "no strategy, checkpointing or micro-batch fits: use more workers, a shorter max_length or a "
                   "larger GPU")
            report.problems.append(
                f"train: {gib(plan.total)} per GPU does not fit {gib(usable)} ({1 - RESERVED_FRACTION:.0%} of "
                f"{gib(gpu_bytes)}, {source}) with strategy: {train.strategy}, precision: {train.precision}"
                ", "
                f"activation_checkpointing: {str(train.activation_checkpointing).lower()}, batch_size: "
                f"{train.batch_size}; {how}")
    policy, cluster = cfg.policy, cfg.cluster
    if policy.backend != "vllm" or cluster.gpus_per_engine == 0:
        report.notes.append("engines: not planned (they run on CPU or with transformers)")
    elif (arch := arch_of(policy.model_path)) is None:
        report.notes.append(f"engines: cannot plan: no config.json for {policy.model_path}")
    else:
        eplan = engine_memory(arch, policy.dtype, policy.max_model_len, cluster.tensor_parallel_size,
                              policy.gpu_memory_utilization, gpu_bytes)
        report.engine = {**_engine_dict(eplan), "architecture": arch.source}
        if eplan.fits is False:
            fix = next((tp for tp in (2, 4, 8) if tp > eplan.tensor_parallel_size and arch.num_heads % tp == 0
                        and engine_memory(arch, policy.dtype, policy.max_model_len, tp,
                                          policy.gpu_memory_utilization, gpu_bytes).fits), None)
            report.engine["fits_with"] = f"tensor_parallel_size: {fix}" if fix else None
            how = (f"fits with cluster.tensor_parallel_size: {fix} and gpus_per_engine: {fix}" if fix else
                   "no tensor_parallel_size up to 8 fits: lower max_model_len or use larger GPUs")
            report.problems.append(
                f"engines: weights {gib(eplan.weights)} + KV cache {gib(eplan.kv_cache)} (one {policy.max_model_len}"
                f"-token sequence) per GPU exceed gpu_memory_utilization {policy.gpu_memory_utilization} x "
                f"{gib(gpu_bytes)} = {gib(eplan.budget)} with tensor_parallel_size {eplan.tensor_parallel_size}; "
                f"{how}")
    if gpu_bytes is None and (report.train or report.engine):
        report.notes.append("memory check skipped: no train.gpu_memory_gb in the config and no GPU detected")
    return report


def report_lines(report: MemoryReport) -> list[str]:
    """The breakdown as lines for a terminal."""
    lines = []
    if report.train:
        t = report.train
        parts = ", ".join(f"{k} {gib(v)}" for k, v in t["parts"].items())
        ckpt = str(t["activation_checkpointing"]).lower()
        lines.append(f"train ({t['strategy']}, {t['precision']}, activation_checkpointing {ckpt}, micro-batch "
                     f"{t['batch_size']} x {t['seq_len']} tokens, {t['num_workers']} workers, "
                     f"{t['params'] / 1e9:.2f} B params): {gib(t['total'])} per GPU = {parts}")
    if report.engine:
        e = report.engine
        lines.append(f"engine ({e['dtype']}, tensor_parallel_size {e['tensor_parallel_size']}, {e['params'] / 1e9:.2f}"
                     f" B params): weights {gib(e['weights'])} + KV cache {gib(e['kv_cache'])} "
                     f"({e['max_model_len']} tokens) = {gib(e['total'])} per GPU"
                     + (f" of {gib(e['budget'])} (gpu_memory_utilization {e['gpu_memory_utilization']}); "
                        f"{e['max_sequences']:.1f} full-length sequences fit" if e["budget"] is not None else ""))
    if report.gpu_bytes is not None and (report.train or report.engine):
        lines.append(f"GPU memory {gib(report.gpu_bytes)} ({report.gpu_source})")
    lines += report.notes
    return lines
