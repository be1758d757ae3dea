"""The environment list has one home (configs/env.py); scripts/offline-env.sh must set exactly the same."""

from __future__ import annotations

import subprocess
from pathlib import Path

from configs.env import FORWARDED_ENV, OFFLINE_ENV

REPO = Path(__file__).resolve().parents[2]


def sourced_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """What `source scripts/offline-env.sh` exports into an otherwise empty environment."""
    out = subprocess.run(["bash", "-c", "source scripts/offline-env.sh && env -0"], cwd=REPO, env=extra or {},
                         capture_output=True, check=True).stdout.decode()
    env = dict(item.split("=", 1) for item in out.split("\0") if item)
    for shell_own in ("PWD", "SHLVL", "_", "OLDPWD"):
        env.pop(shell_own, None)
    return env


def test_shell_script_sets_exactly_the_python_list():
    assert sourced_env() == OFFLINE_ENV


def test_shell_script_keeps_a_kv_cache_size_the_user_chose():
    # The one variable the script leaves to the caller, as set_offline_env leaves every one (setdefault).
    assert sourced_env({"VLLM_CPU_KVCACHE_SPACE": "4"})["VLLM_CPU_KVCACHE_SPACE"] == "4"


def test_engine_actors_get_every_offline_and_quiet_variable():
    assert set(OFFLINE_ENV) <= set(FORWARDED_ENV)
