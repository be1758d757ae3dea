"""configs: the factory's settings. The pydantic schema every YAML here is validated against (schema.py), where
a config's model is found (models.py), a model's architecture from its config.json or a shipped table
(architectures.py), the repository root and config paths (paths.py), and the YAML configs.

The bottom layer: it imports no other package of the repo. Everything above (tasks, cluster, flows, the CLI)
may import it. Direction: configs <- tasks <- cluster <- flows <- prm_factory (guarded by tests/test_structure.py).
"""
