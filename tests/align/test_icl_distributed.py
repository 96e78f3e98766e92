"""ICL under torch.distributed (gloo, 2 CPU processes): negatives gathered from every rank."""

from __future__ import annotations

import pytest
import torch

from flip.align.objectives import info_nce

Z_TEXT = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.5, -1.0], [-1.0, 0.3]])
Z_TAB = torch.tensor([[1.0, 0.5], [1.0, 1.0], [0.0, 1.0], [0.2, -0.8], [-0.4, 0.9]])
SPLIT = [3, 2]  # rows per rank: unequal on purpose (padding path)


def _worker(rank: int, world: int, init_file: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    lo = sum(SPLIT[:rank])
    zt = Z_TEXT[lo:lo + SPLIT[rank]].clone().requires_grad_(True)
    zv = Z_TAB[lo:lo + SPLIT[rank]].clone().requires_grad_(True)
    out = info_nce(zt, zv, 0.7, "dot")
    out["loss"].backward()
    queue.put((rank, out["loss"].item(), zt.grad is not None and zv.grad is not None))
    dist.barrier()
    dist.destroy_process_group()
    # leave without the interpreter's teardown: under load, gloo's threads being destroyed at exit
    # aborted a worker ("terminate called without an active exception") after its work was done
    queue.close()
    queue.join_thread()
    import os

    os._exit(0)


@pytest.mark.slow
def test_gathered_negatives_match_full_batch(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, str(tmp_path / "init"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (loss, has_grad)) for r, loss, has_grad in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # each rank averages its own rows over ALL columns: the row-weighted mean is the full-batch loss
    full = info_nce(Z_TEXT, Z_TAB, 0.7, "dot")["loss"].item()
    weighted = sum(results[r][0] * SPLIT[r] for r in range(2)) / sum(SPLIT)
    assert weighted == pytest.approx(full, abs=1e-6)
    assert all(results[r][1] for r in range(2))
    local_only = info_nce(Z_TEXT[:3], Z_TAB[:3], 0.7, "dot")["loss"].item()  # what rank 0 gets without gathering
    assert abs(results[0][0] - local_only) > 1e-3
