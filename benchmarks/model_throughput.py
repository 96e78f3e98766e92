"""Training throughput of the ID-based CTR models: forward + backward + Adam step on random ids.

    python benchmarks/model_throughput.py                        # all nine (DCNv2 in both variants)
    python benchmarks/model_throughput.py --model dcnv2          # DCN-Mix and full-rank DCNv2
    python benchmarks/model_throughput.py --model dcnv2 --baseline --repeats 9

Reference point: FuxiCTR trains DCNv2 at ~21,000 samples/s on this 2-core machine (batch 1024, 8
fields); the target is >= 2x that.

Method. Every case (model variant x training setup) is built first; then each repeat runs every
case in turn (a few untimed steps, then ``--steps`` timed steps), so that all cases see the same
machine conditions: on a shared VM the speed drifts by 20% or more within minutes, and numbers
from separate runs are not comparable. The reported throughput is the median over repeats
(``best`` = fastest repeat). Process CPU time over wall time is recorded too; well below
``threads`` means other processes took the cores (``contended``), though a loaded host can also
slow a run that shows full CPU use.

``--baseline`` adds, for every model, the same model trained the stock way (``F.dropout``, Adam
with ``foreach=True``), labelled ``<name>+stock``: the difference is what ``layers.Dropout`` and
the fused Adam step buy.

``--fuxictr SRC`` adds FuxiCTR's own DCNv2 (both cross networks) as reference cases, labelled
``fuxictr_dcnv2`` / ``fuxictr_dcnv2_fullrank``. ``SRC`` is an unpacked FuxiCTR 2.x source tree (e.g.
``pip download fuxictr --no-deps`` then unzip the wheel); only its ``cross_net.py``,
``mlp_block.py`` and ``torch_utils.py`` are loaded (its package ``__init__`` needs polars etc.).
The reference step is FuxiCTR's ``train_step`` for DCNv2 minus its data loader: one
``nn.Embedding`` per field, sigmoid + ``BCELoss``, the embedding L2 regulariser,
``clip_grad_norm_(10)`` and ``torch.optim.Adam`` with its defaults.

Results are printed and merged into ``benchmarks/results/model_throughput.json`` (one entry per
case, each with its command line).
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flip.config import IdModelConfig  # noqa: E402
from flip.models import MODELS, build_id_model, layers  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "model_throughput.json"


@dataclass
class Case:
    label: str
    cfg: IdModelConfig
    optimizer: str  # fused | foreach | for-loop | "torch default" (FuxiCTR reference)
    stock_dropout: bool
    step: Callable[[int], None] | None = None
    params: int = 0
    output_dim: int = 0
    reference: str = ""  # non-empty for the FuxiCTR reference cases


def model_configs(names: list[str]) -> list[tuple[str, IdModelConfig]]:
    """(label, config) per model; DCNv2 in both cross-network variants."""
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
    return torch.optim.Adam(model.parameters(), lr=lr, foreach=impl == "foreach")


def random_batches(n: int, batch: int, fields: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` batches of global ids: field f draws from its own contiguous block of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    per_field = (vocab - 2) // fields
    local = torch.randint(0, per_field, (n, batch, fields), generator=g)
    x = 2 + per_field * torch.arange(fields) + local
    y = (torch.rand(n, batch, generator=g) < 0.3).float()
    return x, y


def prepare(case: Case, xs: torch.Tensor, ys: torch.Tensor, args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    model = build_id_model(case.cfg, args.fields, args.vocab).train()
    opt = make_optimizer(model, case.optimizer, args.lr)

    def step(i: int) -> None:
        loss = F.binary_cross_entropy_with_logits(model(xs[i % len(xs)]), ys[i % len(ys)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    case.step = step
    case.params = sum(p.numel() for p in model.parameters())
    case.output_dim = model.output_dim


def time_case(case: Case, steps: int, untimed: int) -> tuple[float, float]:
    """Run ``untimed`` then ``steps`` timed steps; return (wall seconds, process CPU seconds)."""
    fast = layers._serial_cpu_bernoulli()
    if case.stock_dropout:
        layers._SERIAL_CPU_BERNOULLI = False  # layers.Dropout defers to F.dropout
    try:
        for i in range(untimed):
            case.step(i)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for i in range(steps):
            case.step(i)
        return time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        layers._SERIAL_CPU_BERNOULLI = fast


def fuxictr_cases(src: Path, xs: torch.Tensor, ys: torch.Tensor, args: argparse.Namespace) -> list[Case]:
    """FuxiCTR's DCNv2 (parallel; DCN-Mix and full-rank) built from its own layer files."""
    import importlib.util
    import types

    from torch import nn

    root = src / "fuxictr" / "pytorch" if (src / "fuxictr").is_dir() else src / "pytorch"

    def load(name: str, path: Path) -> types.ModuleType:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    for name in ("fuxictr", "fuxictr.pytorch"):  # bare namespaces: skip the package __init__ files
        sys.modules.setdefault(name, types.ModuleType(name))
    load("fuxictr.pytorch.torch_utils", root / "torch_utils.py")
    cross = load("fuxictr_ref_cross_net", root / "layers" / "interactions" / "cross_net.py")
    blocks = load("fuxictr_ref_mlp_block", root / "layers" / "blocks" / "mlp_block.py")
    version = (root.parent / "version.py").read_text(encoding="utf-8").split("=")[-1].strip().strip("\"'")

    fields, d = args.fields, 32
    per_field = (args.vocab - 2) // fields
    local = xs - 2 - per_field * torch.arange(fields) + 1  # per-field ids 1..per_field (0 = padding)

    class FuxiDCNv2(nn.Module):  # FuxiCTR model_zoo/DCNv2, model_structure="parallel"
        def __init__(self, mix: bool) -> None:
            super().__init__()
            self.embedding = nn.ModuleDict(
                {f"f{i}": nn.Embedding(per_field + 1, d, padding_idx=0) for i in range(fields)}
            )
            D = fields * d
            self.crossnet = cross.CrossNetMix(D, 2, 32, 4) if mix else cross.CrossNetV2(D, 2)
            self.parallel_dnn = blocks.MLP_Block(
                input_dim=D, output_dim=None, hidden_units=[300, 300, 128], hidden_activations="ReLU",
                output_activation=None, dropout_rates=0.1, batch_norm=False,
            )
            self.fc = nn.Linear(D + 128, 1)
            for m in self.modules():  # BaseModel.reset_parameters / init_weights
                if type(m) in (nn.Linear, nn.Conv1d):
                    nn.init.xavier_normal_(m.weight)
                    if m.bias is not None:
                        m.bias.data.fill_(0)
            for emb in self.embedding.values():
                nn.init.normal_(emb.weight, std=1e-4)
                emb.weight.data[0] = 0

        def forward(self, X: dict[str, torch.Tensor]) -> torch.Tensor:
            feature_emb = torch.cat([self.embedding[k](v) for k, v in X.items()], dim=-1)  # flatten_emb
            out = torch.cat([self.crossnet(feature_emb), self.parallel_dnn(feature_emb)], dim=-1)
            return torch.sigmoid(self.fc(out))

    cases = []
    for label, mix in (("fuxictr_dcnv2", True), ("fuxictr_dcnv2_fullrank", False)):
        torch.manual_seed(args.seed)
        model = FuxiDCNv2(mix).train()
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)  # FuxiCTR: get_optimizer("adam") defaults

        def step(i: int, model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad()
            X = {f"f{k}": local[i % len(local), :, k] for k in range(fields)}
            loss = F.binary_cross_entropy(model(X).squeeze(-1), ys[i % len(ys)])
            reg = sum(0.5e-5 * torch.norm(p, 2) ** 2 for p in model.embedding.parameters())  # emb L2 1e-5
            (loss + reg).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 10)
            opt.step()

        cfg = IdModelConfig(name="dcnv2", low_rank_mixture=mix)
        cases.append(Case(label, cfg, "torch default", stock_dropout=True, step=step,
                          params=sum(p.numel() for p in model.parameters()), output_dim=fields * d + 128,
                          reference=f"FuxiCTR {version} layers from {src}"))
    return cases


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
    parser.add_argument("--steps", type=int, default=30, help="timed steps per case per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per case before each repeat")
    parser.add_argument("--optimizer", choices=["fused", "foreach", "for-loop"], default="fused")
    parser.add_argument("--baseline", action="store_true", help="also time each model with F.dropout + foreach Adam")
    parser.add_argument("--fuxictr", type=Path, metavar="SRC", help="unpacked FuxiCTR source: add its DCNv2 as reference")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=2012)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    info = machine()
    command = shlex.join(["python", "benchmarks/model_throughput.py", *(sys.argv[1:] if argv is None else argv)])
    dropout_kernel = "layers.Dropout (float32-uniform mask)" if layers._serial_cpu_bernoulli() else "F.dropout"
    print(
        f"torch {info['torch']} ({info['torch_cpu_capability']}), {args.threads} threads, {info['cpu']} "
        f"x{info['os_cpu_count']}, batch {args.batch}, {args.fields} fields, vocab {args.vocab}; "
        f"Adam({args.optimizer}), dropout via {dropout_kernel}",
        flush=True,
    )
    suffix = "" if args.optimizer == "fused" else f"+{args.optimizer}"
    cases = []
    for label, cfg in model_configs(args.model or list(MODELS)):
        cases.append(Case(label + suffix, cfg, args.optimizer, stock_dropout=False))
        if args.baseline:
            cases.append(Case(label + "+stock", cfg, "foreach", stock_dropout=True))
    xs, ys = random_batches(16, args.batch, args.fields, args.vocab, args.seed)
    for case in cases:
        prepare(case, xs, ys, args)
    if args.fuxictr:
        cases = fuxictr_cases(args.fuxictr, xs, ys, args) + cases

    walls = {c.label: [] for c in cases}
    cpus = {c.label: [] for c in cases}
    for r in range(args.repeats):
        for case in cases:
            wall, cpu = time_case(case, args.steps, args.warmup)
            walls[case.label].append(wall)
            cpus[case.label].append(cpu)
        print(f"repeat {r + 1}/{args.repeats}: " + "  ".join(
            f"{c.label} {args.steps * args.batch / walls[c.label][-1] / 1e3:.1f}k" for c in cases), flush=True)

    results = {}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(f"\n{'case':24s} {'samples/s':>10s} {'best':>9s} {'ms/step':>8s} {'params':>10s}  cpu/wall")
    for case in cases:
        rates = [args.steps * args.batch / w for w in walls[case.label]]
        ratio = statistics.median(c / w for c, w in zip(cpus[case.label], walls[case.label]))
        median = statistics.median(rates)
        entry = {
            "model": case.cfg.name,
            "samples_per_s": round(median),
            "best_samples_per_s": round(max(rates)),
            "repeat_samples_per_s": [round(x) for x in rates],
            "ms_per_step": round(1e3 * args.batch / median, 2),
            "params": case.params,
            "output_dim": case.output_dim,
            "cpu_time_over_wall": round(ratio, 2),
            "contended": ratio < 0.8 * args.threads,
            "optimizer": f"Adam({case.optimizer})",
            **({"reference": case.reference} if case.reference else {}),
            "dropout_kernel": "F.dropout" if case.stock_dropout else dropout_kernel,
            "batch": args.batch, "fields": args.fields, "vocab": args.vocab, "threads": args.threads,
            "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
            "config": dict(vars(case.cfg)),
            "torch": torch.__version__, "machine": info, "command": command, "measured_at": now,
        }
        results[case.label] = entry
        print(
            f"{case.label:24s} {median:>10,.0f} {max(rates):>9,.0f} {entry['ms_per_step']:>8.2f} "
            f"{case.params:>10,d}  {ratio:.2f}{'  CONTENDED' if entry['contended'] else ''}"
        )

    for ours, ref in (("dcnv2", "fuxictr_dcnv2"), ("dcnv2_fullrank", "fuxictr_dcnv2_fullrank")):
        if ours + suffix in walls and ref in walls:  # same repeat = same machine conditions
            ratios = [w_ref / w_ours for w_ours, w_ref in zip(walls[ours + suffix], walls[ref])]
            results[ours + suffix]["speedup_vs_fuxictr"] = round(statistics.median(ratios), 2)
            results[ours + suffix]["speedup_vs_fuxictr_per_repeat"] = [round(r, 2) for r in ratios]
            print(f"{ours + suffix} vs {ref}: {statistics.median(ratios):.2f}x (median of per-repeat ratios)")

    if not args.no_save:
        doc: dict = {"models": {}}
        if args.output.exists():
            try:
                doc = json.loads(args.output.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                pass
        doc.setdefault("models", {}).update(results)
        doc.update(
            description="training samples/s (forward + backward + Adam step) on random ids; median over "
            "repeats, cases interleaved within a run",
            reference={"fuxictr_dcnv2_samples_per_s": 21_000, "target_samples_per_s": 42_000},
            last_command=command, torch=torch.__version__, machine=info,
        )
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, args.output)
        print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
