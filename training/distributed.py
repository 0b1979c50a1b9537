"""torch.distributed in a few helpers: the same code runs alone or under ``torchrun``
(gloo on CPU, nccl on CUDA), with DDP or FSDP. Outside torchrun every helper is a no-op."""

from __future__ import annotations

import os

import torch
import torch.distributed as td
from torch import nn


def active() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if active() else 0


def world_size() -> int:
    return td.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init() -> torch.device:
    """Join the process group when launched by torchrun; return this process's device."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cuda = torch.cuda.is_available()
    if launched and not active():
        td.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def shutdown() -> None:
    if active():
        td.destroy_process_group()


def barrier() -> None:
    if active():
        td.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if active():
        td.all_reduce(tensor, op=td.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj) -> list:
    if not active():
        return [obj]
    out = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """DDP or FSDP (fully_shard per decoder layer, then the root) when distributed, else as is."""
    if not active():
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
