"""Data-parallel and sharded training under ``torchrun``, on torch.distributed's own collectives.

Every rank runs the same recipe. The data stream is global: every rank walks the same sequence of
global batches (``batch_size × world`` samples, grouped by size as in one process) and takes its
own contiguous slice, and sample j of rank r draws its randomness with the global index
``offset_r + j``. So noise, timesteps and dropout depend on (seed, step, sample index), never on
the rank or the number of ranks.

Each rank computes the gradient of its slice's mean loss, weighted by its share of the global
batch, n_r / N; one all-reduce (SUM) of the flattened LoRA gradients and loss then gives every rank
exactly the single-process gradient of the global batch:

    g = Σ_r (n_r / N) · ∇ mean_{i ∈ slice r} loss_i = ∇ mean_{i ∈ batch} loss_i

The LoRA and AdamW state stay replicated (identical on every rank). ``train.distributed: fsdp``
also shards the frozen base with FSDP2 (``fully_shard`` per transformer block, LoRA parameters
ignored), so each rank holds 1/world of the base weights between layers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from qflux.lora.kinds import is_adapter_param
from qflux.weights.block_swap import transformer_blocks

Params = dict[str, torch.Tensor]


@attrs.frozen
class World:
    """This process's place among the ranks of a run (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes files."""
        return self.rank == 0


def world_from_env() -> World:
    """The world ``torchrun`` describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    return World(
        rank=int(os.environ.get("RANK", 0)),
        size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_world(device_type: str) -> World:
    """Join the process group when launched by torchrun with several ranks (NCCL on CUDA, gloo on
    CPU); a single process needs none. Idempotent."""
    world = world_from_env()
    if world.size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(world.local_rank)
        torch.distributed.init_process_group(backend)
    return world


def rank_device(world: World, device: torch.device) -> torch.device:
    """Each rank's own GPU (``cuda:LOCAL_RANK``) when training on CUDA under torchrun."""
    if device.type == "cuda" and world.size > 1:
        return torch.device("cuda", world.local_rank)
    return device


def all_reduce_sum(grads: Mapping[str, torch.Tensor], loss: torch.Tensor) -> tuple[Params, torch.Tensor]:
    """Σ over ranks of (grads, loss) in one collective (flattened into a single buffer)."""
    names = list(grads)
    flat = torch.cat([grads[k].reshape(-1).float() for k in names] + [loss.reshape(1).float()])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    out: Params = {}
    i = 0
    for k in names:
        g = grads[k]
        out[k] = flat[i : i + g.numel()].view_as(g).to(g.dtype)
        i += g.numel()
    return out, flat[-1].to(loss.dtype)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (a stop request, for instance)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def barrier(world: World) -> None:
    """Wait for every rank (no-op for one process)."""
    if world.size > 1:
        torch.distributed.barrier()


def shard_frozen_base(transformer: Any, world: World) -> int:
    """FSDP2: shard each transformer block's frozen weights (and the rest of the model) across the
    ranks, leaving the LoRA parameters out (they are substituted per call and stay replicated).

    Returns:
        How many blocks were wrapped.
    """

    device_type = next(transformer.parameters()).device.type
    mesh = init_device_mesh(device_type, (world.size,))
    ignored = {p for n, p in transformer.named_parameters() if is_adapter_param(n)}
    blocks = transformer_blocks(transformer)  # every family's repeated blocks, from its own _repeated_blocks
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(transformer, mesh=mesh, ignored_params=ignored)
    return len(blocks)
