"""Training under torchrun: where a process stands in a (possibly trivial) process group and the few
collectives training needs. How pretraining shares a global batch out among the ranks is
:func:`flip.train.pretrain.rank_share` (below, its scheme); finetuning's is :mod:`flip.train.sharding`.

The same command runs on one CPU, one GPU or N GPUs/nodes: ``torchrun --nproc-per-node N -m
flip.cli pretrain ...`` (or ``finetune``). When ``WORLD_SIZE > 1`` the process group is initialised (NCCL on
CUDA, gloo on CPU or with ``run.device=cpu``), each rank uses ``cuda:LOCAL_RANK`` and the
model is wrapped in DDP (``find_unused_parameters`` only when an ablation leaves an encoder
unused). Every rank walks the same permutation; each global batch of ``batch_size`` rows is
cut into contiguous, balanced per-rank slices. So that N ranks compute what one process
would:

* masks are drawn on the GLOBAL batch from the shared generator (identical on every rank),
  then sliced; NCE noise too (each rank skips the draws that belong to the ranks before it,
  so all generators stay in step);
* each objective's local loss is rescaled by ``W * n_local / n_global`` (n = masked tokens
  for MLM, masked fields for MTM, rows for ICL), so that DDP's gradient average equals the
  gradient of the global-batch mean;
* ICL negatives are all-gathered across ranks by ``flip.align.objectives`` with an autograd
  all-gather (every rank's block carries its gradient), so with the scaling above the ICL
  gradient matches a single process too (the authors' code keeps only the local block's
  gradient; with the paper's dot-product similarity that partial gradient made ICL diverge on
  2 ranks, ``tests/train/test_ddp.py``);
* dropout draws differ per rank (each rank's RNG is offset after model initialisation).

Only rank 0 writes ``OUT``; rank ``r > 0`` runs the loop in ``OUT/.rank-r`` (its own
checkpoints, needed to resume; removed at the end). Logged losses are all-reduced global means.

Nothing happens at import; ``torch.distributed`` is imported when used.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

from flip.train.loop import resolve_device

__all__ = ["DistContext", "all_reduce_sum", "broadcast", "check_same_position", "init_distributed"]


@dataclass
class DistContext:
    """Where this process stands in a (possibly trivial) process group."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False  # this module initialised the group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """Contiguous balanced slice ``[lo, hi)`` of ``n`` rows for ``rank`` (default: this one)."""
        r = self.rank if rank is None else rank
        return (r * n) // self.world, ((r + 1) * n) // self.world


def init_distributed(device_name: str) -> tuple[DistContext, torch.device]:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, gloo on CPU).

    An already-initialised group (e.g. by a test) is used as it is. Returns the context and the
    device of this rank (``cuda:LOCAL_RANK`` on CUDA).
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if dist.is_available() and dist.is_initialized():
        ctx = DistContext(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0") or 0))
    elif world > 1:
        device = resolve_device(device_name)
        backend = "nccl" if device.type == "cuda" else "gloo"
        # generous timeout: rank 0 tokenizes the training split while the others wait at a barrier
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))
        ctx = DistContext(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0") or 0), True)
    else:
        return DistContext(), resolve_device(device_name)
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    return ctx, device


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast(obj: Any, ctx: DistContext) -> Any:
    if not ctx.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_same_position(ctx: DistContext, position: list[int], device: torch.device) -> None:
    """Every rank must stand at the same ``position`` (e.g. resumed from the same checkpoint)."""
    import torch.distributed as dist

    mine = torch.tensor(position, dtype=torch.long, device=device)
    every = [torch.zeros_like(mine) for _ in range(ctx.world)]
    dist.all_gather(every, mine)
    positions = [tuple(int(v) for v in t.tolist()) for t in every]
    if len(set(positions)) != 1:
        raise RuntimeError(
            f"ranks resumed from different checkpoints (batches, samples per rank: {positions}); "
            "delete OUT/checkpoint and OUT/.rank-*/checkpoint to start over")
