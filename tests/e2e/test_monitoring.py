"""Watching a run as a user does: `prm-factory serve`'s stack, a real Prometheus, and the UIs in headless Chromium.

One stack for the module (cluster.prefect_stack.start_stack: a real Prefect server with its UI, the deployments of a
copy of prefect.yaml, a process worker, and a Ray head started through cluster/local.py with its dashboard
and token auth), one build of a tiny toy config (3 shards, transformers backend, one engine actor), run as
the `build-dataset` deployment while a real Prometheus (Debian's `prometheus`) scrapes the Ray node with the
shipped scrape config. The browser tests load the Prefect UI and the Ray dashboard in Debian's `chromium`
through Playwright and save screenshots into the test's tmp dir; they skip, saying why, where the browser,
Playwright or Prometheus is missing (`.ci/run` installs them).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from cluster.local import format_resource
from configs.schema import REPO_ROOT

MONITORING = REPO_ROOT / "cluster" / "monitoring"
GRAFANA = MONITORING / "grafana-prm-factory.json"
CONFIG_NAME = "watch-tiny"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PROMETHEUS = shutil.which("prometheus")
# The flags a headless Chromium needs here (root, no GPU, a closed network: no background connections).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STAGES = {"generate": "generate_tokens", "branch": "branch_tokens", "rollout": "rollout_tokens"}


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is not installed (pip install -e '.[dev]')"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does it)"
    return None


BROWSER_MISSING = _browser_missing()
needs_browser = pytest.mark.skipif(BROWSER_MISSING is not None, reason=f"browser test: {BROWSER_MISSING}")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None,
                                      reason="no prometheus binary (apt-get install prometheus; .ci/run does it)")


# -- pure functions --------------------------------------------------------------------------------------------


def test_format_resource_prints_memory_in_gib_and_counts_as_numbers():
    assert format_resource("memory", 17115300000) == "15.94 GiB"  # 17,115,300,000 / 2**30
    assert format_resource("object_store_memory", 512 * 2**20) == "512 MiB"
    assert format_resource("CPU", 2.0) == "2" and format_resource("GPU", 0.5) == "0.5"


def grafana_queries() -> list[str]:
    dash = json.loads(GRAFANA.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    return exprs


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(ray_prm_factory_[a-z_]+)", expr))


def test_grafana_dashboard_covers_every_factory_metric():
    from cluster import engine_metrics as metrics

    named = set().union(*(metric_names(e) for e in grafana_queries()))
    bases = {n.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
             for n in named}
    assert bases == {f"ray_{m}" for m in (metrics.TOKENS_GENERATED, metrics.REQUESTS, metrics.REQUEST_LATENCY,
                                          metrics.REQUESTS_IN_FLIGHT, metrics.ANCHORS_FOUND)}


# -- the served stack --------------------------------------------------------------------------------------------


@contextmanager
def environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def get_json(url: str, data: bytes | None = None, timeout: float = 10):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def served(prefect_server, tmp_path_factory, policy_model_path):
    """`serve`'s stack (deployments, worker, Ray with dashboard) on free ports, in tmp, on the session's Prefect
    server (with its UI)."""
    from cluster.prefect_stack import start_stack, urls_text

    tmp = tmp_path_factory.mktemp("watch")
    config = tmp / "watch-tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": CONFIG_NAME,
        "sources": [{"kind": "toy", "num_problems": 6, "seed": 11, "min_steps": 2, "max_steps": 3}],
        "policy": {"model_path": policy_model_path, "backend": "transformers", "max_model_len": 128},
        "cluster": {"num_engines": 1, "cpus_per_engine": 1, "request_timeout_s": 180},
        "partition": {"method": "edu", "tau": 0.2, "min_step_tokens": 3, "max_anchors": 3},
        "tree": {"branch_width": 2, "max_depth": 1, "max_leaves": 3},
        "rollouts": {"n": 2, "max_new_tokens": 16},
        "dataset": {"out_dir": str(tmp / "dataset"), "problems_per_shard": 2},
    }))
    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    for d in spec["deployments"]:
        d["parameters"]["config_path"] = str(config)
    prefect_file = tmp / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    state_file = tmp / "ray" / "cluster.json"
    lines: list[str] = []
    t0 = time.monotonic()
    with environ(PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="2"):
        stack = start_stack(home=prefect_server["home"], prefect_file=prefect_file, ray_state_file=state_file,
                            echo=lines.append, api_url=prefect_server["api_url"])
    try:
        lines += urls_text(stack)
        yield {"stack": stack, "tmp": tmp, "config": str(config), "state_file": state_file,
               "home": prefect_server["home"], "lines": lines, "startup_s": time.monotonic() - t0,
               "ray_state": json.loads(state_file.read_text())}
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def prometheus(served):
    """A real Prometheus on a free loopback port, with the shipped scrape config aimed at this Ray node."""
    if PROMETHEUS is None:
        pytest.skip("no prometheus binary (apt-get install prometheus; .ci/run does it)")
    from cluster.prefect_stack import free_port

    tmp = served["tmp"] / "prometheus"
    tmp.mkdir()
    cfg = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = "1s"  # the shipped 15 s is for people, not for a test
    sd = cfg["scrape_configs"][0]["file_sd_configs"][0]
    # The shipped config reads Ray's service-discovery file; other Rays on this machine share /tmp/ray, so the
    # test writes its own file in the same format, naming only this node's metrics endpoint.
    target = urllib.parse.urlparse(served["stack"].metrics_url).netloc
    sd["files"] = [str(tmp / "targets.json")]
    sd["refresh_interval"] = "1s"
    (tmp / "targets.json").write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [target]}]))
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = open(tmp / "prometheus.log", "w")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
                time.sleep(0.3)
        yield {"url": url, "dir": tmp, "target": target}
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def query(prom_url: str, expr: str) -> list[dict]:
    out = get_json(f"{prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert out["status"] == "success", out
    return out["data"]["result"]


@pytest.fixture(scope="module")
def build_run(served, request):
    """The build-dataset deployment run once, watched while it runs: its state, progress artifact and logs."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PROMETHEUS is not None:
        request.getfixturevalue("prometheus")  # scraping before the build starts
    api_url = served["stack"].api_url
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        t0 = time.monotonic()
        flow_run = run_deployment("build-dataset/build-dataset", timeout=0)
        seen: list[tuple[str, float | None]] = []  # (flow run state, progress artifact value) while it runs
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                fr = client.read_flow_run(flow_run.id)
                arts = get_json(f"{api_url}/artifacts/filter", json.dumps(
                    {"artifacts": {"key": {"any_": [f"{CONFIG_NAME}-dataset-progress"]}}}).encode())
                seen.append((fr.state.type.value, arts[0]["data"] if arts else None))
                if fr.state.is_final():
                    break
                time.sleep(0.5)
            fr = client.read_flow_run(flow_run.id)
            from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

            # The flow's process sends its logs in batches: the last ones can land after the run is final.
            log_deadline = time.monotonic() + 60
            while True:
                logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
                shard_lines = [e for e in logs if re.match(r"shard \d{5} built", e.message)]
                ready_seen = any(e.message.startswith("engine pool ready after") for e in logs)
                if (ready_seen and len(shard_lines) >= 3) or time.monotonic() > log_deadline:
                    break
                time.sleep(1)
            task_runs = client.read_task_runs()
    assert fr.state.is_completed(), f"{fr.state}: see {served['home'] / 'logs'}"
    return {"flow_run": fr, "seen": seen, "logs": [entry.message for entry in logs], "seconds": time.monotonic() - t0,
            "task_runs": [t.name for t in task_runs if t.flow_run_id == fr.id],
            "dataset": served["tmp"] / "dataset"}


@pytest.mark.slow
def test_ui_settings_name_this_servers_api(served):
    stack = served["stack"]
    assert stack.api_url.rsplit(":", 1)[1] != "4200/api"  # a free port, not Prefect's default
    settings = get_json(f"{stack.ui_url}/ui-settings")
    assert settings["api_url"] == stack.api_url
    printed = "\n".join(served["lines"])
    assert f"Prefect UI:      {stack.ui_url}" in printed
    assert stack.ray_dashboard in printed and "ray get-auth-token" in printed
    assert stack.metrics_url in printed


@pytest.mark.slow
def test_progress_artifact_follows_the_shards_and_the_log_says_when_engines_are_ready(build_run):
    seen = build_run["seen"]
    while_running = [p for state, p in seen if state == "RUNNING" and p is not None]
    assert while_running and min(while_running) < 100.0, seen  # visible before the run ended
    assert seen[-1][1] == 100.0
    logs = build_run["logs"]
    ready = [i for i, m in enumerate(logs) if m.startswith("engine pool ready after")]
    shards = [i for i, m in enumerate(logs) if re.match(r"shard \d{5} built", m)]
    assert len(ready) == 1 and len(shards) == 3, logs
    assert ready[0] < shards[0]  # ready is said before the first shard is done, and after the engines answered
    assert re.search(r"3/3 shards done, [\d,]+ tokens so far", logs[shards[-1]])
    assert "start-engines" in " ".join(build_run["task_runs"])


@pytest.mark.slow
@needs_prometheus
def test_prometheus_scrapes_tokens_per_stage_equal_to_the_dataset_cost(build_run, prometheus):
    from tasks.store.report import dataset_stats

    cost = dataset_stats(build_run["dataset"])["cost"]
    expected = {stage: cost[key] for stage, key in STAGES.items() if cost[key]}
    assert expected.get("generate", 0) > 0 and len(expected) >= 2, cost  # (tree leaves may cover all rollouts)
    expr = 'sum by (stage) (ray_prm_factory_tokens_generated_total{engine="watch-tiny-engine-0"})'
    deadline = time.monotonic() + 90  # Ray's agent exports every few seconds; Prometheus scrapes every second
    got: dict[str, float] = {}
    while time.monotonic() < deadline:
        got = {r["metric"]["stage"]: float(r["value"][1]) for r in query(prometheus["url"], expr)}
        if got == expected:
            break
        time.sleep(1)
    assert got == expected
    up = query(prometheus["url"], 'up{job="ray"}')
    assert [r["metric"]["instance"] for r in up] == [prometheus["target"]] and up[0]["value"][1] == "1"


@pytest.mark.slow
@needs_prometheus
def test_every_grafana_query_runs_on_metrics_prometheus_has(build_run, prometheus):
    names = set(get_json(f"{prometheus['url']}/api/v1/label/__name__/values")["data"])
    deadline = time.monotonic() + 60  # the anchors counter of the flow-run driver may arrive a little later
    exprs = grafana_queries()
    while time.monotonic() < deadline:
        missing = {n for e in exprs for n in metric_names(e)} - names
        if not missing:
            break
        time.sleep(2)
        names = set(get_json(f"{prometheus['url']}/api/v1/label/__name__/values")["data"])
    assert not missing, f"Grafana queries name metrics Prometheus does not have: {sorted(missing)}"
    for expr in exprs:
        if expr.startswith("label_values("):
            continue
        promql = expr.replace("$__rate_interval", "1m").replace('engine=~"$engine"', 'engine=~".*"')
        query(prometheus["url"], promql)  # parses and runs


def ray_listeners(ray_start_pid: int) -> list[tuple[str, str]]:
    """(local address, process) of every TCP listener of the processes in `ray start`'s session."""
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout.split()
    pids = {int(ps[i]) for i in range(0, len(ps), 2) if int(ps[i + 1]) == ray_start_pid}
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = [int(p) for p in re.findall(r"pid=(\d+)", line)]
        if any(p in pids for p in owners):
            found.append((line.split()[3], re.search(r'\(\("([^"]+)"', line).group(1)))
    return found


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ss") is None, reason="no `ss` (iproute2) to list listeners")
def test_every_ray_listener_binds_loopback(served, build_run):
    listeners = ray_listeners(served["ray_state"]["pid"])
    names = {name for _, name in listeners}
    assert {"gcs_server", "raylet"} <= names, listeners  # the listing sees Ray's own processes
    assert len(listeners) >= 8
    loopback = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")
    assert [(a, n) for a, n in listeners if not a.startswith(loopback)] == []


@pytest.mark.slow
def test_cluster_status_finds_the_cluster_serve_started(served, build_run):
    env = {**os.environ, "PRM_FACTORY_CLUSTER_STATE": str(served["state_file"])}
    cmd = [sys.executable, "-m", "prm_factory.cli", "cluster", "status"]
    text = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    out = text.stdout + text.stderr
    assert "started by prm-factory serve" in out and served["stack"].ray_dashboard in out
    assert re.search(r"  memory: [\d.]+ GiB free of [\d.]+ GiB", out), out
    assert "e+" not in out and f"{CONFIG_NAME}-engine-0: transformers" in out
    info = json.loads(subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, timeout=120).stdout)
    assert info["running"] and info["metrics_url"] == served["stack"].metrics_url


# -- the browser ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(served):
    if BROWSER_MISSING:
        pytest.skip(f"browser test: {BROWSER_MISSING}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, tmp_path):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    pg.shots = tmp_path  # screenshots beside the test's other files
    yield pg
    context.close()


def shoot(pg, name: str) -> Path:
    path = pg.shots / f"{name}.png"
    pg.screenshot(path=str(path), full_page=True)
    return path


API_ERROR = "Can't connect to Server API"


@pytest.mark.slow
@needs_browser
def test_browser_prefect_dashboard_and_flow_run(served, build_run, page):
    ui = served["stack"].ui_url
    page.goto(f"{ui}/dashboard")
    page.get_by_text("Flow Runs").first.wait_for()
    page.wait_for_load_state("networkidle")
    shoot(page, "prefect-dashboard")
    body = page.inner_text("body")
    assert API_ERROR not in body
    # The session's server holds the flow runs of earlier test modules too: the dashboard counts them all, except
    # those scheduled in the future (the deployments' cron runs).
    now = datetime.datetime.now(datetime.UTC).isoformat()
    total = get_json(f"{served['stack'].api_url}/flow_runs/count", json.dumps(
        {"flow_runs": {"expected_start_time": {"before_": now}}}).encode())
    assert total >= 1 and re.search(rf"Flow Runs\s+{total}\s+total", body), (total, body[:2000])
    assert "prm-factory-local" in body, body[:2000]
    # The dashboard lists runs by name only under its "failed" tab, which holds the runs of whichever test module
    # failed one earlier in the session: the runs page lists them all.
    page.goto(f"{ui}/runs")
    page.get_by_text("build-dataset").first.wait_for()
    shoot(page, "prefect-runs")
    assert API_ERROR not in page.inner_text("body")

    fr = build_run["flow_run"]
    page.goto(f"{ui}/runs/flow-run/{fr.id}")
    page.get_by_text(fr.name).first.wait_for()
    page.get_by_text("Completed").first.wait_for()
    page.get_by_text("engine pool ready after").first.wait_for()  # the Logs tab is the default
    shoot(page, "prefect-flow-run")
    assert API_ERROR not in page.content()


@pytest.mark.slow
@needs_browser
def test_browser_markdown_artifact_images_load(served, build_run, page):
    api = served["stack"].api_url
    arts = get_json(f"{api}/artifacts/filter", json.dumps(
        {"artifacts": {"key": {"any_": [f"{CONFIG_NAME}-dataset"]}}}).encode())
    assert len(arts) == 1 and arts[0]["type"] == "markdown"
    page.goto(f"{served['stack'].ui_url}/artifacts/artifact/{arts[0]['id']}")
    page.get_by_text("Tokens per labelled step").first.wait_for()
    page.wait_for_function("document.images.length >= 3 && [...document.images].every(i => i.complete)")
    widths = page.evaluate("[...document.images].filter(i => i.src.startsWith('data:image/png'))"
                           ".map(i => i.naturalWidth)")
    shoot(page, "prefect-artifact")
    page.locator("img[alt=cost]").scroll_into_view_if_needed()
    shoot(page, "prefect-artifact-plots")
    assert len(widths) == 3 and all(w > 0 for w in widths), widths
    assert "| |" not in page.inner_text("body")


@pytest.mark.slow
@needs_browser
def test_browser_ray_dashboard_actors_after_token_login(served, build_run, page):
    token = subprocess.run([str(Path(sys.executable).with_name("ray")), "get-auth-token"], capture_output=True,
                           text=True, env={**os.environ, "RAY_AUTH_MODE": "token"}, check=True).stdout.strip()
    assert token
    dashboard = served["stack"].ray_dashboard
    page.goto(f"{dashboard}/#/actors")
    field = page.get_by_placeholder("Enter your authentication token")
    field.wait_for()
    shoot(page, "ray-login")
    field.fill(token)
    field.press("Enter")
    page.get_by_text(f"{CONFIG_NAME}-engine-0").first.wait_for()
    shoot(page, "ray-actors")
    assert "EngineActor" in page.inner_text("body")


def test_server_env_points_the_ui_at_this_api_and_takes_a_database_url(tmp_path):
    from cluster.prefect_stack import server_env

    env = server_env(tmp_path, "http://127.0.0.1:5123/api")
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:5123/api" and "PREFECT_API_URL" not in env
    assert "PREFECT_SERVER_DATABASE_CONNECTION_URL" not in env and env["PREFECT_HOME"] == str(tmp_path)
    pg = "postgresql+asyncpg://prefect:pw@db:5432/prefect"
    env = server_env(tmp_path, "http://127.0.0.1:5123/api", database_url=pg, ui=False)
    assert env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == pg and env["PREFECT_UI_ENABLED"] == "false"


def test_logs_are_appended_per_start_and_rotated_when_large(tmp_path, monkeypatch):
    from cluster import local

    log = tmp_path / "logs" / "prefect-server.log"
    for run in ("first", "second"):
        with local.open_log(log, "prefect-server") as fh:
            fh.write(f"{run} run\n")
    text = log.read_text()
    assert text.count("===== prefect-server started") == 2 and text.index("first run") < text.index("second run")
    monkeypatch.setattr(local, "LOG_ROTATE_BYTES", len(text) - 1)
    with local.open_log(log, "prefect-server") as fh:
        fh.write("third run\n")
    assert (tmp_path / "logs" / "prefect-server.log.1").read_text() == text  # the old log, whole
    assert "third run" in log.read_text() and "first run" not in log.read_text()
