"""The Problem record every loader produces, and its stable id."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any


def problem_id(source: str, question: str) -> str:
    """Stable id: sha256 of source and whitespace-normalised question text (16 hex chars)."""
    text = " ".join(question.split())
    return hashlib.sha256(f"{source}\x00{text}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Problem:
    """One problem with a canonical answer. `meta` holds source-specific extras (JSON-serialisable)."""

    problem_id: str
    source: str
    question: str
    answer: str
    split: str = "train"
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def make(cls, source: str, question: str, answer: str, split: str = "train", **meta: Any) -> Problem:
        return cls(problem_id(source, question), source, question, answer, split, dict(meta))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
