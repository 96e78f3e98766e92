"""GoodReads (Wan & McAuley, RecSys'18; UCSD Book Graph): JSON-lines (gzip) files.

* ``goodreads_interactions_dedup.json.gz``: user_id, book_id, rating (0 = shelved, not rated), date_added
* ``goodreads_books.json.gz``: book metadata; ``goodreads_book_authors.json.gz``: author names;
  ``goodreads_book_genres_initial.json.gz``: genre votes per book.

Label (paper §4.1.1): rating > 3 → 1, ratings 1–3 → 0; rating 0 (shelved without a rating) is not a
rating and is dropped. The time is ``date_added``. Fields: the authors' fifteen (ClickPrompt's list),
except *Media type*, which the public books file does not carry: we use its ``language_code``
("Language") in that slot. *Book genres* is the genre with the most votes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flip.data.schemas import raw_schemas, validate_raw
from flip.data.sources.base import Download, Field, RawFile, SourceInfo, clean_text, find_raw, sql_str
from flip.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import duckdb

    from flip.config import Config

_BASE = "https://datarepo.eng.ucsd.edu/mcauley_group/gdrive/goodreads/"
_FILES = ["goodreads_interactions_dedup.json.gz", "goodreads_books.json.gz", "goodreads_book_authors.json.gz",
          "goodreads_book_genres_initial.json.gz"]

INFO = SourceInfo(
    name="goodreads",
    directory="goodreads",
    fields=[
        Field("user_id", "User ID"), Field("book_id", "Book ID"), Field("title", "Book title"),
        Field("genre", "Book genres"), Field("average_rating", "Average rating"),
        Field("reviews", "Number of book reviews"), Field("author_id", "Author ID"), Field("author", "Author name"),
        Field("pages", "Number of pages"), Field("ebook", "eBook flag"), Field("format", "Format"),
        Field("publisher", "Publisher"), Field("year", "Publication year"), Field("work_id", "Work ID"),
        Field("language", "Language"),
    ],
    files=[RawFile(name) for name in _FILES],
    # the publisher gives no checksums: they are recorded at the first download and checked afterwards
    downloads=[Download(url=_BASE + name, filename=name) for name in _FILES],
    user_field="user_id",
    item_field="book_id",
    label_rule="rating > 3 -> 1, rating 1..3 -> 0, rating 0 (not rated) dropped",
)


def info(cfg: "Config | None" = None) -> SourceInfo:
    return INFO


def _json(path: Path, columns: dict[str, str]) -> str:
    cols = "{" + ", ".join(f"{sql_str(k)}: {sql_str(v)}" for k, v in columns.items()) + "}"
    return f"read_ndjson({sql_str(str(path))}, columns={cols}, maximum_object_size=100000000)"


def load(con: "duckdb.DuckDBPyConnection", raw: Path, cfg: "Config") -> None:
    paths = {name: find_raw(raw, name) for name in _FILES}
    for name, path in paths.items():
        if not path.exists() or path.stat().st_size == 0:
            raise DataError("file is missing or empty", file=str(path), fix=f"put the official {name} in {raw}")
    try:
        con.execute(f"""
            CREATE OR REPLACE TABLE interactions AS
            SELECT row_number() OVER () AS _row, user_id, book_id, rating::VARCHAR AS rating,
                   epoch(strptime(date_added, '%a %b %d %H:%M:%S %z %Y'))::BIGINT::VARCHAR AS ts
            FROM {_json(paths[_FILES[0]], {"user_id": "VARCHAR", "book_id": "VARCHAR", "rating": "VARCHAR",
                                           "date_added": "VARCHAR"})}
        """)
        con.execute(f"""CREATE OR REPLACE TABLE books AS SELECT * FROM {_json(paths[_FILES[1]], {
            "book_id": "VARCHAR", "title": "VARCHAR", "average_rating": "VARCHAR", "text_reviews_count": "VARCHAR",
            "authors": "STRUCT(author_id VARCHAR, role VARCHAR)[]", "num_pages": "VARCHAR", "is_ebook": "VARCHAR",
            "format": "VARCHAR", "publisher": "VARCHAR", "publication_year": "VARCHAR", "work_id": "VARCHAR",
            "language_code": "VARCHAR"})}""")
        con.execute(f"CREATE OR REPLACE TABLE authors AS SELECT * FROM "
                    f"{_json(paths[_FILES[2]], {'author_id': 'VARCHAR', 'name': 'VARCHAR'})}")
        con.execute(f"""
            CREATE OR REPLACE TABLE genres AS
            SELECT book_id, arg_max(g.key, g.value) AS genre
            FROM (SELECT book_id, unnest(map_entries(genres)) AS g
                  FROM {_json(paths[_FILES[3]], {"book_id": "VARCHAR", "genres": "MAP(VARCHAR, INTEGER)"})})
            GROUP BY book_id
        """)
    except DataError:
        raise
    except Exception as exc:  # malformed JSON / dates
        raise DataError(f"cannot read the GoodReads JSON files: {str(exc).splitlines()[0]}", file=str(raw),
                        fix="use the official UCSD Book Graph files (JSON lines, gzip)") from exc
    validate_raw(con, "interactions", paths[_FILES[0]], raw_schemas()["goodreads/interactions"], header=False)
    con.execute(f"""
        CREATE OR REPLACE TABLE samples AS
        SELECT
            CASE WHEN i.rating::INT > 3 THEN 1 ELSE 0 END AS label,
            i.ts::BIGINT AS ts, i.user_id AS sort_user, i.book_id AS sort_item,
            {clean_text("i.user_id")} AS v_0, {clean_text("i.book_id")} AS v_1, {clean_text("b.title")} AS v_2,
            {clean_text("g.genre")} AS v_3, {clean_text("b.average_rating")} AS v_4,
            {clean_text("b.text_reviews_count")} AS v_5, {clean_text("b.authors[1].author_id")} AS v_6,
            {clean_text("a.name")} AS v_7, {clean_text("b.num_pages")} AS v_8, {clean_text("b.is_ebook")} AS v_9,
            {clean_text("b.format")} AS v_10, {clean_text("b.publisher")} AS v_11,
            {clean_text("b.publication_year")} AS v_12, {clean_text("b.work_id")} AS v_13,
            {clean_text("b.language_code")} AS v_14
        FROM interactions i
        JOIN books b ON i.book_id = b.book_id
        LEFT JOIN genres g ON i.book_id = g.book_id
        LEFT JOIN authors a ON b.authors[1].author_id = a.author_id
        WHERE i.rating::INT > 0
    """)
