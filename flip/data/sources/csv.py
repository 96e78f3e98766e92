"""A user's own click log: one or several CSV or Parquet files described in ``params.yaml``.

```yaml
data:
  dataset: csv
  csv:
    files: [logs/clicks-*.csv]        # globs; .csv/.tsv/.txt or .parquet
    fields:                           # the features, in text order, with human-readable names
      - {column: user, name: User ID}
      - {column: item, name: Item ID}
      - {column: category, name: Category}
    label: clicked                    # 0/1 column, or the column a rule is applied to:
    positive: ""                      # e.g. "value > 3"   (SQL over the label column named value)
    drop: ""                          # e.g. "value = 3"   rows to remove before labelling
    timestamp: ts                     # optional: epoch seconds or an ISO date/time; else file order
    user: user                        # the user id and item id columns (cold-start analysis)
    item: item
    delimiter: ","
    encoding: utf-8                   # or latin-1
```
"""

from __future__ import annotations

import csv as pycsv
import glob
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flip.data.download import file_digest
from flip.data.sources.base import Field, SourceInfo, clean_text, read_delimited
from flip.data.sql import positional, rule_sql
from flip.errors import DataError, FlipError

if TYPE_CHECKING:  # pragma: no cover
    import duckdb

    from flip.config import Config, CsvSource


# the processed splits' own columns: a field may not take one of these names
RESERVED_KEYS = ("row", "timestamp", "label", "text", "span_start", "span_end")


def field_key(column: str) -> str:
    """The field name of a user's column: lower-case letters, digits and ``_`` ("User ID" -> user_id); a
    name the processed splits use for their own columns (row, label, ...) gets ``_field`` appended."""
    key = re.sub(r"[^0-9a-zA-Z]+", "_", column).strip("_").lower() or "field"
    return f"{key}_field" if key in RESERVED_KEYS else key


def _files(c: "CsvSource") -> list[Path]:
    if not c.files:
        raise FlipError("data.csv.files is empty: list your click-log files (globs allowed) in params.yaml")
    found: list[Path] = []
    for pattern in c.files:
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise DataError("no file matches this pattern", file=pattern,
                            fix="fix data.csv.files in params.yaml (paths are relative to the project root)")
        found += [Path(m) for m in matches]
    return found


def info(cfg: "Config") -> SourceInfo:
    c = cfg.data.csv
    if not c.fields:
        raise FlipError("data.csv.fields is empty: list the feature columns with human-readable names")
    fields = [Field(field_key(f.column), f.name) for f in c.fields]
    keys = [f.key for f in fields]
    if len(set(keys)) != len(keys):
        raise FlipError(f"data.csv.fields: two columns map to the same field name ({keys})")
    by_column = {f.column: field_key(f.column) for f in c.fields}
    return SourceInfo(
        name="csv", directory="csv", fields=fields, files=[], user_field=by_column.get(c.user, ""),
        item_field=by_column.get(c.item, ""),
        label_rule=(f"{c.label}: drop where {c.drop or 'never'}; 1 where {c.positive}" if c.positive
                    else f"{c.label} holds 0/1"),
        split_rule=(f"sorted by ({c.timestamp}, {c.user or 'file order'}, {c.item or 'file order'})"
                    if c.timestamp else "file order (no timestamp column)"),
    )


def manifest(cfg: "Config") -> dict[str, Any]:
    files = _files(cfg.data.csv)
    return {"origin": "user files", "files": {str(p): {"bytes": p.stat().st_size, "sha256": file_digest(p)}
                                              for p in files}}


def _show(name: str) -> str:
    """A column name for a message: as it is when plain, else quoted and escaped (one line, no surprises)."""
    return name if re.fullmatch(r"[\w .:/()#%-]+", name) else repr(name)


def _header(path: Path, c: "CsvSource") -> list[str]:
    """The header's cells (the user's column names). They stay Python strings: the file is read by
    position and no cell ever becomes SQL. A header cell holding a line break cannot be told apart from
    the next line by every reader, so it is refused."""
    with open(path, "rb") as fh:
        first = fh.readline()
    try:
        line = first.decode(c.encoding.replace("latin-1", "latin_1"))
    except UnicodeDecodeError:
        raise DataError(f"the header is not valid {c.encoding}", file=str(path), row=1,
                        fix="re-save the file in UTF-8 or set data.csv.encoding (e.g. latin-1)") from None
    line = line.lstrip("\ufeff").rstrip("\r\n")
    try:
        cells = next(pycsv.reader(io.StringIO(line + "\n"), delimiter=c.delimiter, strict=True))
    except (pycsv.Error, StopIteration) as exc:
        raise DataError(f"the header line cannot be read ({exc or 'it is empty'}): a quoted column name that "
                        "goes on past the line end, or a stray quote", file=str(path), row=1, value=line[:80],
                        fix="give each column a name on the first line, without line breaks ("
                            "quote a name that holds the separator, doubling any quote in it)") from None
    for j, cell in enumerate(cells):
        if "\r" in cell or "\n" in cell or "\x00" in cell:
            raise DataError(f"header cell {j + 1} holds a line break or NUL character", file=str(path), row=1,
                            value=cell[:80], fix="rename the column (a name on one line)")
    return [h.strip() for h in cells]


def _locate(names: list[str], needed: list[str], path: Path) -> dict[str, str]:
    """The SQL name (``c_j``, by position) of each needed column, by the user's name for it."""
    missing = [col for col in needed if col not in names]
    if missing:
        raise DataError(
            f"missing column(s) {', '.join(_show(m) for m in missing)}; the file has: "
            f"{', '.join(_show(n) for n in names)}",
            file=str(path), row=1, column=missing[0],
            fix="rename the columns in the file or fix data.csv in params.yaml",
        )
    twice = [col for col in needed if names.count(col) > 1]
    if twice:
        raise DataError(f"column {_show(twice[0])} appears {names.count(twice[0])} times in the header, so it "
                        "is not clear which one to use", file=str(path), row=1, column=twice[0],
                        fix="give each column its own name")
    sql = positional(len(names))
    return {col: sql[names.index(col)] for col in needed}


MISSING_POLICIES = ("unknown", "drop", "error")


def _blank(ident: str) -> str:
    return f"""nullif(trim(regexp_replace({ident}::VARCHAR, '\\s+', ' ', 'g')), '') IS NULL"""


def _check_missing(con: "duckdb.DuckDBPyConnection", table: str, path: Path, c: "CsvSource", header: bool,
                   col: dict[str, str]) -> list[str]:
    """Empty values: user and item ids never (an error naming the rows); each field by its ``missing``
    policy (``data.csv.missing`` by default). Counts go to the ``missing_values`` table (meta.json);
    returns the SQL conditions that drop rows (policy ``drop``)."""
    con.execute("CREATE TABLE IF NOT EXISTS missing_values (field VARCHAR, policy VARCHAR, rows BIGINT)")
    policies: dict[str, str] = {}
    for f in c.fields:
        policy = f.missing or c.missing
        if policy not in MISSING_POLICIES:
            raise FlipError(f"data.csv missing policy {policy!r} for column {f.column!r} is not one of "
                            f"{', '.join(MISSING_POLICIES)}. Fix: set data.csv.missing (or the field's missing:)")
        policies[f.column] = policy
    for column in dict.fromkeys(x for x in (c.user, c.item) if x):
        policies[column] = "error"  # an interaction without its user or item means nothing
    drop = []
    for column, policy in policies.items():
        blank = _blank(col[column])
        n, first = con.execute(f"SELECT count(*), min(_row) FROM {table} WHERE {blank}").fetchone()
        if not n:
            continue
        con.execute("INSERT INTO missing_values VALUES ($1, $2, $3)", [column, policy, int(n)])
        if policy == "error":
            what = "id" if column in (c.user, c.item) else "value"
            rows = [r for (r,) in con.execute(f"SELECT _row FROM {table} WHERE {blank} ORDER BY _row "
                                              "LIMIT 3").fetchall()]
            raise DataError(f"{n:,} row(s) have an empty {what} (rows {', '.join(str(r + int(header)) for r in rows)})",
                            file=str(path), row=int(first) + int(header), column=column,
                            fix="fill them in or remove those rows" + (
                                "; user and item ids may never be empty" if what == "id" else
                                "; or set data.csv.missing (or this field's missing:) to unknown or drop"))
        if policy == "drop":
            drop.append(f"NOT ({blank})")
    return drop


def _check_labels(con: "duckdb.DuckDBPyConnection", table: str, path: Path, c: "CsvSource", header: bool,
                  col: dict[str, str]) -> None:
    """Every label is 0/1 (no rule) or a number (a ``positive:`` rule applies to it): else one paragraph with
    the user's column name, the number of bad rows and the first few."""
    label = col[c.label]
    trimmed = f"trim({label}::VARCHAR)"
    bad_sql = (f"{trimmed} IS NULL OR {trimmed} NOT IN ('0', '1')" if not c.positive
               else f"TRY_CAST({trimmed} AS DOUBLE) IS NULL")
    total = con.execute(f"SELECT count(*) FROM {table} WHERE {bad_sql}").fetchone()[0]
    if not total:
        return
    first = con.execute(f"SELECT _row, {label} FROM {table} WHERE {bad_sql} ORDER BY _row LIMIT 3").fetchall()
    shown = ", ".join(f"row {r + int(header)}: {v!r}" for r, v in first)
    numeric = all(v is not None and re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", str(v)) for _, v in first)
    if c.positive:
        problem, fix = "not a number, so the rule data.csv.positive cannot apply", "repair or drop those rows"
    elif numeric:
        problem = "not 0 or 1"
        fix = (f"if {c.label!r} is a score (a rating, a dwell time), set a rule: data.csv.positive: \"value > 3\" "
               "(and optionally data.csv.drop: \"value = 3\"); else repair those rows")
    else:
        problem = "not 0 or 1 (text)"
        fix = (f"export {c.label!r} as 0/1 (e.g. yes -> 1, no -> 0); a rule (data.csv.positive) applies to "
               "numbers only")
    raise DataError(f"{total:,} row(s) have a label that is {problem} ({shown})", file=str(path),
                    row=int(first[0][0]) + int(header), column=c.label, value=first[0][1], fix=fix)


def _read(con: "duckdb.DuckDBPyConnection", path: Path, table: str, c: "CsvSource") -> tuple[list[str], bool]:
    """Read one file into ``table`` with its columns renamed by position (``_row``, ``c_0 …``); returns the
    file's own column names and whether it has a header line."""
    if path.suffix == ".parquet":
        try:
            names = [d[0] for d in con.execute("SELECT * FROM read_parquet($1) LIMIT 0", [str(path)]).description]
            con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT row_number() OVER () AS _row, * "
                        f"FROM read_parquet($1) AS t({', '.join(positional(len(names)))})", [str(path)])
        except Exception as exc:  # duckdb.Error: not Parquet, damaged
            raise DataError(f"cannot be read as Parquet: {str(exc).splitlines()[0]}", file=str(path),
                            fix="re-export the click log") from exc
        return names, False
    if path.stat().st_size == 0:
        raise DataError("file is empty", file=str(path), fix="re-export the click log with a header row")
    names = _header(path, c)
    read_delimited(con, path, table, positional(len(names)), names=names, delim=c.delimiter, header=True,
                   encoding=c.encoding, quote='"', escape='"', fix="re-export the click log")
    return names, True


def load(con: "duckdb.DuckDBPyConnection", raw: Path, cfg: "Config") -> None:
    """Build ``samples`` from the files of ``data.csv.files``. Columns are addressed by position and the
    rules are checked to be one expression over ``value`` (:func:`flip.data.sql.check_rule`) before any
    file is read; ``value`` is a column of the query the rule runs in, so the word inside a string
    literal keeps its meaning."""
    c = cfg.data.csv
    positive = rule_sql(c.positive, "data.csv.positive", con) if c.positive else ""
    drop_rule = rule_sql(c.drop, "data.csv.drop", con) if c.drop else ""
    needed = [f.column for f in c.fields] + [c.label] + [x for x in (c.timestamp, c.user, c.item) if x]
    needed = list(dict.fromkeys(needed))
    con.execute("CREATE TABLE IF NOT EXISTS files_read (path VARCHAR, rows BIGINT)")
    parts = []
    for i, path in enumerate(_files(c)):
        table = f"part_{i}"
        names, header = _read(con, path, table, c)
        con.execute(f"INSERT INTO files_read SELECT $1, count(*) FROM {table}", [str(path)])
        col = _locate(names, needed, path)
        _check_labels(con, table, path, c, header, col)
        if c.timestamp:
            t = col[c.timestamp]
            ts = f"coalesce(TRY_CAST({t} AS BIGINT), epoch(TRY_CAST({t}::VARCHAR AS TIMESTAMP))::BIGINT)"
            bad = con.execute(f"SELECT _row, {t} FROM {table} WHERE {ts} IS NULL ORDER BY _row LIMIT 1").fetchone()
            if bad:
                raise DataError("timestamp is neither epoch seconds nor a date/time", file=str(path),
                                row=int(bad[0]) + int(header), column=c.timestamp, value=bad[1],
                                fix="use epoch seconds or ISO 8601 (2024-05-01 12:00:00), or drop the row")
        else:
            ts = f"({i}::BIGINT << 40) + _row"
        drop_missing = _check_missing(con, table, path, c, header, col)
        label = f"CASE WHEN {positive} THEN 1 ELSE 0 END" if positive else f"{col[c.label]}::INT"
        conditions = ([f"NOT {drop_rule}"] if drop_rule else []) + drop_missing
        where = ("WHERE " + " AND ".join(conditions)) if conditions else ""
        values = ", ".join(f"{clean_text(col[f.column] + '::VARCHAR')} AS v_{k}" for k, f in enumerate(c.fields))
        user = f"{col[c.user]}::VARCHAR" if c.user else "''"
        item = f"{col[c.item]}::VARCHAR" if c.item else "''"
        # the rules see the label as the column ``value`` of this query (the file's own columns are c_0 …)
        source = f"(SELECT *, {col[c.label]}::DOUBLE AS value FROM {table})" if positive or drop_rule else table
        parts.append(f"SELECT {label} AS label, {ts} AS ts, {user} AS sort_user, {item} AS sort_item, {values} "
                     f"FROM {source} {where}")
    try:
        con.execute("CREATE OR REPLACE TABLE samples AS " + " UNION ALL ".join(parts))
    except Exception as exc:  # a label rule that does not apply to numbers (e.g. value > 'x')
        raise FlipError(f"data.csv.positive / data.csv.drop could not be applied: {str(exc).splitlines()[0]}. "
                        "Fix: write them as one SQL expression over the number `value`, e.g. positive: \"value > 3\""
                        ) from exc


def inputs(cfg: "Config") -> list[Path]:
    """The files this source reads (the only ones its DuckDB connection may open besides its work folders)."""
    return _files(cfg.data.csv)
