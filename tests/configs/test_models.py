"""Models by name or by path: a hub id resolved from a local Hugging Face cache (laid out the way
huggingface_hub lays it out, built here from the shipped toy policy) loads in both engines with offline on;
an unknown id fails in one line before any engine or Ray starts."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from configs.models import ModelNotFoundError, check_model, classify_model_path, resolve_model
from configs.paths import SHIPPED_POLICY
from configs.schema import REPO_ROOT, ConfigError, parse_config
from tasks.generation import GenerationRequest

HUB_ID = "prm-factory-tests/toy-policy"


def build_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """A cache as `huggingface_hub` writes it: models--org--name/{blobs,refs/main,snapshots/<commit>/...}.

    Files are content-addressed blobs; the snapshot holds relative symlinks to them, refs/main the commit.
    Returns the snapshot directory.
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in source.iterdir() if p.is_file())
    commit = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for p in files:
        data = p.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / p.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> tuple[Path, Path]:
    """(cache dir, snapshot dir) holding the shipped toy policy under HUB_ID; HF_HUB_CACHE points at it."""
    cache = tmp_path_factory.mktemp("hf-cache")
    snapshot = build_hub_cache(cache, HUB_ID, SHIPPED_POLICY)
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_CACHE", str(cache))
    yield cache, snapshot
    mp.undo()


def test_model_paths_read_as_directories_or_ids():
    assert classify_model_path("assets/toy-policy").kind == "local"  # exists here: a directory, not an id
    assert classify_model_path("/models/Qwen2.5-Math-7B-Instruct").kind == "local"
    assert classify_model_path("./my-model").kind == "local"
    assert classify_model_path("Qwen/Qwen2.5-Math-7B-Instruct").kind == "hub"
    assert classify_model_path("gpt2").kind == "hub"
    assert classify_model_path("a/b/c").kind == "local"  # no hub id has two slashes


def test_hub_id_resolves_to_the_cached_snapshot_offline(hub_cache):
    cache, snapshot = hub_cache
    assert resolve_model(HUB_ID, offline=True) == snapshot
    assert check_model(HUB_ID, offline=True) == str(snapshot)
    assert resolve_model("assets/toy-policy", offline=True) == SHIPPED_POLICY


def test_unknown_id_offline_is_one_clear_line(hub_cache):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("prm-factory-tests/no-such-model", offline=True)
    message = str(err.value)
    assert "\n" not in message
    assert "'prm-factory-tests/no-such-model' is not in the Hugging Face cache" in message
    assert str(hub_cache[0]) in message and "offline: true" in message


def _toy_config(model_path: str, offline: bool, backend: str = "transformers") -> dict:
    raw = yaml.safe_load((REPO_ROOT / "configs" / "toy.yaml").read_text())
    raw["offline"] = offline
    raw["policy"].update(model_path=model_path, backend=backend)
    raw["partition"]["entropy_source"] = "exact" if backend == "transformers" else "topk_lower"
    return raw


def test_offline_config_validates_a_cached_id_and_names_an_unknown_one(hub_cache):
    assert parse_config(_toy_config(HUB_ID, offline=True)).policy.model_path == HUB_ID
    with pytest.raises(ConfigError) as err:
        parse_config(_toy_config("prm-factory-tests/missing", offline=True), "t.yaml")
    assert "policy.model_path: model 'prm-factory-tests/missing' is not in the Hugging Face cache" in str(err.value)
    # Online, validation does not go to the network: the preflight (check_model, doctor) does.
    assert parse_config(_toy_config("prm-factory-tests/missing", offline=False)).offline is False


def test_unknown_id_stops_build_before_ray_starts(tmp_path, hub_cache):
    """The CLI exits 2 with the reason; no Ray (its start alone takes 4-7 s) and no engine was started."""
    cfg = tmp_path / "unknown.yaml"
    cfg.write_text(yaml.safe_dump(_toy_config("prm-factory-tests/missing", offline=True)))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "prm_factory.cli", "build", "-c", str(cfg), "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    stderr = " ".join(proc.stderr.split())  # rich wraps long lines at the terminal width
    assert "policy.model_path: model 'prm-factory-tests/missing' is not in the Hugging Face cache" in stderr
    assert "ray" not in stderr.lower() and not (tmp_path / "out").exists()
    assert elapsed < 30, elapsed


def test_online_unknown_id_stops_the_cli_build_in_one_line(tmp_path, hub_cache):
    """Online (no hub here), the build's preflight fails before Ray: exit 2, the reason, no traceback."""
    cfg = tmp_path / "online.yaml"
    cfg.write_text(yaml.safe_dump(_toy_config("prm-factory-tests/missing", offline=False)))
    cmd = [sys.executable, "-m", "prm_factory.cli", "build", "-c", str(cfg), "-o", str(tmp_path / "out"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    stderr = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model 'prm-factory-tests/missing'" in stderr and "Traceback" not in stderr
    assert "Connecting to" not in stderr and "Started a local Ray" not in stderr


def test_online_unknown_id_fails_in_the_preflight_before_ray(hub_cache):
    """Online, start_engines looks the id up before ray.init; here (no hub access) it fails in one line."""
    import ray

    from cluster.actors import start_engines

    was_up = ray.is_initialized()
    cfg = parse_config(_toy_config("prm-factory-tests/missing", offline=False))
    with pytest.raises(ModelNotFoundError, match="prm-factory-tests/missing"):
        start_engines(cfg)
    assert ray.is_initialized() == was_up


def _greedy(engine) -> list[int]:
    req = GenerationRequest(engine.tokenize("3+4="), n=1, temperature=0.0, max_new_tokens=12, seed=0)
    return engine.generate([req])[0].samples[0].token_ids


def test_hf_engine_loads_a_hub_id_from_the_cache(hub_cache):
    from cluster.hf_engine import HFEngine

    by_id = HFEngine(HUB_ID, offline=True, seed=0)
    by_path = HFEngine(str(SHIPPED_POLICY), seed=0)
    assert by_id.health()["model_path"] == HUB_ID
    tokens = _greedy(by_id)
    assert tokens and tokens == _greedy(by_path)
    # Sampled with a request seed: the same tokens from the same weights whatever the name.
    req = GenerationRequest(by_id.tokenize("5+2="), n=3, max_new_tokens=10, seed=11)
    assert [s.token_ids for s in by_id.generate([req])[0].samples] == [
        s.token_ids for s in by_path.generate([req])[0].samples
    ]


@pytest.mark.slow
def test_vllm_engine_loads_a_hub_id_from_the_cache(hub_cache, vllm_engine, policy_model_path):
    """A second vLLM engine (the session one serves the same weights by path): ~45-90 s on 2 cores."""
    from cluster.vllm_engine import VLLMEngine

    assert Path(policy_model_path) == SHIPPED_POLICY
    engine = VLLMEngine(HUB_ID, dtype="float32", max_model_len=256, gpu_memory_utilization=0.3, seed=0, offline=True)
    try:
        assert engine.health()["model_path"] == HUB_ID
        tokens = _greedy(engine)
        assert tokens and tokens == _greedy(vllm_engine)
    finally:
        engine.shutdown()


def test_hub_offline_follows_the_config_not_the_cli(tmp_path):
    """Importing the CLI turns telemetry off but not the hub; loading an `offline: true` config turns it off."""
    import os

    code = (
        "import os\n"
        "for k in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE', 'DO_NOT_TRACK'): os.environ.pop(k, None)\n"
        "from prm_factory import cli\n"
        "print(os.environ.get('HF_HUB_OFFLINE'), os.environ.get('DO_NOT_TRACK'))\n"
        "from pathlib import Path\n"
        "from prm_factory.commands import _load\n"
        "_load(Path(%r))\n"
        "print(os.environ.get('HF_HUB_OFFLINE'), os.environ.get('TRANSFORMERS_OFFLINE'))\n"
    )
    online = tmp_path / "online.yaml"
    online.write_text(yaml.safe_dump(_toy_config("assets/toy-policy", offline=False)))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    for config, expected in [(online, "None None"), (REPO_ROOT / "configs" / "toy.yaml", "1 1")]:
        proc = subprocess.run([sys.executable, "-c", code % str(config)], capture_output=True, text=True,
                              timeout=60, cwd=REPO_ROOT, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split("\n")[:2] == ["None 1", expected]
