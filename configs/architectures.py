"""A model's architecture numbers (its ``config.json``) without its weights, for the memory planner and validate.

`read_architecture` looks, in order, in a local model directory, in the Hugging Face cache (a hub id that was
downloaded once: its snapshot's ``config.json``; nothing is fetched) and in `KNOWN_ARCHITECTURES`, a shipped
table of the hub models the repo's GPU configs name. A model found nowhere has no architecture here: the caller
says it cannot plan. Reading is a file read, so ``validate`` stays well under a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from configs.models import classify_model_path, hub_cache_dir

# config.json values of the hub models the shipped GPU configs use (configs/prm-qwen2.5-math-*.yaml,
# configs/gsm8k-qwen2.5-72b.yaml), written here because nothing is downloadable on a machine without the hub.
# Source: each repo's config.json on huggingface.co (Qwen/<name>/blob/main/config.json), Qwen2 architecture
# (q/k/v projections with bias, SwiGLU MLP, RMSNorm). Base and Instruct models share their architecture.
_QWEN25_MATH_1_5B = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "max_position_embeddings": 4096, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
_QWEN25_MATH_7B = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
_QWEN25_72B = {"model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
               "max_position_embeddings": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
KNOWN_ARCHITECTURES: dict[str, dict] = {
    "Qwen/Qwen2.5-Math-1.5B": _QWEN25_MATH_1_5B,
    "Qwen/Qwen2.5-Math-1.5B-Instruct": _QWEN25_MATH_1_5B,
    "Qwen/Qwen2.5-Math-7B": _QWEN25_MATH_7B,
    "Qwen/Qwen2.5-Math-7B-Instruct": _QWEN25_MATH_7B,
    "Qwen/Qwen2.5-72B": _QWEN25_72B,
    "Qwen/Qwen2.5-72B-Instruct": _QWEN25_72B,
}


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder-only transformer (Llama / Qwen2 layout) the planner needs, and where they came from."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2: q, k and v projections carry a bias; Llama: none
    torch_dtype: str | None
    source: str  # "directory PATH" | "HF cache PATH" | "shipped table (configs/architectures.py)"

    @classmethod
    def from_config(cls, hf: dict, source: str) -> Architecture:
        """From a config.json mapping; raises KeyError/TypeError/ValueError when a needed number is missing."""
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        model_type = hf.get("model_type", "")
        return cls(
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            vocab_size=int(hf["vocab_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings") or 0),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            torch_dtype=hf.get("torch_dtype") or hf.get("dtype"),
            source=source,
        )


def _cached_config(model_id: str) -> Path | None:
    """config.json of a hub id's snapshot in the HF cache (the `main` ref's, else any), without the network."""
    repo = hub_cache_dir() / f"models--{model_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip() / "config.json").is_file():
        return repo / "snapshots" / ref.read_text().strip() / "config.json"
    found = sorted(repo.glob("snapshots/*/config.json"))
    return found[0] if found else None


def read_architecture(model_path: str) -> Architecture | None:
    """The architecture of `model_path` (a directory or a hub id) from its config.json, or the shipped table;
    None when neither has it (or its config.json lacks a needed number)."""
    ref = classify_model_path(model_path)
    candidates: list[tuple[Path | None, str]] = []
    if ref.kind == "local":
        candidates.append((ref.local_dir / "config.json", f"directory {ref.local_dir}"))
    else:
        path = _cached_config(model_path)
        candidates.append((path, f"HF cache {path}"))
    for path, source in candidates:
        if path is not None and path.is_file():
            try:
                return Architecture.from_config(json.loads(path.read_text()), source)
            except (KeyError, TypeError, ValueError):
                return None
    if model_path in KNOWN_ARCHITECTURES:
        return Architecture.from_config(KNOWN_ARCHITECTURES[model_path], "shipped table (configs/architectures.py)")
    return None
