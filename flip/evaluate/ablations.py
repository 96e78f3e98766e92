"""The paper's Table 5 ablations as DVC experiments.

``queue`` stages one experiment per Table 5 row (``dvc exp run --queue -n <name> -S …``); ``make
ablations`` then runs them (``dvc exp run --run-all``: each in its own temporary copy of the
committed project, re-running pretraining and what depends on it) and calls ``collect``, which reads
``dvc exp show --json`` and writes ``reports/ablations.json`` for the report. An experiment is matched
to a Table 5 row by its params, not its name: ``dvc exp run -S pretrain.icl_weight=0`` run by hand is
the "w/o ICL" row too.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from flip.errors import FlipError
from flip.io import write_json

# Table 5 row -> the params.yaml values that make it (everything else as in the baseline commit)
TABLE5: dict[str, dict[str, Any]] = {
    "w/o MLM": {"pretrain.mlm_weight": 0.0},
    "w/o MTM": {"pretrain.mtm_weight": 0.0},
    "w/o ICL": {"pretrain.icl_weight": 0.0},
    "w/o MLM&MTM": {"pretrain.mlm_weight": 0.0, "pretrain.mtm_weight": 0.0},
    "w/o MLM&MTM&ICL": {"pretrain.mlm_weight": 0.0, "pretrain.mtm_weight": 0.0, "pretrain.icl_weight": 0.0},
    "w/o Field-level Masking": {"pretrain.field_level_masking": False},
    "w/o Joint Reconstruction": {"pretrain.joint_reconstruction": False},
}
METRICS = "reports/metrics.json"


def experiment_name(row: str) -> str:
    """A git-ref-safe experiment name: "w/o MLM&MTM" -> "wo-mlm-mtm"."""
    return "wo-" + row.removeprefix("w/o ").lower().replace("&", "-").replace(" ", "-")


def overrides(row: str) -> list[str]:
    """The ``-S`` overrides of one row, spelt as ``dvc exp run -S`` takes them."""
    return [f"{k}={json.dumps(v)}" for k, v in TABLE5[row].items()]


def _dvc(repo: Path, *args: str) -> str:
    from flip.environment import dvc_executable

    done = subprocess.run([dvc_executable(), *args], cwd=repo, capture_output=True, text=True)
    if done.returncode:
        raise FlipError(f"`dvc {' '.join(args)}` failed in {repo}: {(done.stderr or done.stdout).strip()[-800:]}")
    return done.stdout


COMMITTED = ("dvc.lock", METRICS)  # what an experiment is compared with: the baseline commit's


def check_committed(repo: Path) -> None:
    """Experiments start from the last commit and `dvc exp show` reads each one's metrics from git: the
    baseline run's dvc.lock and metrics must be committed, unchanged."""
    for name in COMMITTED:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", name], cwd=repo, capture_output=True)
        changed = subprocess.run(["git", "status", "--porcelain", "--", name], cwd=repo, capture_output=True,
                                 text=True).stdout.strip()
        if tracked.returncode or changed:
            raise FlipError(f"{Path(repo) / name} is {'changed since' if changed and not tracked.returncode else 'not in'} "
                            "the last commit: the ablations start from the committed run and are compared with its "
                            "metrics. Fix: run the pipeline (make run), then `git add dvc.lock reports/metrics.json "
                            "reports/plots && git commit -m 'baseline run'`, then queue them again")


def queue(repo: Path, rows: list[str] | None = None) -> list[str]:
    """Queue one DVC experiment per Table 5 row (all rows by default); returns their names."""
    unknown = [r for r in rows or [] if r not in TABLE5]
    if unknown:
        raise FlipError(f"unknown Table 5 row(s) {unknown}: the rows are {', '.join(TABLE5)}")
    check_committed(repo)
    names = []
    for row in rows or list(TABLE5):
        name = experiment_name(row)
        _dvc(repo, "exp", "run", "--queue", "-n", name, *[a for o in overrides(row) for a in ("-S", o)])
        names.append(name)
    return names


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same(a: Any, b: Any) -> bool:
    return a == b if isinstance(a, bool) or isinstance(b, bool) else (
        float(a) == float(b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else a == b)


def table5_row(params: dict[str, Any], baseline: dict[str, Any]) -> str | None:
    """The Table 5 row an experiment is: the params that differ from the baseline's are exactly that
    row's (None when they are something else)."""
    changed = {k: v for k, v in params.items() if k not in baseline or not _same(v, baseline[k])}
    for row, wanted in TABLE5.items():
        # a row whose values the baseline already has (e.g. an ablated baseline) is not distinguishable
        if (set(changed) == {k for k in wanted if not _same(baseline.get(k), wanted[k])}
                and all(_same(params.get(k), v) for k, v in wanted.items()) and changed):
            return row
    return None


def _entry(rev: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    data = rev.get("data") or {}
    params = _flat((data.get("params") or {}).get("params.yaml", {}).get("data") or {})
    metrics = (data.get("metrics") or {}).get(METRICS, {}).get("data") or {}
    return params, metrics


def collect(exp_show: list[dict[str, Any]]) -> dict[str, Any]:
    """The Table 5 rows among the experiments of ``dvc exp show --json`` (each baseline commit's
    experiments compared with that commit's own params), plus each baseline as the "FLIP" row."""
    rows: list[dict[str, Any]] = []
    for commit in exp_show:
        if commit.get("rev") == "workspace" or not commit.get("experiments"):
            continue
        base_params, base_metrics = _entry(commit)
        found = []
        for exp in commit["experiments"]:
            for rev in exp.get("revs", []):
                params, metrics = _entry(rev)
                row = table5_row(params, base_params)
                if row is None or "flip" not in metrics:
                    continue
                found.append({"row": row, "name": rev.get("name") or exp.get("name"), "rev": rev.get("rev"),
                              "settings": ", ".join(f"{k}={params.get(k)}" for k in TABLE5[row]),
                              "flip_auc": metrics["flip"].get("auc"), "flip_logloss": metrics["flip"].get("logloss"),
                              "flip_id_auc": metrics.get("flip_id", {}).get("auc")})
        if found and "flip" in base_metrics:
            rows.append({"row": "FLIP", "name": commit.get("name") or commit["rev"][:7], "rev": commit["rev"],
                         "settings": "baseline (this commit)", "flip_auc": base_metrics["flip"].get("auc"),
                         "flip_logloss": base_metrics["flip"].get("logloss"),
                         "flip_id_auc": base_metrics.get("flip_id", {}).get("auc")})
            order = list(TABLE5)
            rows.extend(sorted(found, key=lambda e: order.index(e["row"])))
    return {"source": "dvc exp show --json", "experiments": rows}


def collect_repo(repo: Path, out: Path) -> dict[str, Any]:
    """``dvc exp show --json`` in ``repo`` -> ``out`` (reports/ablations.json)."""
    result = collect(json.loads(_dvc(repo, "exp", "show", "--json")))
    write_json(out, result)
    return result
