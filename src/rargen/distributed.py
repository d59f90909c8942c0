"""Process groups for ``torchrun`` (one process per device): joining one, the few collectives the
package uses, and wrapping a model for data-parallel training (DDP or FSDP2, ``torch.compile``).

``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; without
them everything here is a single-process no-op, so the same code runs under plain ``python``.
Training, sampling (``sample_images``) and pretokenizing (``store``) all join and sync through here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def default_device(device: str | torch.device | None = None) -> str | torch.device:
    """``device`` as given, or ``"cuda"`` when a GPU is available and ``"cpu"`` otherwise."""
    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the given values, else the torchrun environment's (0 and 1 without)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def is_main_process() -> bool:
    """Rank 0 of the torchrun environment (or the only process): the one that prints summaries."""
    return rank_and_world()[0] == 0


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(
    device: str | torch.device | None = None, *, backend: str | None = None, timeout: timedelta | None = None
) -> Dist:
    """Join the process group named by the torchrun environment (nccl on CUDA, gloo on CPU, or
    ``backend``); ``device`` defaults to this process's GPU (``cuda:LOCAL_RANK``) or the CPU."""
    rank, world_size = rank_and_world()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(default_device(device))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, device_id=None, **({"timeout": timeout} if timeout else {}))
    return Dist(rank, local_rank, world_size, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (identity on one process)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` on one process)."""
    if not active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


# ------------------------------------------------------------------------------------------------
# Data-parallel training


def wrap_for_training(
    raw: nn.Module, env: Dist, *, sharding: str = "ddp", compile: bool = False
) -> tuple[nn.Module, Any]:
    """``(model to call, shard)``: ``raw`` sharded with FSDP2 (each of ``raw.blocks``, then the whole)
    or compiled and wrapped in DDP, across the ranks of ``env``; one process is ``raw`` (compiled).

    ``shard(tensors)`` lays out a dict of full tensors named like ``raw``'s parameters as those
    parameters are laid out (the EMA); it returns them as they are without FSDP.
    """
    shard = dict
    if env.world_size > 1 and sharding == "fsdp":
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import distribute_tensor

        for block in raw.blocks:
            fully_shard(block)
        fully_shard(raw)

        def shard(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
            return {
                n: distribute_tensor(tensors[n], p.device_mesh, p.placements)
                for n, p in raw.named_parameters()
            }

    model = torch.compile(raw) if compile else raw
    if env.world_size > 1 and sharding == "ddp":
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
    return model, shard


def no_sync(model: nn.Module, raw: nn.Module, sharding: str) -> Any:
    """Skip the gradient all-reduce of a non-final micro-step (DDP ``no_sync``; FSDP2 flag)."""
    if sharding == "fsdp":
        raw.set_requires_gradient_sync(False)

        @contextlib.contextmanager
        def resync() -> Iterator[None]:
            yield
            raw.set_requires_gradient_sync(True)

        return resync()
    return model.no_sync()


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole of an FSDP2-sharded tensor (a DTensor), or ``tensor`` itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _is_sharded(raw: nn.Module) -> bool:
    return hasattr(next(raw.parameters()), "full_tensor")  # FSDP2 DTensor parameters


def full_state(raw: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Unsharded model and optimizer state (FSDP: gathered to rank 0 on the CPU, empty elsewhere)."""
    if _is_sharded(raw):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(raw, options=options), get_optimizer_state_dict(
            raw, optimizer, options=options
        )
    return raw.state_dict(), optimizer.state_dict()


def load_optimizer_state(raw: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full (unsharded) optimizer state, sharding it like ``raw`` under FSDP."""
    if _is_sharded(raw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(raw, optimizer, state, options=options)
    else:
        optimizer.load_state_dict(state)
