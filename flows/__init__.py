"""flows: the Prefect flows (build_dataset.py, refresh.py, train_prm.py, active_learning.py) and the Prefect tasks
they are made of (steps.py). Prefect's @task wrappers live here, not in tasks/: tasks/ stays free of Prefect, so
the CLI's local executor and the tests run the same pipeline stages (tasks/build.py) without it. Flows hold no Ray
code: engines start through cluster/engines.py, training through cluster/train.py.

May import: configs, tasks, cluster. Never prm_factory (tests/test_structure.py).
"""
