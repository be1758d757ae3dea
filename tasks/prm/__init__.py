"""tasks.prm: the process reward model: a causal-LM backbone with an ensemble of heads (ActPRM arXiv 2504.10559), its
checkpoints, the pure-torch training pieces (one step, the epoch loop, held-out evaluation, the held-out split) that
cluster/train.py runs under Ray Train, the same training in one process (fit), scoring of files, and the training
report.

May import (tasks.LAYERS): configs, tasks.io, tasks.generation, tasks.cost, tasks.smollm2, tasks.sources,
tasks.labelling, tasks.store, tasks.evaluation. Never the layers after it.
"""
