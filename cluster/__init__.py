"""cluster: what runs processes and accelerators. The vLLM and transformers engines, the Ray engine actors and
their pool, Ray Train, the local Ray head (local.py) and the local Prefect stack supervisor behind
`prm-factory serve` (stack.py), pre-flight checks and the metrics the Ray layer emits.

May import: configs, tasks. Never flows or prm_factory (tests/test_structure.py).
"""
