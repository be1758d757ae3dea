"""tasks.active: ActPRM active labelling (arXiv 2504.10559): uncertainty selection from the ensemble's mean and
spread, the loop that buys labels round by round through build's shard writer, its run directory (pin, pool,
rounds log, resume checks) and its report.

May import (tasks.LAYERS): configs, tasks.io, tasks.generation, tasks.cost, tasks.smollm2, tasks.sources,
tasks.labelling, tasks.store, tasks.evaluation, tasks.prm, tasks.build. Never the layers after it.
"""
