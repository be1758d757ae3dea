"""Ray Train end to end on a small toy dataset: 2 gloo workers, a fault after the first checkpoint, a resume that
continues where it stopped (same step count, no epoch twice), and `score` giving the trainer's own eval numbers."""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest
import ray
from typer.testing import CliRunner

from cluster.train import train_on_ray
from configs.schema import parse_config
from prm_factory.cli import app
from tasks.prm.model import load_prm
from tasks.prm.training import TrainError, is_held_out

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def resumed_run(ray_session, toy_prm_dataset, prefect_server, tmp_path_factory):
    """A 2-worker run killed early in epoch 1, then started again with the same RUN by the train-prm flow.

    (One Ray Train run fewer than a separate resume and flow test: the suite must stay cheap on 2 cores.)
    """
    from flows.train_prm import train_prm

    cfg = parse_config(toy_prm_dataset["config"])
    run = tmp_path_factory.mktemp("train") / "prm-run"
    with pytest.raises(TrainError, match="injected fault in epoch 1"):
        train_on_ray(cfg, toy_prm_dataset["dir"], run, fault_after_epoch=0)
    first = json.loads((run / "epoch-0000" / "train_state.json").read_text())
    assert not (run / "model").exists() and not (run / "epoch-0001").exists()
    flow_out = train_prm(str(toy_prm_dataset["config_path"]), str(toy_prm_dataset["dir"]), str(run),
                              ruler_problems=8)
    return cfg, run, first, flow_out


def test_killed_run_resumes_from_its_checkpoint(resumed_run):
    cfg, run, first, flow_out = resumed_run
    result = flow_out["train"]
    steps_per_epoch = first["global_step"]
    assert first["history"][0]["batches_per_worker"] >= 2  # the fault hit mid-epoch (after batch 0 of epoch 1)
    assert result["resumed_from_epoch"] == 0
    assert [h["epoch"] for h in result["history"]] == list(range(cfg.train.epochs))  # every epoch once
    assert result["global_step"] == cfg.train.epochs * steps_per_epoch == result["history"][-1]["global_step"]
    assert result["history"][0] == first["history"][0]  # epoch 0 was not trained again
    assert "restore_seconds" in result["history"][1] and "restore_seconds" not in result["history"][0]
    assert all(h["world_size"] == 2 for h in result["history"])
    assert result["history"][-1]["train_pull"] > 0  # the heads moved away from their init and are pulled back
    assert (run / "model" / "model.safetensors").is_file() and not (run / "model" / "optimizer.safetensors").exists()


def test_score_equals_the_trainers_last_eval(resumed_run, tmp_path):
    cfg, run, _, flow_out = resumed_run
    held = json.loads((run / "model" / "eval_scores.json").read_text())
    assert held and all(is_held_out(r["problem_id"], cfg.train.eval_fraction, cfg.train.seed) for r in held)
    assert flow_out["train"]["last_eval"]["eval_rows"] == len(held)
    prm = load_prm(run)
    again = prm.score([r["prompt"] for r in held], [r["completions"] for r in held], batch_size=3)
    for row, s in zip(held, again, strict=True):
        assert s.mean == pytest.approx(row["mean"], abs=1e-6) and s.std == pytest.approx(row["std"], abs=1e-6)

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": r["prompt"], "completions": r["completions"], "tag": i}) + "\n"
                           for i, r in enumerate(held)))
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["score", str(src), "--checkpoint", str(run), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rows"] == len(held)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["tag"] for r in rows] == list(range(len(held)))
    for row, ref in zip(rows, held, strict=True):
        assert row["step_scores"] == pytest.approx(ref["mean"], abs=1e-6)
        assert row["step_std"] == pytest.approx(ref["std"], abs=1e-6)


def test_score_parquet_keeps_every_column(resumed_run, toy_prm_dataset, tmp_path):
    _, run, _, _ = resumed_run
    shard = sorted((toy_prm_dataset["dir"] / "shards").glob("*.parquet"))[0]
    out = tmp_path / "scored.parquet"
    res = CliRunner().invoke(app, ["score", str(shard), "--checkpoint", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    before, after = pq.read_table(shard), pq.read_table(out)
    assert after.column_names == before.column_names + ["step_scores", "step_std"]
    assert after.select(before.column_names).to_pylist() == before.to_pylist()
    assert [len(s) for s in after.column("step_scores").to_pylist()] == [len(c) for c in
                                                                          before.column("completions").to_pylist()]


def test_bad_inputs_fail_before_ray(resumed_run, toy_prm_dataset, tmp_path):
    _, run, _, _ = resumed_run
    other = parse_config({**toy_prm_dataset["config"], "train": {**toy_prm_dataset["config"]["train"], "lr": 0.5}})
    with pytest.raises(TrainError, match="another train_hash"):
        train_on_ray(other, toy_prm_dataset["dir"], run)
    res = CliRunner().invoke(app, ["train", "--config", str(toy_prm_dataset["config_path"]), "--dataset",
                                   str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "dataset directory not found" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q", "completions": "not a list"}) + "\n")
    res = CliRunner().invoke(app, ["score", str(bad), "--checkpoint", str(run), "--out", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "row 0: 'completions' must be a list of strings" in " ".join(res.output.split())



def test_train_prm_flow_publishes_its_report(resumed_run, toy_prm_dataset):
    """The flow ran on the real server (it resumed the killed run); it scored the held-out problems with the saved
    checkpoint and published the report. Then the refresh's trigger starts it through its deployment."""
    from prefect.client.orchestration import get_client

    from flows.train_prm import train_prm, trigger_training

    _, run, _, out = resumed_run
    last = out["train"]["last_eval"]
    held = out["held_out"]
    assert held["rows"] == last["eval_rows"] and held["steps"] == last["eval_steps"]
    assert held["loss"] == pytest.approx(last["eval_loss"], abs=1e-6)  # same checkpoint, same rows
    assert 0 <= held["auroc_vs_truth"] <= 1 and held["truth_steps"] == held["steps"]  # toy rows: exact truth
    markdown = (run / "report.md").read_text()
    assert markdown.count("data:image/png;base64,") == 2 and "| epoch | step |" in markdown
    # The toy ruler, scored by the same checkpoint (the flow's evaluation step), is in the report.
    ruler = out["ruler"]
    assert ruler["steps"]["problems"] == 8 and ruler["steps"]["trajectories"] == 8 * 16
    assert 0 <= ruler["steps"]["step_auroc"] <= 1
    assert set(ruler["best_of_n"]["accuracy"]) == {"min_step", "last_step", "majority", "random"}
    assert f"| {ruler['steps']['step_auroc']:.3f} |" in markdown

    async def read():
        async with get_client() as client:
            arts = await client.read_artifacts()
            runs = await client.read_flow_runs()
            return arts, runs

    import asyncio

    arts, runs = asyncio.run(read())
    prm_art = [a for a in arts if a.key == "prm-tiny-prm"]
    assert prm_art and "PRM training: prm-tiny" in prm_art[0].data
    assert any(r.name and r.state and r.state.is_completed() for r in runs)

    # The refresh's hook: with the deployment registered, a new version starts a train-prm flow run on it.
    train_prm.to_deployment(name="train-prm").apply()
    run_id = trigger_training(str(toy_prm_dataset["config_path"]), str(toy_prm_dataset["dir"]))

    async def read_run():
        async with get_client() as client:
            return await client.read_flow_run(run_id)

    scheduled = asyncio.run(read_run())
    assert scheduled.parameters == {"config_path": str(toy_prm_dataset["config_path"]),
                                    "dataset_dir": str(toy_prm_dataset["dir"])}
    assert scheduled.state.is_scheduled()


# -- FSDP through Ray Train: sharded checkpoints, a killed worker, the resume, the consolidated model ------------

# batch 1 x 2 workers x 2 accumulated: the fixture's global batch of 4, two optimizer steps per epoch, and the kill
# (at the epoch's second batch) lands inside an accumulation window.
FSDP_TRAIN = {"strategy": "fsdp", "batch_size": 1, "grad_accum_steps": 2}


@pytest.fixture(scope="module")
def fsdp_runs(ray_session, toy_prm_dataset, tmp_path_factory):
    """An uninterrupted 2-worker FSDP run, and the same run with one worker killed (SIGKILL) mid-epoch 1, then
    started again with the same RUN."""
    cfg = parse_config({**toy_prm_dataset["config"], "train": {**toy_prm_dataset["config"]["train"], **FSDP_TRAIN}})
    root = tmp_path_factory.mktemp("fsdp")
    whole = train_on_ray(cfg, toy_prm_dataset["dir"], root / "whole")
    cpus = ray.available_resources().get("CPU", 0)
    with pytest.raises(TrainError, match=r"worker rank 1 \(pid \d+\) died: its process exited"):
        train_on_ray(cfg, toy_prm_dataset["dir"], root / "killed", fault_after_epoch=0, fault_kind="kill")
    # The failed run's controller, workers and placement group go with it, though the error is still held here.
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < cpus and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) >= cpus, "the killed run's CPUs are still reserved"
    left = sorted(p.name for p in (root / "killed").glob("epoch-*"))
    assert left == ["epoch-0000"] and not (root / "killed" / "model").exists()
    resumed = train_on_ray(cfg, toy_prm_dataset["dir"], root / "killed")
    return cfg, root, whole, resumed


def test_killed_fsdp_run_resumes_to_the_uninterrupted_weights(fsdp_runs):
    from safetensors.torch import load_file

    cfg, root, whole, resumed = fsdp_runs
    assert resumed.resumed_from_epoch == 0 and resumed.global_step == whole.global_step == 2 * cfg.train.epochs
    assert [h["epoch"] for h in resumed.history] == list(range(cfg.train.epochs))
    timing = {"train_seconds", "samples_per_s", "checkpoint_seconds", "peak_rss_mb", "restore_seconds"}

    def numbers(record: dict) -> dict:
        return {k: v for k, v in record.items() if k not in timing}

    assert numbers(resumed.history[0]) == numbers(whole.history[0])  # the same epoch 0, trained once
    assert "restore_seconds" in resumed.history[1] and "restore_seconds" not in resumed.history[0]
    assert numbers(resumed.history[1]) == pytest.approx(numbers(whole.history[1]), abs=1e-6)
    a, b = (load_file(str(root / name / "model" / "model.safetensors")) for name in ("whole", "killed"))
    assert sorted(a) == sorted(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6  # measured: 0.0


def test_fsdp_epoch_checkpoints_hold_one_shard_per_rank(fsdp_runs):
    """No rank gathered the whole model: each epoch checkpoint holds one shard file per rank (about half of model
    and optimizer each) and no whole-model file; RUN/model is the consolidated one, and run.json the global batch."""
    cfg, root, whole, _ = fsdp_runs
    run = root / "whole"
    for epoch in sorted(run.glob("epoch-*")):
        files = sorted(p.name for p in (epoch / "sharded").iterdir())
        assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert not (epoch / "model.safetensors").exists() and not (epoch / "optimizer.safetensors").exists()
        sizes = [(epoch / "sharded" / f).stat().st_size for f in files[1:]]
        assert max(sizes) < 0.6 * sum(sizes)
    assert (run / "model" / "model.safetensors").is_file() and not (run / "model" / "sharded").exists()
    assert json.loads((run / "run.json").read_text())["global_batch"] == 4 == cfg.train.global_batch
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["strategy"] == "fsdp" and summary["global_batch"] == 4 and summary["consolidate_seconds"] > 0
    ddp_bytes = whole.history[-1]["state_bytes_per_worker"]
    assert 0 < ddp_bytes and whole.history[-1]["peak_rss_mb"] > 0


def test_fsdp_run_model_scores_as_its_last_eval(fsdp_runs, tmp_path):
    """`prm-factory score --checkpoint RUN` loads the consolidated model and gives the held-out scores the FSDP
    workers computed on their shards in the last epoch."""
    _, root, _, _ = fsdp_runs
    run = root / "killed"
    held = json.loads((run / "model" / "eval_scores.json").read_text())
    assert held
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": r["prompt"], "completions": r["completions"]}) + "\n"
                           for r in held))
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["score", str(src), "--checkpoint", str(run), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    for row, ref in zip((json.loads(line) for line in out.read_text().splitlines()), held, strict=True):
        assert row["step_scores"] == pytest.approx(ref["mean"], abs=1e-5)


def test_resume_with_another_global_batch_is_refused(fsdp_runs, toy_prm_dataset):
    cfg, root, _, _ = fsdp_runs
    data = {**toy_prm_dataset["config"], "train": {**toy_prm_dataset["config"]["train"], **FSDP_TRAIN,
                                                   "grad_accum_steps": 4}}
    with pytest.raises(TrainError, match=r"global batch of 4 trajectories \(batch_size 1 x 2 workers x "
                                         r"grad_accum_steps 2\), this config's is 8 \(batch_size 1 x 2 workers x "
                                         r"grad_accum_steps 4\)"):
        train_on_ray(parse_config(data), toy_prm_dataset["dir"], root / "whole")


def test_a_backbone_fsdp_cannot_wrap_fails_before_ray(toy_prm_dataset, tmp_path, monkeypatch):
    """No decoder layers to wrap: a TrainError naming the setting, before Ray is asked for anything and before RUN
    is written."""
    import torch
    import transformers

    import cluster.train as train_module

    class Flat(torch.nn.Module):
        _no_split_modules = None

    monkeypatch.setattr(transformers.AutoModel, "from_config", lambda *a, **k: Flat())
    monkeypatch.setattr(train_module, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    cfg = parse_config({**toy_prm_dataset["config"], "train": {**toy_prm_dataset["config"]["train"], **FSDP_TRAIN}})
    with pytest.raises(TrainError, match=r"strategy fsdp wraps each decoder layer, and Flat .* names none.*"
                                         r"use strategy: ddp"):
        train_on_ray(cfg, toy_prm_dataset["dir"], tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_resume_takes_the_latest_complete_checkpoint_registered_or_not(fsdp_runs, tmp_path):
    """A worker killed right after its report can take the report with it before Ray Train's controller takes it:
    the epoch checkpoint is on disk but not registered. The restart resumes from the latest complete one all the
    same, and never from one whose shards did not all arrive."""
    import shutil

    from cluster.train import _resume_dir

    _, root, _, _ = fsdp_runs
    run = tmp_path / "run"
    for epoch in ("epoch-0000", "epoch-0001"):
        shutil.copytree(root / "whole" / epoch, run / epoch)
    registered = run / "epoch-0000"
    assert _resume_dir(run, registered) == run / "epoch-0001"  # later, complete, not registered
    assert _resume_dir(run, None) == run / "epoch-0001"
    (run / "epoch-0001" / "sharded" / "__1_0.distcp").unlink()  # rank 1's shard never arrived
    assert _resume_dir(run, registered) == registered
    (run / "epoch-0000" / "train_state.json").write_text("{")  # a damaged state: nothing to resume
    assert _resume_dir(run, registered) is None and _resume_dir(None, None) is None
