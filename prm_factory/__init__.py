"""prm-factory: step-labelled training data for process reward models. This package is the `prm-factory`
command (cli.py: the app; commands/: the subcommands), the top layer: each subcommand is a thin shell over configs,
tasks, cluster and flows.

May import every package of the repo; none of them may import it (tests/test_structure.py). Only
benchmarks/, scripts/ and tests/ sit above it.

The version and the environment defaults live in configs/env.py (below every layer); they are re-exported here
for scripts and users that import them from the package.
"""

from configs.env import (
    HUB_OFFLINE_ENV,
    OFFLINE_ENV,
    QUIET_ENV,
    __version__,
    set_offline_env,
    set_quiet_env,
    use_hub_offline,
)

__all__ = [
    "HUB_OFFLINE_ENV",
    "OFFLINE_ENV",
    "QUIET_ENV",
    "__version__",
    "set_offline_env",
    "set_quiet_env",
    "use_hub_offline",
]
