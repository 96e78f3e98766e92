"""Training throughput of the ID-based CTR models: forward + backward + Adam step on random ids.

    python benchmarks/model_throughput.py                      # all nine (DCNv2 in both variants)
    python benchmarks/model_throughput.py --model dcnv2        # DCN-Mix and full-rank DCNv2
    python benchmarks/model_throughput.py --model deepfm --steps 100 --repeats 7

Reference point: FuxiCTR trains DCNv2 at ~21,000 samples/s on this 2-core machine (batch 1024, 8
fields); the target is >= 2x that. Each repeat times ``--steps`` steps after ``--warmup`` steps;
the reported throughput is the median over repeats (``best`` is the fastest repeat). The process
CPU time over wall time is recorded too: well below ``threads`` means other processes competed for
the cores and the numbers are not trustworthy (the result says so in ``contended``).

Results are printed and merged into ``benchmarks/results/model_throughput.json`` (one entry per
model variant, each with its own command line).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flip.config import IdModelConfig  # noqa: E402
from flip.models import MODELS, build_id_model  # noqa: E402
from flip.models import layers  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "model_throughput.json"


def variants(names: list[str]) -> list[tuple[str, IdModelConfig]]:
    """(label, config) for each model; DCNv2 in both cross-network variants."""
    out = []
    for name in names:
        if name == "dcnv2":
            out.append(("dcnv2", IdModelConfig(name="dcnv2", low_rank_mixture=True)))
            out.append(("dcnv2_fullrank", IdModelConfig(name="dcnv2", low_rank_mixture=False)))
        else:
            out.append((name, IdModelConfig(name=name)))
    return out


def make_optimizer(model: torch.nn.Module, impl: str, lr: float) -> torch.optim.Optimizer:
    if impl == "fused":
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    if impl == "foreach":
        return torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    return torch.optim.Adam(model.parameters(), lr=lr, foreach=False)


def random_batches(n: int, batch: int, fields: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` batches of global ids: field f draws from its own contiguous block of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    per_field = (vocab - 2) // fields
    local = torch.randint(0, per_field, (n, batch, fields), generator=g)
    x = 2 + per_field * torch.arange(fields) + local
    y = (torch.rand(n, batch, generator=g) < 0.3).float()
    return x, y


def bench(label: str, cfg: IdModelConfig, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = build_id_model(cfg, args.fields, args.vocab)
    model.train()
    opt = make_optimizer(model, args.optimizer, args.lr)
    xs, ys = random_batches(16, args.batch, args.fields, args.vocab, args.seed)

    def step(i: int) -> None:
        loss = F.binary_cross_entropy_with_logits(model(xs[i % 16]), ys[i % 16])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(args.warmup):
        step(i)
    rates, cpu_ratio = [], []
    for _ in range(args.repeats):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for i in range(args.steps):
            step(i)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        rates.append(args.steps * args.batch / wall)
        cpu_ratio.append(cpu / wall)
    median = statistics.median(rates)
    result = {
        "model": cfg.name,
        "variant": label,
        "samples_per_s": round(median),
        "best_samples_per_s": round(max(rates)),
        "repeat_samples_per_s": [round(r) for r in rates],
        "ms_per_step": round(1e3 * args.batch / median, 2),
        "params": sum(p.numel() for p in model.parameters()),
        "output_dim": model.output_dim,
        "cpu_time_over_wall": round(statistics.median(cpu_ratio), 2),
        "contended": statistics.median(cpu_ratio) < 0.8 * args.threads,
        "config": {k: v for k, v in vars(cfg).items()},
    }
    print(
        f"{label:16s} {result['samples_per_s']:>8,d} samples/s (best {result['best_samples_per_s']:,d})  "
        f"{result['ms_per_step']:6.2f} ms/step  {result['params']:>9,d} params  "
        f"cpu/wall {result['cpu_time_over_wall']:.2f}{'  CONTENDED' if result['contended'] else ''}",
        flush=True,
    )
    return result


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "os_cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS), action="append", help="repeatable; default: all")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--fields", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--optimizer", choices=["fused", "foreach", "for-loop"], default="fused")
    parser.add_argument(
        "--stock-dropout", action="store_true",
        help="use F.dropout everywhere (ablation of layers.Dropout's CPU mask); labels get '+stock_dropout'",
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=2012)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.stock_dropout:
        layers._SERIAL_CPU_BERNOULLI = False  # make layers.Dropout defer to F.dropout
    suffix = ("+stock_dropout" if args.stock_dropout else "") + ("" if args.optimizer == "fused" else f"+{args.optimizer}")
    info = machine()
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(["model_throughput.py", *argv])
    dropout_kernel = "layers.Dropout (float32-uniform mask)" if layers._serial_cpu_bernoulli() else "F.dropout"
    print(
        f"torch {info['torch']} ({info['torch_cpu_capability']}), {args.threads} threads, {info['cpu']} "
        f"x{info['os_cpu_count']}, batch {args.batch}, {args.fields} fields, vocab {args.vocab}, "
        f"Adam ({args.optimizer}), dropout via {dropout_kernel}",
        flush=True,
    )
    results = {}
    for label, cfg in variants(args.model or list(MODELS)):
        label += suffix
        entry = bench(label, cfg, args)
        entry.update(
            batch=args.batch, fields=args.fields, vocab=args.vocab, threads=args.threads,
            optimizer=f"Adam({args.optimizer})", dropout_kernel=dropout_kernel,
            steps=args.steps, repeats=args.repeats, warmup=args.warmup,
            torch=torch.__version__, machine=info, command=command,
            measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        results[label] = entry

    if not args.no_save:
        doc = {"models": {}}
        if args.output.exists():
            try:
                doc = json.loads(args.output.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                pass
        doc.setdefault("models", {}).update(results)
        doc.update(
            description="training samples/s (forward + backward + Adam step) on random ids; median over repeats",
            reference={"fuxictr_dcnv2_samples_per_s": 21_000, "target_samples_per_s": 42_000},
            last_command=command, torch=torch.__version__, machine=info,
        )
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, args.output)
        print(f"saved {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
