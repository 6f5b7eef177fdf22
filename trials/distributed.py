"""The ranks of one multi-GPU trial: one process per GPU, trained as one torch-distributed job.

Rank 0 owns the Optuna trial: it draws the params and shares them, reports each evaluation and
decides whether to prune (see `trials.reporter`). The other ranks train on what rank 0 shares and
report nothing. The HF Trainer (and DeepSpeed, when the space names a config) finds the process
group already made, from the same RANK/WORLD_SIZE/MASTER_ADDR variables `torchrun` would set.
"""

from __future__ import annotations

import os
import socket
from typing import Any


def rendezvous_address(host: str) -> str:
    """HOST:PORT for rank 0 to listen on: this node's address (as the cluster knows it, which
    the backend gives) and a free port."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"{host}:{port}"


def init_group(*, rank: int, world: int, address: str) -> None:
    """Join the trial's process group (blocks until every rank has joined)."""
    import torch
    import torch.distributed as dist

    host, port = address.rsplit(":", 1)
    # What `torchrun` sets; accelerate and DeepSpeed read them. Each rank sees only its own GPU
    # (Ray sets CUDA_VISIBLE_DEVICES), so its local device is always 0.
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR=host,
        MASTER_PORT=port,
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    dist.init_process_group(
        backend="nccl" if torch.cuda.is_available() else "gloo",
        init_method=f"tcp://{address}",
        rank=rank,
        world_size=world,
    )


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks in its group; (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(payload: Any) -> Any:
    """Rank 0's `payload`, on every rank."""
    import torch.distributed as dist

    box = [payload]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
