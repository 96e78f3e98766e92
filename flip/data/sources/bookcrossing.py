"""Book-Crossing (Ziegler et al. 2005): ``BX-Book-Ratings.csv``, ``BX-Users.csv``, ``BX-Books.csv``.

``;``-separated, ``"``-quoted, latin-1, ``NULL`` for a missing age; some values contain line breaks
(read with a CSV parser). Label (paper §4.1.1): rating > 5 → 1, otherwise 0 (0 = implicit
interaction counts as negative). Ratings of books absent from ``BX-Books.csv`` are dropped (the
text needs the book's metadata); users absent from ``BX-Users.csv`` get ``unknown`` values.

**Split rule.** Book-Crossing has no timestamps. Rows are ordered by ``md5(user id ';' ISBN)``, a
fixed pseudo-random order that depends neither on the file order (sorted by user, which would put
whole users into the test split) nor on the DuckDB version, and then split 80/10/10 like the
other datasets. ``timestamp`` is 0 for every row.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flip.data.schemas import raw_schemas, validate_raw
from flip.data.sources.base import Download, Field, RawFile, SourceInfo, clean_text, find_raw, read_delimited

if TYPE_CHECKING:  # pragma: no cover
    import duckdb

    from flip.config import Config

INFO = SourceInfo(
    name="bookcrossing",
    directory="bookcrossing",
    fields=[
        Field("user_id", "User ID"),
        Field("location", "Location"),
        Field("age", "Age"),
        Field("isbn", "ISBN"),
        Field("title", "Book title"),
        Field("author", "Author"),
        Field("year", "Publication year"),
        Field("publisher", "Publisher"),
    ],
    files=[RawFile("BX-Book-Ratings.csv", "BX-CSV-Dump.zip"), RawFile("BX-Users.csv", "BX-CSV-Dump.zip"),
           RawFile("BX-Books.csv", "BX-CSV-Dump.zip")],
    # the publisher gives no checksum: it is recorded at the first download and checked afterwards
    downloads=[Download(url="http://www2.informatik.uni-freiburg.de/~cziegler/BX/BX-CSV-Dump.zip",
                        filename="BX-CSV-Dump.zip")],
    user_field="user_id",
    item_field="isbn",
    label_rule="rating > 5 -> 1, otherwise 0",
    split_rule="no timestamps: ordered by md5(user id;ISBN) (fixed pseudo-random order), then split",
)


def info(cfg: "Config | None" = None) -> SourceInfo:
    return INFO


def load(con: "duckdb.DuckDBPyConnection", raw: Path, cfg: "Config") -> None:
    schemas = raw_schemas()
    specs = {
        "BX-Book-Ratings.csv": ("ratings", ["user_id", "isbn", "rating"], "\\"),
        "BX-Users.csv": ("users", ["user_id", "location", "age"], "\\"),
        # titles contain backslash-escaped quotes (\")
        "BX-Books.csv": ("books", ["isbn", "title", "author", "year", "publisher", "image_s", "image_m", "image_l"],
                         "\\"),
    }
    for filename, (table, columns, escape) in specs.items():
        path = find_raw(raw, filename)
        read_delimited(con, path, table, columns, complete_lines=True, delim=";", header=True, encoding="latin-1", quote='"',
                       escape=escape, fix=f"put the official Book-Crossing {filename} in {raw}")
        schema = schemas[f"bookcrossing/{filename}"]
        validate_raw(con, table, path, schema, header=True)
    con.execute(f"""
        CREATE OR REPLACE TABLE samples AS
        SELECT
            CASE WHEN r.rating::INT > 5 THEN 1 ELSE 0 END AS label,
            0::BIGINT                                      AS ts,
            md5(trim(r.user_id) || ';' || trim(r.isbn))    AS sort_user,
            trim(r.isbn)                                   AS sort_item,
            {clean_text("trim(r.user_id)")}                AS v_0,
            {clean_text("u.location")}                     AS v_1,
            {clean_text("nullif(u.age, 'NULL')")}          AS v_2,
            {clean_text("r.isbn")}                         AS v_3,
            {clean_text("b.title")}                        AS v_4,
            {clean_text("b.author")}                       AS v_5,
            {clean_text("b.year")}                         AS v_6,
            {clean_text("b.publisher")}                    AS v_7
        FROM ratings r
        JOIN (SELECT DISTINCT ON (trim(isbn)) * FROM books ORDER BY trim(isbn), _row) b ON trim(r.isbn) = trim(b.isbn)
        LEFT JOIN users u ON trim(r.user_id) = trim(u.user_id)
    """)
