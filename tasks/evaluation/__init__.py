"""tasks.evaluation: how good a step scorer is, against exact truth where there is one: the scorer protocol, AUROC and
accuracy, the toy ruler (held-out trajectories with exact per-step truth), ProcessBench's metric, best-of-N
selectors, and the policy's own accuracy on held-out toy problems.

May import (tasks.LAYERS): configs, tasks.io, tasks.generation, tasks.cost, tasks.smollm2, tasks.sources,
tasks.labelling, tasks.store. Never the layers after it.
"""
