"""cluster: what runs processes and accelerators. The vLLM and transformers engines (vllm_engine.py, hf_engine.py),
the Ray engine actors and their pool (actors.py), the one entry point that starts a config's engines
(engines.py), the one rule for which Ray a run joins (connect.py), Ray Train (train.py) and the active loop's
rounds on it (active_run.py), the local Ray head (local.py) and the process supervisor behind `prm-factory serve`
(prefect_stack.py: a Prefect server, worker and deployments, here because it starts the Ray head beside them),
pre-flight checks (preflight.py), the memory planner behind validate and doctor (memory_plan.py) and the counters
the engines emit to Ray's metrics (engine_metrics.py).

May import: configs, tasks. Never flows or prm_factory (tests/test_structure.py).
"""
