"""tasks: the domain logic, free of Ray and Prefect. Loaders and the problem record, entropy and step
partitioning, rollouts and step labels (EDU-PRM arXiv 2503.22233, ER-PRM arXiv 2412.11006), the dataset
format and its IO, versions, reports, the PRM model and its evaluation, and the build pipeline (build.py:
prepare -> label shard -> finalize) that the CLI and the Prefect flows execute.

Engines reach this layer only as values passed in (anything with the engine protocol); nothing here starts
one. May import: configs. Never cluster, flows or prm_factory (tests/test_structure.py).
"""
