"""Which labeller a config asks for (``labels.labeller``), the one place that chooses."""

from __future__ import annotations

from collections.abc import Callable

from configs.schema import FactoryConfig
from tasks.generation import Engine
from tasks.labelling.tree_labeller import ShardLabeller, Tokenizer
from tasks.labelling.truth_labeller import TruthLabeller


def make_labeller(cfg: FactoryConfig, engine: Engine, tokenizer: Tokenizer,
                  progress: Callable[[str, int], None] | None = None) -> ShardLabeller | TruthLabeller:
    """The labeller `cfg.labels.labeller` names: the tree labeller (EDU tree and ER-PRM rollouts), or the
    exact-truth ceiling (toy problems only)."""
    cls = TruthLabeller if cfg.labels.labeller == "truth" else ShardLabeller
    return cls(cfg, engine, tokenizer, progress)
