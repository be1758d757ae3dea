"""tasks.labelling: from a policy's solution to step labels: next-token entropy, where a solution is cut into steps
(EDU-PRM arXiv 2503.22233 anchors, newline, fixed), the tree labeller that generates and branches, rollouts from
step prefixes, and the label rule (hard, soft, ER-PRM arXiv 2412.11006). Views of trees for people.

May import (tasks.LAYERS): configs, tasks.io, tasks.generation, tasks.cost, tasks.smollm2, tasks.sources. Never the
layers after it.
"""
