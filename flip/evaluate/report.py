"""The ``report`` stage: one HTML page (``reports/index.html``) and a Markdown summary of this run.

Everything it shows comes from this run's own outputs: ``eval.json`` (evaluate), ``validation.json``
(validate), the pretraining run (its configuration, metrics and step log, read through
:class:`flip.runs.RunDir`), ``analysis.json``
(analyze), after ``make ablations``, ``ablations.json`` (``flip ablations``, from ``dvc exp show``), and
the committed pretraining-scaling study (``benchmarks/results/pretrain_scaling.json``, labelled as such).
The paper's numbers (``flip.evaluate.paper``) stand beside ours, labelled as the paper's. Nothing is
computed again here, and nothing else is read from another run.
"""

from __future__ import annotations

import html
import json
import posixpath
import subprocess
from pathlib import Path
from typing import Any

from flip.errors import FlipError
from flip.evaluate import figures
from flip.evaluate.paper import STRATEGY_ROW, TABLE2, TABLE5_ML1M
from flip.io import atomic_file
from flip.runs import RunDir

PAPER = "Wang et al., RecSys '24"


def _read(path: Path | None) -> Any:
    return json.loads(path.read_text()) if path is not None and path.exists() else None


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


class Page:
    """The report as HTML and Markdown at once: every section is written to both."""

    def __init__(self) -> None:
        self.html: list[str] = []
        self.md: list[str] = []

    def heading(self, text: str) -> None:
        self.html.append(f"<h2>{html.escape(text)}</h2>")
        self.md.append(f"## {text}\n")

    def text(self, text: str, *, bold: bool = False) -> None:
        self.html.append(f"<p>{'<b>' if bold else ''}{html.escape(text)}{'</b>' if bold else ''}</p>")
        self.md.append(f"**{text}**\n" if bold else f"{text}\n")

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.html.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr>" + "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows) + "</table>")
        self.md.append("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" + "".join(
            "| " + " | ".join(_fmt(c).replace("|", "/") for c in r) + " |\n" for r in rows))

    def figure(self, src: str, caption: str) -> None:
        self.html.append(f'<figure><img src="{html.escape(src)}" alt="{html.escape(Path(src).stem)}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        self.md.append(f"![{Path(src).stem}]({src})\n\n*{caption}*\n")

    def raw_html(self, fragment: str) -> None:
        self.html.append(fragment)


# ------------------------------------------------------------------------------------ the run's settings
def commit() -> str:
    """The git commit the report was made at ("+ uncommitted changes" when tracked files differ;
    dvc.lock, which DVC rewrites while it runs, is not counted)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True, timeout=30)
        if head.returncode:
            return "not a git repository"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not found)"
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


def profile(config: dict[str, Any], paper_profile: Path = Path("profiles/paper.txt")) -> str:
    """Which profile the runs used: the paper's settings (every line of ``profiles/paper.txt``
    holds), the quick one (an equal-data subsample), or custom."""
    from flip.config import parse_override

    if paper_profile.exists():
        lines = [x.strip() for x in paper_profile.read_text().splitlines() if x.strip() and not x.startswith("#")]

        def holds(line: str) -> bool:
            path, value = parse_override(line)
            node: Any = config
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            return node == value
        if lines and all(holds(x) for x in lines):
            return f"paper ({paper_profile}: the paper's settings, every row)"
    rows = config.get("finetune", {}).get("train_rows", 0)
    if rows:
        return (f"quick (every strategy on the same {rows:,} most recent training rows; the paper's settings are "
                "`make run PROFILE=paper`)")
    return "custom (every training row)"


def settings_section(page: Page, ev: dict[str, Any], pretrain: dict[str, Any] | None,
                     pretrain_config: dict[str, Any] | None) -> None:
    config = ev.get("config") or {}
    counts = ev["counts"]
    page.heading("This run")
    rows = [["dataset", ev["dataset"]],
            ["samples (train · valid · test)", f"{counts['total']:,} ({counts['train']:,} · {counts['valid']:,} · "
                                                f"{counts['test']:,})"],
            ["profile", profile(config)],
            ["commit", commit()],
            ["ID model", config.get("id_model", {}).get("name")],
            ["language model", f"{config.get('plm', {}).get('name')} (max length {config.get('plm', {}).get('max_length')})"],
            ["seeds", ", ".join(sorted({x.removeprefix("seed-") for s in ev["strategies"].values()
                                        for x in s.get("seeds", [])}))]]
    if pretrain and pretrain.get("aligned") is False:
        rows.append(["pretraining", "none: every objective weight is 0 (the paper's w/o MLM&MTM&ICL), so the "
                                    "strategies start from the initial ID model and the language model as loaded"])
    elif pretrain and pretrain_config:
        p = pretrain_config["pretrain"]
        weights = ", ".join(f"{k.upper()} {p[f'{k}_weight']:g}" for k in ("mlm", "mtm", "icl"))
        rows.append(["pretraining", f"{pretrain.get('rows', 0):,} rows, {pretrain.get('epochs')} epoch(s), "
                                    f"{pretrain.get('steps')} steps of {pretrain.get('batch_size')}; "
                                    f"objective weights {weights}"])
    page.table(["setting", "value"], rows)
    per = [[name, s.get("train_rows"), s["test"]["rows"], s.get("max_epochs"), _epochs(s), s.get("batch_size"),
            ", ".join(x.removeprefix("seed-") for x in s.get("seeds", [])),
            s.get("id_model") or "–", s.get("plm") or "–", s.get("pretrained") or "no"]
           for name, s in ev["strategies"].items()]
    page.table(["strategy", "trained on rows", "scored on test rows", "max epochs", "epochs run", "batch size",
                "seeds", "ID model", "language model", "pretraining"], per)


def _epochs(s: dict[str, Any]) -> str:
    e = [x for x in s.get("epochs_run", []) if x is not None]
    return "–" if not e else (str(e[0]) if min(e) == max(e) else f"{min(e)}–{max(e)}")


# ------------------------------------------------------------------------------------ results
RESULT_HEADER = ["strategy", "paper row", "train rows", "seeds", "valid AUC", "test AUC (mean ± std)", "test logloss",
                 "ΔAUC vs scratch [95% CI]", "p-value", "Δ seed std", "test ECE"]


def _result_row(name: str, s: dict[str, Any], paper: dict[str, Any]) -> list[Any]:
    d = s.get("delta_vs_scratch")
    delta = f"{d['delta']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" if d else "(baseline)"
    row = STRATEGY_ROW.get(name, name)
    return [name, row, s.get("train_rows"), len(s.get("seeds", [])), s["valid"]["auc"],
            f"{s['test']['auc']:.4f} ± {s['test'].get('auc_std', 0.0):.4f}", s["test"]["logloss"], delta,
            f"{d['p_value']:.2g}" if d else "–", d["seed_std"] if d else None, s["test"]["ece"],
            paper.get(row, (None, None))[0], paper.get(row, (None, None))[1]]


def _candidate(c: dict[str, Any], name: str, plm_only: bool) -> str:
    rates = f"plm_lr={c['plm_lr']:g}" if plm_only else (
        f"lr={c['lr']:g}" + (f", plm_lr={c['plm_lr']:g}" if name == "flip" else ""))
    auc = c.get("valid_auc")
    return f"{rates}: {auc:.4f}" if isinstance(auc, float) else rates


PROFILE_NOTE = ("What this run can show: a comparison at the training budget it was given (rows, epochs, "
                "language-model size). The quick profile trains the language-model strategies on a few thousand rows "
                "on a CPU, so it tests whether FLIP helps at that budget, not the paper's full-data margins; the paper "
                "profile (`make run PROFILE=paper`, a GPU) trains every strategy on every row as the paper did. How "
                "FLIP_ID's gain moves as pretraining grows is the section 'FLIP_ID's gain against pretraining' below "
                "(benchmarks/pretrain_scaling.py).")


def scaling_section(page: Page, scaling: dict[str, Any] | None, dataset: str, figures_dir: Path) -> None:
    """The pretraining-scaling study (``benchmarks/pretrain_scaling.py``), where it was run on this dataset."""
    page.heading("FLIP_ID's gain against pretraining")
    points = (scaling or {}).get("points") or []
    if not points or scaling.get("dataset") != dataset:
        page.text("No pretraining-scaling study for this dataset yet: `python benchmarks/pretrain_scaling.py --idle "
                  "yes` pretrains on growing numbers of rows and finetunes FLIP_ID after each, next to scratch, and "
                  "writes benchmarks/results/pretrain_scaling.json, which this section shows.")
        return
    rows = [[p["rows"], p["seeds"], f"{p['delta']:+.4f} [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}]",
             f"{p['p_value']:.2g}", ", ".join(f"{v:+.4f}" for v in p["per_seed"].values()),
             round(p["time"]), f"{p['samples_per_second']:.1f}",
             " ".join(x for x in (p.get("machine", ""), str(p.get("date", ""))[:10]) if x)] for p in points]
    page.table(["pretraining rows", "seeds", "ΔAUC FLIP_ID − scratch [95% CI]", "p-value", "per seed",
                "pretraining s", "samples/s", "machine, date"], rows)
    caption = figures.pretrain_scaling(points, figures_dir / "pretrain_scaling.png",
                                       paper=scaling.get("paper_flip_id_delta"))
    page.figure("figures/pretrain_scaling.png", caption)
    state = "idle" if scaling.get("idle") else "busy"
    page.text(f"From {scaling.get('date', 'an earlier run')} ({state} machine; each point's own in the table), "
              "not this run: the quick profile's pretraining on the N most recent training rows (one epoch), then "
              "FLIP_ID and scratch on the whole training split with the same seeds, scored on the whole test split "
              "(DeLong). " + str(scaling.get("reading", "")))


def results_section(page: Page, ev: dict[str, Any]) -> None:
    dataset, strategies = ev["dataset"], ev["strategies"]
    paper = TABLE2.get(dataset, {})
    paper_cols = [f"paper AUC ({PAPER}, Table 2)", "paper logloss"]
    first = next(iter(strategies.values()))
    page.heading("Did FLIP help here?")
    page.text(ev.get("headline", ""), bold=True)
    page.text(f"Equal data: every strategy trained on the same {first['train_rows']:,} most recent training rows and "
              f"was scored on the same {first['test']['rows']:,} test rows"
              + (f" (of {ev['counts']['test']:,}: an evenly spaced subsample; the interval reflects it)"
                 if first["test"]["rows"] < ev["counts"]["test"] else "") + ". "
              "ΔAUC is the mean over seeds minus scratch's, with its 95% interval and p-value from DeLong's paired "
              "test on those rows; 'Δ seed std' is the spread of the per-seed differences (training noise). "
              f"The paper's columns are {PAPER}'s Table 2 (the full dataset on a GPU), for reference only.")
    page.table(RESULT_HEADER + paper_cols, [_result_row(n, s, paper) for n, s in strategies.items()])
    page.text(PROFILE_NOTE)

    page.heading("Learning-rate selection (validation split only)")
    sel = [(n, s) for n, s in strategies.items() if s.get("selection")]
    seed = next((s["selection"].get("seed") for _, s in sel if s["selection"].get("seed") is not None), "–")
    rows = []
    for name, s in sel:
        plm_only = s.get("id_model") is None
        keys = ["plm_lr"] if plm_only else (["lr", "plm_lr"] if name == "flip" else ["lr"])
        chosen = ", ".join(f"{k}={s['selection']['selected'][k]:g}" for k in keys
                           if s["selection"]["selected"].get(k) is not None)
        rows.append([name, chosen, "; ".join(_candidate(c, name, plm_only) for c in s["selection"]["candidates"])])
    page.table(["strategy", "selected", f"candidates (validation AUC, seed {seed})"], rows)

    full = ev.get("full_data") or {}
    if full:
        page.heading("The ID model on the full training split (not an equal-data comparison)")
        page.text("Both trained on every training row at the fixed finetune.lr and scored on the whole test split; "
                  "the Δ is FLIP_ID against scratch on those rows.")
        page.table(RESULT_HEADER + paper_cols, [_result_row(n, s, paper) for n, s in full.items()])


def ablations_section(page: Page, ablations: dict[str, Any] | None, dataset: str) -> None:
    page.heading(f"Ablations ({PAPER}, Table 5)")
    if not ablations or not ablations.get("experiments"):
        page.text("No ablation experiments yet: `make ablations` runs the Table 5 variants as DVC experiments "
                  "(`dvc exp run --queue`) and fills this table from `dvc exp show --json`.")
        return
    paper = TABLE5_ML1M if dataset == "movielens-1m" else {}
    rows = [[e["row"], e["name"], e["settings"], e["flip_auc"], e["flip_logloss"], e.get("flip_id_auc"),
             paper.get(e["row"], (None, None))[0], paper.get(e["row"], (None, None))[1]]
            for e in ablations["experiments"]]
    page.table(["Table 5 row", "experiment", "settings", "FLIP test AUC", "FLIP test logloss", "FLIP_ID test AUC",
                "paper AUC (ML-1M)", "paper logloss"], rows)
    page.text(f"Each row is a DVC experiment of this project (`dvc exp show`), at this run's profile; collected "
              f"from {ablations.get('source', 'dvc exp show --json')}. The paper's columns are its MovieLens-1M "
              "numbers" + ("" if paper else " (shown for MovieLens-1M only)") + ".")


def calibration_section(page: Page, ev: dict[str, Any], bins: dict[str, list], figures_dir: Path) -> None:
    page.heading("Calibration (test)")
    page.table(["strategy", "ECE", "Brier", "PCOC", "mean prediction", "click rate"],
               [[n, s["test"]["ece"], s["test"]["brier"], s["test"]["pcoc"], s["test"]["mean_pred"],
                 s["test"]["mean_label"]] for n, s in ev["strategies"].items()])
    if any(bins.values()):
        caption = figures.reliability(bins, figures_dir / "reliability.png")
        page.figure("figures/reliability.png", caption)


def cold_start_section(page: Page, ev: dict[str, Any], figures_dir: Path) -> None:
    page.heading("Cold start: AUC by user and item frequency")
    strategies = ev["strategies"]
    train_rows = next(iter(strategies.values())).get("train_rows")
    for key in ("user", "item"):
        field = ev.get(f"{key}_field")
        series = {n: s["cold_start"][field] for n, s in strategies.items() if field in s.get("cold_start", {})}
        if not series:
            continue
        buckets = next(iter(series.values()))
        header = [f"{key} interactions", "test rows", "click rate", "readable"] + [f"{n} AUC" for n in series]
        page.table(header, [[b["bucket"], b["rows"], b["positive_rate"], not b.get("too_few_rows")]
                            + [series[n][i]["auc"] for n in series] for i, b in enumerate(buckets)])
        caption = figures.cold_start(key, field, series, train_rows, figures_dir / f"coldstart_{key}.png")
        page.figure(f"figures/coldstart_{key}.png", caption)


def alignment_section(page: Page, analysis_dir: Path | None, reports_dir: Path) -> None:
    page.heading("Alignment analysis (the paper's §4.6)")
    result = _read(analysis_dir / "analysis.json") if analysis_dir else None
    if not result:
        page.text("No analysis figures (run `flip analyze`).")
        return

    def src(name: str) -> str:
        png = analysis_dir / name
        return (png.relative_to(reports_dir).as_posix() if png.is_relative_to(reports_dir)
                else Path("..", png.relative_to(reports_dir.parent)).as_posix())
    f5 = result["fig5"]
    if "skipped" in f5:
        page.text(f"Fig. 5 skipped: {f5['skipped']}.")
    else:
        page.figure(src("fig5_field_similarity.png"),
                    f"Fig. 5: cross-modal similarity with one field masked in the text (rows) and one in the table "
                    f"(columns), over {f5['rows']} test rows. Aligned field by field, the diagonal stands out: here "
                    f"its mean is {f5['diagonal_mean']:.3f} against {f5['off_diagonal_mean']:.3f} off it, and it is "
                    f"the largest entry in {f5['diagonal_is_row_max']} of {len(f5['fields'])} rows.")
    f6 = result["fig6"]
    ranks = "; ".join(f"{name}: {v['effective_rank']:.1f}" for name, v in f6.items())
    page.figure(src("fig6_embedding_svd.png"),
                "Fig. 6: the ID embeddings projected on their top two singular directions, coloured by field. The "
                "paper's comparison is the ID model finetuned after alignment against the same model trained from "
                "scratch; a higher effective rank (the number of directions the embeddings really use) means a less "
                f"collapsed table. Effective ranks: {ranks}.")


def drift_section(page: Page, ev: dict[str, Any]) -> None:
    page.heading("Data drift: the training split against each held-out window (Evidently)")
    windows = ev["data_drift"]
    first = next(iter(windows.values()))
    page.text("Attribute columns are tested for drift and counted; ID-like columns (" + ", ".join(first["id_like"])
              + ") always differ in a newer, chronological window, as new users and items arrive: they are tested "
              "and listed, but expected to drift and not counted. The label is not a feature: its drift is the "
              "change of the click rate. The verdict uses the retrain flow's thresholds (retrain.drift_share, "
              "retrain.target_drift). The test window's row is the drift stage's record (reports/drift/drift.json), "
              "the very verdict the retrain flow applies retrain.drift_policy to; the other windows are tested "
              "the same way (the same sample size, evaluate.drift_rows, and seed).")
    rows = [[w, d["window_rows"], f"{len(d['drifted_attributes'])} of {len(d['attributes'])}",
             ", ".join(d["drifted_attributes"]) or "none", ", ".join(d["id_like_drifted"]) or "none",
             d["positive_rate"]["train"], d["positive_rate"]["window"], "; ".join(d["reasons"]) or "no drift"]
            for w, d in windows.items()]
    page.table(["window", "rows", "attributes drifted", "which", "ID-like drifted (expected)",
                "click rate (train)", "click rate (window)", "verdict"], rows)
    # a window's page is relative to evidently/ (the test window's lies in the drift stage's folder)
    links = [f'<a href="{html.escape(posixpath.normpath("evidently/" + d["html"]))}">data drift, {html.escape(w)}</a>'
             for w, d in windows.items() if d.get("html")]
    links += [f'<a href="evidently/{html.escape(p["html"])}">{html.escape(n)}, {html.escape(w)}</a>'
              for n, s in ev["strategies"].items() for w, p in s.get("prediction_drift", {}).items() if p.get("html")]
    if links:
        page.raw_html("<p>Evidently pages (evaluate.pages; every window's numbers are in eval.json): "
                      + " · ".join(links) + "</p>")


def report(reports_dir: Path, *, pretrain_dir: Path | None = None, analysis_dir: Path | None = None,
           ablations: Path | None = None, scaling: Path | None = None) -> dict[str, Any]:
    """Write ``reports_dir/index.html`` and ``reports_dir/summary.md`` from this run's outputs."""
    reports_dir = Path(reports_dir)
    ev = _read(reports_dir / "eval.json")
    if ev is None:
        raise FlipError(f"{reports_dir / 'eval.json'} not found: run `flip evaluate` first")
    validation = _read(reports_dir / "validation.json") or {}
    pre = RunDir(pretrain_dir) if pretrain_dir else None
    pretrain = pre.metrics() if pre is not None and pre.is_finished() else None
    pretrain_config = pre.config() if pre is not None and pre.config_file.exists() else None
    figures_dir = reports_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)

    page = Page()
    settings_section(page, ev, pretrain, pretrain_config)
    results_section(page, ev)
    scaling_section(page, _read(scaling), ev["dataset"], figures_dir)
    ablations_section(page, _read(ablations), ev["dataset"])
    bins = {n: _read(reports_dir / "plots" / "reliability" / f"{n}.json") or [] for n in ev["strategies"]}
    calibration_section(page, ev, bins, figures_dir)
    cold_start_section(page, ev, figures_dir)
    if pre is not None and pre.log_file.exists():
        caption = figures.pretraining_losses(pre.log("step"), figures_dir / "pretrain_losses.png")
        if caption:
            page.heading("Pretraining")
            page.figure("figures/pretrain_losses.png", caption)
    alignment_section(page, Path(analysis_dir) if analysis_dir else None, reports_dir)
    drift_section(page, ev)
    page.heading("Data validation (pandera contract, Great Expectations)")
    page.text(str(validation.get("summary", "not run")))
    if (reports_dir / "gx_docs").exists():
        page.raw_html('<p><a href="gx_docs/index.html">Great Expectations Data Docs</a></p>')

    title = f"FLIP evaluation report: {ev['dataset']}"
    n_figures = sum(1 for x in page.html if x.startswith("<figure>"))
    document = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#f3f3f3}}td:first-child{{text-align:left}}
figure{{display:inline-block;margin:8px;max-width:540px;vertical-align:top}}figcaption{{font-size:0.85em;color:#444}}
img{{max-width:520px;border:1px solid #ddd}}</style></head>
<body data-figures="{n_figures}">
<h1>{html.escape(title)}</h1>
{''.join(page.html)}
<script>
  // count figures that really decoded (read by the headless-browser test)
  window.addEventListener('load', () => {{
    const ok = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
    document.body.setAttribute('data-figures-loaded', String(ok));
  }});
</script>
</body></html>
"""
    with atomic_file(reports_dir / "index.html") as tmp:
        tmp.write_text(document, encoding="utf-8")
    with atomic_file(reports_dir / "summary.md") as tmp:
        tmp.write_text(f"# {title}\n\n" + "\n".join(page.md), encoding="utf-8")
    return {"html": str(reports_dir / "index.html"), "markdown": str(reports_dir / "summary.md"),
            "figures": n_figures}
