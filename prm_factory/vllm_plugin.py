"""vLLM's entry points into prm-factory (pyproject.toml ``[project.entry-points]``).

- ``vllm.general_plugins``: ``register`` adds ``PRMFactoryEnsembleForProcessReward`` (``prm_factory.vllm_model``)
  to vLLM's model registry, in every vLLM process. The class is named lazily, so this imports no torch model code.
- ``vllm.io_processor_plugins``: ``io_processor`` names the request/response processor
  (``prm_factory.vllm_io.EnsembleStepsIO``), which an export selects through its config.json's
  ``io_processor_plugin``.

With the package installed, ``vllm serve DIR --runner pooling`` (or the API-server module) serves an export of
``prm-factory export --format vllm-ensemble`` with no other code or flag.
"""

from __future__ import annotations

ARCHITECTURE = "PRMFactoryEnsembleForProcessReward"
IO_PROCESSOR = "prm_factory_steps"  # the entry point's name, written into an export's config.json


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"prm_factory.vllm_model:{ARCHITECTURE}")


def io_processor() -> str:
    return "prm_factory.vllm_io.EnsembleStepsIO"
