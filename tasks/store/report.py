"""What a dataset directory holds, as numbers, markdown and plots: for Prefect artifacts and `prm-factory inspect`.

Everything is computed from the directory alone (manifest.json, the shards, build.json), so a report can be
rebuilt for any version at any time. Cost is the engine's generated tokens (per stage, summed from each
shard's provenance); "cost per labelled step" divides them by the steps that got a label from the
policy's rollouts or tree (every step but the last of each row, whose label is the final answer's
correctness and costs nothing extra). Soft and ER labels are null on early-stop and rule-estimated steps
(tasks.labelling.label_rule.step_labels); the ER histogram counts the steps that have one and says how many do not.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.cost import COST_STAGES, ShardCost, total_cost
from tasks.labelling.label_rule import FINAL_ORIGIN

REPORTS_DIR = "reports"
ER_BINS = 10


@dataclass
class Report:
    stats: dict[str, Any]
    markdown: str
    images: dict[str, Path] = field(default_factory=dict)
    markdown_path: Path | None = None

    def table_rows(self) -> list[dict[str, Any]]:
        """One row per shard, for a Prefect table artifact."""
        return self.stats["per_shard"]


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _tau(dataset_dir: Path) -> float | None:
    from tasks.store.dataset import BUILD_MARKER

    marker = dataset_dir / BUILD_MARKER
    if not marker.is_file():
        return None
    config = json.loads(marker.read_text()).get("config", {})
    return config.get("partition", {}).get("tau")


def step_counts(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Steps per origin, and the stored hard ``labels`` as good / bad counts of the non-final steps (the ones a
    rollout or the tree labelled) and of the final ones (the outcome), over dataset rows (``labels`` and
    ``step_origin`` columns). The dataset report and the export's card count with this."""
    origins: Counter[str] = Counter()
    hard = {"good": 0, "bad": 0}
    final = {"good": 0, "bad": 0}
    for row in rows:
        for label, origin in zip(row["labels"], row["step_origin"], strict=True):
            origins[origin] += 1
            (final if origin == FINAL_ORIGIN else hard)["good" if label else "bad"] += 1
    return {"step_origin": origins, "hard_labels": hard, "final_labels": final}


def dataset_stats(dataset_dir: str | Path) -> dict[str, Any]:
    """Counts, label distributions, step entropies and cost of a finished dataset directory."""
    from tasks.io import read_provenance
    from tasks.store.dataset import read_dataset, read_manifest

    root = Path(dataset_dir)
    manifest = read_manifest(root)
    extra = manifest.get("extra", {})
    table = read_dataset(root)
    cols = table.select(["labels", "er_labels", "step_origin", "step_entropies", "final_correct", "shard"]).to_pylist()

    counts = step_counts(cols)
    origins, hard = counts["step_origin"], counts["hard_labels"]
    er_hist = [0] * ER_BINS
    er_null = 0
    entropies: list[float] = []
    per_shard_steps: dict[int, int] = {}
    for row in cols:
        for er, origin in zip(row["er_labels"], row["step_origin"], strict=True):
            if origin == FINAL_ORIGIN:
                continue
            if er is None:
                er_null += 1
            else:
                er_hist[min(ER_BINS - 1, int(er * ER_BINS))] += 1
            per_shard_steps[row["shard"]] = per_shard_steps.get(row["shard"], 0) + 1
        entropies.extend(h for h in row["step_entropies"][1:] if h is not None and not math.isnan(h))
    labelled_steps = hard["good"] + hard["bad"]
    final_correct = sum(bool(r["final_correct"]) for r in cols)

    per_shard = []
    shard_costs = []
    for entry in manifest.get("shards", []):
        index = int(Path(entry["path"]).stem.split("-")[1])
        shard_cost = ShardCost.from_dict(read_provenance(root / entry["path"]).get("cost", {}))
        shard_costs.append(shard_cost)
        generated, steps = shard_cost.generated_tokens, per_shard_steps.get(index, 0)
        per_shard.append({"shard": index, "rows": entry["rows"], "labelled_steps": steps,
                          **{s: getattr(shard_cost, s) for s in COST_STAGES}, "generated_tokens": generated,
                          "tokens_per_labelled_step": round(generated / steps, 2) if steps else None})
    total = total_cost(shard_costs)
    cost = {**{s: getattr(total, s) for s in COST_STAGES}, "generated_tokens": total.generated_tokens}
    tau = _tau(root)
    return {
        "dataset_dir": str(root),
        "dataset_version": manifest.get("dataset_version"),
        "version": extra.get("lineage", {}).get("version"),
        "parents": manifest.get("parents", []),
        "created_at": manifest.get("created_at"),
        "config_hash": manifest.get("config_hash"),
        "name": extra.get("name"),
        "policy_model": extra.get("policy_model"),
        "problems": extra.get("problems"),
        "quarantined": extra.get("quarantined"),
        "rows": manifest.get("num_rows", table.num_rows),
        "shards": manifest.get("num_shards", len(per_shard)),
        "steps": sum(origins.values()),
        "labelled_steps": labelled_steps,
        "step_origin": dict(sorted(origins.items())),
        "hard_labels": hard,
        "good_step_fraction": round(hard["good"] / labelled_steps, 4) if labelled_steps else None,
        "er_label_histogram": er_hist,
        "er_label_null_steps": er_null,
        "final_correct": final_correct,
        "final_correct_fraction": round(final_correct / len(cols), 4) if cols else None,
        "tau": tau,
        "step_entropy": {
            "count": len(entropies),
            "mean": round(sum(entropies) / len(entropies), 4) if entropies else None,
            "p50": _quantile(entropies, 0.5),
            "p90": _quantile(entropies, 0.9),
            "at_or_above_tau": sum(h >= tau for h in entropies) if tau is not None else None,
        },
        "entropies": entropies,
        "cost": cost,
        "tokens_per_labelled_step": round(cost["generated_tokens"] / labelled_steps, 2) if labelled_steps else None,
        "per_shard": per_shard,
        "lineage": extra.get("lineage"),
    }


def render_plots(stats: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes of three plots: step-entropy histogram with the τ line, label distribution, cost per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs: dict[str, bytes] = {}

    def save(fig, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        pngs[name] = buf.getvalue()

    save(entropy_figure(stats), "entropy")

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    hard = stats["hard_labels"]
    final_bad = stats["rows"] - stats["final_correct"]
    left.bar(["step good", "step bad", "final right", "final wrong"],
             [hard["good"], hard["bad"], stats["final_correct"], final_bad],
             color=["tab:green", "tab:red", "tab:olive", "tab:orange"])
    left.set(title="hard labels", ylabel="steps")
    left.tick_params(axis="x", labelrotation=20)
    edges = [i / ER_BINS for i in range(ER_BINS)]
    right.bar(edges, stats["er_label_histogram"], width=1 / ER_BINS, align="edge", color="tab:purple")
    null_note = f", {stats['er_label_null_steps']:,} null" if stats.get("er_label_null_steps") else ""
    right.set(title=f"ER-PRM labels (non-final steps{null_note})", xlabel="label", ylabel="steps")
    save(fig, "labels")

    save(cost_figure(stats), "cost")
    return pngs


def entropy_figure(stats: dict[str, Any]):
    """Histogram of step-start entropies with the τ line; the legend right of the axes, clear of every bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(stats["entropies"] or [0.0], bins=30, color="tab:blue")
    if stats["tau"] is not None:
        ax.axvline(stats["tau"], color="tab:red", linestyle="--", label=f"τ = {stats['tau']}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set(title="entropy at step starts (EDU anchors)", xlabel="entropy (nats)", ylabel="steps")
    return fig


def cost_figure(stats: dict[str, Any]):
    """Stacked bars of generated tokens per labelled step, per shard and stage; the legend outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3))
    shards = [str(p["shard"]) for p in stats["per_shard"]]
    bottom = [0.0] * len(shards)
    for stage, color in zip(COST_STAGES, ("tab:blue", "tab:orange", "tab:green"), strict=True):
        values = [p[stage] / p["labelled_steps"] if p["labelled_steps"] else 0.0 for p in stats["per_shard"]]
        ax.bar(shards, values, bottom=bottom, label=stage.removesuffix("_tokens"), color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set(title="generated tokens per labelled step", xlabel="shard", ylabel="tokens")
    # Outside the axes, right of them: inside, it covered a shard's bar.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, title="stage")
    return fig


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _fmt_run(key: str, value: Any) -> str:
    """A value of the run summary for a markdown cell: counts as `a: 1, b: 2`, a dashboard as text, not a link."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in sorted(value.items())) or "–"
    if key == "ray_dashboard":
        # Its port changes when the cluster restarts, so it is not a link; `cluster status` prints the live one.
        return (f"`{value}` at run time (after a restart: `prm-factory cluster status`)" if value
                else "– (no Ray dashboard)")
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _fmt(value)


def render_markdown(stats: dict[str, Any], run: dict[str, Any] | None = None,
                    images: dict[str, str] | None = None) -> str:
    """A markdown report; `images` maps plot names to URLs (file names, or data: URIs to embed them)."""
    run = run or {}
    lines = [f"# Dataset `{stats.get('name') or Path(stats['dataset_dir']).name}`", ""]
    if run.get("status") == "up_to_date":
        lines += [f"**Up to date**: version `{run.get('version')}` already holds every shard of the current "
                  "sources; no engine work, no new version.", ""]
    lines += [
        "| dataset | value |", "|---|---|",
        f"| path | `{stats['dataset_dir']}` |",
        f"| version | `{stats.get('version') or '–'}` (content `{stats['dataset_version']}`) |",
        f"| parents | {', '.join(f'`{p}`' for p in stats['parents']) or '–'} |",
        f"| config hash | `{stats['config_hash']}` |",
        f"| problems / quarantined | {_fmt(stats['problems'])} / {_fmt(stats['quarantined'])} |",
        f"| rows / shards | {_fmt(stats['rows'])} / {_fmt(stats['shards'])} |",
        f"| steps / labelled steps | {_fmt(stats['steps'])} / {_fmt(stats['labelled_steps'])} |",
        f"| good-step fraction (hard) | {_fmt(stats['good_step_fraction'])} |",
        f"| steps without soft/ER label (early stop, estimated) | {_fmt(stats.get('er_label_null_steps'))} |",
        f"| final answer correct | {_fmt(stats['final_correct_fraction'])} |",
        f"| step origin | {', '.join(f'{k}: {v:,}' for k, v in stats['step_origin'].items()) or '–'} |",
        f"| entropy at step starts | mean {_fmt(stats['step_entropy']['mean'])}, "
        f"p90 {_fmt(stats['step_entropy']['p90'])}, τ = {_fmt(stats['tau'])} |",
        "",
        "## Cost (generated tokens)", "",
        "| stage | dataset total | this run |", "|---|---|---|",
    ]
    run_cost = run.get("cost", {})
    for stage in (*COST_STAGES, "generated_tokens"):
        lines.append(f"| {stage.removesuffix('_tokens')} | {_fmt(stats['cost'][stage])} | "
                     f"{_fmt(run_cost.get(stage, 0)) if run else '–'} |")
    lines += ["", f"**Tokens per labelled step**: {_fmt(stats['tokens_per_labelled_step'])}", ""]
    if run:
        lines += ["## This run", "", "| this run | value |", "|---|---|"]
        for k in ("status", "shards_by_status", "reused_shards", "engine_started", "seconds", "ray_dashboard"):
            if k in run:
                lines.append(f"| {k.replace('_', ' ')} | {_fmt_run(k, run[k])} |")
        lines.append("")
    if stats.get("lineage"):
        lin = stats["lineage"]
        reused = [r["index"] for r in lin.get("reused_shards", [])]
        lines += ["## Lineage", "", f"parent `{lin.get('parent')}`; reused shards {reused}, "
                  f"labelled shards {lin.get('labelled_shards')}", ""]
    for name, url in (images or {}).items():
        lines += [f"![{name}]({url})", ""]
    return "\n".join(lines)


def build_report(dataset_dir: str | Path, run: dict[str, Any] | None = None, *, embed_images: bool = False,
                 write_files: bool = True) -> Report:
    """Stats, plots and markdown for a dataset dir; with `write_files`, saved under `<dir>/reports/`.

    `embed_images` puts the PNGs into the markdown as base64 data URIs (Prefect's image artifact takes a
    URL only, and a local server has nowhere to serve files from); otherwise the markdown links the files.
    """
    root = Path(dataset_dir)
    stats = dataset_stats(root)
    pngs = render_plots(stats)
    images: dict[str, Path] = {}
    md_path = None
    if write_files:
        out = root / REPORTS_DIR
        out.mkdir(exist_ok=True)
        for name, data in pngs.items():
            images[name] = out / f"{name}.png"
            images[name].write_bytes(data)
        (out / "stats.json").write_text(json.dumps({k: v for k, v in stats.items() if k != "entropies"},
                                                   indent=2, default=str) + "\n")
        md_path = out / "report.md"
        md_path.write_text(render_markdown(stats, run, {n: f"{n}.png" for n in pngs}))
    urls = ({n: "data:image/png;base64," + base64.b64encode(d).decode() for n, d in pngs.items()} if embed_images
            else {n: f"{REPORTS_DIR}/{n}.png" for n in pngs})
    return Report(stats, render_markdown(stats, run, urls), images, md_path)
