"""scripts/ship_toy_prm.py refuses a directory that is not a finished training run, before touching its output."""

from __future__ import annotations

import subprocess
import sys

from configs.schema import REPO_ROOT


def test_ship_refuses_an_unfinished_run_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "model.safetensors").write_bytes(b"")  # weights without prm_config.json: a torn run
    out = tmp_path / "asset"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "ship_toy_prm.py"), "--run", str(run),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "not a finished run's model" in proc.stderr and "prm_config.json" in proc.stderr
    assert not out.exists()
