"""The ``report`` stage: one HTML page (``reports/index.html``) and a Markdown summary.

It puts every strategy's AUC and logloss beside the paper's Table 2, the ID baselines and the
ablation runs when they exist, calibration and cold-start plots, pretraining loss curves, the drift
summary with links to the Evidently and Great Expectations pages, and the alignment figures.
Everything it shows is read from files the other stages wrote; nothing is computed twice.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

from flip.evaluate.paper import STRATEGY_ROW, TABLE2, TABLE5_ML1M
from flip.errors import FlipError
from flip.io import atomic_file
from flip.strategies import PLM_ONLY


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(x: Any, digits: int = 4) -> str:
    return "–" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def _figures(ev: dict[str, Any], pretrain_log: list[dict[str, Any]], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}

    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    for name, s in ev["strategies"].items():
        bins = [b for b in s.get("reliability", []) if b["count"]]
        if bins:
            ax.plot([b["mean_pred"] for b in bins], [b["frac_pos"] for b in bins], marker="o", label=name)
    ax.set(xlabel="mean predicted click probability", ylabel="observed click rate", title="Reliability (test)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)
    made["reliability"] = "figures/reliability.png"

    for key in ("user", "item"):
        field = ev.get(f"{key}_field")
        series = {n: s["cold_start"].get(field) for n, s in ev["strategies"].items() if field in s.get("cold_start", {})}
        if not series:
            continue
        buckets = [b["bucket"] for b in next(iter(series.values()))]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        width = 0.8 / len(series)
        for i, (name, rows) in enumerate(series.items()):
            ax.bar([j + i * width for j in range(len(buckets))], [r["auc"] or 0 for r in rows], width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(buckets))], buckets)
        ax.set(ylim=(0.5, 1.0), xlabel=f"{key} interactions in training", ylabel="test AUC",
               title=f"AUC by {key} frequency (cold start)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"coldstart_{key}.png", dpi=110)
        plt.close(fig)
        made[f"coldstart_{key}"] = f"figures/coldstart_{key}.png"

    steps = [r for r in pretrain_log if r.get("event") == "step"]
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for key in ("mlm", "mtm", "icl", "loss"):
            pts = [(r["step"], r[key]) for r in steps if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=key)
        ax.set(xlabel="step", ylabel="loss", title="Pretraining losses")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "pretrain_losses.png", dpi=110)
        plt.close(fig)
        made["pretrain_losses"] = "figures/pretrain_losses.png"
    return made


def _table(header: list[str], rows: list[list[Any]]) -> tuple[str, str]:
    """The same table as HTML and as Markdown."""
    h = "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows) + "</table>"
    md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" + "".join(
        "| " + " | ".join(_fmt(c) for c in r) + " |\n" for r in rows)
    return h, md


PROFILE_NOTE = ("What this run can show: a comparison at the training budget it was given (rows, epochs, "
                "language-model size). The quick profile trains the language-model strategies on a few thousand rows "
                "on a CPU, so it tests whether FLIP helps at that budget, not the paper's full-data margins; the paper "
                "profile (`make run PROFILE=paper`, a GPU) trains every strategy on every row as the paper did.")
RESULT_HEADER = ["strategy", "paper row", "train rows", "seeds", "valid AUC", "test AUC (mean ± std)", "test logloss",
                 "ΔAUC vs scratch [95% CI]", "p-value", "Δ seed std", "test ECE"]


def _result_row(name: str, s: dict[str, Any], paper: dict[str, Any]) -> list[Any]:
    d = s.get("delta_vs_scratch")
    delta = f"{d['delta']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" if d else "(baseline)"
    return [name, STRATEGY_ROW.get(name, name), s.get("train_rows"), len(s.get("seeds", [])), s["valid"]["auc"],
            f"{s['test']['auc']:.4f} ± {s['test'].get('auc_std', 0.0):.4f}", s["test"]["logloss"], delta,
            f"{d['p_value']:.2g}" if d else "–", d["seed_std"] if d else None, s["test"]["ece"],
            paper.get(STRATEGY_ROW.get(name, ""), (None, None))[0]]


def _candidate(c: dict[str, Any], name: str) -> str:
    rates = f"plm_lr={c['plm_lr']:g}" if name in PLM_ONLY else (
        f"lr={c['lr']:g}" + (f", plm_lr={c['plm_lr']:g}" if name == "flip" else ""))
    auc = c.get("valid_auc")
    return f"{rates}: {auc:.4f}" if isinstance(auc, float) else rates


def _epochs(s: dict[str, Any]) -> str:
    e = [x for x in s.get("epochs_run", []) if x is not None]
    return f"{min(e)}–{max(e)} epoch(s)" if e and min(e) != max(e) else (f"{e[0]} epoch(s)" if e else "")


def report(reports_dir: Path, *, pretrain_dir: Path | None = None, analysis_dir: Path | None = None,
           ablations_dir: Path | None = None, id_models: Path | None = None) -> dict[str, Any]:
    """Write ``reports_dir/index.html`` and ``reports_dir/summary.md`` from the stages' outputs."""
    reports_dir = Path(reports_dir)
    ev = _read(reports_dir / "eval.json")
    if ev is None:
        raise FlipError(f"{reports_dir / 'eval.json'} not found: run `flip evaluate` first")
    validation = _read(reports_dir / "validation.json") or {}
    dataset = ev["dataset"]
    paper = TABLE2.get(dataset, {})

    # main table: every strategy at equal training data, on the same test rows, with the paired Δ
    strategies = ev["strategies"]
    first = next(iter(strategies.values()))
    rows = [_result_row(name, s, paper) for name, s in strategies.items()]
    main_h, main_md = _table(RESULT_HEADER + [f"paper AUC ({dataset})"], rows)
    sel_rows = [[name, ", ".join(f"{k}={v:g}" for k, v in s["selection"]["selected"].items()
                                 if v is not None and (k == "lr") != (name in PLM_ONLY)),
                 "; ".join(_candidate(c, name) for c in s["selection"]["candidates"])]
                for name, s in strategies.items() if s.get("selection")]
    sel_h, sel_md = _table(["strategy", "selected", "candidates (validation AUC, seed " +
                            str(next((s["selection"].get("seed") for s in strategies.values()
                                      if s.get("selection", {}).get("seed") is not None), "–")) + ")"], sel_rows)
    full = ev.get("full_data") or {}
    full_rows = [_result_row(name, s, paper) for name, s in full.items()]
    full_h, full_md = _table(RESULT_HEADER + [f"paper AUC ({dataset})"], full_rows) if full_rows else ("", "")
    scope = (f"Equal data: every strategy trained on the same {first['train_rows']:,} most recent training rows "
             f"and scored on the same {first['test']['rows']:,} test rows"
             + (f" (of {ev['counts']['test']:,}: an evenly spaced subsample; the interval reflects it)"
                if first["test"]["rows"] < ev["counts"]["test"] else "") + ". "
             "ΔAUC is the mean over seeds minus scratch's, with its 95% interval and p-value from DeLong's paired "
             "test on those rows; 'Δ seed std' is the spread of the per-seed differences (training noise).")
    seeds_line = "; ".join(f"{n}: {len(s['seeds'])} seed(s), {_epochs(s)}" for n, s in strategies.items())

    sections_h, sections_md = [], []
    ids = _read(id_models) if id_models else None
    if ids and ids.get("models"):
        r = [[m["model"], m.get("paper_row"), m["test_auc"], m["test_logloss"], m.get("samples_per_second"),
              m.get("paper_auc")] for m in ids["models"]]
        h, md = _table(["ID model (scratch)", "paper row", "test AUC", "test logloss", "train samples/s",
                        "paper AUC"], r)
        sections_h.append(f"<h2>ID-based baselines</h2>{h}")
        sections_md.append(f"## ID-based baselines\n\n{md}")

    if ablations_dir and Path(ablations_dir).exists():
        r = []
        for d in sorted(Path(ablations_dir).iterdir()):
            m = _read(d / "metrics.json")
            if m:
                ref = TABLE5_ML1M.get(d.name.replace("_", " "), (None, None)) if dataset == "movielens-1m" else (None, None)
                r.append([d.name, m["test"]["auc"], m["test"]["logloss"], ref[0], ref[1]])
        if r:
            h, md = _table(["ablation", "test AUC", "test logloss", "paper AUC", "paper logloss"], r)
            sections_h.append(f"<h2>Ablations</h2>{h}")
            sections_md.append(f"## Ablations\n\n{md}")

    # calibration + cold start numbers
    cal_rows = [[n, s["test"]["ece"], s["test"]["brier"], s["test"]["pcoc"], s["test"]["mean_pred"],
                 s["test"]["mean_label"]] for n, s in ev["strategies"].items()]
    cal_h, cal_md = _table(["strategy", "ECE", "Brier", "PCOC", "mean prediction", "click rate"], cal_rows)

    drift_rows = [[w, d["rows"], d["drifted_columns"], d["drifted_share"],
                   max(d["drift_score"].values()) if d["drift_score"] else None] for w, d in ev["data_drift"].items()]
    drift_h, drift_md = _table(["window", "rows", "drifted columns", "drifted share", "max drift score"], drift_rows)
    drift_links = " · ".join(f'<a href="evidently/{html.escape(d["html"])}">{html.escape(w)}</a>'
                             for w, d in ev["data_drift"].items())
    pred_links = " · ".join(f'<a href="evidently/{html.escape(p["html"])}">{html.escape(n)} {html.escape(w)}</a>'
                            for n, s in ev["strategies"].items() for w, p in s.get("prediction_drift", {}).items())

    pretrain_log: list[dict[str, Any]] = []
    if pretrain_dir and (Path(pretrain_dir) / "log.jsonl").exists():
        pretrain_log = [json.loads(x) for x in (Path(pretrain_dir) / "log.jsonl").read_text().splitlines() if x]
    ev_plot = {**ev, "user_field": ev.get("user_field"), "item_field": ev.get("item_field")}
    for name, s in ev_plot["strategies"].items():
        rel = reports_dir / "plots" / "reliability" / f"{name}.json"
        s["reliability"] = _read(rel) or []
    figures = _figures(ev_plot, pretrain_log, reports_dir / "figures")

    alignment = []
    if analysis_dir and Path(analysis_dir).exists():
        for png in sorted(Path(analysis_dir).glob("*.png")):
            alignment.append(Path("..", png.relative_to(reports_dir.parent)).as_posix()
                             if not png.is_relative_to(reports_dir) else png.relative_to(reports_dir).as_posix())

    imgs = "".join(f'<figure><img src="{html.escape(src)}" alt="{html.escape(k)}"><figcaption>{html.escape(k)}'
                   f"</figcaption></figure>" for k, src in figures.items())
    align_imgs = "".join(f'<figure><img src="{html.escape(src)}" alt="alignment"><figcaption>{html.escape(Path(src).stem)}'
                         f"</figcaption></figure>" for src in alignment)
    gx = '<a href="gx_docs/index.html">Great Expectations Data Docs</a>' if (reports_dir / "gx_docs").exists() else ""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>FLIP evaluation: {html.escape(dataset)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#f3f3f3}}td:first-child{{text-align:left}}
figure{{display:inline-block;margin:8px}}img{{max-width:520px;border:1px solid #ddd}}</style></head>
<body data-figures="{len(figures) + len(alignment)}">
<h1>FLIP evaluation report: {html.escape(dataset)}</h1>
<p>Generated {stamp}. Samples: {ev['counts']['total']:,} (train {ev['counts']['train']:,} · valid {ev['counts']['valid']:,} · test {ev['counts']['test']:,}).
Model selection on the validation split; test scored once. Paper numbers: Wang et al., RecSys '24, Table 2.</p>
<h2>Did FLIP help here?</h2><p class="headline"><b>{html.escape(ev.get('headline', ''))}</b></p>
<p>{html.escape(scope)}</p>{main_h}
<p>Seeds and epochs: {html.escape(seeds_line)}. Paper AUC: the full dataset on a GPU (Table 2), for reference only.</p>
<p>{html.escape(PROFILE_NOTE)}</p>
<h2>Learning-rate selection (validation split only)</h2>{sel_h}
{('<h2>ID models on the full training split (not an equal-data comparison)</h2>' + full_h) if full_h else ''}
{''.join(sections_h)}
<h2>Calibration (test)</h2>{cal_h}
<h2>Figures</h2>{imgs}
<h2>Alignment analysis</h2>{align_imgs or '<p>No analysis figures (run <code>flip analyze</code>).</p>'}
<h2>Data drift (Evidently): training split vs held-out windows</h2>{drift_h}
<p>Data drift reports: {drift_links}</p><p>Prediction drift and quality: {pred_links}</p>
<h2>Data validation</h2><p>{html.escape(str(validation.get('summary', 'not run')))} {gx}</p>
<script>
  // count figures that really decoded (read by the headless-browser test)
  window.addEventListener('load', () => {{
    const ok = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
    document.body.setAttribute('data-figures-loaded', String(ok));
  }});
</script>
</body></html>
"""
    md = (f"# FLIP evaluation report: {dataset}\n\nGenerated {stamp}. Model selection on validation; test scored once.\n\n"
          f"## Did FLIP help here?\n\n**{ev.get('headline', '')}**\n\n{scope}\n\n{main_md}\n"
          f"Seeds and epochs: {seeds_line}.\n\n{PROFILE_NOTE}\n\n"
          f"## Learning-rate selection (validation split only)\n\n{sel_md}\n"
          + (f"## ID models on the full training split (not an equal-data comparison)\n\n{full_md}\n" if full_md else "")
          + "\n".join(sections_md) +
          f"\n## Calibration (test)\n\n{cal_md}\n## Data drift (training vs held-out windows)\n\n{drift_md}\n"
          f"Data validation: {validation.get('summary', 'not run')}\n")
    with atomic_file(reports_dir / "index.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    with atomic_file(reports_dir / "summary.md") as tmp:
        tmp.write_text(md, encoding="utf-8")
    return {"html": str(reports_dir / "index.html"), "markdown": str(reports_dir / "summary.md"),
            "figures": len(figures) + len(alignment)}
