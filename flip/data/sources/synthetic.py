"""A deterministic synthetic click log of any size, for tests and the scale benchmark.

Generated in DuckDB SQL from ``range(rows)`` with hash-based pseudo-randomness (same params and
DuckDB version → same data). Users have a favourite mood word; items have a genre made of a mood
word and a noun ("dark thriller"). A click is much likelier when the item's genre contains the
user's mood word, so the *words* of the text carry part of the signal, while popularity and user
activity are skewed (some users and items are rare: cold start).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flip.data.sources.base import Field, SourceInfo, sql_str

if TYPE_CHECKING:  # pragma: no cover
    import duckdb

    from flip.config import Config

MOODS = ["dark", "funny", "romantic", "epic", "quiet", "scary"]
NOUNS = ["thriller", "comedy", "drama", "saga", "mystery", "story", "adventure", "tale"]
ADJECTIVES = ["silent", "golden", "broken", "hidden", "last", "red", "lost", "wild", "little", "long"]
THINGS = ["river", "house", "garden", "city", "road", "winter", "mirror", "promise", "island", "letter"]
CITIES = ["paris", "berlin", "tokyo", "lima", "oslo", "cairo", "austin", "lyon", "porto", "kyoto", "delhi", "quito"]
AUTHORS = ["ana moreau", "li wei", "sam okafor", "eva novak", "raj patel", "mia berg", "tom reyes", "kim ito"]
PUBLISHERS = ["north press", "blue house", "atlas books", "river & sons", "kite media"]
FORMATS = ["paperback", "hardcover", "ebook", "audio"]
LANGUAGES = ["english", "français", "español", "deutsch", "日本語"]

ALL_FIELDS = [
    Field("user_id", "User ID"),
    Field("item_id", "Item ID"),
    Field("gender", "Gender"),
    Field("age", "Age"),
    Field("city", "City"),
    Field("mood", "Favourite mood"),
    Field("genre", "Genre"),
    Field("title", "Title"),
    Field("author", "Author"),
    Field("year", "Release year"),
    Field("publisher", "Publisher"),
    Field("format", "Format"),
    Field("language", "Language"),
    Field("length", "Length"),
    Field("price", "Price band"),
]


def info(cfg: "Config") -> SourceInfo:
    f = cfg.data.synthetic.fields
    if not 4 <= f <= len(ALL_FIELDS):
        from flip.errors import FlipError

        raise FlipError(f"data.synthetic.fields must be between 4 and {len(ALL_FIELDS)}, got {f}")
    return SourceInfo(
        name="synthetic", directory="synthetic", fields=ALL_FIELDS[:f], files=[], user_field="user_id",
        item_field="item_id", label_rule="generated: click likelier when the genre contains the user's mood word",
        split_rule="sorted by (timestamp, user id, item id); timestamps increase with the row number",
    )


def _lst(words: list[str]) -> str:
    return "[" + ", ".join(sql_str(w) for w in words) + "]"


def _pick(words: list[str], key: str) -> str:
    return f"{_lst(words)}[1 + ({key}) % {len(words)}]"


def load(con: "duckdb.DuckDBPyConnection", raw: Path, cfg: "Config") -> None:
    s = cfg.data.synthetic
    fields = info(cfg).fields
    seed, users, items, rows = int(s.seed), int(s.users), int(s.items), int(s.rows)  # numbers only reach the SQL

    def h(expr: str, salt: str) -> str:  # deterministic 0..2^31 integer
        return f"(hash({expr}, {seed}, {sql_str(salt)}) % 2147483647)::BIGINT"

    def unif(expr: str, salt: str) -> str:
        return f"({h(expr, salt)} / 2147483647.0)"

    values = {
        "user_id": "'u' || u::VARCHAR",
        "item_id": "'i' || it::VARCHAR",
        "gender": _pick(["female", "male"], h("u", "gender")),
        "age": _pick(["under 18", "18-24", "25-34", "35-44", "45-54", "55 and over"], h("u", "age")),
        "city": _pick(CITIES, h("u", "city")),
        "mood": f"{_lst(MOODS)}[1 + umood]",
        "genre": f"{_lst(MOODS)}[1 + imood] || ' ' || {_pick(NOUNS, h('it', 'noun'))}",
        "title": f"'the ' || {_pick(ADJECTIVES, h('it', 'adj'))} || ' ' || {_pick(THINGS, h('it', 'thing'))}",
        "author": _pick(AUTHORS, h("it", "author")),
        "year": f"(1950 + {h('it', 'year')} % 75)::VARCHAR",
        "publisher": _pick(PUBLISHERS, h("it", "pub")),
        "format": _pick(FORMATS, h("it", "format")),
        "language": _pick(LANGUAGES, h("it", "lang")),
        "length": _pick(["short", "medium", "long", "very long"], h("it", "length")),
        "price": _pick(["budget", "standard", "premium"], h("it", "price")),
    }
    cols = ",\n            ".join(f"{values[f.key]} AS v_{k}" for k, f in enumerate(fields))
    # users and items are skewed: u = floor(U * x^2) puts most rows on few ids (and leaves a long tail)
    con.execute(f"""
        CREATE OR REPLACE VIEW samples AS
        WITH base AS (
            SELECT i,
                   least({users - 1}, floor({users} * pow({unif('i', 'user')}, 2)))::BIGINT AS u,
                   least({items - 1}, floor({items} * pow({unif('i', 'item')}, 2)))::BIGINT AS it
            FROM range({rows}) t(i)
        ), feats AS (
            SELECT *, {h('u', 'mood')} % {len(MOODS)} AS umood, {h('it', 'mood')} % {len(MOODS)} AS imood,
                   {unif('it', 'quality')} - 0.5 AS quality, {unif('u', 'activity')} - 0.5 AS activity
            FROM base
        )
        SELECT
            CASE WHEN {unif('i', 'click')} <
                 1 / (1 + exp(-(2.2 * (umood = imood)::INT + 1.6 * quality + 0.8 * activity - 1.0)))
                 THEN 1 ELSE 0 END AS label,
            1600000000 + i * 7 + {h('i', 'ts')} % 5 AS ts,
            u AS sort_user,
            it AS sort_item,
            {cols}
        FROM feats
    """)


def manifest(cfg: "Config") -> dict:
    """Nothing to download: the data are generated from these params."""
    import dataclasses

    return {"origin": "generated", "params": dataclasses.asdict(cfg.data.synthetic)}
