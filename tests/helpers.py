"""Test helpers: project paths, the optional MovieLens-1M copy, tiny raw files in official formats."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FLIP_DATA_MIRROR") or ROOT.parent / "shared" / "data")

# The settings the tests were written for, where Config() (= params.yaml, the quick profile) differs:
# the tests pin them so that a change of the profile does not change what they compute.
TEST_DEFAULTS: dict[str, dict[str, Any]] = {
    "plm": {"max_length": 100},
    "pretrain": {"epochs": 30, "batch_size": 1024, "lr": 5e-5, "plm_lr": 0.0, "warmup_steps": 0, "train_rows": 0},
    "finetune": {"train_rows": 0, "eval_rows": 0, "lr_grid": [], "plm_epochs": 0, "plm_batch_size": 0,
                 "alpha_init": 0.0},
    "run": {"seeds": [2012]},
}


def pinned_tree(tree: dict[str, Any] | None = None) -> dict[str, Any]:
    """``tree`` (a params.yaml-shaped dict) over :data:`TEST_DEFAULTS`, section by section."""
    out = {section: dict(values) for section, values in TEST_DEFAULTS.items()}
    for section, values in (tree or {}).items():
        out[section] = {**out.get(section, {}), **values} if isinstance(values, dict) else values
    return out


def pinned_config(tree: dict[str, Any] | None = None):
    """``config_from_dict(pinned_tree(tree))``."""
    from flip.config import config_from_dict

    return config_from_dict(pinned_tree(tree))


def pinned_overrides(*overrides: str) -> list[str]:
    """``-S`` overrides for ``load_config(None, ...)``: :data:`TEST_DEFAULTS`, then ``overrides``."""
    pinned = [f"{s}.{k}={json.dumps(v)}" for s, values in TEST_DEFAULTS.items() for k, v in values.items()]
    return [*pinned, *overrides]


def ml1m_available() -> bool:
    return (SHARED_DATA / "ml-1m" / "ratings.dat").exists()


# ------------------------------------------------------------------ tiny files in official layouts
def write_ml1m(root: Path, ratings: list[tuple] | None = None) -> Path:
    """A tiny MovieLens-1M in the official layout (``::``, latin-1) under ``root/ml-1m``."""
    d = root / "ml-1m"
    d.mkdir(parents=True, exist_ok=True)
    users = [(1, "F", 1, 10, "48067"), (2, "M", 56, 16, "70072"), (3, "M", 25, 15, "55117"),
             (4, "M", 45, 7, "02460"), (5, "M", 25, 20, "55455")]
    movies = [(1, "Toy Story (1995)", "Animation|Children's|Comedy"), (2, "Jumanji (1995)", "Adventure"),
              (3, "Café au lait (Métisse) (1993)", "Comedy"), (4, "Heat (1995)", "Action|Crime|Thriller")]
    if ratings is None:
        ratings = []
        t = 978300000
        for i in range(60):
            u, m = 1 + i % 5, 1 + (i * 7) % 4
            ratings.append((u, m, 1 + (i * 3 + u) % 5, t + i * 10))
    (d / "users.dat").write_bytes("".join("::".join(map(str, u)) + "\n" for u in users).encode("latin-1"))
    (d / "movies.dat").write_bytes("".join("::".join(map(str, m)) + "\n" for m in movies).encode("latin-1"))
    (d / "ratings.dat").write_bytes("".join("::".join(map(str, r)) + "\n" for r in ratings).encode("latin-1"))
    return d


def write_bookcrossing(root: Path) -> Path:
    """A tiny Book-Crossing dump: ``;``-separated, quoted, latin-1, NULL ages, \\" escapes, a line break."""
    d = root / "bookcrossing"
    d.mkdir(parents=True, exist_ok=True)
    users = ['"User-ID";"Location";"Age"', '"1";"nyc, new york, usa";NULL', '"2";"århus, \\"n/a\\", denmark";"34"',
             '"3";"cernusco s\n, milan, italy";"25"', '"4";"porto, porto, portugal";"51"']
    books = ['"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher";"Image-URL-S";"Image-URL-M";"Image-URL-L"']
    for k in range(6):
        books.append(f'"00000000{k}X";"Livre n°{k} \\"spécial\\"";"Auteur {k}";"{1990 + k}";"Éditions {k % 2}";"s";"m";"l"')
    ratings = ['"User-ID";"ISBN";"Book-Rating"']
    for i in range(40):
        ratings.append(f'"{1 + i % 4}";"00000000{(i * 5) % 7}X";"{(i * 3) % 11}"')  # ISBN ...6X has no book
    for name, lines in (("BX-Users.csv", users), ("BX-Books.csv", books), ("BX-Book-Ratings.csv", ratings)):
        (d / name).write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return d


def write_goodreads(root: Path) -> Path:
    """A tiny UCSD GoodReads (JSON lines, gzip) with the official keys."""
    d = root / "goodreads"
    d.mkdir(parents=True, exist_ok=True)

    def dump(name: str, rows: list[dict]) -> None:
        with gzip.open(d / name, "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)

    books = [{"book_id": str(b), "title": f"Book {b} – ünïcode", "average_rating": "3.9", "text_reviews_count": "12",
              "authors": [{"author_id": str(100 + b % 3), "role": ""}], "num_pages": "320", "is_ebook": "false",
              "format": "Paperback", "publisher": "Pub", "publication_year": "2001", "work_id": str(900 + b),
              "language_code": "eng"} for b in range(5)]
    dump("goodreads_books.json.gz", books)
    dump("goodreads_book_authors.json.gz", [{"author_id": str(100 + a), "name": f"Author {a}"} for a in range(3)])
    dump("goodreads_book_genres_initial.json.gz",
         [{"book_id": str(b), "genres": {"fiction": 10 + b, "history, biography": 20 - b * 5}} for b in range(5)])
    inter = [{"user_id": f"u{i % 6}", "book_id": str(i % 5), "rating": i % 6,
              "date_added": f"Thu Dec {1 + i % 28:02d} 11:31:02 -0800 2015"} for i in range(50)]
    dump("goodreads_interactions_dedup.json.gz", inter)
    return d
