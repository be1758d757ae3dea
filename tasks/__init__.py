"""tasks: the domain logic, free of Ray and Prefect, one sub-package per stage of the factory.

=================  ==========================================================================================
``io``             atomic writes, sha256, where a dataset's files live, shard provenance
``generation``     the engine protocol and its request/result records (cluster/ implements it)
``cost``           what labelling costs, in generated tokens per stage, and the one sum over shards
``smollm2``        the real-language smoke's model, prepared from a wheel's GGUF file
``sources/``       problems: the toy world, file loaders, answer checking, the problem record, prompts
``labelling/``     entropy, step partition (EDU-PRM arXiv 2503.22233), the tree labeller, rollouts, the label
                   rule (ER-PRM arXiv 2412.11006)
``store/``         the Parquet dataset contract, versions, η relabelling, the dataset report, exports for other
                   trainers (Math-Shepherd / OpenRLHF, Qwen2.5-Math-PRM, TRL) with a dataset card
``evaluation/``    metrics, the toy ruler, ProcessBench, best-of-N, the policy's own evaluation
``prm/``           the PRM (ensemble heads, ActPRM arXiv 2504.10559), its pure-torch training step, scoring, report
``build``          the build pipeline (prepare -> label shard -> finalize) that the CLI and the flows execute
``active/``        ActPRM selection, the active-labelling loop and its report
=================  ==========================================================================================

``LAYERS`` is the one statement of the order: a module may import the modules of its own layer and of the
layers before it, never one after it (tests/test_structure.py). Engines reach this package only as values
passed in (anything with the engine protocol); nothing here starts one. The package as a whole may import
configs, never cluster, flows or prm_factory.
"""

LAYERS = (
    ("tasks.io", "tasks.generation", "tasks.cost", "tasks.smollm2"),
    ("tasks.sources",),
    ("tasks.labelling",),
    ("tasks.store",),
    ("tasks.evaluation",),
    ("tasks.prm",),
    ("tasks.build",),
    ("tasks.active",),
)
