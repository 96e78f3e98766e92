"""``flip drift``, and every other Evidently (0.7 API) report on held-out chronological windows: data
drift, prediction drift, quality.

Windows: the validation split, the test split, and the test split cut into ``slices`` consecutive
time slices. Data drift compares each window's attribute fields with the training split (ID-like
fields are tested but expected to drift, and the label is judged by its positive rate); prediction
drift and classification quality compare a model's test-window scores with its validation scores.

The test window's data drift is computed once, by the ``drift`` stage (:func:`drift`,
``reports/drift/drift.json``): the retrain flow decides on it and the ``evaluate`` stage reads it
(:func:`read_drift`) instead of computing it again. Every data-drift test (that one and evaluate's
other windows) reads the splits' raw values and samples windows larger than ``evaluate.drift_rows``
with the fixed seed :data:`DRIFT_SEED`, so one window always gets one verdict. The sample is DuckDB's
(:func:`flip.data.sql.sample_sql`: the rows of the smallest ``hash(row, seed)``), the same whether
drawn from a split's Parquet file (the drift stage and evaluate's windows, which never load a whole
split: they read the sample, and the exact row counts and positive rates, in DuckDB) or from a
DataFrame (:func:`sample_frame`).
Evidently is imported inside the functions (~6 s import).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flip.io import file_sha256

# The sampling seed of every data-drift test (the drift stage's and evaluate's): fixed, not a run
# seed, so that a window gets the same sample, hence the same verdict, wherever it is tested.
DRIFT_SEED = 0


def sample_frame(df: Any, max_rows: int, seed: int = DRIFT_SEED) -> Any:
    """``df`` (with the processed splits' ``row`` column) sampled to ``max_rows`` rows when larger, by
    the rule the drift stage applies to a split's file (:func:`flip.data.sql.sample_sql`)."""
    if len(df) <= max_rows:
        return df
    from flip.data.sql import locked_connection, sample_sql

    with locked_connection() as con:
        con.register("frame", df)
        return con.sql(sample_sql("frame", max_rows, seed)).df()


def sampled_split(data_dir: Path, split: str, max_rows: int, seed: int = DRIFT_SEED,
                  rows_between: tuple[int, int] | None = None) -> tuple[Any, int, float]:
    """A processed split's raw values (:func:`flip.data.preprocess.split_values`) sampled in DuckDB to
    ``max_rows`` rows (as :func:`sample_frame`), with the exact row count and positive rate of all its
    rows: memory of ``max_rows`` rows, whatever the split's size. ``rows_between`` (first, last): only
    the rows whose ``row`` lies in that closed range (a time slice, :func:`split_slices`)."""
    from flip.data.preprocess import split_values_sql
    from flip.data.sql import locked_connection, sample_sql, sql_str
    from flip.io import read_json

    meta = read_json(Path(data_dir) / "meta.json")
    source = f"read_parquet({sql_str(Path(data_dir) / f'{split}.parquet')})"
    if rows_between is not None:
        source = f"(SELECT * FROM {source} WHERE row BETWEEN {int(rows_between[0])} AND {int(rows_between[1])})"
    with locked_connection(read=[Path(data_dir)]) as con:
        rows, rate = con.sql(f"SELECT count(*), avg(label::DOUBLE) FROM {source}").fetchall()[0]
        values = split_values_sql(meta)
        frame = con.sql(sample_sql(source, max_rows, seed, values) if rows > max_rows
                        else f"SELECT {values} FROM {source} ORDER BY row").df()
    return frame, int(rows), float(rate) if rate is not None else float("nan")


def split_slices(data_dir: Path, split: str, slices: int) -> dict[str, tuple[int, int]]:
    """The split cut into ``slices`` consecutive time slices of (nearly) equal row counts, in ``row``
    order, as (first, last) ``row`` of each: ``{"test_slice_1": ..., ...}``, computed in DuckDB."""
    from flip.data.sql import locked_connection, sql_str

    source = f"read_parquet({sql_str(Path(data_dir) / f'{split}.parquet')})"
    with locked_connection(read=[Path(data_dir)]) as con:
        n = con.sql(f"SELECT count(*) FROM {source}").fetchall()[0][0]
        bounds = np.linspace(0, n, slices + 1).astype(int)
        cuts = sorted({int(b) for k in range(slices) if bounds[k + 1] > bounds[k]
                       for b in (bounds[k], bounds[k + 1] - 1)})
        if not cuts:
            return {}
        at = dict(con.sql(f"SELECT pos, row FROM (SELECT row, row_number() OVER (ORDER BY row) - 1 AS pos "
                          f"FROM {source}) WHERE pos IN ({', '.join(map(str, cuts))})").fetchall())
    return {f"test_slice_{k + 1}": (int(at[int(bounds[k])]), int(at[int(bounds[k + 1]) - 1]))
            for k in range(slices) if bounds[k + 1] > bounds[k]}


def _windows(test: Any, slices: int) -> dict[str, Any]:
    bounds = np.linspace(0, len(test), slices + 1).astype(int)
    return {f"test_slice_{k + 1}": test.iloc[bounds[k]: bounds[k + 1]] for k in range(slices) if bounds[k + 1] > bounds[k]}


def _value(metrics: list[dict], prefix: str) -> Any:
    for m in metrics:
        if m["metric_name"].startswith(prefix):
            return m["value"]
    return None


def windows_drift(data_dir: Path, meta: dict[str, Any], out_dir: Path, *, slices: int, pages: str,
                  drift_share: float, target_drift: float, max_rows: int, test_drift: dict[str, Any],
                  seed: int = DRIFT_SEED) -> dict[str, Any]:
    """:func:`window_drift` for the held-out windows other than the test split (valid, the test
    split's time slices, :func:`split_slices`), with ``test_drift`` (the drift stage's record,
    :func:`read_drift`) as the test window's: ``{"valid", "test", "test_slice_1", ...}``. Each window
    and the training split are read as DuckDB samples with exact totals (:func:`sampled_split`): the
    memory of a few ``max_rows`` samples, whatever the splits' sizes.

    ``pages``: which of these windows get an Evidently HTML page (each is ~5 MB: the page carries its
    own JavaScript): ``all`` every one, ``main`` and ``none`` none (the test window's page is the
    drift stage's). Every window's numbers are in the returned summary either way."""
    train, train_rows, rate_train = sampled_split(data_dir, "train", max_rows, seed)

    def one(name: str, split: str, rows_between: tuple[int, int] | None = None) -> dict[str, Any]:
        window, rows, rate = sampled_split(data_dir, split, max_rows, seed, rows_between)
        totals = {"reference_rows": train_rows, "window_rows": rows, "rate_train": rate_train, "rate_window": rate}
        return window_drift(train, window, meta, out_dir, drift_share=drift_share, target_drift=target_drift,
                            max_rows=max_rows, seed=seed, stem=f"data_drift_{name}", html=pages == "all",
                            totals=totals)

    return {"valid": one("valid", "valid"), "test": test_drift,
            **{name: one(name, "test", between) for name, between in split_slices(data_dir, "test", slices).items()}}


def prediction_drift(strategy: str, valid: Any, test: Any, out_dir: Path, *, slices: int = 4,
                     pages: str = "main") -> dict[str, Any]:
    """Score drift (test windows vs validation) and classification quality of one model's predictions;
    an Evidently page for the test window (``pages="main"``), every window (``all``) or none."""
    from evidently import BinaryClassification, DataDefinition, Dataset, Report
    from evidently.metrics import DummyLogLoss, LogLoss, MeanValue, RocAuc, ValueDrift
    from evidently.presets import ClassificationPreset

    definition = DataDefinition(numerical_columns=["pred"], categorical_columns=["label"],
                                classification=[BinaryClassification(target="label", prediction_probas="pred")])

    def ds(df: Any) -> Any:
        return Dataset.from_pandas(df[["label", "pred"]].assign(label=df["label"].astype(int)),
                                   data_definition=definition)

    reference = ds(valid)
    summary: dict[str, Any] = {}
    for name, df in {"test": test, **_windows(test, slices)}.items():
        if df["label"].nunique() < 2:
            continue
        snap = Report([ValueDrift(column="pred"), ClassificationPreset(), LogLoss(), DummyLogLoss(), RocAuc(),
                       MeanValue(column="pred"), MeanValue(column="label")]).run(
            current_data=ds(df), reference_data=reference)
        stem = f"predictions_{strategy}_{name}"
        page = pages == "all" or (pages == "main" and name == "test")
        if page:
            snap.save_html(str(out_dir / f"{stem}.html"))
        snap.save_json(str(out_dir / f"{stem}.json"))
        metrics = snap.dict()["metrics"]
        means = [m["value"] for m in metrics if m["metric_name"].startswith("MeanValue")]
        summary[name] = {"rows": len(df), "pred_drift": float(_value(metrics, "ValueDrift(column=pred")),
                         "auc": _value(metrics, "RocAuc"), "logloss": _value(metrics, "LogLoss"),
                         "dummy_logloss": _value(metrics, "DummyLogLoss"),
                         "mean_pred": means[0] if means else None, "mean_label": means[1] if len(means) > 1 else None,
                         "html": f"{stem}.html" if page else None}
    return summary


ID_DRIFT_THRESHOLD = 0.1  # Evidently's default threshold of the Jensen-Shannon distance


def jensen_shannon(reference: Any, current: Any) -> float:
    """The Jensen-Shannon distance (natural log) of two categorical samples' value frequencies over the
    union of their values: what Evidently computes for a categorical column of a large sample."""
    from scipy.spatial import distance

    ref, cur = reference.value_counts(), current.value_counts()
    keys = ref.index.union(cur.index)
    p = ref.reindex(keys, fill_value=0).to_numpy(np.float64) / max(len(reference), 1)
    q = cur.reindex(keys, fill_value=0).to_numpy(np.float64) / max(len(current), 1)
    return float(distance.jensenshannon(p, q))


def window_drift(train: Any, window: Any, meta: dict[str, Any], out_dir: Path, *, drift_share: float,
                 target_drift: float, max_rows: int, seed: int = DRIFT_SEED, stem: str = "window_drift",
                 html: bool = True, totals: dict[str, Any] | None = None) -> dict[str, Any]:
    """Data drift (attribute columns) and target drift (the label) of a window against the training
    data, with Evidently; the verdict says whether either crossed its threshold. ID-like columns are
    tested and listed but never counted: outside Evidently (whose report spends minutes on a column of
    ~20k distinct values), by the test Evidently would pick for them, the Jensen-Shannon distance of the
    value frequencies (:func:`jensen_shannon`, drifted at >= 0.1). The label is judged by its positive
    rate, not as a column. ``train`` and ``window`` hold the splits' raw values (:func:`flip.data.preprocess.split_values`);
    each is sampled to ``max_rows`` rows (``seed``, :func:`sample_frame`) when larger. ``totals``: when
    ``train`` and ``window`` are such samples already (:func:`sampled_split`), the row counts and
    positive rates of the whole splits (``reference_rows``, ``window_rows``, ``rate_train``,
    ``rate_window``). Writes ``<stem>.json`` (and ``<stem>.html`` with ``html``) into ``out_dir``; the
    record keeps the settings it was computed with."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    from flip.data.tensors import id_like_fields

    fields = [f["name"] for f in meta["fields"]]
    ids = id_like_fields(meta)
    attributes = [f for f in fields if f not in ids]
    columns = [*attributes, "label"]  # what Evidently tests; the ID-like columns are tested here
    definition = DataDefinition(categorical_columns=columns)
    current, reference = (sample_frame(df, max_rows, seed)[[*columns, *ids]].astype(str) for df in (window, train))

    with np.errstate(divide="ignore"):  # chi-square of a value absent from a small window: p-value 0, not an error
        snap = Report([DataDriftPreset(columns=columns)]).run(
            current_data=Dataset.from_pandas(current[columns], data_definition=definition),
            reference_data=Dataset.from_pandas(reference[columns], data_definition=definition))
    out_dir.mkdir(parents=True, exist_ok=True)
    if html:
        snap.save_html(str(out_dir / f"{stem}.html"))
    snap.save_json(str(out_dir / f"{stem}.json"))
    metrics = snap.dict()["metrics"]
    score = {m["config"].get("column"): float(m["value"]) for m in metrics if m["metric_name"].startswith("ValueDrift")}
    method = {m["config"].get("column"): m["config"].get("method") for m in metrics
              if m["metric_name"].startswith("ValueDrift")}
    threshold = {m["config"].get("column"): m["config"].get("threshold") for m in metrics
                 if m["metric_name"].startswith("ValueDrift")}
    for col in ids:
        score[col] = jensen_shannon(reference[col], current[col])
        method[col], threshold[col] = "Jensen-Shannon distance", ID_DRIFT_THRESHOLD

    def drifted(col: str) -> bool:  # Evidently's test per column: a p-value below, or a distance at/above, its threshold
        t = threshold.get(col)
        if t is None or col not in score:
            return False
        return score[col] < t if "p_value" in str(method.get(col, "")) else score[col] >= t

    drifted_attr = [c for c in attributes if drifted(c)]
    share = len(drifted_attr) / len(attributes) if attributes else 0.0
    if totals is None:
        totals = {"reference_rows": len(train), "window_rows": len(window),
                  "rate_train": float(train["label"].astype(float).mean()),
                  "rate_window": float(window["label"].astype(float).mean())}
    rate_train, rate_window = totals["rate_train"], totals["rate_window"]
    reasons = []
    if attributes and share >= drift_share:
        reasons.append(f"{len(drifted_attr)} of {len(attributes)} attribute columns drifted "
                       f"({', '.join(drifted_attr)}; retrain.drift_share={drift_share:g})")
    if abs(rate_window - rate_train) > target_drift:
        reasons.append(f"the positive rate moved from {rate_train:.3f} (training) to {rate_window:.3f} "
                       f"(retrain.target_drift={target_drift:g})")
    return {
        "reference_rows": int(totals["reference_rows"]), "window_rows": int(totals["window_rows"]),
        "attributes": attributes, "id_like": ids,
        "drifted_attributes": drifted_attr, "drifted_share": share,
        "id_like_drifted": [c for c in ids if drifted(c)],
        "positive_rate": {"train": rate_train, "window": rate_window},
        "label_drift_score": score.get("label"),
        "drift_score": score, "method": method,
        "drift": bool(reasons), "reasons": reasons,
        "expected": "ID-like columns (users, items, zip codes, titles) always differ in a newer window: "
                    "they are shown but do not count as drift",
        "settings": {"drift_share": drift_share, "target_drift": target_drift, "max_rows": max_rows, "seed": seed},
        "html": f"{stem}.html" if html else None,
    }


def drift_settings(cfg: Any) -> dict[str, Any]:
    """The settings a data-drift test runs with: ``retrain.drift_share``, ``retrain.target_drift``,
    ``evaluate.drift_rows`` (the sample size) and :data:`DRIFT_SEED`."""
    return {"drift_share": cfg.retrain.drift_share, "target_drift": cfg.retrain.target_drift,
            "max_rows": cfg.evaluate.drift_rows, "seed": DRIFT_SEED}


def drift(cfg: Any, data_dir: Path, out_dir: Path) -> dict[str, Any]:
    """The newest window (test split) against the training split: ``OUT/drift.json`` + Evidently page.
    The verdict is applied by the retrain flow (``retrain.drift_policy``: warn or stop; the policy is
    the flow's, not recorded here, so that this record depends only on what computed it)."""
    from flip.io import atomic_dir, read_json, write_json

    meta = read_json(Path(data_dir) / "meta.json")
    settings = drift_settings(cfg)
    train, train_rows, rate_train = sampled_split(data_dir, "train", settings["max_rows"], settings["seed"])
    window, window_rows, rate_window = sampled_split(data_dir, "test", settings["max_rows"], settings["seed"])
    totals = {"reference_rows": train_rows, "window_rows": window_rows, "rate_train": rate_train,
              "rate_window": rate_window}
    with atomic_dir(out_dir, "drift", ("drift.json", "window_drift.html", "window_drift.json")) as tmp:
        result = window_drift(train, window, meta, tmp, drift_share=settings["drift_share"],
                              target_drift=settings["target_drift"], max_rows=settings["max_rows"],
                              seed=settings["seed"], totals=totals)
        result["window_time_range"] = meta.get("time_range", {}).get("test")
        result["meta_sha256"] = file_sha256(Path(data_dir) / "meta.json")
        write_json(tmp / "drift.json", result)
    return result


def read_drift(cfg: Any, data_dir: Path, drift_dir: Path) -> dict[str, Any]:
    """The drift stage's record of the test window (``drift_dir/drift.json``), checked to be of this
    processed dataset and of this config's drift settings: a missing or stale record is an error
    with the fix, never silently recomputed or used."""
    from flip.errors import FlipError
    from flip.io import read_json

    path = Path(drift_dir) / "drift.json"
    fix = f"run `flip drift --out {drift_dir}` (or `dvc repro drift`) first"
    if not path.exists():
        raise FlipError(f"{path} not found: the test window's drift comes from the drift stage; {fix}")
    record = read_json(path)
    if record.get("meta_sha256") != file_sha256(Path(data_dir) / "meta.json"):
        raise FlipError(f"{path} was computed on another processed dataset than {data_dir} "
                        f"(its meta.json differs): {fix}")
    want = drift_settings(cfg)
    if record.get("settings") != want:
        differ = ", ".join(f"{k} {record.get('settings', {}).get(k)!r} there, {v!r} here"
                           for k, v in want.items() if record.get("settings", {}).get(k) != v)
        raise FlipError(f"{path} was computed with other drift settings ({differ}; retrain.drift_share, "
                        f"retrain.target_drift, evaluate.drift_rows): {fix}")
    return record
