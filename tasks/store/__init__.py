"""tasks.store: what a dataset is on disk: the Parquet row schema, atomic shards with completion records, the manifest
and its verification, versions under one root (refresh, reuse), η relabelling into a new version, the dataset
report, and exports in other trainers' layouts (Math-Shepherd / OpenRLHF, Qwen2.5-Math-PRM, TRL) with a dataset card.

May import (tasks.LAYERS): configs, tasks.io, tasks.generation, tasks.cost, tasks.smollm2, tasks.sources,
tasks.labelling. Never the layers after it.
"""
