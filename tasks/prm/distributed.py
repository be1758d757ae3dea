"""How the PRM trains across workers, in plain torch (free of Ray): the strategy that holds the model (DDP or
FSDP2), the precision it computes in, activation checkpointing, and FSDP's sharded checkpoints.

- **ddp**: every worker holds the whole model; ``DistributedDataParallel`` all-reduces the gradients.
- **fsdp**: ``torch.distributed.fsdp.fully_shard`` (FSDP2) on each decoder layer of the backbone and on the whole
  PRM (the root: embeddings, final norm, the ensemble heads, an untied LM head). Each worker holds 1/world of every
  parameter, gradient and AdamW state; a layer's parameters are all-gathered for its forward and backward and its
  gradients reduce-scattered. The heads and token features run inside the root's forward, on its gathered
  parameters, so they work as under ddp.

Precision (``train.precision``): the weights and AdamW states are float32 in every setting (a bf16 weight does
not move at lr 1e-5, which is why configs/schema.py refuses ``train.dtype: bfloat16``). ``bf16-mixed`` and
``fp16-mixed`` compute in low precision: under fsdp through ``MixedPrecisionPolicy(param_dtype=bf16/fp16,
reduce_dtype=float32)`` (the gathered copies are low precision, the gradients are reduced in float32 into the
float32 shards), under ddp through ``torch.autocast``. fp16 adds loss scaling (``GradScaler``; fsdp:
``ShardedGradScaler``). The loss itself is always computed in float32.

Sharded checkpoints (fsdp): ``save_sharded`` has every rank write its own shard of model and optimizer with
``torch.distributed.checkpoint`` (no rank gathers the whole model); ``load_sharded`` reads them back into any
layout (another world size reshards); ``consolidate_sharded`` writes the model's tensors into one safetensors
file, a few hundred MB in memory at a time, for ``score``, ``eval`` and ``export``, which read a checkpoint as always.
"""

from __future__ import annotations

import contextlib
import json
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16-mixed": torch.bfloat16,
                                             "fp16-mixed": torch.float16}
STRATEGIES = ("ddp", "fsdp")
SHARDED_DIR = "sharded"  # the torch.distributed.checkpoint directory inside an fsdp epoch checkpoint
MODEL_PREFIX = "model."  # its model tensors' keys (the optimizer's start with "optim.")
# torch dtype -> the safetensors header's name for it
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


class StrategyError(ValueError):
    """A strategy or setting the backbone cannot use; the message names the backbone and the setting."""


def decoder_layers(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's decoder layers: the modules whose class the model lists in ``_no_split_modules`` (what
    transformers itself keeps whole on one device; every HF decoder names its layer class there)."""
    names = set(getattr(backbone, "_no_split_modules", None) or ())
    return [m for m in backbone.modules() if type(m).__name__ in names]


def check_backbone(backbone: nn.Module, strategy: str, activation_checkpointing: bool, where: str = "") -> int:
    """StrategyError when the backbone cannot be trained this way; the number of decoder layers otherwise.
    Runs on a meta-device backbone too (no weights needed): the driver calls it before any worker starts."""
    if strategy not in STRATEGIES:
        raise StrategyError(f"strategy {strategy!r} is not one of {STRATEGIES}")
    layers = decoder_layers(backbone)
    name = type(backbone).__name__ + (f" ({where})" if where else "")
    if strategy == "fsdp" and not layers:
        raise StrategyError(f"strategy fsdp wraps each decoder layer, and {name} names none: its "
                            f"_no_split_modules is {getattr(backbone, '_no_split_modules', None)!r} and no module "
                            "has such a class; use strategy: ddp for this backbone")
    if activation_checkpointing and not getattr(backbone, "supports_gradient_checkpointing", False):
        raise StrategyError(f"activation_checkpointing: {name} does not support gradient checkpointing "
                            "(supports_gradient_checkpointing is False); set activation_checkpointing: false")
    return len(layers)


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The PRM inside a DDP wrapper (FSDP2 wraps in place: the model is itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_model(model: nn.Module, strategy: str, precision: str = "fp32", activation_checkpointing: bool = False,
               device: str | torch.device = "cpu") -> nn.Module:
    """The PRM ready to train under `strategy` on `device` (torch.distributed initialised for fsdp and for ddp
    with more than one worker; ddp with one worker is the bare model). Make the optimizer afterwards: fully_shard
    replaces the parameters with their shards."""
    import torch.distributed as dist

    backbone = model.backbone
    check_backbone(backbone, strategy, activation_checkpointing)
    if precision not in PRECISIONS:
        raise StrategyError(f"precision {precision!r} is not one of {tuple(PRECISIONS)}")
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if activation_checkpointing:  # transformers' own, per decoder layer; non-reentrant works under FSDP2 and DDP
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():
            raise StrategyError("strategy fsdp needs torch.distributed initialised (Ray Train does it)")
        mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
        low = PRECISIONS[precision]
        policy = (MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low is not None
                  else MixedPrecisionPolicy())
        # FSDP2 warns when a wrapped forward returns a view (an in-place op on it would skip its backward hook);
        # the PRM's logits are a reshape, and nothing here changes them in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        for layer in decoder_layers(backbone):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)  # moves each group's shards to the mesh's device
        return model
    model.to(dev)
    if dist.is_initialized() and dist.get_world_size() > 1:
        return nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    return model


def autocast(model: nn.Module, precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """The forward's precision context: torch.autocast for mixed precision without FSDP (whose
    MixedPrecisionPolicy already casts), else nothing."""
    low = PRECISIONS[precision]
    if low is None or is_fsdp(model):
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=low)


def make_scaler(model: nn.Module, precision: str, device: str | torch.device) -> Any:
    """A loss scaler for fp16-mixed (fsdp: ShardedGradScaler, which agrees on inf/NaN across ranks), else None."""
    if precision != "fp16-mixed":
        return None
    kind = torch.device(device).type
    if is_fsdp(model):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        # its found-inf flag is a 1-element tensor that DTensor replicates, saying so at every step
        warnings.filterwarnings("ignore", message=r"Found a non-scalar tensor with numel=1")
        return ShardedGradScaler(device=kind)
    return torch.amp.GradScaler(kind)


def no_gradient_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """Within an accumulation window, before its last batch: DDP skips its all-reduce (the gradients add up locally
    and the last backward reduces the sum). FSDP keeps reducing: each batch's gradients are reduce-scattered into
    the sharded ones, so no rank ever holds a whole model's gradients."""
    return model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state (its local shards under fsdp)."""
    def nbytes(t: torch.Tensor) -> int:
        t = _local(t)
        return t.numel() * t.element_size()

    params = list(model.parameters())
    out = {"params": sum(nbytes(p) for p in params),
           "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
           "optimizer": sum(nbytes(v) for state in (optimizer.state.values() if optimizer else ())
                            for v in state.values() if torch.is_tensor(v))}
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


# -- sharded checkpoints (torch.distributed.checkpoint) -------------------------------------------------------


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Every rank writes its shard of model and optimizer into `path` (a directory of its own is fine: the
    coordinator, rank 0, writes ``.metadata`` beside its shard). Collective: call it on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, storage_writer=dcp.FileSystemWriter(str(path)))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Read a sharded checkpoint into the model and optimizer (any layout: DCP reshards). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def sharded_complete(path: str | Path) -> bool:
    """True when a sharded checkpoint is whole: its ``.metadata`` reads and every byte range it points to is on
    disk (each rank's shard arrives on its own; a run killed during an upload leaves some out)."""
    import torch.distributed.checkpoint as dcp

    root = Path(path)
    try:
        meta = dcp.FileSystemReader(str(root)).read_metadata()
        for info in (meta.storage_data or {}).values():
            file = root / info.relative_path
            if not file.is_file() or file.stat().st_size < info.offset + info.length:
                return False
    except (OSError, ValueError, EOFError, RuntimeError, AttributeError):
        return False
    return bool(meta.storage_data)


def sharded_tensors(path: str | Path, prefix: str = MODEL_PREFIX) -> dict[str, Any]:
    """The sharded checkpoint's tensors under `prefix`: name (prefix dropped) -> DCP's storage metadata (size,
    dtype), in the checkpoint's order. Reads ``.metadata`` only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(path)).read_metadata()
    return {key[len(prefix):]: value for key, value in meta.state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(value, TensorStorageMetadata)}


def iter_sharded_tensors(path: str | Path, prefix: str = MODEL_PREFIX, chunk_bytes: int = 256 * 2**20
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """Each whole tensor under `prefix`, assembled from every rank's shard (no process group), in the checkpoint's
    order; read a group of tensors up to `chunk_bytes` at a time, so memory stays near that (or one tensor)."""
    import torch.distributed.checkpoint as dcp

    def flush(group: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({prefix + name: t for name, t in group}, storage_reader=dcp.FileSystemReader(str(path)),
                     no_dist=True)
        return group

    group: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, meta in sharded_tensors(path, prefix).items():
        tensor = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        if group and size + tensor.numel() * tensor.element_size() > chunk_bytes:
            yield from flush(group)
            group, size = [], 0
        group.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
    if group:
        yield from flush(group)


def consolidate_sharded(path: str | Path, out_file: str | Path, metadata: dict[str, str] | None = None,
                        prefix: str = MODEL_PREFIX) -> int:
    """Write the model of a sharded checkpoint as one safetensors file (what ``load_prm`` reads), streaming: the
    header from ``.metadata``, then each tensor's bytes as it is assembled, a few hundred MB at a time (never the
    whole model). Returns the bytes written."""
    entries = sharded_tensors(path, prefix)
    header: dict[str, Any] = {}
    offset = 0
    for name, meta in entries.items():
        dtype = meta.properties.dtype
        if dtype not in _SAFETENSORS_DTYPES:
            raise StrategyError(f"{path}: tensor {name} has dtype {dtype}, which safetensors cannot hold")
        size = int(torch.Size(meta.size).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(meta.size),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    out = Path(out_file)
    with out.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, tensor in iter_sharded_tensors(path, prefix):
            data = tensor.contiguous().reshape(-1).view(torch.uint8)
            if data.numel() != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise StrategyError(f"{path}: tensor {name} came back with another size than its metadata")
            f.write(data.numpy().tobytes())
    return out.stat().st_size
