"""tasks.sources: the problems a build labels, from where they come to the prompt a policy sees: the toy world (exact
step truth), file loaders (GSM8K, MATH, ProcessBench, the user's JSONL/Parquet) with quarantine of bad rows, final-
answer checking, the Problem record and its id, and prompt rendering.

May import (tasks.LAYERS): configs, tasks.io, tasks.generation, tasks.cost, tasks.smollm2. Never the layers after
it.
"""
