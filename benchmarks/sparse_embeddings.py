"""Dense vs row-sparse embedding updates (``id_model.embedding_updates``): the DCNv2 training step.

    python benchmarks/sparse_embeddings.py --idle yes                      # the full run (idle machine)
    python benchmarks/sparse_embeddings.py --vocab 12000 300000 --repeats 3 --steps 5 --idle no   # a quick check

One step is what ``flip finetune`` (strategy ``scratch``) runs: ``build_scratch`` (the default DCNv2,
d = 32, ``finetune`` defaults: Adam lr 1e-3, lookup-L2 1e-4) and ``TabularTask.loss`` on a batch of
``finetune.batch_size`` rows, then backward, ``optimizer.step()`` and ``zero_grad``. The batch is 8
fields like MovieLens-1M (user, gender, age, occupation, zip code, movie, title, genres): the ids
are synthetic, drawn per field from a Zipf law (exponent ``--zipf``) over the field's values, hot
values scattered over the table; the vocabulary (``--vocab``, rows) is split 60/40 between the user
and movie fields after the small fields take their MovieLens sizes. No dataset is read.

Method (A/B interleaved): every case (vocabulary x dense/sparse) is built first; each repeat runs
every case in turn (``--warmup`` untimed steps, then ``--steps`` timed ones) so that all see the same
machine conditions; the result per case is the median over repeats of the mean ms/step, and
samples/s from it. ``speedup`` = dense ms / sparse ms per vocabulary (target: >= 5 at 3M ids, >= 1
at 12k). ``--device cuda`` runs the same on a GPU. Process CPU time over wall time is recorded per
case (``cpu_ratio``); the ``--idle`` flag says whether the machine was otherwise idle.

Resumable: after every repeat the samples so far are written to the results file
(``benchmarks/results/sparse_embeddings.json``, ``complete: false``); the same command run again goes
on from there (other settings start over).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, command, machine, save  # noqa: E402
from flip.config import Config  # noqa: E402
from flip.data.tensors import TabularSplit  # noqa: E402
from flip.train.builders import build_scratch  # noqa: E402
from flip.train.sparse_updates import SplitOptimizer  # noqa: E402
from flip.train.tasks import CtrData  # noqa: E402

NAME = "sparse_embeddings"
# MovieLens-1M's small fields (values incl. the OOV id): gender, age, occupation, zip code, title, genres
SMALL_FIELDS = {"gender": 3, "age": 8, "occupation": 22, "zipcode": 3440, "title": 3707, "genres": 302}
FIELD_ORDER = ("user_id", "gender", "age", "occupation", "zipcode", "movie_id", "title", "genres")


def field_sizes(vocab: int) -> dict[str, int]:
    """Rows per field for a vocabulary of ``vocab`` rows (2 reserved: padding, [MASK])."""
    rest = vocab - 2 - sum(SMALL_FIELDS.values())
    if rest < 20:
        raise SystemExit(f"--vocab {vocab} is too small: at least {2 + sum(SMALL_FIELDS.values()) + 20}")
    user = int(rest * 0.6)
    return {"user_id": user, "movie_id": rest - user, **SMALL_FIELDS}


def synthetic_data(vocab: int, rows: int, zipf: float, seed: int) -> CtrData:
    """``rows`` training rows of Zipf-distributed ids per field, as a :class:`CtrData` (no valid/test)."""
    rng = np.random.default_rng(seed)
    sizes = field_sizes(vocab)
    fields, cols, offset = [], [], 2
    for name in FIELD_ORDER:
        size = sizes[name]
        p = 1.0 / np.arange(1, size + 1, dtype=np.float64) ** zipf
        cdf = np.cumsum(p / p.sum())
        ranks = np.minimum(np.searchsorted(cdf, rng.random(rows)), size - 1)
        cols.append(offset + rng.permutation(size)[ranks])  # hot values scattered over the field's rows
        fields.append({"name": name, "offset": offset, "size": size, "oov_id": offset})
        offset += size
    assert offset == vocab
    x = torch.from_numpy(np.stack(cols, axis=1).astype(np.int64))
    y = torch.from_numpy((rng.random(rows) < 0.5).astype(np.float32))
    meta = {"fields": fields, "vocab_size": vocab}
    return CtrData(dataset_dir=Path("."), meta=meta, splits={"train": TabularSplit(x, y)})


class Case:
    def __init__(self, vocab: int, mode: str, data: CtrData, batch: int, seed: int, device: torch.device) -> None:
        self.vocab, self.mode, self.label = vocab, mode, f"{mode}@{vocab}"
        cfg = Config()
        cfg.id_model.embedding_updates = mode
        cfg.finetune.precision = "fp32"
        torch.manual_seed(seed)
        self.task = build_scratch(cfg, data, device)
        self.device = device
        assert isinstance(self.task.optimizer, SplitOptimizer) == (mode == "sparse")
        self.task.model.train()
        self.batch = batch
        self.gen = torch.Generator().manual_seed(seed)
        self.samples: list[float] = []  # ms/step per repeat
        self.cpu: list[float] = []

    def step(self) -> None:
        task = self.task
        idx = torch.randint(0, task.n_train, (self.batch,), generator=self.gen).to(self.device)
        task.loss(idx).backward()
        task.optimizer.step()
        task.optimizer.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, warmup: int, steps: int) -> None:
        for _ in range(warmup):
            self.step()
        self.sync()
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        wall = time.perf_counter() - t0
        self.samples.append(1000.0 * wall / steps)
        self.cpu.append((time.process_time() - c0) / max(wall, 1e-9))


def summary(cases: list[Case], args: argparse.Namespace, complete: bool) -> dict:
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None
    out: dict = {"settings": settings(args), "idle": args.idle, "gpu": gpu, "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "load_average": list(os.getloadavg()), "complete": complete,
                 "cases": {}, "speedup": {}}
    for c in cases:
        if not c.samples:
            continue
        ms = statistics.median(c.samples)
        out["cases"][c.label] = {"vocab": c.vocab, "updates": c.mode, "median_ms_per_step": ms,
                                 "samples_per_second": args.batch_size * 1000.0 / ms, "repeats": len(c.samples),
                                 "ms_per_step": c.samples, "cpu_ratio": statistics.median(c.cpu)}
    for vocab in args.vocab:
        dense, sparse = out["cases"].get(f"dense@{vocab}"), out["cases"].get(f"sparse@{vocab}")
        if dense and sparse:
            out["speedup"][str(vocab)] = dense["median_ms_per_step"] / sparse["median_ms_per_step"]
    return out


def settings(args: argparse.Namespace) -> dict:
    keys = ("vocab", "batch_size", "steps", "warmup", "repeats", "zipf", "rows", "seed", "device")
    return {k: getattr(args, k) for k in keys}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[12_000, 3_000_000], help="vocabulary sizes (rows)")
    ap.add_argument("--batch-size", type=int, default=Config().finetune.batch_size)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per case and repeat")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before each timing")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of the ids of each field")
    ap.add_argument("--rows", type=int, default=200_000, help="synthetic training rows batches are drawn from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--idle", choices=("yes", "no"), required=True, help="was the machine otherwise idle (recorded)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory of the results file")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    cases = []
    for vocab in args.vocab:
        data = synthetic_data(vocab, args.rows, args.zipf, args.seed)
        data.splits["train"] = data.train.to(device)
        cases += [Case(vocab, mode, data, args.batch_size, args.seed, device) for mode in ("dense", "sparse")]

    path = args.out / f"{NAME}.json"
    if path.exists():  # resume the samples of an unfinished run of the same settings
        old = json.loads(path.read_text())
        if not old.get("complete") and old.get("settings") == settings(args):
            for c in cases:
                prev = old["cases"].get(c.label)
                if prev:
                    c.samples, c.cpu = list(prev["ms_per_step"]), [prev["cpu_ratio"]] * len(prev["ms_per_step"])
            print(f"resuming {path}: {min(len(c.samples) for c in cases)} repeats done", flush=True)

    while min(len(c.samples) for c in cases) < args.repeats:
        for c in cases:  # interleaved: every case once per repeat
            if len(c.samples) < args.repeats:
                c.run(args.warmup, args.steps)
        r = min(len(c.samples) for c in cases)
        print(f"repeat {r}/{args.repeats}: " + ", ".join(f"{c.label} {c.samples[-1]:.1f} ms" for c in cases), flush=True)
        save(NAME, summary(cases, args, complete=False), args.out, echo=False)
    result = summary(cases, args, complete=True)
    save(NAME, result, args.out)
    print(f"command: {command()}  machine: {machine()['cpu']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
