"""``flip finetune`` under PyTorch's own ``torchrun``: two "nodes" on localhost (c10d rendezvous on a free
port, gloo) train a tiny scratch DCNv2 and end with the weights of one process at the same global batch.

Each rank reads only its rows of the training split (``flip.train.sharding``); the unit tests check
that the shards of the ranks partition every global batch exactly as one process's batch, and the
torchrun test that the two ranks' weights are one and the same (``run.json``'s ``rank_weights``, the
SHA-256 of each rank's parameters) and equal a single-process run's within float rounding.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from helpers import ROOT, preset_tree

TREE = {
    "id_model": {"name": "dcnv2", "embedding_dim": 8, "dnn_hidden_units": [32, 16], "low_rank": 4,
                 "num_experts": 2, "dropout": 0.0},  # dropout draws per rank: off, to compare weights
    # 2,501 rows in batches of 250: the last batch has one row, so one rank takes a weight-0 stand-in
    "finetune": {"strategy": "scratch", "epochs": 2, "batch_size": 250, "lr": 3e-3, "patience": 0,
                 "eval_batch_size": 512, "l2_embedding": 1e-4, "precision": "fp32", "train_rows": 2501,
                 "eval_rows": 400},
    "run": {"seeds": [7], "device": "cpu", "threads": 1, "progress": False},
}


@pytest.fixture(scope="module")
def grouped_data(tiny_dataset, tmp_path_factory) -> Path:
    """The tiny dataset with ``train.parquet`` in row groups of 400 rows (a rank skips whole groups)."""
    d = tmp_path_factory.mktemp("grouped") / "tiny"
    shutil.copytree(tiny_dataset, d)
    pq.write_table(pq.read_table(d / "train.parquet"), d / "train.parquet", row_group_size=400)
    assert pq.ParquetFile(d / "train.parquet").metadata.num_row_groups == 8
    return d


def test_read_rows_reads_those_rows(grouped_data):
    from flip.data.tensors import load_tabular, read_rows

    whole = load_tabular(grouped_data, "train")
    pos = np.array([0, 5, 399, 400, 1234, 2999])
    part = read_rows(grouped_data, "train", pos)
    assert torch.equal(part.x, whole.x[pos]) and torch.equal(part.y, whole.y[pos])
    assert len(read_rows(grouped_data, "train", np.array([], dtype=np.int64))) == 0
    with pytest.raises(IndexError):
        read_rows(grouped_data, "train", np.array([3000]))


@pytest.mark.parametrize("world", [2, 3])
def test_the_shards_make_up_each_global_batch(grouped_data, world):
    """Rank r holds about 1/W of the epoch's rows, the ranks' rows are disjoint, and the ranks' slices of
    every global batch, in rank order, are that batch of one process (ids and labels)."""
    from flip.data.tensors import load_tabular
    from flip.train.distributed import DistContext
    from flip.train.sharding import TrainShard

    start, n, bs = 499, 2501, 250
    whole = load_tabular(grouped_data, "train")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    shards = [TrainShard(grouped_data, start, n, DistContext(world, r), torch.device("cpu")) for r in range(world)]
    for shard in shards:
        shard.start_epoch(perm, bs)
    held = [set(s.ids.tolist()) for s in shards]
    assert sum(len(h) for h in held) <= n + world - 1  # the last batch (1 row) gives W - 1 stand-ins
    assert set().union(*held) == set(range(n))
    assert all(len(h) <= n // world + n // bs + 2 for h in held)
    for k in range(0, n, bs):
        idx = perm[k:k + bs]
        parts = [s.batch(idx) for s in shards]
        x = torch.cat([p[0] for p in parts if not p[2]])
        y = torch.cat([p[1] for p in parts if not p[2]])
        assert torch.equal(x, whole.x[start + idx]) and torch.equal(y, whole.y[start + idx])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parameter_digest(weights: dict[str, torch.Tensor], names: list[str]) -> str:
    """As ``flip.train.loop``'s ``rank_weights``: SHA-256 over the parameters by name."""
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode())
        h.update(weights[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow  # ~30 s: four torch processes start
def test_two_nodes_train_the_weights_of_one_process(grouped_data, tmp_path):
    from safetensors.torch import load_file

    from flip.config import config_from_dict
    from flip.models import build_id_model
    from flip.train.finetune import finetune

    tree = preset_tree("pinned", TREE)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tree), encoding="utf-8")
    torchrun = Path(sys.executable).parent / "torchrun"
    assert torchrun.exists(), f"no torchrun next to {sys.executable}"
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    nodes, logs = [], []
    for node in (0, 1):
        logs.append((tmp_path / f"node{node}.log").open("wb"))
        nodes.append(subprocess.Popen(
            [str(torchrun), "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "flip-test",
             "--max-restarts", "0", "-m", "flip.cli", "finetune", "--params", str(params),
             "--data", str(grouped_data), "--out", str(tmp_path / f"out{node}")],
            cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True))
    t0 = time.monotonic()
    single = finetune(config_from_dict(tree), grouped_data, tmp_path / "single")  # meanwhile, in this process
    try:
        codes = [p.wait(timeout=max(10.0, 150 - (time.monotonic() - t0))) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, 9)
        for fh in logs:
            fh.close()
    out = "".join(f"\n--- node{i}.log ---\n" + (tmp_path / f"node{i}.log").read_text(errors="replace")[-4000:]
                  for i in (0, 1))
    assert codes == [0, 0], out

    # rank 0 wrote its node's OUT; the other rank's work folder is gone
    written = [tmp_path / f"out{i}" for i in (0, 1) if (tmp_path / f"out{i}" / "metrics.json").exists()]
    assert len(written) == 1, out
    run = written[0]
    assert not list(tmp_path.glob("out*/.rank-*")), out
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2
    weights = load_file(run / "model.safetensors")
    meta = json.loads((grouped_data / "meta.json").read_text())
    model = build_id_model(config_from_dict(tree).id_model, len(meta["fields"]), meta["vocab_size"])
    names = [n for n, _ in model.named_parameters()]
    assert set(names) <= set(weights)
    # both ranks ended with exactly these parameters (each rank hashed its own)
    assert info["rank_weights"] == [_parameter_digest(weights, names)] * 2

    # ... which are one process's at the same global batch, up to float rounding
    reference = load_file(tmp_path / "single" / "model.safetensors")
    assert weights.keys() == reference.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], reference[name], atol=2e-5, rtol=1e-4, msg=name)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == single["train"]["steps"] == 22
    assert metrics["train"]["loss"] == pytest.approx(single["train"]["loss"], rel=1e-5)  # all ranks' rows
    assert metrics["test"]["auc"] == pytest.approx(single["test"]["auc"], abs=1e-5)
