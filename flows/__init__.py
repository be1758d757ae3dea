"""flows: the Prefect flows (build_dataset.py, refresh.py, train_prm.py) and the Prefect tasks they are made of
(steps.py). Prefect's @task wrappers live here, not in tasks/: tasks/ stays free of Prefect, so the CLI's local
executor and the tests run the same pipeline stages (tasks/build.py) without it.

May import: configs, tasks, cluster. Never prm_factory (tests/test_structure.py).
"""
