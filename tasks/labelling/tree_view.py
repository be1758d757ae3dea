"""Views of partitioned solutions and generation trees: rich text for the terminal, a standalone HTML page.

High-entropy tokens (H >= tau) are highlighted, step boundaries are drawn as a bar before the anchor token,
and each leaf shows whether its final answer is right. The part a branch shares with its parent is dimmed.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

from rich.text import Text


@dataclass(frozen=True)
class LeafView:
    """What the views need of one leaf: its tokens as text, entropies, step starts and outcome."""

    token_texts: list[str]
    entropies: list[float]
    boundaries: list[int]
    branch_at: int
    depth: int
    final_correct: bool


def _visible(token: str) -> str:
    return token.replace("\n", "⏎")


def leaf_text(leaf: LeafView, tau: float) -> Text:
    """One leaf as rich Text: `│` before each step, anchors in reverse red, shared prefix dimmed."""
    out = Text()
    out.append("✓ " if leaf.final_correct else "✗ ", style="bold green" if leaf.final_correct else "bold red")
    cuts = set(leaf.boundaries[1:])
    for i, (tok, h) in enumerate(zip(leaf.token_texts, leaf.entropies, strict=False)):
        if i in cuts:
            out.append("│", style="bold cyan")
        style = "bold white on red" if h >= tau else ""
        if i < leaf.branch_at:
            style = (style + " dim").strip()
        out.append(_visible(tok), style=style or None)
    return out


def tree_html(question: str, leaves: Sequence[LeafView], tau: float, title: str = "generation tree") -> str:
    """A standalone HTML page of one problem's tree: leaves in generation order, indented by depth."""
    rows = []
    for n, leaf in enumerate(leaves):
        cuts = set(leaf.boundaries[1:])
        spans = []
        for i, (tok, h) in enumerate(zip(leaf.token_texts, leaf.entropies, strict=False)):
            if i in cuts:
                spans.append('<span class="cut">│</span>')
            # Background intensity grows with entropy, saturating at 2 tau.
            alpha = min(1.0, h / (2 * tau)) if tau > 0 else 0.0
            cls = "anchor" if h >= tau else ""
            cls += " shared" if i < leaf.branch_at else ""
            spans.append(f'<span class="{cls.strip()}" style="background: rgba(220,50,47,{alpha:.2f})" '
                         f'title="H={h:.3f} nats">{html.escape(_visible(tok))}</span>')
        mark = '<b class="ok">✓</b>' if leaf.final_correct else '<b class="bad">✗</b>'
        rows.append(f'<div class="leaf" style="margin-left:{2 * leaf.depth}em">{mark} <small>leaf {n}, depth '
                    f'{leaf.depth}, {len(leaf.boundaries)} steps</small><br><code>{"".join(spans)}</code></div>')
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
code {{ font-size: 1.05em; white-space: pre-wrap; }}
.leaf {{ margin-bottom: 1em; }}
.anchor {{ font-weight: bold; outline: 1px solid #dc322f; }}
.shared {{ opacity: 0.45; }}
.cut {{ color: #268bd2; font-weight: bold; }}
.ok {{ color: #2aa198; }} .bad {{ color: #dc322f; }}
</style></head><body>
<h2>{html.escape(title)}</h2>
<p><b>Question:</b> {html.escape(question)}</p>
<p>Steps start at <span class="cut">│</span>; tokens with entropy ≥ τ = {tau:g} nats are outlined; hover a token
for its entropy. Dimmed text is shared with the leaf this one branched from.</p>
{''.join(rows)}
</body></html>
"""
