"""η relabelling: a new dataset version whose ER labels are recomputed from the stored counts; no engine.

ER-PRM (arXiv 2412.11006) labels depend on the rollouts only through (k, N), which every row stores, so a
new η needs no new rollout. Which steps get an ER label, and which value, is the label rule's
(``tasks.labelling.label_rule.step_labels``); this module applies it to a table and writes the result as a new version.
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
from tasks.labelling.label_rule import step_labels
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


def _name_row(message: str, offsets: np.ndarray) -> str:
    """The rule's ``step i: ...`` over flattened steps, told as ``row r step s: ...``."""
    head, sep, rest = message.partition(": ")
    if not (sep and head.startswith("step ") and head[5:].isdigit()):
        return message
    flat = int(head[5:])
    row = int(np.searchsorted(offsets, flat, side="right")) - 1
    return f"row {row} step {flat - int(offsets[row])}: {rest}"


def relabel_dataset(src_dir: str | Path, out_dir: str | Path, eta: float) -> dict[str, Any]:
    """A new dataset version in ``out_dir`` with ER labels recomputed for ``eta``; no engine, no rollouts.

    Shard by shard (same indices), provenance kept and extended with the new η and the parent version;
    the manifest lists the source's ``dataset_version`` as its parent. Returns the new manifest.
    """
    src, out = Path(src_dir), Path(out_dir)
    problems = verify_dataset(src)
    if problems:
        raise DatasetError(f"{src} does not match its manifest, refusing to relabel: {'; '.join(problems)}")
    if out.resolve() == src.resolve():
        raise DatasetError("relabel writes a new version: --out must differ from the source directory")
    if (out / MANIFEST_NAME).exists():
        raise DatasetError(f"{out} already holds a dataset; choose a new --out")
    parent = read_manifest(src)
    claim = {"relabel_of": parent["dataset_version"], "eta": float(eta)}
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
    for entry in parent["shards"]:
        path = src / entry["path"]
        table = relabel(pq.read_table(path), eta)
        prov = read_provenance(path) | {"eta": float(eta), "relabelled_from": parent["dataset_version"]}
        index = shard_index(entry["path"])
        assert index is not None  # verify_dataset accepts only shards/part-XXXXX.parquet entries
        # Record key None: these rows are not what any build plan's key promises (η differs), so a build
        # resumed in this folder can never take them as its own shards.
        infos.append(write_shard(out, index, table.to_pylist(), prov, key=None))
    extra = dict(parent.get("extra", {})) | {"relabelled_eta": float(eta)}
    return write_manifest(out, schema_version=parent["schema_version"], config_hash=parent["config_hash"],
                          code_version=parent["code_version"], shards=infos, parents=[parent["dataset_version"]],
                          extra=extra)
