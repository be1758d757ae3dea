"""Security bits of issue 12: nothing is unpickled, and no name or path from input leads outside the output."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from configs.schema import REPO_ROOT, ConfigError, parse_config
from tasks.store.dataset import (
    SCHEMA_VERSION,
    DatasetError,
    read_dataset,
    verify_dataset,
    write_manifest,
    write_shard,
)
from tasks.store.relabel import relabel_dataset
from tests.integrity_helpers import build_config

CODE_DIRS = ("tasks", "flows", "cluster", "configs", "prm_factory", "scripts", "benchmarks")
UNSAFE_MODULES = {"pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def _unsafe_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(node.module or "")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            keywords = {k.arg: k.value for k in node.keywords}
            weights_only = keywords.get("weights_only")
            if name == "load" and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch" and not (
                    isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append("torch.load without weights_only=True")
            if name in ("read_pickle", "from_pickle") or (name == "load" and keywords.get("allow_pickle") is not None):
                found.append(name)
    return found


# bench_engines times Ray's serializer on result objects it has just built itself (no file, no socket): a
# measurement of pickling, not a reader of pickled data. Any other unsafe call there still fails the test.
MEASURES_PICKLE = {"benchmarks/bench_engines.py": ["pickle"]}


def test_no_code_unpickles_anything():
    """Datasets are Parquet + JSON and checkpoints safetensors: no module may unpickle (a pickle runs code)."""
    offenders = {}
    for folder in CODE_DIRS:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            calls = _unsafe_calls(ast.parse(path.read_text(), str(path)))
            if calls:
                offenders[str(path.relative_to(REPO_ROOT))] = calls
    assert {path: calls for path, calls in offenders.items() if MEASURES_PICKLE.get(path) != calls} == {}


def test_the_scan_would_catch_pickle():
    assert _unsafe_calls(ast.parse("import pickle\nimport torch\ntorch.load('x')\n")) == [
        "pickle", "torch.load without weights_only=True"]
    assert _unsafe_calls(ast.parse("import torch\ntorch.load('x', weights_only=True)\n")) == []


def _row(shard: int) -> dict:
    return {
        "prompt": "q\n", "completions": ["a"], "labels": [True], "successes": [1], "rollouts": [1],
        "soft_labels": [1.0], "er_labels": [1.0], "tree_value": [1.0], "eta": 1.0, "step_entropies": [0.1],
        "entropy_kind": "exact",
        "problem_id": "p", "source": "toy", "split": "train", "policy_model": "m", "partitioner": "newline",
        "partitioner_params": "{}", "step_origin": ["final"], "answer": "1", "final_correct": True,
        "prompt_tokens": 1, "completion_tokens": 1, "rollout_tokens": 0, "tree_id": "t", "shard": shard,
    }


def test_a_crafted_manifest_cannot_point_outside_the_dataset(tmp_path):
    outside = write_shard(tmp_path / "elsewhere", 0, [_row(0)], {})
    ds = tmp_path / "ds"
    write_manifest(ds, schema_version=SCHEMA_VERSION,
                   config_hash="c", code_version="0", shards=[write_shard(ds, 0, [_row(0)], {})],
                   parents=[], extra={})
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["shards"][0]["path"] = "../elsewhere/shards/part-00000.parquet"
    manifest["shards"][0]["sha256"] = outside.sha256
    (ds / "manifest.json").write_text(json.dumps(manifest))
    assert any("is not shards/part-XXXXX.parquet" in p for p in verify_dataset(ds))
    with pytest.raises(DatasetError, match="is not shards/part-XXXXX.parquet"):
        read_dataset(ds)
    with pytest.raises(DatasetError, match="refusing to relabel"):
        relabel_dataset(ds, tmp_path / "out", 2.0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../up", "a/b", "/abs", ".hidden", "x\x00y"])
def test_a_config_name_cannot_be_a_path(tmp_path, name):
    """The name becomes Ray actor names, Prefect artifact keys and default run folders: no separators."""
    data = build_config(Path(tmp_path / "x.jsonl"), name=name)
    with pytest.raises(ConfigError, match="name"):
        parse_config(data, check_paths=False)
