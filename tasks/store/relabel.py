"""Labels again from the stored counts, no engine: a new η (``relabel``), or fewer rollouts (``subsample_rollouts``).

ER-PRM (arXiv 2412.11006) labels depend on the rollouts only through (k, N), which every row stores, so a
new η needs no new rollout. Which steps get an ER label, and which value, is the label rule's
(``tasks.labelling.label_rule.step_labels``); this module applies it to a table and writes the result as a new version.

The same counts also hold every smaller rollout budget: the N outcomes of a step are independent policy samples,
so a random m of them, drawn without replacement, are m independent samples. ``subsample_rollouts`` turns a
Math-Shepherd build with N rollouts into the rows a build with m < N would have drawn, so N = 4, 8 and 16 cost
the rollouts of N = 16 alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.io import atomic_write_json, read_provenance, shard_index
from tasks.labelling.label_rule import FINAL_ORIGIN, step_labels
from tasks.store.dataset import MANIFEST_NAME, DatasetError, read_manifest, verify_dataset, write_manifest, write_shard

RELABEL_MARKER = "relabel.json"


def relabel(table: pa.Table, eta: float) -> pa.Table:
    """The table with ``er_labels`` recomputed from ``successes``/``rollouts`` for a new η, and ``eta`` set.

    Steps sampled N times get ER(k, N, η), the ``"final"`` step keeps the outcome (its hard ``labels``
    value as 0.0/1.0), early-stop and rule-estimated steps stay null: ``tasks.labelling.label_rule.step_labels``,
    given the stored hard labels. Other columns are unchanged. A row whose counts or origins the rule
    refuses is a DatasetError naming the row and step.
    """
    flat_k = pc.list_flatten(table["successes"]).to_numpy()
    flat_n = pc.list_flatten(table["rollouts"]).to_numpy()
    flat_origin = pc.list_flatten(table["step_origin"]).to_numpy(zero_copy_only=False)
    flat_hard = pc.list_flatten(table["labels"]).to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(table["successes"]).to_numpy(zero_copy_only=False)
    for name in ("rollouts", "step_origin", "labels"):
        if not np.array_equal(pc.list_value_length(table[name]).to_numpy(zero_copy_only=False), lengths):
            raise DatasetError(f"column {name!r} and 'successes' differ in step counts")
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    try:
        labels = step_labels(flat_k, flat_n, flat_origin, eta, flat_hard)
    except ValueError as err:
        raise DatasetError(_name_row(str(err), offsets)) from None
    values = pa.array(labels.er, pa.float64(), mask=~labels.valued)
    er_col = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32), pa.int32()), values)
    i = table.schema.get_field_index("er_labels")
    table = table.set_column(i, table.schema.field(i), er_col)
    j = table.schema.get_field_index("eta")
    return table.set_column(j, table.schema.field(j), pa.array(np.full(table.num_rows, float(eta)), pa.float64()))


def subsample_rollouts(table: pa.Table, n: int, seed: int) -> pa.Table:
    """The rows a build with ``rollouts.n = n`` would give, drawn from a build with a larger N; no engine.

    For plain rollouts without a tree (Math-Shepherd: newline steps, one policy solution per problem): a step's
    N outcomes are the solution's own (its final answer, ``final_correct``) and N - 1 fresh rollouts, as the
    build tops every prefix up to N (`tasks.labelling.rollouts`). A build with n keeps the own outcome and draws
    n - 1 fresh ones, so each step keeps its own outcome and draws n - 1 of its N - 1 fresh outcomes without
    replacement (a hypergeometric draw of the fresh successes, numpy's generator seeded by ``seed``): the same
    distribution as n - 1 fresh rollouts. ``successes``, ``rollouts``, ``labels``, ``soft_labels`` and
    ``er_labels`` are recomputed (`tasks.labelling.label_rule.step_labels`, the table's η); ``rollout_tokens``
    becomes the solution's tokens plus the fresh rollouts' tokens times (n - 1) / (N - 1): the expected cost of
    the kept rollouts, not a count. Other columns are unchanged.

    Raises DatasetError for a table this does not hold for: a tree, early-stop or binary-search steps, more
    than one row of a problem (shared prefixes), steps with different N, counts without the solution's own
    outcome, or n outside 1..N.
    """
    rows = table.to_pylist()
    pids = [r["problem_id"] for r in rows]
    if len(set(pids)) != len(pids):
        raise DatasetError("subsample_rollouts needs one row per problem: rows of one problem share prefixes")
    sizes = {k for r in rows for k, o in zip(r["rollouts"], r["step_origin"], strict=True) if o == "rollout"}
    if len(sizes) > 1:
        raise DatasetError(f"subsample_rollouts needs one N for every step, found {sorted(sizes)}")
    big = sizes.pop() if sizes else n
    if not 1 <= n <= big:
        raise DatasetError(f"subsample_rollouts draws n in 1..{big} (the table's N), got {n}")
    rng = np.random.default_rng(seed)
    out = []
    for i, r in enumerate(rows):
        origins = r["step_origin"]
        odd = sorted(set(origins) - {"rollout", FINAL_ORIGIN})
        if odd:
            raise DatasetError(f"row {i}: subsample_rollouts takes plain rollout steps only, found {odd}")
        own = int(bool(r["final_correct"]))
        k = list(r["successes"])
        for s, origin in enumerate(origins):
            if origin != "rollout":
                continue
            fresh = k[s] - own
            if not 0 <= fresh <= big - 1:
                raise DatasetError(f"row {i} step {s}: {k[s]} successes of {big} cannot hold the solution's own "
                                   f"{'right' if own else 'wrong'} answer: not a build that counts the solution "
                                   "among the N")
            drawn = int(rng.hypergeometric(fresh, big - 1 - fresh, n - 1)) if n > 1 else 0
            k[s] = own + drawn
        nn = [n if o == "rollout" else m for o, m in zip(origins, r["rollouts"], strict=True)]
        labels = step_labels(k, nn, origins, r["eta"], r["labels"])
        solution = int(r["completion_tokens"])
        tokens = solution + round((int(r["rollout_tokens"]) - solution) * (n - 1) / max(1, big - 1))
        out.append(r | {"successes": k, "rollouts": nn, "labels": labels.hard_list(),
                        "soft_labels": labels.soft_list(), "er_labels": labels.er_list(), "rollout_tokens": tokens})
    return pa.Table.from_pylist(out, schema=table.schema)


def _name_row(message: str, offsets: np.ndarray) -> str:
    """The rule's ``step i: ...`` over flattened steps, told as ``row r step s: ...``."""
    head, sep, rest = message.partition(": ")
    if not (sep and head.startswith("step ") and head[5:].isdigit()):
        return message
    flat = int(head[5:])
    row = int(np.searchsorted(offsets, flat, side="right")) - 1
    return f"row {row} step {flat - int(offsets[row])}: {rest}"


def relabel_dataset(src_dir: str | Path, out_dir: str | Path, eta: float | None = None, rollouts: int | None = None,
                    seed: int = 0) -> dict[str, Any]:
    """A new dataset version in ``out_dir`` with labels recomputed from the stored counts; no engine, no rollouts.

    ``eta``: ER labels for that η (``relabel``). ``rollouts``: the rows a build with that many rollouts per step
    would give (``subsample_rollouts``, shard i drawn with seed ``seed * 1_000_003 + i``; Math-Shepherd builds
    only), then η if given too. Shard by shard (same indices), provenance kept and extended with what changed and
    the parent version; the manifest lists the source's ``dataset_version`` as its parent, and for ``rollouts`` its
    ``extra.subsampled`` gives the expected generated tokens of such a build (the rows' ``rollout_tokens``), while
    ``extra.cost`` stays what the parent's build spent. Returns the new manifest.
    """
    if eta is None and rollouts is None:
        raise DatasetError("relabel needs a new eta, a smaller rollouts count, or both")
    src, out = Path(src_dir), Path(out_dir)
    problems = verify_dataset(src)
    if problems:
        raise DatasetError(f"{src} does not match its manifest, refusing to relabel: {'; '.join(problems)}")
    if out.resolve() == src.resolve():
        raise DatasetError("relabel writes a new version: --out must differ from the source directory")
    if (out / MANIFEST_NAME).exists():
        raise DatasetError(f"{out} already holds a dataset; choose a new --out")
    parent = read_manifest(src)
    claim: dict[str, Any] = {"relabel_of": parent["dataset_version"]}
    if eta is not None:
        claim["eta"] = float(eta)
    if rollouts is not None:
        claim |= {"rollouts": int(rollouts), "seed": int(seed)}
    marker = out / RELABEL_MARKER
    if out.exists() and any(out.iterdir()):
        # Only a folder this same relabel started (and was interrupted in) may be written into again.
        try:
            mine = json.loads(marker.read_text()) == claim
        except (OSError, ValueError):
            mine = False
        if not mine:
            raise DatasetError(f"{out} is not empty and was not started by this relabel; choose an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, claim, indent=None)
    infos = []
    expected_tokens = 0
    for entry in parent["shards"]:
        path = src / entry["path"]
        index = shard_index(entry["path"])
        assert index is not None  # verify_dataset accepts only shards/part-XXXXX.parquet entries
        table = pq.read_table(path)
        prov = read_provenance(path) | {"relabelled_from": parent["dataset_version"]}
        if rollouts is not None:
            try:
                table = subsample_rollouts(table, int(rollouts), int(seed) * 1_000_003 + index)
            except DatasetError as err:
                raise DatasetError(f"{entry['path']}: {err}") from None
            expected_tokens += int(pc.sum(table["rollout_tokens"]).as_py() or 0)
            prov |= {"subsampled_rollouts": int(rollouts), "subsample_seed": int(seed)}
        if eta is not None:
            table = relabel(table, eta)
            prov |= {"eta": float(eta)}
        # Record key None: these rows are not what any build plan's key promises (η or N differs), so a build
        # resumed in this folder can never take them as its own shards.
        infos.append(write_shard(out, index, table.to_pylist(), prov, key=None))
    extra = dict(parent.get("extra", {}))
    if eta is not None:
        extra["relabelled_eta"] = float(eta)
    if rollouts is not None:
        extra["subsampled"] = {"rollouts": int(rollouts), "seed": int(seed),
                               "expected_generated_tokens": expected_tokens}
    return write_manifest(out, schema_version=parent["schema_version"], config_hash=parent["config_hash"],
                          code_version=parent["code_version"], shards=infos, parents=[parent["dataset_version"]],
                          extra=extra)
