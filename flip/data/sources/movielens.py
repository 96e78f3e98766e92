"""MovieLens-1M (GroupLens): ``ratings.dat``, ``users.dat``, ``movies.dat``; ``::``-separated, latin-1.

Label (paper §4.1.1): rating > 3 → 1, rating < 3 → 0, rating = 3 dropped.
Fields (the authors' eight): user id, gender, age, occupation, zip code, movie id, title, genres,
with human-readable values on the text side (age bucket and occupation names, not codes).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flip.data.schemas import raw_schemas, validate_raw
from flip.data.sources.base import Download, Field, RawFile, SourceInfo, clean_text, read_delimited, sql_str

if TYPE_CHECKING:  # pragma: no cover
    import duckdb

    from flip.config import Config

INFO = SourceInfo(
    name="movielens-1m",
    directory="ml-1m",
    fields=[
        Field("user_id", "User ID"),
        Field("gender", "Gender"),
        Field("age", "Age"),
        Field("occupation", "Occupation"),
        Field("zipcode", "Zip code"),
        Field("movie_id", "Movie ID"),
        Field("title", "Title"),
        Field("genres", "Genres"),
    ],
    files=[RawFile("ratings.dat", "ml-1m.zip"), RawFile("users.dat", "ml-1m.zip"), RawFile("movies.dat", "ml-1m.zip")],
    downloads=[
        Download(
            url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
            filename="ml-1m.zip",
            checksum="md5:c4d9eecfca2ab87c1945afe126590906",
            size=5917549,
        )
    ],
    user_field="user_id",
    item_field="movie_id",
    label_rule="rating > 3 -> 1, rating < 3 -> 0, rating = 3 dropped",
)



def info(cfg: "Config | None" = None) -> SourceInfo:
    return INFO


AGES = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56 and over"}
OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
    "programmer", "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer",
    "tradesman/craftsman", "unemployed", "writer",
]


def _map(pairs: dict[int, str]) -> str:
    return "MAP {" + ", ".join(f"{k}: {sql_str(v)}" for k, v in pairs.items()) + "}"


def load(con: "duckdb.DuckDBPyConnection", raw: Path, cfg: "Config") -> None:
    """Create the ``samples`` table from the three official files."""
    schemas = raw_schemas()
    specs = {
        "ratings.dat": ("ratings", ["user_id", "movie_id", "rating", "timestamp"]),
        "users.dat": ("users", ["user_id", "gender", "age", "occupation", "zipcode"]),
        "movies.dat": ("movies", ["movie_id", "title", "genres"]),
    }
    for filename, (table, columns) in specs.items():
        path = raw / filename
        read_delimited(con, path, table, columns, complete_lines=True, delim="::", header=False, encoding="latin-1",
                       fix=f"put the official MovieLens-1M {filename} in {raw}")
        validate_raw(con, table, path, schemas[f"movielens-1m/{filename}"], header=False)
    missing = con.execute(
        "SELECT r._row, r.user_id, r.movie_id, u.user_id IS NULL FROM ratings r "
        "LEFT JOIN users u ON r.user_id::BIGINT = u.user_id::BIGINT "
        "LEFT JOIN movies m ON r.movie_id::BIGINT = m.movie_id::BIGINT "
        "WHERE u.user_id IS NULL OR m.movie_id IS NULL ORDER BY r._row LIMIT 1"
    ).fetchone()
    if missing:
        from flip.errors import DataError

        column = "user_id" if missing[3] else "movie_id"
        raise DataError(
            f"rating refers to a {column.split('_')[0]} that is not in "
            f"{'users.dat' if missing[3] else 'movies.dat'}",
            file=str(raw / "ratings.dat"), row=int(missing[0]), column=column,
            value=missing[1] if missing[3] else missing[2],
            fix="use matching official files of one MovieLens-1M release",
        )
    occupations = _map(dict(enumerate(OCCUPATIONS)))
    con.execute(f"""
        CREATE OR REPLACE TABLE samples AS
        SELECT
            CASE WHEN r.rating::INT > 3 THEN 1 ELSE 0 END        AS label,
            r.timestamp::BIGINT                                   AS ts,
            r.user_id::BIGINT                                     AS sort_user,
            r.movie_id::BIGINT                                    AS sort_item,
            {clean_text("r.user_id")}                             AS v_0,
            CASE u.gender WHEN 'M' THEN 'male' ELSE 'female' END  AS v_1,
            {_map(AGES)}[u.age::INT]                              AS v_2,
            {occupations}[u.occupation::INT]                      AS v_3,
            {clean_text("u.zipcode")}                             AS v_4,
            {clean_text("r.movie_id")}                            AS v_5,
            {clean_text("m.title")}                               AS v_6,
            {clean_text("replace(m.genres, '|', ', ')")}          AS v_7
        FROM ratings r
        JOIN users u  ON r.user_id::BIGINT = u.user_id::BIGINT
        JOIN movies m ON r.movie_id::BIGINT = m.movie_id::BIGINT
        WHERE r.rating::INT <> 3
    """)
