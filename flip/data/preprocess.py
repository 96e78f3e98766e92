"""Raw samples → time-ordered, split, encoded, two-modality Parquet (DuckDB SQL, bounded memory).

Steps, all in one on-disk DuckDB database that spills beyond ``preprocess.memory_limit``:

1. the source builds ``samples`` (label, ts, sort keys, one VARCHAR value per field);
2. sort by (ts, user, item): the row's position is ``row``;
3. split: the first floor(0.9·n) rows are train+valid, the rest test; the last
   floor(len(train+valid)/9) rows of train+valid are validation;
4. per-field vocabularies on the training split only: global id 0 = padding, 1 = the shared
   ``[MASK]`` feature, then for each field its OOV id (``offset``) followed by its training values;
5. text ``"<field> is <value>."`` joined by spaces, with each value's character span;
6. write ``{train,valid,test}.parquet``, ``feature_counts.parquet``, ``vocab.parquet`` (field,
   value, id, count) and ``meta.json`` into a
   temporary directory that replaces the output directory only when everything succeeded.
"""

from __future__ import annotations

import math
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

from flip.config import Config
from flip.data.sources import get_source
from flip.data.sources.base import SourceInfo
from flip.data.sql import locked_connection, quote_ident, sql_str
from flip.errors import DataError
from flip.io import atomic_dir, read_json, write_json

PAD_ID, MASK_ID, FIRST_FIELD_ID = 0, 1, 2
SPLITS = ("train", "valid", "test")


def split_sizes(n: int, test_fraction: float = 0.1, valid_divisor: int = 9) -> dict[str, int]:
    """Sizes of the chronological splits for ``n`` samples (exact integer arithmetic)."""
    trval = math.floor(n * (1 - Fraction(str(test_fraction))))
    valid = trval // valid_divisor if valid_divisor > 0 else 0
    return {"train": trval - valid, "valid": valid, "test": n - trval}


def text_and_spans_sql(titles: list[str]) -> tuple[str, str, str]:
    """SQL for the text ``"<title> is <v_k>."`` joined by spaces and the value spans [start, end)."""
    parts, starts, ends = [], [], []
    offset = "0"
    for k, title in enumerate(titles):
        prefix = ("" if k == 0 else " ") + f"{title} is "
        parts += [sql_str(prefix), f"v_{k}", "'.'"]
        start = f"({offset} + {len(prefix)})"
        end = f"({start} + length(v_{k}))"
        starts.append(start)
        ends.append(end)
        offset = f"({end} + 1)"
    text = "concat(" + ", ".join(parts) + ")"
    return text, "[" + ", ".join(starts) + "]::INTEGER[]", "[" + ", ".join(ends) + "]::INTEGER[]"


def connect(workdir: Path, cfg: Config, *, read: list[Path] = (), write: list[Path] = ()):
    """The preprocessing database in ``workdir``, locked down (:func:`flip.data.sql.locked_connection`): it
    may read ``read`` (the raw files) and write only ``workdir`` and ``write`` (the output's temp folder)."""
    return locked_connection(workdir / "work.duckdb", read=list(read), write=[workdir, *write],
                             memory_limit=cfg.preprocess.memory_limit, threads=int(cfg.preprocess.threads),
                             temp_directory=workdir / "spill")


def preprocess(cfg: Config, raw_dir: Path, out_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Build the processed dataset for ``cfg.data.dataset`` from ``raw_dir`` into ``out_dir``.

    Returns the metadata written to ``meta.json``. On any error nothing is written.
    """
    started = time.time()
    source = get_source(cfg.data.dataset)
    info: SourceInfo = source.info(cfg)
    titles = [f.title for f in info.fields]
    names = [f.key for f in info.fields]
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log = print if progress else (lambda *a, **k: None)

    with tempfile.TemporaryDirectory(prefix=".preprocess-", dir=out_dir.parent) as work, \
            atomic_dir(out_dir, "preprocess", ("meta.json", "*.parquet")) as tmp:
        inputs = getattr(source, "inputs", None)  # a source reading files outside raw_dir names them
        con = connect(Path(work), cfg, read=[Path(raw_dir), *(inputs(cfg) if inputs else [])], write=[tmp])
        origin = "the files of data.csv.files" if cfg.data.dataset == "csv" else raw_dir
        log(f"[preprocess] reading {info.name} from {origin}")
        source.load(con, Path(raw_dir), cfg)
        tables = {t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        if "files_read" in tables:
            for path, rows in con.execute("SELECT path, rows FROM files_read").fetchall():
                log(f"[preprocess] read {path} ({rows:,} rows)")
        missing: dict[str, dict[str, Any]] = {}
        if "missing_values" in tables:
            for column, policy, rows in con.execute(
                    "SELECT field, any_value(policy), sum(rows) FROM missing_values GROUP BY 1 ORDER BY 1").fetchall():
                missing[column] = {"rows": int(rows), "policy": policy}
                log(f"[preprocess] {int(rows):,} empty value(s) in {column!r}: "
                    + ("rows dropped" if policy == "drop" else "kept as 'unknown'"))
        values = ", ".join(f"v_{k}" for k in range(len(names)))
        con.execute(
            f"CREATE TABLE ordered AS SELECT label::TINYINT AS label, ts::BIGINT AS ts, {values} "
            "FROM samples ORDER BY ts, sort_user, sort_item"
        )
        n = con.execute("SELECT count(*) FROM ordered").fetchone()[0]
        if n == 0:
            raise DataError("no samples left after applying the label rule", file=str(raw_dir),
                            fix=f"check the raw files and the label rule ({info.label_rule})")
        sizes = split_sizes(n, cfg.preprocess.test_fraction, cfg.preprocess.valid_divisor)
        if min(sizes.values()) == 0:
            raise DataError(f"only {n} samples: a split would be empty ({sizes})", file=str(raw_dir),
                            fix="provide more rows (at least ~20)")
        n_train, n_trval = sizes["train"], sizes["train"] + sizes["valid"]
        bounds = {"train": (0, n_train), "valid": (n_train, n_trval), "test": (n_trval, n)}
        log(f"[preprocess] {n:,} samples -> train {sizes['train']:,} / valid {sizes['valid']:,} / test {sizes['test']:,}")

        # vocabularies on the training split: local id 1.. by decreasing count, then value
        fields_meta = []
        offset = FIRST_FIELD_ID
        for k, (name, title) in enumerate(zip(names, titles)):
            con.execute(f"""
                CREATE TABLE vocab_{k} AS
                SELECT value, cnt, {offset} + row_number() OVER (ORDER BY cnt DESC, value) AS gid
                FROM (SELECT v_{k} AS value, count(*) AS cnt FROM ordered WHERE rowid < {n_train} GROUP BY 1)
                WHERE cnt >= {int(cfg.preprocess.min_count)}
            """)
            distinct = con.execute(f"SELECT count(*) FROM vocab_{k}").fetchone()[0]
            fields_meta.append({"name": name, "title": title, "offset": offset, "size": distinct + 1,
                                "oov_id": offset, "train_values": distinct})
            offset += distinct + 1
        vocab_size = offset

        text, starts, ends = text_and_spans_sql(titles)
        ids = ", ".join(
            f"coalesce(vocab_{k}.gid, {int(f['oov_id'])})::INTEGER AS {quote_ident(f['name'])}"
            for k, f in enumerate(fields_meta)
        )
        joins = " ".join(f"LEFT JOIN vocab_{k} ON o.v_{k} = vocab_{k}.value" for k in range(len(names)))
        stats: dict[str, dict[str, Any]] = {}
        for split, (lo, hi) in bounds.items():
            path = tmp / f"{split}.parquet"
            con.execute(f"""
                COPY (
                    SELECT o.rowid::BIGINT AS row, o.ts AS timestamp, o.label, {ids},
                           {text} AS text, {starts} AS span_start, {ends} AS span_end
                    FROM (SELECT rowid, * FROM ordered WHERE rowid >= {lo} AND rowid < {hi}) o {joins}
                    ORDER BY row
                ) TO {sql_str(str(path))} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 122880)
            """)
            rows, pos, t0, t1 = con.execute(
                f"SELECT count(*), avg(label), min(ts), max(ts) FROM ordered WHERE rowid >= {lo} AND rowid < {hi}"
            ).fetchone()
            stats[split] = {"rows": rows, "positive_rate": float(pos), "first_timestamp": t0, "last_timestamp": t1}
            log(f"[preprocess] wrote {split}.parquet ({rows:,} rows)")

        counts_sql = " UNION ALL ".join(f"SELECT gid, cnt FROM vocab_{k}" for k in range(len(names)))
        con.execute(f"""
            COPY (SELECT i::INTEGER AS id, coalesce(c.cnt, 0)::BIGINT AS count
                  FROM range({vocab_size}) r(i) LEFT JOIN ({counts_sql}) c ON c.gid = r.i ORDER BY id)
            TO {sql_str(str(tmp / 'feature_counts.parquet'))} (FORMAT parquet)
        """)
        # the vocabularies themselves (value -> global id), for scoring new rows with a trained model
        vocab_sql = " UNION ALL ".join(
            f"SELECT {sql_str(name)} AS field, value, gid::INTEGER AS id, cnt::BIGINT AS count FROM vocab_{k}"
            for k, name in enumerate(names))
        con.execute(f"COPY ({vocab_sql} ORDER BY id) TO {sql_str(str(tmp / 'vocab.parquet'))} (FORMAT parquet)")
        total_pos = con.execute("SELECT avg(label) FROM ordered").fetchone()[0]
        con.close()

        meta = {
            "dataset": info.name,
            "fields": fields_meta,
            "vocab_size": vocab_size,
            "pad_id": PAD_ID,
            "mask_id": MASK_ID,
            "user_field": info.user_field,
            "item_field": info.item_field,
            "counts": {"total": n, **sizes},
            "positive_rate": {"total": float(total_pos), **{s: stats[s]["positive_rate"] for s in SPLITS}},
            "time_range": {s: [stats[s]["first_timestamp"], stats[s]["last_timestamp"]] for s in SPLITS},
            "feature_counts": "feature_counts.parquet",
            "vocabulary": "vocab.parquet",
            "text_template": "{title} is {value}.",
            "label_rule": info.label_rule,
            "missing_values": missing,  # own data: empty values per column and what was done with them
            "split_rule": info.split_rule,
            "params": {"test_fraction": cfg.preprocess.test_fraction, "valid_divisor": cfg.preprocess.valid_divisor,
                       "min_count": cfg.preprocess.min_count},
        }  # no timings here: the same raw files must give byte-identical outputs (DVC hashes them)
        write_json(tmp / "meta.json", meta)
    log(f"[preprocess] done in {time.time() - started:.1f}s -> {out_dir}")
    return meta


def split_values_sql(meta: dict[str, Any]) -> str:
    """The select list of :func:`split_values` over a processed split's columns."""
    cols = ", ".join(
        f"substr(text, span_start[{k + 1}] + 1, span_end[{k + 1}] - span_start[{k + 1}]) AS {quote_ident(f['name'])}"
        for k, f in enumerate(meta["fields"]))
    return f"row, label::VARCHAR AS label, {cols}"


def split_values(data_dir: Path, split: str) -> Any:
    """A processed split back as raw values (Arrow): ``row``, ``label`` and one VARCHAR column per field,
    each value cut from the row's text by its character span (what a model's vocabulary maps)."""
    meta = read_json(Path(data_dir) / "meta.json")
    with locked_connection(read=[Path(data_dir)]) as con:
        return con.sql(f"SELECT {split_values_sql(meta)} FROM read_parquet($1) ORDER BY row",
                       params=[str(Path(data_dir) / f"{split}.parquet")]).to_arrow_table()
