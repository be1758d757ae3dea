"""`prm-factory doctor`: one line per check, exit 0 when a run can start, exit 1 naming what is missing."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from configs.schema import REPO_ROOT
from prm_factory.cli import app

TOY = REPO_ROOT / "configs" / "toy.yaml"


def _doctor(*args: str):
    return CliRunner().invoke(app, ["doctor", *args])


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_toy_config_passes_and_reports_no_gpu_cleanly():
    result = _doctor(str(TOY), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    by_name = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == ["data", "model", "torch", "vllm", "gpu", "memory", "ray", "disk"]
    assert by_name["model"]["detail"] == f"assets/toy-policy: directory -> {REPO_ROOT / 'assets' / 'toy-policy'}"
    if not _has_cuda():
        assert by_name["gpu"]["detail"].startswith("no GPU (this config runs on CPU")
    assert "the run starts a Ray of its own on 127.0.0.1" in by_name["ray"]["detail"]


def test_missing_data_unknown_model_and_gpus_fail_one_line_each(tmp_path):
    raw = yaml.safe_load(TOY.read_text())
    raw["sources"] = [{"kind": "gsm8k", "path": str(tmp_path / "nowhere.jsonl")}]
    raw["policy"]["model_path"] = "prm-factory-tests/not-cached"  # offline: true in the toy config
    raw["cluster"]["gpus_per_engine"] = 1
    config = tmp_path / "broken.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = _doctor(str(config))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) >= 8 and [line.split()[1] for line in lines[:8]] == [
        "data", "model", "torch", "vllm", "gpu", "memory", "ray", "disk"]
    status = {line.split()[1]: line.split()[0] for line in lines}
    assert status["data"] == "FAIL" and "nowhere.jsonl not found" in lines[0]
    assert status["model"] == "FAIL" and "'prm-factory-tests/not-cached' is not in the Hugging Face cache" in lines[1]
    if not _has_cuda():
        assert status["gpu"] == "FAIL" and "no GPU" in lines[4] and "the config needs 1" in lines[4]
    assert status["torch"] == status["disk"] == "ok"
