"""Distributed pretraining: where a process stands in a (possibly trivial) torchrun process group, the
few collectives pretraining needs, and how a global batch is shared out among the ranks.

The same command runs on one CPU, one GPU or N GPUs/nodes: ``torchrun --nproc-per-node N -m
flip.cli pretrain ...``. When ``WORLD_SIZE > 1`` the process group is initialised (NCCL on
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

from flip.align.masking import IGNORE_INDEX
from flip.train.loop import resolve_device

__all__ = ["DistContext", "all_reduce_sum", "broadcast", "check_same_position", "init_distributed", "rank_share"]


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


def rank_share(model: Any, batch: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], ctx: DistContext):
    """This rank's contiguous slice of a global batch and of its masks (``model.mask`` on the global
    batch), trimmed to the slice's longest text; the scale of each objective's local loss
    (``W * n_local / n_global``); and the NCE noise draws of the ranks before and after this one,
    which the rank skips so that every rank's generator stays in step. Returns
    ``(local, local_masks, scales, skip_before, skip_after)``."""
    B, W = int(batch["x"].shape[0]), ctx.world
    lo, hi = ctx.bounds(B)
    empty = hi == lo
    if empty:  # fewer rows than ranks (a tiny last batch): a stand-in row, nothing masked, weight 0
        lo, hi = max(0, lo - 1), max(1, lo)
    local = {k: v[lo:hi] for k, v in batch.items()}
    local_masks = {k: v[lo:hi] for k, v in masks.items()}
    if empty:
        local_masks = _nothing_masked(local, local_masks)
    width = int(local["attention_mask"].sum(dim=1).max())
    for k in ("input_ids", "attention_mask"):
        local[k] = local[k][:, :width]
    for k in ("masked_ids", "mlm_labels"):
        if k in local_masks:
            local_masks[k] = local_masks[k][:, :width]
    scales = _rank_scales(batch, masks, local_masks, B, hi - lo, W, empty)
    skip_before = skip_after = 0
    if model.mtm is not None and model.mtm.loss_type == "nce":
        per_rank = [int(masks["tab_fields"][a:b].sum()) for a, b in (ctx.bounds(B, r) for r in range(W))]
        K = model.mtm.num_negatives
        skip_before = sum(per_rank[:ctx.rank]) * K
        skip_after = sum(per_rank[ctx.rank + 1:]) * K
    return local, local_masks, scales, skip_before, skip_after


def _rank_scales(batch, masks, local_masks, B, rows, W, empty) -> dict[str, torch.Tensor]:
    """``W * n_local / n_global`` per objective (0 for a padding-only rank)."""
    scales: dict[str, torch.Tensor] = {}
    dev = batch["x"].device

    def ratio(local: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        if empty:
            return torch.zeros((), device=dev)
        return W * local.float() / total.float().clamp_min(1.0)

    if "mlm_labels" in masks:
        scales["mlm"] = ratio((local_masks["mlm_labels"] != IGNORE_INDEX).sum(), (masks["mlm_labels"] != IGNORE_INDEX).sum())
    if "tab_fields" in masks:
        scales["mtm"] = ratio(local_masks["tab_fields"].sum(), masks["tab_fields"].sum())
    scales["icl"] = ratio(torch.tensor(rows, device=dev), torch.tensor(B, device=dev))
    return scales


def _nothing_masked(batch: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``masks`` of the rows of ``batch`` with nothing masked (a stand-in row that must not count)."""
    out = dict(masks)
    for key in ("text_fields", "tab_fields"):
        if key in out:
            out[key] = torch.zeros_like(out[key])
    if "masked_ids" in out:
        out["masked_ids"] = batch["input_ids"].clone()
        out["mlm_labels"] = torch.full_like(out["mlm_labels"], IGNORE_INDEX)
    if "x_masked" in out:
        out["x_masked"] = batch["x"].clone()
    return out


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
