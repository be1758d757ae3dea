"""Where the repository is, and how a path in a config is read: the bottom of the import graph.

Both configs/schema.py (validation) and configs/models.py (model lookup) need this; it lives apart from
both so that neither imports the other back.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The trained toy policy shipped in the repo: the default policy of configs/toy.yaml, trained by
# scripts/train_policy.py.
SHIPPED_POLICY = REPO_ROOT / "assets" / "toy-policy"


def resolve_path(path: str | Path) -> Path:
    """A config path made absolute: relative paths are taken from the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def shipped_policy_ready() -> bool:
    """True once the trained toy policy is in assets/ (config and weights both written)."""
    return (SHIPPED_POLICY / "config.json").is_file() and (SHIPPED_POLICY / "model.safetensors").is_file()
