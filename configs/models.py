"""Where a config's model lives: a local directory or a Hugging Face model id, resolved to a local directory.

A `model_path` in a config (the policy's, the PRM backbone's) is either

- a local HF-format directory (absolute, ``~/...``, ``./...``, or relative to the repository root), or
- a Hugging Face model id (``org/name`` or ``name``), taken from the Hugging Face cache
  (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``) and downloaded into it when
  the config is not offline.

A string that names an existing local directory is always that directory, so ``assets/toy-policy`` (which
also reads like an id) stays the shipped model. Offline (``offline: true`` in the config) nothing is ever
fetched: an id must already be in the cache. Engines call `resolve_model` on the node that loads the model
(each node fills its own cache); the driver calls `check_model` before Ray starts, so an unknown id or a
missing directory fails in the driver with one clear line instead of in an engine actor on another machine.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from configs.paths import resolve_path

# What an engine needs from a hub repo: config, weights, tokenizer, chat template. Skips other formats
# (GGUF, ONNX, .bin next to safetensors) that would multiply the download.
TOKENIZER_FILE_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
MODEL_FILE_PATTERNS = [*TOKENIZER_FILE_PATTERNS, "*.safetensors", "*.py"]
# Hugging Face repo ids: one optional namespace, then a name; letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelNotFoundError(FileNotFoundError):
    """The model cannot be found: no HF model at a local path, an id not in the cache (offline), or unknown."""


@dataclass(frozen=True)
class ModelRef:
    """A model_path as the config wrote it, and how it reads: a local directory or a hub id."""

    model_path: str
    kind: str  # "local" | "hub"
    local_dir: Path | None  # the directory for "local"; None for "hub" until resolved


def hub_cache_dir() -> Path:
    """The Hugging Face cache, read from the environment now (huggingface_hub reads it once, at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def classify_model_path(model_path: str) -> ModelRef:
    """Read a model_path as a local directory or a hub id, without touching the network."""
    local = resolve_path(model_path)
    explicit_path = model_path.startswith(("/", "~", "./", "../")) or model_path in (".", "..")
    if local.exists() or explicit_path or not _HUB_ID.match(model_path) or model_path.count("/") > 1:
        return ModelRef(model_path, "local", local)
    return ModelRef(model_path, "hub", None)


def _hub_refused(model_path: str, err: Exception) -> ModelNotFoundError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelNotFoundError(f"model '{model_path}' cannot be fetched from the Hugging Face hub: {first}")


def _check_local(ref: ModelRef) -> Path:
    assert ref.local_dir is not None
    if not (ref.local_dir / "config.json").is_file():
        raise ModelNotFoundError(f"no HF model at {ref.model_path} (expected {ref.local_dir / 'config.json'})")
    return ref.local_dir


def resolve_model(model_path: str, *, offline: bool, revision: str | None = None, tokenizer_only: bool = False
                  ) -> Path:
    """The local directory holding `model_path`'s files, downloading a hub id into the cache unless offline.

    tokenizer_only: fetch the config and tokenizer files only (a driver that tokenizes but loads no weights).

    Raises ModelNotFoundError (a FileNotFoundError) with one line naming the model and what to do.
    """
    ref = classify_model_path(model_path)
    if ref.kind == "local":
        return _check_local(ref)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache_dir()
    try:
        path = snapshot_download(model_path, revision=revision, cache_dir=cache, local_files_only=offline,
                                 allow_patterns=TOKENIZER_FILE_PATTERNS if tokenizer_only else MODEL_FILE_PATTERNS)
    except LocalEntryNotFoundError:
        # Offline with an empty cache, or online with the hub unreachable and nothing cached.
        how = "offline: true in the config" if offline else "the hub is unreachable (or HF_HUB_OFFLINE=1)"
        raise ModelNotFoundError(
            f"model '{model_path}' is not in the Hugging Face cache {cache} and {how}; download it on a machine "
            f"with hub access (`hf download {model_path}`), set HF_HUB_CACHE, or point model_path at a directory"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, HFValidationError) as err:
        raise _hub_refused(model_path, err) from None
    return _check_local(ModelRef(model_path, "local", Path(path)))


def check_model(model_path: str, *, offline: bool, revision: str | None = None) -> str:
    """Check, without downloading weights, that `model_path` can be loaded; returns where it will come from.

    Local directories and (offline) cached ids are looked up on disk; online, a hub id is looked up with one
    metadata request. Raises ModelNotFoundError like `resolve_model`.
    """
    ref = classify_model_path(model_path)
    if ref.kind == "local":
        return str(_check_local(ref))
    try:  # already cached: no request needed
        return str(resolve_model(model_path, offline=True, revision=revision))
    except ModelNotFoundError:
        if offline:
            raise
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub_errors

    try:
        info = HfApi().model_info(model_path, revision=revision)
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError, hub_errors.RevisionNotFoundError,
            hub_errors.HFValidationError) as err:
        raise _hub_refused(model_path, err) from None
    except Exception as err:  # noqa: BLE001 - network errors of any kind: one line, not a traceback
        raise ModelNotFoundError(f"model '{model_path}': the Hugging Face hub did not answer ({err})") from None
    return f"hub:{model_path}@{info.sha}"
