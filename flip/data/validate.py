"""The ``validate`` stage: pandera contract (hard) + Great Expectations batch quality and Data Docs.

Roles (see README, "Data validation"): pandera (``flip.data.schemas``) owns every row/schema rule and
fails hard. Great Expectations owns aggregates of one batch: row counts, null proportions, the
label-rate band, the log's time band, no constant field in training, and, in the validation and
test windows, the share of attribute values training never saw (``validate.max_unseen_share``; new
users and items are expected and not bounded). It publishes Data Docs under ``reports/gx_docs``,
rewritten to work offline (``flip.data.datadocs``). Row counts that differ from the dataset's
published size are warnings (a partial copy is legitimate); the other expectations fail the stage.
Great Expectations is imported here only (it takes ~6 s to import).

Memory: the pandera contract reads each split in chunks (``flip.data.schemas.CHUNK_ROWS``). Great
Expectations needs a DataFrame: a split of at most :data:`GX_SAMPLE_ROWS` rows is validated whole (its
expectations decide, as they always did); a larger one is validated on a seeded DuckDB sample of that
many rows (:func:`flip.data.sql.sample_sql`, seed :data:`GX_SAMPLE_SEED`) for its Data Docs, and the
same expectations are computed exactly over all its rows as DuckDB aggregates (:func:`exact_checks`),
which decide; the sample's own failures are then warnings.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from flip.config import Config
from flip.data.datadocs import make_offline
from flip.data.preprocess import split_sizes
from flip.data.schemas import validate_processed
from flip.data.tensors import id_like_fields, load_meta
from flip.errors import DataError
from flip.io import atomic_dir, write_json

# a split larger than this is given to Great Expectations as a seeded sample of this many rows (the
# verdict then comes from exact DuckDB aggregates over all rows); ML-1M's splits are all below it
GX_SAMPLE_ROWS = 1_000_000
GX_SAMPLE_SEED = 0
# published sample counts (paper Table 1); a different count is a warning, not an error
PUBLISHED_TOTAL = {"movielens-1m": 739_012, "bookcrossing": 1_031_171, "goodreads": 20_122_040}


def _suite(gx: Any, name: str, meta: dict[str, Any], cfg: Config, split: str,
           time_band: tuple[int, int] | None = None) -> Any:
    import great_expectations.expectations as gxe

    fields = meta["fields"]
    ids = set(id_like_fields(meta))
    lo, hi = cfg.validate.positive_rate_band
    exps = [gxe.ExpectTableRowCountToBeBetween(min_value=1)]
    if time_band is not None:  # a time far outside the log's own period (a cut-off line, a corrupted digit)
        exps.append(gxe.ExpectColumnValuesToBeBetween(column="timestamp", min_value=time_band[0],
                                                      max_value=time_band[1]))
    exps.append(gxe.ExpectColumnMeanToBeBetween(column="label", min_value=lo, max_value=hi))
    for f in fields:
        exps.append(gxe.ExpectColumnProportionOfNonNullValuesToBeBetween(
            column=f["name"], min_value=1.0 - cfg.validate.max_null_fraction))
        if split == "train" and f["size"] > 2:  # a field with one value in training carries nothing
            exps.append(gxe.ExpectColumnUniqueValueCountToBeBetween(column=f["name"], min_value=2))
        if split != "train" and f["name"] not in ids:
            # an attribute's values in a newer window are ones training has seen (new users and items are
            # expected; a new occupation code or a misspelt genre is not): at most max_unseen_share unseen
            exps.append(gxe.ExpectColumnValuesToNotBeInSet(column=f["name"], value_set=[int(f["oov_id"])],
                                                           mostly=1.0 - cfg.validate.max_unseen_share))
    exps.append(gxe.ExpectColumnProportionOfNonNullValuesToBeBetween(column="text", min_value=1.0))
    return gx.ExpectationSuite(name=name, expectations=exps)


def time_band(data_dir: Path, width: float = 5.0) -> tuple[int, int]:
    """The plausible period of the log: its 1st..99th percentile of time, widened by ``width`` times that
    span on each side. A 1970 timestamp among 2000-2003 ones lies far outside it."""
    from flip.data.sql import locked_connection

    files = [str(Path(data_dir) / f"{s}.parquet") for s in ("train", "valid", "test")]
    with locked_connection(read=[Path(data_dir)]) as con:
        q1, q99 = con.execute("SELECT quantile_disc(timestamp, 0.01), quantile_disc(timestamp, 0.99) "
                              "FROM read_parquet($1)", [files]).fetchall()[0]
    span = max(int(q99) - int(q1), 1)
    return int(q1 - width * span), int(q99 + width * span)


def exact_checks(path: Path, meta: dict[str, Any], cfg: Config, split: str, band: tuple[int, int],
                 expected: int = 0, memory_limit: str = "") -> tuple[int, list[str], list[str]]:
    """The quality suite's expectations (:func:`_suite`) and the published count (``expected``, 0: none)
    as DuckDB aggregates over every row of the split at ``path``, in one scan. Returns the row count, the
    failures and the count mismatches, worded as Great Expectations words its own."""
    from flip.data.sql import locked_connection, quote_ident, sql_str

    fields = meta["fields"]
    ids = set(id_like_fields(meta))
    q = {f["name"]: quote_ident(f["name"]) for f in fields}
    terms = ["count(*)", "min(timestamp)", "max(timestamp)", "avg(label::DOUBLE)", "count(text)"]
    terms += [f"count({q[f['name']]})" for f in fields]
    distinct = [f["name"] for f in fields if split == "train" and f["size"] > 2]
    unseen = [f for f in fields if split != "train" and f["name"] not in ids]
    terms += [f"count(DISTINCT {q[n]})" for n in distinct]
    terms += [f"count(*) FILTER ({q[f['name']]} = {int(f['oov_id'])})" for f in unseen]
    with locked_connection(read=[path], memory_limit=memory_limit) as con:
        got = list(con.sql(f"SELECT {', '.join(terms)} FROM read_parquet({sql_str(path)})").fetchall()[0])
    rows, t_min, t_max, rate, texts = got[:5]
    non_null = dict(zip([f["name"] for f in fields], got[5:5 + len(fields)]))
    uniques = dict(zip(distinct, got[5 + len(fields):5 + len(fields) + len(distinct)]))
    oov = dict(zip([f["name"] for f in unseen], got[5 + len(fields) + len(distinct):]))
    failed = []
    if rows < 1:
        failed.append(f"expect_table_row_count_to_be_between(): observed {rows}")
    if rows and (t_min < band[0] or t_max > band[1]):
        failed.append(f"expect_column_values_to_be_between(timestamp): observed min {t_min}, max {t_max} "
                      f"outside [{band[0]}, {band[1]}]")
    lo, hi = cfg.validate.positive_rate_band
    if rows and not lo <= rate <= hi:
        failed.append(f"expect_column_mean_to_be_between(label): observed {rate}")
    for name, n in non_null.items():
        if rows and n / rows < 1.0 - cfg.validate.max_null_fraction:
            failed.append(f"expect_column_proportion_of_non_null_values_to_be_between({name}): observed {n / rows}")
    for name, n in uniques.items():
        if n < 2:
            failed.append(f"expect_column_unique_value_count_to_be_between({name}): observed {n}")
    for name, n in oov.items():
        if non_null[name] and (non_null[name] - n) / non_null[name] < 1.0 - cfg.validate.max_unseen_share:
            failed.append(f"expect_column_values_to_not_be_in_set({name}): observed {n / non_null[name]} unseen")
    if rows and texts < rows:
        failed.append(f"expect_column_proportion_of_non_null_values_to_be_between(text): observed {texts / rows}")
    counts = [f"expect_table_row_count_to_equal(): observed {rows}"] if expected and rows != expected else []
    return int(rows), failed, counts


def _expected_counts_suite(gx: Any, name: str, expected: int) -> Any:
    import great_expectations.expectations as gxe

    return gx.ExpectationSuite(name=name, expectations=[
        gxe.ExpectTableRowCountToEqual(value=expected)])


def _sample(path: Path, columns: list[str], rows: int) -> Any:
    """``columns`` of the split at ``path``, sampled in DuckDB to ``rows`` rows (seed GX_SAMPLE_SEED)."""
    from flip.data.sql import locked_connection, quote_ident, sample_sql, sql_str

    cols = ", ".join(quote_ident(c) for c in ["row", *columns])
    with locked_connection(read=[path]) as con:
        df = con.sql(sample_sql(f"read_parquet({sql_str(path)})", rows, GX_SAMPLE_SEED, cols)).df()
    return df.drop(columns="row")


def validate(cfg: Config, data_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Run both validations on ``data_dir``; write ``out_dir/validation.json`` and ``out_dir/gx_docs/``."""
    import logging

    started = time.time()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if not (data_dir / "meta.json").exists():
        raise DataError("processed dataset not found (no meta.json)", file=str(data_dir),
                        fix="run `flip preprocess` (or `dvc repro preprocess`) first")
    meta = load_meta(data_dir)
    contract = validate_processed(data_dir, meta)  # hard failure raises DataError

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx
    import pyarrow.parquet as pq
    from great_expectations.data_context.types.base import ProgressBarsConfig

    warnings: list[str] = []
    expected = cfg.validate.expected_total or PUBLISHED_TOTAL.get(meta["dataset"], 0)
    if expected and meta["counts"]["total"] != expected:
        warnings.append(f"{meta['dataset']} has {meta['counts']['total']:,} samples, the published dataset "
                        f"{expected:,} (a partial copy?)")

    with atomic_dir(out_dir / "gx_docs", "validate", ("index.html", "static", "validations", "expectations")) \
            as docs:
        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        ctx.add_data_docs_site(site_name="reports", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        asset = ctx.data_sources.add_pandas("processed").add_dataframe_asset(meta["dataset"])
        quality: dict[str, Any] = {}
        status: dict[str, str] = {}  # suite -> passed | failed | warning, for the Data Docs index
        failures: list[str] = []
        columns = [f["name"] for f in meta["fields"]] + ["label", "text", "timestamp"]
        band = time_band(data_dir)
        for split in ("train", "valid", "test"):
            path = data_dir / f"{split}.parquet"
            size = 0
            if expected:  # published split sizes: a mismatch is a warning (partial copies are legitimate)
                size = split_sizes(expected, cfg.preprocess.test_fraction, cfg.preprocess.valid_divisor)[split]
            rows = pq.ParquetFile(path).metadata.num_rows
            sampled = rows > GX_SAMPLE_ROWS
            if sampled:  # exact aggregates over all rows decide; Great Expectations sees a sample
                rows, hard, counts = exact_checks(path, meta, cfg, split, band, size, cfg.preprocess.memory_limit)
                quality[f"{split}_exact"] = {"success": not hard, "failed": hard, "rows": rows}
                failures.extend(f"{split}: {f}" for f in hard)
                if size:
                    quality[f"{split}_counts"] = {"success": not counts, "failed": counts, "rows": rows}
                    warnings.extend(f"{split}: {f}" for f in counts)
                df = _sample(path, columns, GX_SAMPLE_ROWS)
            else:
                df = pq.read_table(path, columns=columns).to_pandas()
            batch = asset.add_batch_definition_whole_dataframe(split)
            suites = [(ctx.suites.add(_suite(gx, f"{split}_quality", meta, cfg, split, band)), True)]
            if size and not sampled:
                suites.append((ctx.suites.add(_expected_counts_suite(gx, f"{split}_counts", size)), False))
            for suite, hard in suites:
                vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=suite.name, data=batch, suite=suite))
                cp = ctx.checkpoints.add(gx.Checkpoint(
                    name=f"{suite.name}_cp", validation_definitions=[vd], result_format="SUMMARY",
                    actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["reports"])]))
                res = cp.run(batch_parameters={"dataframe": df})
                stats = {"success": bool(res.success), "failed": []}
                for vr in res.run_results.values():
                    for r in vr.results:
                        if not r.success:
                            cfg_ = r.expectation_config
                            stats["failed"].append(f"{cfg_.type}({cfg_.kwargs.get('column', '')}): "
                                                   f"observed {r.result.get('observed_value')}")
                if sampled:
                    stats["sample_rows"] = len(df)
                quality[suite.name] = stats
                status[suite.name] = "passed" if res.success else ("failed" if hard and not sampled else "warning")
                if not res.success:
                    if sampled:  # the exact aggregates above decided; the sample's view is a warning
                        warnings.extend(f"{split} (a sample of {len(df):,} rows): {f}" for f in stats["failed"])
                    else:
                        (failures if hard else warnings).extend(f"{split}: {f}" for f in stats["failed"])
            del df
        make_offline(docs, status)
        result = {
            "success": not failures,
            "dataset": meta["dataset"],
            "counts": meta["counts"],
            "positive_rate": meta["positive_rate"],
            "contract": contract,
            "quality": quality,
            "warnings": warnings,
            "failures": failures,
            "data_docs": str(out_dir / "gx_docs" / "index.html"),
            "seconds": round(time.time() - started, 2),
            "missing_values": meta.get("missing_values", {}),
            "summary": f"{meta['counts']['total']:,} samples, {len(meta['fields'])} fields, contract ok, "
                       f"{len(failures)} quality failure(s), "
                       f"{len(warnings)} warning(s)"
                       + "".join(f", {m['rows']:,} empty {col!r} ({'dropped' if m['policy'] == 'drop' else 'unknown'})"
                                 for col, m in meta.get("missing_values", {}).items()),
        }
        if failures:  # keep the report for inspection beside the (unchanged) stage output, then fail
            failed = out_dir / "gx_docs-failed"
            shutil.rmtree(failed, ignore_errors=True)
            shutil.copytree(docs, failed)
            write_json(failed / "validation.json", result)
            raise DataError("Great Expectations quality checks failed:\n  " + "\n  ".join(failures),
                            file=str(data_dir), fix=f"see the Data Docs in {failed}/index.html")
    write_json(out_dir / "validation.json", result)
    return result
