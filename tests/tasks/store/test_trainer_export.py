"""Exporting a dataset for other PRM trainers (tasks/store/trainer_export.py, `prm-factory export-dataset`).

- each format, written from a real build, read back by its own tool's reader: HF `datasets` for all; OpenRLHF's
  placeholder-token rule (math-shepherd) and Qwen2.5-Math-PRM's `<extra_0>` rule (qwen-prm) on a tokenizer; TRL's
  own PRMTrainer row processing and a training step (trl-stepwise);
- the dataset card against the manifest, the build config and the rows;
- on small hand-made datasets (no engine): the label choice, the tag collision rule, bad input, atomic writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from configs.schema import REPO_ROOT, parse_config
from prm_factory.cli import app
from tasks.labelling.label_rule import step_labels
from tasks.store import trainer_export as export_module
from tasks.store.dataset import SCHEMA_VERSION, read_dataset, read_manifest, write_manifest, write_shard
from tasks.store.trainer_export import MATH_SHEPHERD_TAG, QWEN_STEP_TOKEN, ExportError, export_dataset

POLICY = REPO_ROOT / "assets" / "toy-policy"
BUILD = {
    "name": "export-tiny",
    "seed": 5,
    "sources": [{"kind": "toy", "num_problems": 6, "seed": 41, "min_steps": 2, "max_steps": 4, "license": "MIT"}],
    "policy": {"model_path": "assets/toy-policy", "backend": "transformers", "max_model_len": 256},
    "partition": {"method": "edu", "tau": 0.3, "min_step_tokens": 3, "max_anchors": 3, "entropy_source": "exact"},
    "tree": {"branch_width": 2, "max_depth": 1, "max_leaves": 3},
    "rollouts": {"n": 3, "max_new_tokens": 64},
    "dataset": {"problems_per_shard": 3},
}
FORMATS = ("math-shepherd", "qwen-prm", "trl-stepwise")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One tiny dataset built by the transformers engine on the toy policy (~20 s), shared by the module."""
    from cluster.hf_engine import HFEngine
    from tasks.build import build

    out = tmp_path_factory.mktemp("export-build") / "ds"
    build(parse_config(BUILD), out, lambda: HFEngine(str(POLICY)))
    return out


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    for fmt in FORMATS:
        export_dataset(built, root / fmt, fmt)
    return {fmt: root / fmt for fmt in FORMATS}


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """HF datasets' cache in a temp dir for this module (not the user's ~/.cache)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
        yield


def _load(out: Path, builder: str = "parquet", split: str = "train"):
    import datasets

    files = sorted(str(p) for p in (out / "data").glob(f"{split}-*"))
    assert files, f"no {split} file in {out}"
    return datasets.load_dataset(builder, data_files=files, split="train")


def _dataset_rows(path: Path) -> list[dict]:
    return read_dataset(path).to_pylist()


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def _toy_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(POLICY))


# -- each format in its own reader ------------------------------------------------------------------------


@pytest.mark.slow
def test_math_shepherd_splits_back_into_the_steps_and_labels(built, exported, hf_cache):
    rows = _dataset_rows(built)
    loaded = _load(exported["math-shepherd"])
    assert len(loaded) == len(rows) and any(len(r["completions"]) > 1 for r in rows)  # multi-step rows exist
    for row, record in zip(rows, loaded, strict=True):
        pieces = record["input"].split(MATH_SHEPHERD_TAG)
        # prompt + step 0, then one piece per later step, and nothing after the last tag
        assert pieces == [row["prompt"] + row["completions"][0], *row["completions"][1:], ""]
        assert record["input"].replace(MATH_SHEPHERD_TAG, "") == row["prompt"] + "".join(row["completions"])
        # `label`: the same text, a + or - where each tag was
        signs, pos = [], 0
        for piece in pieces[:-1]:
            assert record["label"][pos:pos + len(piece)] == piece
            pos += len(piece)
            tag = record["label"][pos:pos + len(" +")]  # the tag " ки" with its marker replaced
            assert tag in (" +", " -"), tag
            signs.append(tag[-1])
            pos += len(tag)
        assert pos == len(record["label"])
        assert signs == record["value"] == ["+" if good else "-" for good in row["labels"]]
        assert record["problem_id"] == row["problem_id"] and record["soft_labels"] == row["soft_labels"]
    assert {"+", "-"} <= {sign for record in loaded for sign in record["value"]}  # both kinds of step are here


@pytest.mark.slow
def test_math_shepherd_labels_land_on_openrlhfs_placeholder_tokens(built, exported, hf_cache):
    """OpenRLHF's ProcessRewardDataset rule: labels[input_ids == id(placeholder)] = value, one per placeholder."""
    tokenizer = _toy_tokenizer()
    tokenizer.add_tokens(["ки"])  # OpenRLHF needs the placeholder to be one token
    placeholder = tokenizer.convert_tokens_to_ids("ки")
    for row, record in zip(_dataset_rows(built), _load(exported["math-shepherd"]), strict=True):
        ids = tokenizer(record["input"], add_special_tokens=False)["input_ids"]
        at = [i for i, t in enumerate(ids) if t == placeholder]
        assert len(at) == len(record["value"]) == len(row["completions"])
        # the tokens before each placeholder spell the trajectory up to the end of the step it labels
        for j, i in enumerate(at):
            before = tokenizer.decode(ids[:i]).replace(MATH_SHEPHERD_TAG.strip(), "").replace(" ", "")
            assert before == (row["prompt"] + "".join(row["completions"][:j + 1])).replace(" ", "")


@pytest.mark.slow
def test_qwen_prm_splits_back_at_extra_0(built, exported, hf_cache):
    rows = _dataset_rows(built)
    loaded = _load(exported["qwen-prm"])
    tokenizer = _toy_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [QWEN_STEP_TOKEN]})
    sep = tokenizer.convert_tokens_to_ids(QWEN_STEP_TOKEN)
    for row, record in zip(rows, loaded, strict=True):
        assert record["query"] == row["prompt"] and record["steps"] == row["completions"]
        assert record["response"] == QWEN_STEP_TOKEN.join(record["steps"]) + QWEN_STEP_TOKEN  # Qwen's usage code
        assert record["response"].split(QWEN_STEP_TOKEN) == [*row["completions"], ""]
        assert record["labels"] == [int(good) for good in row["labels"]]
        # Qwen2.5-Math-PRM reads a step's reward where input_ids == id(<extra_0>): one per step
        ids = tokenizer(record["query"] + record["response"], add_special_tokens=False)["input_ids"]
        assert sum(t == sep for t in ids) == len(record["labels"])
    assert {0, 1} <= {label for record in loaded for label in record["labels"]}


@pytest.mark.slow
def test_trl_prm_trainer_reads_and_trains_on_the_export(built, exported, hf_cache, tmp_path):
    """TRL's own row processing (PRMTrainer maps tokenize_row over the dataset), then two training steps."""
    import torch
    from transformers import AutoModelForTokenClassification
    from trl.experimental.prm import PRMConfig, PRMTrainer

    rows = _dataset_rows(built)
    train = _load(exported["trl-stepwise"])
    assert train.features["labels"].feature.dtype == "bool"
    tokenizer = _toy_tokenizer()
    model = AutoModelForTokenClassification.from_pretrained(str(POLICY), num_labels=2)
    args = PRMConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                     report_to=[], max_length=None, step_separator="\n", logging_steps=1, save_strategy="no",
                     dataset_num_proc=None)
    trainer = PRMTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    for row, tokenized in zip(rows, trainer.train_dataset, strict=True):
        assert [t for t in tokenized["labels"] if t != -100] == [int(good) for good in row["labels"]]
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


def test_trl_truncates_float_labels_as_the_card_says(tmp_path):
    """The card's claim about TRL 1.13, checked against TRL itself: int() truncates soft labels, a null raises."""
    from trl.experimental.prm import PRMTrainer

    row = {"prompt": "q\n", "completions": ["a", "b", "c"], "labels": [0.75, 1.0, 0.0]}
    kwargs = {"tokenizer": _toy_tokenizer(), "step_separator": "\n", "max_length": None,
              "max_completion_length": None, "train_on_last_step_only": False, "is_eval": False}
    labels = PRMTrainer.tokenize_row(row, **kwargs)["labels"]
    assert [t for t in labels if t != -100] == [0, 1, 0]
    with pytest.raises(TypeError):
        PRMTrainer.tokenize_row({**row, "labels": [None, 1.0, 0.0]}, **kwargs)
    card = _write_and_export(tmp_path, [_row("p0", "q\n", ["a", "b"], [1, 1], [2, 1], ["rollout", "final"], True)],
                             "trl-stepwise")[1]
    assert "int(0.75) == 0" in card and "Soft and ER labels do not survive TRL's cast" in card


@pytest.mark.slow
def test_jsonl_loads_in_the_json_reader_with_the_same_records(built, exported, hf_cache, tmp_path):
    export_dataset(built, tmp_path / "jsonl", "qwen-prm", file_format="jsonl")
    as_json = _load(tmp_path / "jsonl", "json")
    as_parquet = _load(exported["qwen-prm"])
    assert as_json.to_list() == as_parquet.to_list() and len(as_json) == read_manifest(built)["num_rows"]


# -- the card ------------------------------------------------------------------------------------------------


def test_the_card_license_is_the_sources_one_license_else_unknown():
    from tasks.store.trainer_export import _card_license

    assert _card_license([{"license": "MIT"}, {"license": "mit"}]) == "mit"
    assert _card_license([{"license": "MIT"}, {"license": "Apache-2.0"}]) == "unknown"
    assert _card_license([{"license": "MIT"}, {}]) == "unknown" and _card_license([]) == "unknown"


def test_a_source_license_does_not_change_the_config_hash():
    licensed = parse_config(BUILD)
    bare = parse_config({**BUILD, "sources": [{k: v for k, v in BUILD["sources"][0].items() if k != "license"}]})
    assert licensed.sources[0].license == "MIT" and bare.sources[0].license is None
    assert licensed.config_hash() == bare.config_hash()


@pytest.mark.slow
def test_card_names_the_config_hash_counts_sources_and_cost(built, exported):
    manifest = read_manifest(built)
    rows = _dataset_rows(built)
    build_config = json.loads((built / "build.json").read_text())["config"]
    ingest = json.loads((built / "ingest.json").read_text())
    steps = sum(len(r["completions"]) for r in rows)
    good = sum(sum(r["labels"]) for r in rows)
    for fmt, out in exported.items():
        card = (out / "README.md").read_text()
        meta = _front_matter(card)["prm_factory"]
        assert meta["format"] == fmt
        assert meta["config_hash"] == manifest["config_hash"] == parse_config(BUILD).config_hash()
        assert meta["code_version"] == manifest["code_version"]
        assert meta["dataset_version"] == manifest["dataset_version"]
        assert meta["rows"] == manifest["num_rows"] == len(rows)
        assert (meta["steps"], meta["good_steps"], meta["bad_steps"]) == (steps, good, steps - good)
        assert meta["generated_tokens"] == manifest["extra"]["cost"]["generated_tokens"] > 0
        assert f"config hash `{manifest['config_hash']}`" in card
        assert f"| rows (trajectories) | {manifest['num_rows']:,} |" in card
        assert f"| steps | {steps:,} |" in card
        assert f"| exported labels: good / bad | {good:,} / {steps - good:,} |" in card
        assert f"| generated in all (`generated_tokens`) | {manifest['extra']['cost']['generated_tokens']:,} |" in card
        source, counts = build_config["sources"][0], ingest["per_source"][0]
        assert (f"| 0 | toy | generated by prm-factory's toy world (tasks/sources/toy_world.py): "
                f"{source['num_problems']} problems, seed {source['seed']}") in card
        assert f"| train | {counts['kept']} | {counts['quarantined']} | MIT |" in card  # the source's own license
        assert _front_matter(card)["license"] == "mit"
        assert yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0]) == build_config
        for column in ("`labels` (hard)", "`soft_labels`", "`er_labels`"):
            assert column in card


@pytest.mark.slow
def test_the_card_lets_datasets_find_the_files(exported, built, hf_cache):
    import datasets

    loaded = datasets.load_dataset(str(exported["trl-stepwise"]))
    assert list(loaded) == ["train"] and len(loaded["train"]) == read_manifest(built)["num_rows"]


# -- hand-made datasets: labels, collisions, bad input ---------------------------------------------------------


def _row(pid: str, prompt: str, steps: list[str], successes: list[int], rollouts: list[int], origins: list[str],
         final_correct: bool, split: str = "train") -> dict:
    labels = step_labels(successes, rollouts, origins, 1.0, [None] * (len(steps) - 1) + [final_correct])
    return {
        "prompt": prompt, "completions": steps, "labels": labels.hard_list(), "successes": successes,
        "rollouts": rollouts, "soft_labels": labels.soft_list(), "er_labels": labels.er_list(),
        "tree_value": [0.5] * len(steps), "eta": 1.0, "step_entropies": [1.0] * len(steps), "entropy_kind": "exact",
        "problem_id": pid, "source": "toy", "split": split, "policy_model": "assets/toy-policy",
        "partitioner": "newline", "partitioner_params": "{}", "step_origin": origins, "answer": "1",
        "final_correct": final_correct, "prompt_tokens": 3, "completion_tokens": 5, "rollout_tokens": 7,
        "tree_id": None,
    }


# Steps: 1/4 successes (soft 0.25, ER 0.357, hard True), 3/4 (0.75, 0.828, True), an early-stop step (hard True,
# soft/ER null), and a wrong final answer.
GRADED = _row("graded", "Start at 2.\n", ["2+1=3\n", "3*2=6\n", "6-1=5\n", "Answer: 4"], [1, 3, 1, 0], [4, 4, 2, 1],
              ["rollout", "rollout", "early_stop", "final"], False)
HELD_OUT = _row("held-out", "Start at 3.\n", ["3+3=6\n", "Answer: 6"], [2, 1], [2, 1], ["rollout", "final"], True,
                split="test")


def _write(root: Path, rows: list[dict]) -> Path:
    infos = [write_shard(root, 0, rows, {"config_hash": "handmade", "code_version": "test"})]
    write_manifest(root, schema_version=SCHEMA_VERSION, config_hash="handmade", code_version="test", shards=infos,
                   parents=[], extra={"name": "handmade"})
    return root


def _write_and_export(tmp_path: Path, rows: list[dict], fmt: str, **kwargs):
    src = _write(tmp_path / "src", rows)
    summary = export_dataset(src, tmp_path / "out", fmt, **kwargs)
    return summary, (tmp_path / "out" / "README.md").read_text()


def _qwen_labels(out: Path, split: str = "train") -> list[list[int]]:
    import pyarrow.parquet as pq

    return pq.read_table(next((out / "data").glob(f"{split}-*.parquet"))).column("labels").to_pylist()


@pytest.mark.parametrize(("label", "threshold", "expected", "fallback"), [
    ("labels", None, [1, 1, 1, 0], 0),  # the stored hard label, 1[k > 0]
    ("soft_labels", None, [0, 1, 1, 0], 1),  # 0.25 < 0.5 <= 0.75; the early-stop step keeps its hard label
    ("soft_labels", 0.2, [1, 1, 1, 0], 1),
    ("soft_labels", 0.75, [0, 1, 1, 0], 1),  # good at the threshold itself
    ("soft_labels", 0.76, [0, 0, 1, 0], 1),
    ("er_labels", 0.4, [0, 1, 1, 0], 1),  # ER(1/4) = 0.357, ER(3/4) = 0.828 at eta 1
    ("er_labels", 0.3, [1, 1, 1, 0], 1),
])
def test_the_label_column_and_threshold_choose_good_and_bad(tmp_path, label, threshold, expected, fallback):
    summary, card = _write_and_export(tmp_path, [GRADED, HELD_OUT], "qwen-prm", label=label, threshold=threshold)
    assert _qwen_labels(tmp_path / "out") == [expected]
    assert _qwen_labels(tmp_path / "out", "test") == [[1, 1]]
    assert summary.null_fallback_steps == fallback and summary.good_steps == sum(expected) + 2
    meta = _front_matter(card)["prm_factory"]
    assert (meta["label_column"], meta["good_steps"]) == (label, sum(expected) + 2)
    if label != "labels":
        assert f"the {fallback:,} steps whose `{label}` is null keep their hard `labels` value" in card


def test_one_file_per_split_listed_in_the_card(tmp_path):
    summary, card = _write_and_export(tmp_path, [GRADED, HELD_OUT], "math-shepherd")
    files = _front_matter(card)["configs"][0]["data_files"]
    assert files == [{"split": "test", "path": "data/test-00000-of-00001.parquet"},
                     {"split": "train", "path": "data/train-00000-of-00001.parquet"}]
    assert sorted(p.name for p in (tmp_path / "out" / "data").iterdir()) == [Path(f["path"]).name for f in files]
    assert summary.rows_per_split == {"test": 1, "train": 1}
    assert "the config itself is not stored in this dataset directory" in card  # no build.json here


def test_a_step_holding_the_tag_is_refused_and_nothing_is_written(tmp_path):
    shepherd = _row("russian", "Реши:\n", ["шаг один, руки вверх\n", "Answer: 1"], [1, 1], [1, 1],
                    ["rollout", "final"], True)
    with pytest.raises(ExportError, match=r"row 0 \(problem russian\): step 0 contains the step tag's marker 'ки'"):
        _write_and_export(tmp_path, [shepherd], "math-shepherd")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.export-tmp-*"))
    # another tag exports it, and the text still splits back into the steps
    summary = export_dataset(tmp_path / "src", tmp_path / "out", "math-shepherd", step_tag=" <step>")
    text = _load_records(tmp_path / "out")[0]["input"]
    assert text.split(" <step>") == [shepherd["prompt"] + shepherd["completions"][0], "Answer: 1", ""]
    assert summary.step_tag == " <step>"

    qwen = _row("qwen", "q\n", ["a<extra_0>b\n", "Answer: 1"], [1, 1], [1, 1], ["rollout", "final"], True)
    with pytest.raises(ExportError, match=r"step 0 contains the step tag's marker '<extra_0>'"):
        _write_and_export(tmp_path / "q", [qwen], "qwen-prm")
    _write_and_export(tmp_path / "trl", [qwen], "trl-stepwise")  # TRL places labels by tokens: nothing to refuse


def test_a_tag_formed_where_two_pieces_meet_is_refused(tmp_path):
    # neither the prompt nor a step holds 'ки', but the prompt's last letter and step 0's first one form it
    row = _row("joined", "Шаг к", ["и 1\n", "Answer: 1"], [1, 1], [1, 1], ["rollout", "final"], True)
    with pytest.raises(ExportError, match="where a step meets the next, forms the step tag's marker 'ки'"):
        _write_and_export(tmp_path, [row], "math-shepherd")
    with pytest.raises(ExportError, match="its prompt contains"):
        _write_and_export(tmp_path / "p", [{**row, "prompt": "руки\n"}], "math-shepherd")


def _load_records(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(next((out / "data").glob("train-*.parquet"))).to_pylist()


def test_bad_options_are_refused_before_anything_is_read(tmp_path):
    src = _write(tmp_path / "src", [GRADED])
    for kwargs, message in [
        ({"fmt": "prm800k"}, "unknown format 'prm800k'"),
        ({"label": "tree_value"}, "--label must be one of"),
        ({"label": "labels", "threshold": 0.5}, "--threshold applies to soft_labels and er_labels"),
        ({"label": "soft_labels", "threshold": 0.0}, r"--threshold must be in \(0, 1\]"),
        ({"file_format": "csv"}, "--file-format must be one of"),
        ({"fmt": "qwen-prm", "step_tag": " <s>"}, "--step-tag is math-shepherd's"),
        ({"step_tag": "  "}, "--step-tag must hold a non-space marker"),
        ({"step_tag": " +"}, "hold no '\\+' or '-'"),
    ]:
        with pytest.raises(ExportError, match=message):
            export_dataset(src, tmp_path / "out", **{"fmt": "math-shepherd", **kwargs})
    assert not (tmp_path / "out").exists()


def test_out_is_refused_when_not_empty_and_replaced_whole_with_force(tmp_path):
    src = _write(tmp_path / "src", [GRADED])
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError, match="exists and is not empty; choose a new --out, or replace it with --force"):
        export_dataset(src, out, "qwen-prm")
    assert (out / "mine.txt").read_text() == "keep me"
    killed = tmp_path / ".out.export-tmp-999-deadbeef"  # what a SIGKILLed export leaves
    (killed / "data").mkdir(parents=True)
    export_dataset(src, out, "qwen-prm", force=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "README.md", "data", "data/train-00000-of-00001.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp or moved-aside dir left
    with pytest.raises(ExportError, match="is the dataset or a directory holding it"):
        export_dataset(src, src, "qwen-prm", force=True)
    with pytest.raises(ExportError, match="is the dataset or a directory holding it"):
        export_dataset(src, tmp_path, "qwen-prm", force=True)
    assert read_dataset(src).num_rows == 1


def test_a_crash_mid_export_leaves_no_half_export(tmp_path, monkeypatch):
    src = _write(tmp_path / "src", [GRADED])
    out = tmp_path / "out"
    export_dataset(src, out, "trl-stepwise")
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def crash(path, text):
        raise OSError("disk gone")

    monkeypatch.setattr(export_module, "atomic_write_text", crash)  # the card is written after the data files
    for target, force in ((tmp_path / "fresh", False), (out, True)):
        with pytest.raises(OSError, match="disk gone"):
            export_dataset(src, target, "qwen-prm", force=force)
    assert not (tmp_path / "fresh").exists()
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_a_dataset_that_does_not_verify_is_refused(tmp_path):
    src = _write(tmp_path / "src", [GRADED])
    shard = next((src / "shards").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ExportError, match=r"is not a verified dataset: sha256 mismatch: shards/part-00000.parquet"):
        export_dataset(src, tmp_path / "out", "qwen-prm")
    with pytest.raises(ExportError, match="is not a verified dataset: missing manifest"):
        export_dataset(tmp_path / "nothing", tmp_path / "out", "qwen-prm")
    bad_split = _write(tmp_path / "split", [{**GRADED, "split": "train/v2"}])
    with pytest.raises(ExportError, match=r"split names \['train/v2'\] are not Hugging Face split names"):
        export_dataset(bad_split, tmp_path / "out", "qwen-prm")
    assert not (tmp_path / "out").exists()


# -- the command -----------------------------------------------------------------------------------------------


def test_the_command_exports_a_refresh_roots_latest_version(tmp_path):
    root = tmp_path / "root"
    _write(root / "versions" / "0001-abcd", [GRADED, HELD_OUT])
    (root / "LATEST").write_text("0001-abcd\n")
    result = CliRunner().invoke(app, ["export-dataset", str(root), "--format", "math-shepherd", "--out",
                                      str(tmp_path / "out"), "--label", "soft_labels", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["dataset_dir"] == str(root / "versions" / "0001-abcd")
    assert (summary["rows"], summary["steps"], summary["good_steps"], summary["threshold"]) == (2, 6, 4, 0.5)
    assert _front_matter((tmp_path / "out" / "README.md").read_text())["prm_factory"]["label_column"] == "soft_labels"


def test_the_command_refuses_bad_input_in_one_line_with_exit_2(tmp_path):
    src = _write(tmp_path / "src", [GRADED])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    runner = CliRunner()
    for args, message in [
        ([str(tmp_path / "nothing"), "-f", "qwen-prm", "-o", str(tmp_path / "o")], "is not a verified dataset"),
        ([str(src), "-f", "openrlhf", "-o", str(tmp_path / "o")], "unknown format 'openrlhf'"),
        ([str(src), "-f", "qwen-prm", "-o", str(tmp_path / "full")], "exists and is not empty"),
    ]:
        result = runner.invoke(app, ["export-dataset", *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
    shutil.rmtree(tmp_path / "full")
