"""The vLLM-servable export: the Llama -> Qwen2 mapping, the tokenizer, the distilled head, the transformers and
vLLM paths, and the CLI's refusals."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from configs.schema import REPO_ROOT
from prm_factory.cli import app
from tasks.prm.export import (
    ExportedPRM,
    ExportError,
    byte_level_tokenizer,
    export_lines,
    qwen2_config,
    qwen2_tensors,
    step_tag_id,
    tagged_input,
)
from tasks.prm.model import load_prm

POLICY = REPO_ROOT / "assets" / "toy-policy"
TOY_PRM = REPO_ROOT / "assets" / "toy-prm"
RULER = REPO_ROOT / "assets" / "toy-ruler" / "ruler.parquet"


@pytest.fixture(scope="module")
def ruler_rows():
    rows = pq.read_table(RULER).to_pylist()
    return rows[-544:-32], rows[-32:]  # distill on 512 trajectories, check on the last 32 (other problems)


def test_llama_maps_onto_qwen2_with_equal_hidden_states():
    from transformers import AutoModel, AutoTokenizer, Qwen2Config, Qwen2Model

    llama = AutoModel.from_pretrained(str(POLICY)).eval()
    cfg = qwen2_config(json.loads((POLICY / "config.json").read_text()))
    qwen = Qwen2Model(Qwen2Config(**cfg)).eval()
    tensors = qwen2_tensors(llama.state_dict(), "llama")
    assert any(k.endswith("q_proj.bias") for k in tensors) and all(k.startswith("model.") for k in tensors)
    qwen.load_state_dict({k[len("model."):]: v for k, v in tensors.items()})
    ids = AutoTokenizer.from_pretrained(str(POLICY))("Start at 9. Apply in order: +2, +1.\n9+2=11\n11+1=12\n",
                                                    return_tensors="pt")
    with torch.no_grad():
        a, b = llama(**ids).last_hidden_state, qwen(**ids).last_hidden_state
    assert a.abs().max() > 0.1 and torch.allclose(a, b, atol=1e-5)


def test_backbones_that_do_not_map_are_refused_by_name():
    base = json.loads((POLICY / "config.json").read_text())
    with pytest.raises(ExportError, match="GPT2LMHeadModel"):
        qwen2_config({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(ExportError, match="attention biases"):
        qwen2_config({**base, "attention_bias": True})
    with pytest.raises(ExportError, match="rope type 'llama3'"):
        qwen2_config({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}})
    assert qwen2_config(base)["architectures"] == ["Qwen2ForProcessRewardModel"]


def test_byte_level_tokenizer_keeps_the_ids_and_refuses_multi_character_vocabularies(tmp_path):
    from tokenizers import Tokenizer

    source = json.loads((POLICY / "tokenizer.json").read_text())
    before = Tokenizer.from_str(json.dumps(source))
    after = Tokenizer.from_str(json.dumps(byte_level_tokenizer(source)))
    text = "Start at 9.  Apply: +2\n\n9+2=11\nAnswer: 11"
    assert after.encode(text).ids == before.encode(text).ids and len(before.encode(text).ids) > len(text)
    merged = json.loads(json.dumps(source))
    merged["model"]["vocab"]["ab"] = max(merged["model"]["vocab"].values()) + 1
    with pytest.raises(ExportError, match="one-byte word-level"):
        byte_level_tokenizer(merged)


def test_lines_and_prompt_tags():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(POLICY))
    tag = step_tag_id(tok)
    lines = export_lines(["1+2=3\n3+", "4=7\nAnswer: 7"])
    assert lines == ["1+2=3\n", "3+4=7\n", "Answer: 7\n"]
    x = tagged_input(tok, tag, "Start at 1.\nApply: +2, +4.\n", lines, 256)
    assert x.prompt_tags == 2 and len(x.positions) == 3
    assert [x.input_ids[p] for p in x.positions] == [tag] * 3 and x.positions[-1] == len(x.input_ids) - 1
    with pytest.raises(ExportError, match="exceeds"):
        tagged_input(tok, tag, "Start at 1.\n", lines * 40, 256)


def test_student_layers_start_as_the_identity():
    """The student's new layers pass the residual stream through at the start, so distillation starts from the
    backbone's own hidden states; their parameters are not all zero, so they can learn."""
    from tasks.prm.export import student_backbone

    backbone = load_prm(TOY_PRM).model.backbone
    student = student_backbone(backbone, 2)
    assert len(student.layers) == len(backbone.layers) + 2
    ids = torch.tensor([[1, 5, 6, 7, 4, 8, 9]])
    with torch.no_grad():
        want = backbone(input_ids=ids).last_hidden_state
        got = student(input_ids=ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-6)
    assert student.layers[-1].self_attn.q_proj.weight.abs().sum() > 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ruler_rows):
    """`export --format qwen2-prm` (the one-head export any vLLM serves), through the CLI."""
    train, _ = ruler_rows
    work = tmp_path_factory.mktemp("export")
    out = work / "toy-prm-qwen2"
    too_long = ["1+1=2\n"] * 60  # past the backbone's 256 positions: left out and counted, not scored at a wrong tag
    data = work / "distill.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completions": c}) + "\n" for p, c in
                            [(r["prompt"], r["completions"]) for r in train] + [("Start.\n", too_long)]))
    res = CliRunner().invoke(app, ["export", "--format", "qwen2-prm", "--checkpoint", str(TOY_PRM), "--data",
                                   str(data), "--out", str(out), "--epochs", "4", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    prm = load_prm(TOY_PRM)
    assert summary["trajectories"] == len(train) and summary["trajectories_left_out"] == 1
    layers = int(prm.model.backbone.config.num_hidden_layers) + summary["distillation"]["extra_layers"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == layers == 5
    assert "exceeds" in summary["first_left_out"]
    # serve.json names the directory the export ends in, not its temporary name
    cli = json.loads((out / "serve.json").read_text())["cli"]
    assert f"--model {out} " in cli and "export-tmp" not in cli
    return out, summary, prm


@pytest.mark.slow
def test_export_loads_in_transformers_and_scores_as_the_distilled_head(exported, ruler_rows):
    out, summary, prm = exported
    train, _ = ruler_rows
    assert json.loads((out / "config.json").read_text())["step_tag_id"] == summary["step_tag_id"]
    assert json.loads((out / "serve.json").read_text())["pooler_config"] == {"step_tag_id": summary["step_tag_id"]}
    scorer = ExportedPRM(out)
    prompts, completions = [r["prompt"] for r in train], [r["completions"] for r in train]
    student = scorer.score(prompts, completions)
    teacher = prm.score(prompts, completions)  # the ruler's completions are lines already
    assert [len(s.mean) for s in student] == [len(c) for c in completions]
    diffs = [abs(a - b) for s, t in zip(student, teacher, strict=True) for a, b in zip(s.mean, t.mean, strict=True)]
    # The reloaded export is the head export_prm fitted: its mean gap to the teacher is the one export_prm measured.
    assert sum(diffs) / len(diffs) == pytest.approx(summary["distillation"]["train_mean_abs_diff"], abs=1e-5)
    # The fit does fit: on its own steps the student is closer to the ensemble than the best constant (the
    # ensemble's mean) and follows it. How much of the ensemble's quality it keeps on new problems is measured in
    # benchmarks/bench_export.py (benchmarks/README.md).
    t = torch.tensor([x for r in teacher for x in r.mean])
    s = torch.tensor([x for r in student for x in r.mean])
    assert (s - t).abs().mean() < 0.8 * (t - t.mean()).abs().mean()
    assert torch.corrcoef(torch.stack([s, t]))[0, 1] > 0.5


@pytest.mark.slow
def test_score_engine_vllm_scores_in_ray_actors_as_transformers_does(exported, ruler_rows, tmp_path, ray_session):
    """`score --engine vllm`: PoolingActors in the session's Ray, served by EnginePool.score, equal to the export
    scored through transformers within 1e-3 per step."""
    out, _, _ = exported
    _, check = ruler_rows
    src = tmp_path / "check.jsonl"
    src.write_text("".join(json.dumps({"prompt": r["prompt"], "completions": r["completions"],
                                       "step_truth": r["step_truth"]}) + "\n" for r in check))
    runner = CliRunner()
    res = runner.invoke(app, ["score", str(src), "--checkpoint", str(out), "--out", str(tmp_path / "v.jsonl"),
                              "--engine", "vllm", "--json"])
    assert res.exit_code == 0, res.output
    vllm_rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    reference = ExportedPRM(out).score([r["prompt"] for r in check], [r["completions"] for r in check])
    worst = max(abs(a - b) for row, ref in zip(vllm_rows, reference, strict=True)
                for a, b in zip(row["step_scores"], ref.mean, strict=True))
    assert worst <= 1e-3 and all(len(r["step_scores"]) == len(r["completions"]) for r in vllm_rows)
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["rows"] == len(check) and not math.isnan(summary["quality"]["step_auroc"])


@pytest.mark.slow
def test_score_engine_vllm_serves_a_native_checkpoint_with_its_ensemble(ruler_rows, tmp_path, ray_session):
    """`score --engine vllm` on a checkpoint from `train`: a Ray actor's vLLM engine runs the whole ensemble as the
    package's plugin model (backbone, token features, eight heads), so mean and std equal the transformers path's
    per step (the export's one-head student plays no part). Steps cut mid-line (as EDU cuts them) and a text past
    the context (its cut-off steps null) are scored as transformers scores them."""
    _, check = ruler_rows
    first = check[0]
    text = "".join(first["completions"])
    check = [*check, dict(first, completions=[text[:3], text[3:9], text[9:]]),
             dict(first, completions=["1+1=2\n"] * 60, step_truth=[True] * 60)]
    src = tmp_path / "check.jsonl"
    src.write_text("".join(json.dumps({"prompt": r["prompt"], "completions": r["completions"],
                                       "step_truth": r["step_truth"]}) + "\n" for r in check))
    res = CliRunner().invoke(app, ["score", str(src), "--checkpoint", str(TOY_PRM), "--out", str(tmp_path / "v.jsonl"),
                                   "--engine", "vllm", "--json"])
    assert res.exit_code == 0, res.output
    got = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    want = load_prm(TOY_PRM).score([r["prompt"] for r in check], [r["completions"] for r in check])
    lengths = [len(r["completions"]) for r in check]
    assert [len(r["step_scores"]) for r in got] == [len(w.mean) for w in want] == lengths
    for key, attr in (("step_scores", "mean"), ("step_std", "std")):
        assert [[x is None for x in row[key]] for row in got] == [[math.isnan(x) for x in getattr(ref, attr)]
                                                                 for ref in want]
        worst = max(abs(a - b) for row, ref in zip(got, want, strict=True)
                    for a, b in zip(row[key], getattr(ref, attr), strict=True) if a is not None)
        assert worst <= 1e-4, (key, worst)
    assert got[-1]["step_scores"][0] is not None and got[-1]["step_scores"][-1] is None  # cut at the context
    assert max(x for row in got for x in row["step_std"] if x is not None) > 0.01  # a real ensemble: heads disagree


def test_cli_refusals(tmp_path):
    runner = CliRunner()
    src = tmp_path / "t.jsonl"
    src.write_text(json.dumps({"prompt": "Start at 1.\n", "completions": ["1+1=2\n"]}) + "\n")
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["score", str(src), "--checkpoint", str(tmp_path / "empty"), "--out",
                              str(tmp_path / "o.jsonl"), "--engine", "vllm"])
    assert res.exit_code == 2 and "empty" in res.output and not (tmp_path / "o.jsonl").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    res = runner.invoke(app, ["export", "--checkpoint", str(TOY_PRM), "--out", str(tmp_path / "taken")])
    assert res.exit_code == 2 and "--force" in res.output and (tmp_path / "taken" / "x").read_text() == "keep me"
    res = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "nothing"), "--data", str(src), "--out",
                              str(tmp_path / "new")])
    assert res.exit_code == 2 and not (tmp_path / "new").exists()
    for argv, words in ((["--format", "qwen2-prm"], "give --data"), (["--format", "onnx"], "--format must be")):
        res = runner.invoke(app, ["export", "--checkpoint", str(TOY_PRM), "--out", str(tmp_path / "new"), *argv])
        assert res.exit_code == 2 and words in res.output and not (tmp_path / "new").exists()
