"""tasks.store: what a dataset is on disk: the Parquet row schema, atomic shards with completion records, the manifest
and its verification, versions under one root (refresh, reuse), η relabelling into a new version, and the dataset
report.

May import (tasks.LAYERS): configs, tasks.io, tasks.generation, tasks.cost, tasks.smollm2, tasks.sources,
tasks.labelling. Never the layers after it.
"""
