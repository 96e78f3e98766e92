"""pandera owns the schema contract: one place for every row-level and schema rule.

* Raw schemas: types and value domains of each dataset's official files (what a row must look
  like before preprocessing). ``validate_raw`` checks a DuckDB table chunk by chunk (bounded memory)
  and turns the first failure into a :class:`~flip.errors.DataError` naming file, row, column, fix.
* The processed schema is built from ``meta.json`` (field id domains come from the vocabularies)
  and checks types, id domains, label values, keys, time order and that splits do not overlap.

Aggregate and distribution rules (row counts, null proportions, label-rate band, cardinality) are
Great Expectations' job (``flip.data.validate``); nothing here repeats them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from flip.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import duckdb
    import pandera.pandas as pa

CHUNK_ROWS = 1_000_000  # raw files are validated in chunks of this many rows
# a processed split is validated in chunks of whole Parquet row groups, up to about this many rows
# each, every group read on its own (pyarrow's batch iterator reads ahead: ~4 GiB held at 16M rows)
PROCESSED_CHUNK_ROWS = 250_000


# ------------------------------------------------------------------------------------ raw files
def _raw(columns: dict[str, Any], unique: list[str] | None = None, name: str = "") -> "pa.DataFrameSchema":
    import pandera.pandas as pa

    return pa.DataFrameSchema(columns, unique=unique, coerce=True, name=name, strict="filter")


def raw_schemas() -> dict[str, "pa.DataFrameSchema"]:
    """Schemas of the raw tables, keyed ``<dataset>/<file>``."""
    import pandera.pandas as pa

    def ints(lo: int | None = None, hi: int | None = None, fix: str = "") -> "pa.Column":
        checks = []
        if lo is not None and hi is not None:
            checks.append(pa.Check.in_range(lo, hi, error=fix or f"must lie in [{lo}, {hi}]"))
        elif lo is not None:
            checks.append(pa.Check.ge(lo, error=fix or f"must be >= {lo}"))
        return pa.Column("int64", checks, nullable=False)

    text = pa.Column(str, nullable=False)
    return {
        "movielens-1m/ratings.dat": _raw(
            {
                "user_id": ints(1, 6040, "MovieLens-1M user ids are 1..6040"),
                "movie_id": ints(1, 3952, "MovieLens-1M movie ids are 1..3952"),
                "rating": ints(1, 5, "MovieLens ratings are integers 1..5"),
                # the published period, 2000-04-25 .. 2003-02-28: a cut-off or corrupted time is caught here
                "timestamp": ints(956_703_932, 1_046_454_590,
                                  "MovieLens-1M timestamps lie in 2000-04-25 .. 2003-02-28 (956703932..1046454590)"),
            },
            name="ml-1m ratings",
        ),
        "movielens-1m/users.dat": _raw(
            {
                "user_id": ints(1, 6040, "MovieLens-1M user ids are 1..6040"),
                "gender": pa.Column(str, pa.Check.isin(["M", "F"], error="gender is M or F")),
                "age": pa.Column(
                    "int64", pa.Check.isin([1, 18, 25, 35, 45, 50, 56], error="age is one of the 7 ML-1M age codes")
                ),
                "occupation": ints(0, 20, "occupation is a code 0..20"),
                "zipcode": text,
            },
            unique=["user_id"],
            name="ml-1m users",
        ),
        "movielens-1m/movies.dat": _raw(
            {"movie_id": ints(1, 3952, "MovieLens-1M movie ids are 1..3952"), "title": text, "genres": text},
            unique=["movie_id"], name="ml-1m movies"
        ),
        "bookcrossing/BX-Book-Ratings.csv": _raw(
            {"user_id": ints(0), "isbn": text, "rating": ints(0, 10, "Book-Crossing ratings are 0..10")},
            name="BX ratings",
        ),
        "bookcrossing/BX-Users.csv": _raw(
            {"user_id": ints(0), "location": pa.Column(str, nullable=True), "age": pa.Column(str, nullable=True)},
            unique=["user_id"],
            name="BX users",
        ),
        "bookcrossing/BX-Books.csv": _raw(
            {
                "isbn": text,
                "title": pa.Column(str, nullable=True),
                "author": pa.Column(str, nullable=True),
                "year": pa.Column(str, nullable=True),
                "publisher": pa.Column(str, nullable=True),
            },
            name="BX books",
        ),
        "goodreads/interactions": _raw(
            {
                "user_id": text,
                "book_id": text,
                "rating": ints(0, 5, "GoodReads ratings are 0..5"),
                "ts": ints(0),
            },
            name="GoodReads interactions",
        ),
    }


def validate_raw(
    con: "duckdb.DuckDBPyConnection",
    table: str,
    path: Path | str,
    schema: "pa.DataFrameSchema",
    *,
    header: bool,
    columns: list[str] | None = None,
) -> None:
    """Validate ``table`` (VARCHAR columns + ``_row``) in chunks; raise DataError at the first bad row."""
    import pandera.pandas as pa

    cols = columns or list(schema.columns)
    select = ", ".join(["_row", *[f'"{c}"' for c in cols]])
    n = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    seen_unique: dict[str, set] = {c: set() for c in (schema.unique or [])}
    for start in range(0, n, CHUNK_ROWS):
        df = con.execute(
            f"SELECT {select} FROM {table} WHERE _row > {start} AND _row <= {start + CHUNK_ROWS} ORDER BY _row"
        ).df()
        df.index = df.pop("_row").to_numpy()
        try:
            schema.validate(df, lazy=True)
        except pa.errors.SchemaErrors as exc:
            raise _first_failure(exc, df, path, header) from None
        for col, seen in seen_unique.items():  # uniqueness across chunks
            values = set(df[col].tolist())
            both = values & seen
            if both:
                dup = next(iter(both))
                row = int(df.index[df[col] == dup][0])
                raise DataError(
                    "duplicate key", file=str(path), row=row + int(header), column=col, value=dup,
                    fix=f"{col} must be unique in this file; remove the duplicate line",
                )
            seen |= values


def _first_failure(exc: Any, df: Any, path: Path | str, header: bool) -> DataError:
    cases = exc.failure_cases
    cases = cases[cases["index"].notna()] if "index" in cases else cases
    if len(cases) == 0:
        first = exc.failure_cases.iloc[0]
        return DataError(f"schema check failed: {first['check']}", file=str(path), column=first.get("column"))
    cases = cases.sort_values("index")
    first = cases.iloc[0]
    row, column, check, value = int(first["index"]), first["column"], str(first["check"]), first["failure_case"]
    same = cases[(cases["column"] == column) & (cases["check"] == first["check"])]
    count = f" ({same['index'].nunique():,} row(s) of the first {CHUNK_ROWS:,} fail this check)" \
        if same["index"].nunique() > 1 else ""
    value = value.item() if hasattr(value, "item") else value
    if "unique" in check or "duplicate" in check.lower():  # name the second occurrence
        row = int(df.index[df.duplicated(subset=[column])][0])
        value = df.loc[row, column]
    line = row + int(header)
    if "coerce_dtype" in check or "dtype" in check:
        norm = "".join(ch for ch in str(value).lower() if ch.isalnum())
        if norm and norm == "".join(ch for ch in str(column).lower() if ch.isalnum()):
            problem = "a header line inside the data (this file has no header row)"
        else:
            problem = "expected a number"
        return DataError(problem + count, file=str(path), row=line, column=column, value=value,
                         fix="repair or delete that line")
    if "unique" in check or "duplicate" in check.lower():
        return DataError("duplicate key", file=str(path), row=line, column=column, value=value,
                         fix=f"{column} must be unique in this file; remove the duplicate line")
    if "not_nullable" in check or "null" in check.lower():
        return DataError("missing value" + count, file=str(path), row=line, column=column,
                         fix="fill in the value or delete that line")
    return DataError(f"value outside the rule: {check}{count}", file=str(path), row=line, column=column, value=value,
                     fix="repair that line, or drop such rows before preprocessing")


# ------------------------------------------------------------------------------ processed splits
def processed_schema(meta: dict[str, Any]) -> "pa.DataFrameSchema":
    """Contract of one processed split, with id domains taken from the vocabularies in ``meta``."""
    import pandera.pandas as pa

    columns: dict[str, pa.Column] = {
        "row": pa.Column("int64", pa.Check.ge(0), unique=True),
        "timestamp": pa.Column("int64"),
        "label": pa.Column("int8", pa.Check.isin([0, 1])),
        "text": pa.Column(str, pa.Check.str_length(min_value=1)),
        "span_start": pa.Column(object),
        "span_end": pa.Column(object),
    }
    for f in meta["fields"]:
        lo, hi = f["offset"], f["offset"] + f["size"] - 1
        columns[f["name"]] = pa.Column(
            "int32", pa.Check.in_range(lo, hi, error=f"ids of field {f['name']} lie in [{lo}, {hi}]")
        )
    num_fields = len(meta["fields"])

    def spans_ok(df: Any) -> Any:  # vectorised: every field has 0 <= start < end <= len(text)
        import numpy as np
        import pandas as pd

        ok = np.array([len(s) == num_fields for s in df["span_start"]]) & np.array(
            [len(e) == num_fields for e in df["span_end"]])
        if not ok.all():
            return pd.Series(ok, index=df.index)
        starts, ends = np.stack(df["span_start"].to_numpy()), np.stack(df["span_end"].to_numpy())
        lengths = df["text"].str.len().to_numpy()[:, None]
        ok = ((starts >= 0) & (starts < ends) & (ends <= lengths)).all(axis=1)
        return pd.Series(ok, index=df.index)

    return pa.DataFrameSchema(
        columns,
        checks=[
            pa.Check(lambda df: df["row"].is_monotonic_increasing, error="rows are stored in time order"),
            pa.Check(lambda df: df["timestamp"].is_monotonic_increasing, error="timestamps never decrease"),
            pa.Check(spans_ok, error="every field has a span [start, end) inside the text"),
        ],
        strict=True,
        name="processed split",
    )


def _row_group_chunks(pf: Any, rows: int) -> list[list[int]]:
    """The file's row groups in order, gathered into runs of about ``rows`` rows (at least one group)."""
    chunks: list[list[int]] = []
    size = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if not chunks or size + n > rows:
            chunks.append([])
            size = 0
        chunks[-1].append(g)
        size += n
    return chunks


def validate_processed(dataset_dir: Path | str, meta: dict[str, Any]) -> dict[str, Any]:
    """Validate every split in row-group chunks and check the splits do not overlap in time or rows.

    Returns a JSON-able summary; raises :class:`DataError` with the failure cases on a violation.
    """
    import pandera.pandas as pa
    import pyarrow.parquet as pq

    import gc

    from flip.io import malloc_trim

    schema = processed_schema(meta)
    trim = malloc_trim()
    bounds: dict[str, tuple[int, int, int, int]] = {}
    summary: dict[str, Any] = {"splits": {}}
    for split in ("train", "valid", "test"):
        path = Path(dataset_dir) / f"{split}.parquet"
        if not path.exists():
            raise DataError("processed split is missing", file=str(path), fix="run `flip preprocess` first")
        pf = pq.ParquetFile(path)
        rows = 0
        first_row = last_row = first_ts = last_ts = None
        for groups in _row_group_chunks(pf, PROCESSED_CHUNK_ROWS):
            # pandera's validation leaves reference cycles that hold each chunk's frame: collected
            # here, the peak stays ~1 GiB at 16M rows (3.7 GiB and growing after 24 chunks without)
            df = None
            gc.collect()
            trim(0)
            df = pf.read_row_groups(groups).to_pandas()
            try:
                schema.validate(df, lazy=True)
            except pa.errors.SchemaErrors as exc:
                cases = exc.failure_cases.head(10)
                table = cases[["column", "check", "failure_case", "index"]].to_string(index=False)
                raise DataError(
                    f"{len(exc.failure_cases)} schema failure(s):\n{table}\n",
                    file=str(path),
                    fix="re-run `flip preprocess`; if it persists, report the failing rule",
                ) from None
            if last_row is not None and (df["row"].iloc[0] <= last_row or df["timestamp"].iloc[0] < last_ts):
                raise DataError("rows out of time order across row groups", file=str(path), row=rows,
                                fix="re-run `flip preprocess`")
            first_row = int(df["row"].iloc[0]) if first_row is None else first_row
            first_ts = int(df["timestamp"].iloc[0]) if first_ts is None else first_ts
            last_row, last_ts = int(df["row"].iloc[-1]), int(df["timestamp"].iloc[-1])
            rows += len(df)
        if rows == 0:
            raise DataError("processed split is empty", file=str(path), fix="check the raw data and the split params")
        bounds[split] = (first_row, last_row, first_ts, last_ts)
        summary["splits"][split] = {"rows": rows, "first_row": first_row, "last_row": last_row}
    for earlier, later in (("train", "valid"), ("valid", "test")):
        before, after = bounds[earlier], bounds[later]
        if not before[1] < after[0]:
            raise DataError(f"rows of {earlier} and {later} overlap (leakage)", file=str(dataset_dir),
                            fix="re-run `flip preprocess`")
        if not before[3] <= after[2]:
            raise DataError(f"{later} starts before {earlier} ends in time (leakage)", file=str(dataset_dir),
                            fix="re-run `flip preprocess`")
    summary["success"] = True
    return summary
