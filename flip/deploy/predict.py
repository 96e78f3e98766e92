"""``flip predict``: score new rows with a model bundle, streaming, in bounded memory.

Input, either
* one or more CSV / Parquet files (``.gz`` CSV too) with one column per field of the model, named by
  the field (``user_id``), its title (``User ID``) or, for your own data, the original column
  (``User ID`` → ``user_id``); optional ``label`` (0/1) and an id column (``--id-column``, default
  ``id`` or ``row`` when present, else the row's position in the input);
* or a directory in the raw layout of the dataset the model was trained on (``data/raw/ml-1m``),
  read by that dataset's own reader with its checks; rows are numbered in the pipeline's time order,
  as the ``row`` column of the processed splits.

Each value is cleaned as in preprocessing (DuckDB, streaming the input in its order), mapped through
the training vocabulary (unseen values take their field's OOV id and are counted per field), and, for
models with a language model, rendered as the same ``"<field> is <value>."`` text. Rows are scored in
batches of ``batch_rows`` and written as they come (Parquet or CSV by the output's suffix), so memory
stays bounded whatever the input size (a raw directory's time-order sort spills to disk beyond
``preprocess.memory_limit``):

* the vocabularies live in DuckDB tables (one per field, under the DuckDB memory limit), and the values
  of each chunk of :data:`MAP_ROWS` rows are mapped to ids by one join per field, never through a
  Python dictionary of the whole vocabulary;
* AUC and logloss keep at most :data:`METRIC_ROWS` labelled rows in memory (then they are exactly
  :mod:`flip.metrics`'); beyond, the (label, prob) pairs spill to a Parquet file and DuckDB computes
  both exactly, equal to the in-memory values up to float rounding (:class:`LabelledScores`);
* a CSV line longer than ``max_line_bytes`` (default :data:`MAX_LINE_BYTES`, ``--max-line-bytes``), or a
  Parquet value longer than it, is a :class:`~flip.errors.DataError` naming the file and row, before
  any row is scored; DuckDB's reader is given the same limit, so a 1 GB line is never held in memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flip.deploy.package import Bundle, load_bundle
from flip.errors import DataError, FlipError
from flip.io import atomic_file, malloc_trim

TEXT_CHUNK = 256  # rows per language-model forward pass
# Rows per scored batch: the ID models' forward (most of flip predict's time) is fastest at 2-4k rows on
# a 2-core CPU (measured, DCNv2 on 15 fields: 99k rows/s at 2,048, 105k at 4,096, 95k at 8,192, 80k at 16,384)
BATCH_ROWS = 4096
TRIM_EVERY = 8  # batches between returns of freed memory to the system (see flip.io.malloc_trim)
# The longest CSV line (and Parquet field value) flip predict reads, in bytes (`--max-line-bytes`): a
# click-log line is a few hundred bytes; 2 MiB is DuckDB's own default max_line_size.
MAX_LINE_BYTES = 2 * 1024 * 1024
MAP_ROWS = 1 << 18  # rows whose values are mapped to ids together (one DuckDB join per field and chunk)
METRIC_ROWS = 1 << 22  # labelled rows kept in memory for AUC/logloss (36 MB); beyond, they spill to Parquet


@dataclass
class ScoredBatch:
    ids: Any  # pyarrow array: the row ids
    prob: np.ndarray  # (B,) float64
    label: np.ndarray | None  # (B,) 0/1, when the input has labels
    oov: np.ndarray  # (F,) rows of this batch whose value of field k was unseen in training


def _reader(paths: list[Path], max_line_bytes: int = MAX_LINE_BYTES) -> str:
    """The table function reading ``paths`` (each path a quoted SQL literal: a view cannot hold parameters)."""
    from flip.data.sql import sql_str

    files = "[" + ", ".join(sql_str(str(p)) for p in paths) + "]"
    suffixes = {"".join(p.suffixes[-2:]) if p.suffix == ".gz" else p.suffix for p in paths}
    if suffixes <= {".parquet"}:
        return f"read_parquet({files})"
    if suffixes <= {".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz"}:
        return f"read_csv({files}, all_varchar = true, header = true, max_line_size = {int(max_line_bytes)})"
    raise DataError(f"cannot read files of type {', '.join(sorted(suffixes))}", file=str(paths[0]),
                    fix="give CSV (.csv, .tsv, .txt, optionally .gz) or Parquet files, all of one kind")


OUTPUT_COLUMNS = ("prob", "label")  # written next to the id column


def check_line_sizes(paths: list[Path], limit: int) -> None:
    """Raise a :class:`DataError` naming the file and line of the first CSV line longer than ``limit``
    bytes. One streaming pass in 1 MiB blocks (``.gz`` decompressed as it goes): memory stays at a
    block whatever the line's length. DuckDB's own error for such a line depends on where it falls
    (sniffing, a parallel scan) and quotes the line; this one is the same wherever it is."""
    import gzip

    import numpy as np

    for path in paths:
        if path.suffix == ".parquet":
            continue
        line, length = 1, 0  # the current line's number and its bytes so far
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            while block := f.read(1 << 20):
                ends = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
                starts = np.concatenate(([0], ends + 1))
                lengths = np.concatenate((ends, [len(block)])) - starts  # each piece, without its newline
                lengths[0] += length
                over = np.flatnonzero(lengths[:-1] > limit) if len(ends) else np.array([], dtype=np.int64)
                if len(over) or lengths[-1] > limit:
                    k = int(over[0]) if len(over) else len(lengths) - 1
                    raise DataError(f"line {line + k:,} is longer than {limit:,} bytes (the longest line "
                                    "flip predict reads), so the file cannot be read in bounded memory",
                                    file=str(path), row=line + k - 1,
                                    fix="repair or remove that line (a lost newline joins lines), or, if such "
                                        "lines are real, raise the limit with --max-line-bytes")
                line += len(ends)
                length = int(lengths[-1])


def _table_rows(con: Any, bundle: Bundle, relation: str, where: str, id_column: str) -> tuple[bool, str]:
    """View ``rows`` (_id, [label], v_0 … v_{F-1}) over a table with a column per field: a plain
    projection, so DuckDB streams it in the input's order (no sort, no join, bounded memory).

    The input's columns are renamed by position (``c_0 …``) and matched to the model's fields in
    Python: neither a column name of the input, nor ``--id-column``, nor a field name of the bundle
    ever becomes SQL."""
    from flip.data.sources.base import clean_text
    from flip.data.sources.csv import field_key
    from flip.data.sql import positional

    try:
        columns = [str(c) for c in con.sql(f"SELECT * FROM {relation} LIMIT 0").columns]
    except Exception as exc:  # duckdb.Error: unreadable file, no header
        raise DataError(f"cannot be read: {str(exc).splitlines()[0]}", file=where,
                        fix="give CSV files with a header line, or Parquet files") from exc
    sql = positional(len(columns))
    by_name = {}
    for j, c in enumerate(columns):
        by_name.setdefault(c, sql[j])
    shown = ", ".join(repr(c) for c in columns)
    chosen = []
    for f in bundle.fields:
        match = [j for j, c in enumerate(columns) if c == f["name"] or c == f["title"] or field_key(c) == f["name"]]
        if not match:
            raise DataError(f"no column for the model's field {f['name']!r} ({f['title']!r})", file=where,
                            column=f["name"], fix=f"give a column per field: "
                            f"{', '.join(repr(x['name']) for x in bundle.fields)} (found {shown})")
        chosen.append(sql[match[0]])
    id_col = id_column or next((c for c in ("id", "row") if c in columns), "")
    if id_col and id_col not in by_name:
        raise DataError(f"no id column {id_col!r}", file=where, column=id_col,
                        fix=f"name one of the columns ({shown}) with --id-column")
    if id_col in OUTPUT_COLUMNS:
        raise DataError(f"the id column cannot be {id_col!r}: the output has a column of that name", file=where,
                        column=id_col, fix="name another column with --id-column")
    has_label = "label" in by_name
    values = ", ".join(f"{clean_text(f'CAST({c} AS VARCHAR)')} AS v_{k}" for k, c in enumerate(chosen))
    ident = f"{by_name[id_col]} AS _id, " if id_col else ""
    label = f"trim(CAST({by_name['label']} AS VARCHAR)) AS label, " if has_label else ""
    con.execute(f"CREATE TEMP VIEW rows AS SELECT {ident}{label}{values} FROM {relation} AS t({', '.join(sql)})")
    if has_label:
        bad_label = "label IS NULL OR label NOT IN ('0', '1')"
        bad = con.sql(f"SELECT count(*) FROM rows WHERE {bad_label}").fetchall()[0][0]
        if bad:  # (the error path only: number the rows to name the first bad one)
            first, value = con.sql(f"SELECT pos, label FROM (SELECT row_number() OVER () AS pos, * FROM rows) "
                                   f"WHERE {bad_label} ORDER BY pos LIMIT 1").fetchall()[0]
            raise DataError(f"{bad:,} row(s) have a label that is not 0 or 1", file=where, row=int(first),
                            column="label", value=value, fix="give 0/1 labels, or drop the label column to score")
    return has_label, id_col or "row"


def _raw_rows(con: Any, bundle: Bundle, directory: Path) -> tuple[bool, str]:
    """View ``rows`` over a raw directory read by the dataset's own source, in the pipeline's time order
    (the sort spills to disk beyond ``preprocess.memory_limit``)."""
    from flip.config import config_from_dict
    from flip.data.sources import get_source

    cfg = config_from_dict(bundle.info["config"])
    if cfg.data.dataset == "csv":
        raise FlipError(f"{directory} is a directory: for a model trained on your own data, pass the CSV or "
                        "Parquet files themselves (--input logs/new-*.csv)")
    get_source(cfg.data.dataset).load(con, Path(directory), cfg)
    values = ", ".join(f"v_{k}" for k in range(len(bundle.fields)))
    con.execute(f"""CREATE TEMP VIEW rows AS
        SELECT row_number() OVER (ORDER BY ts, sort_user, sort_item) - 1 AS _id, label::VARCHAR AS label, {values}
        FROM samples ORDER BY ts, sort_user, sort_item""")
    return True, "row"


def _features_sql(bundle: Bundle, has_id: bool, has_label: bool) -> str:
    from flip.data.preprocess import text_and_spans_sql

    values = ", ".join(f"v_{k}" for k in range(len(bundle.fields)))
    text = ""
    if bundle.uses_plm:
        t, starts, ends = text_and_spans_sql([f["title"] for f in bundle.fields])
        text = f", {t} AS text, {starts} AS span_start, {ends} AS span_end"
    return (f"SELECT {'_id, ' if has_id else ''}{'label::INTEGER AS label, ' if has_label else ''}{values}{text} "
            "FROM rows")


class Vocabulary:
    """The bundle's training vocabularies as DuckDB tables ``vocab_k`` (value, id), one per field, under
    the connection's memory limit: a chunk's values -> global ids by a join (unseen -> the field's OOV
    id). No Python dictionary of the vocabulary is built (a 3M-id one takes ~0.4 GB)."""

    def __init__(self, con: Any, bundle: Bundle) -> None:
        self.fields = bundle.fields
        path = str(bundle.path / "vocab.parquet")
        for k, f in enumerate(self.fields):
            con.execute(f"CREATE TABLE vocab_{k} AS SELECT value, id::BIGINT AS id FROM read_parquet($1) "
                        "WHERE field = $2", [path, f["name"]])
            duplicated = con.execute(f"SELECT count(*) - count(DISTINCT value) FROM vocab_{k}").fetchall()[0][0]
            if duplicated:
                raise FlipError(f"{path}: field {f['name']!r} has {duplicated:,} duplicated value(s); the bundle "
                                "is damaged. Fix: package the model again (flip package)")
        self.con = con.cursor()  # (the scoring stream runs on ``con``; a cursor may query beside it)

    def encode(self, table: Any) -> np.ndarray:
        """(B, F) int64 ids of a table with the value columns ``v_0 … v_{F-1}``: per field, the chunk's
        distinct values are joined to the vocabulary in DuckDB (ordered by their position), then
        spread over the rows with a vectorised take."""
        import pyarrow as pa
        import pyarrow.compute as pc

        out = np.empty((table.num_rows, len(self.fields)), dtype=np.int64)
        for k, f in enumerate(self.fields):
            oov = int(f["oov_id"])
            enc = pc.dictionary_encode(table.column(f"v_{k}").combine_chunks())
            distinct = pa.table({"pos": pa.array(np.arange(len(enc.dictionary), dtype=np.int64)),
                                 "value": enc.dictionary.cast(pa.string())})
            self.con.register("distinct_values", distinct)
            try:
                ids = self.con.execute(f"SELECT coalesce(v.id, $1) AS id FROM distinct_values AS d LEFT JOIN "
                                       f"vocab_{k} AS v ON d.value = v.value ORDER BY d.pos", [oov]).fetchnumpy()["id"]
            finally:
                self.con.unregister("distinct_values")
            lookup = np.append(np.asarray(ids, dtype=np.int64), oov)  # a NULL value (index -1 after fill) -> OOV
            out[:, k] = lookup[pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False)]
        return out

    def close(self) -> None:
        self.con.close()


class LabelledScores:
    """AUC and logloss of a stream of (label, prob) batches in bounded memory.

    Up to ``in_memory`` rows are kept as arrays and scored by :mod:`flip.metrics` (scikit-learn: the
    numbers of every other stage). Beyond, every pair is written to ``folder/labelled.parquet`` and
    DuckDB computes both over the file: AUC as the Mann-Whitney statistic over the distinct scores,
    ``sum_s pos_s (2 neg_below_s + neg_s) / (2 P N)`` in exact integer (HUGEINT) counts with one final
    division, and logloss as the mean of ``-log`` of the clipped probability (scikit-learn's clipping,
    ``eps`` = float64 epsilon). Both equal the in-memory values up to float rounding (summation order;
    below 1e-12 in the tests); the sort and grouping spill to disk beyond ``memory_limit``."""

    def __init__(self, folder: Path, *, in_memory: int = METRIC_ROWS, memory_limit: str = "") -> None:
        self.folder, self.in_memory, self.memory_limit = Path(folder), int(in_memory), memory_limit
        self.labels: list[np.ndarray] = []
        self.probs: list[np.ndarray] = []
        self.rows, self.classes = 0, set()
        self.writer: Any = None

    def add(self, label: np.ndarray, prob: np.ndarray) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.rows += len(label)
        self.classes.update(np.unique(label).tolist())
        self.labels.append(label.astype(np.int8))
        self.probs.append(np.asarray(prob, dtype=np.float64))
        if self.writer is None and self.rows <= self.in_memory:
            return
        chunk = pa.table({"label": np.concatenate(self.labels), "prob": np.concatenate(self.probs)})
        if self.writer is None:
            self.writer = pq.ParquetWriter(str(self.folder / "labelled.parquet"), chunk.schema)
        self.writer.write_table(chunk)
        self.labels, self.probs = [], []

    def result(self) -> dict[str, float]:
        """``{"auc", "logloss"}`` when both classes occur, else ``{}``."""
        from flip.metrics import auc, logloss

        if len(self.classes) < 2:
            return {}
        if self.writer is None:
            y, p = np.concatenate(self.labels), np.concatenate(self.probs)
            return {"auc": auc(y, p), "logloss": logloss(y, p)}
        self.writer.close()
        from flip.data.sql import locked_connection, sql_str

        eps = float(np.finfo(np.float64).eps)
        with locked_connection(read=[self.folder], write=[self.folder], temp_directory=self.folder / "spill",
                               memory_limit=self.memory_limit, threads=1) as con:
            con.execute(f"CREATE VIEW scores AS SELECT * FROM read_parquet({sql_str(self.folder / 'labelled.parquet')})")
            numerator, positives, negatives = con.execute("""
                WITH g AS (SELECT prob, count(*) FILTER (label = 1)::HUGEINT AS pos,
                                  count(*) FILTER (label = 0)::HUGEINT AS neg FROM scores GROUP BY prob),
                     c AS (SELECT pos, neg, coalesce(sum(neg) OVER (ORDER BY prob ROWS BETWEEN UNBOUNDED PRECEDING
                                                                    AND 1 PRECEDING), 0) AS below FROM g)
                SELECT sum(pos * (2 * below + neg)), sum(pos), sum(neg) FROM c""").fetchall()[0]
            loss = con.execute("SELECT avg(CASE WHEN label = 1 THEN -ln(greatest(least(prob, 1 - $1), $1)) "
                               "ELSE -ln(1 - greatest(least(prob, 1 - $1), $1)) END) FROM scores", [eps]).fetchall()[0][0]
        return {"auc": int(numerator) / (2 * int(positives) * int(negatives)),  # (int / int: rounded once)
                "logloss": float(loss)}


def _score_batch(bundle: Bundle, batch: Any, ids: np.ndarray, device: torch.device) -> np.ndarray:
    n_fields = len(bundle.fields)
    x = torch.from_numpy(ids).to(device)
    with torch.no_grad():
        if not bundle.uses_plm:
            return torch.sigmoid(bundle.model(x).double()).cpu().numpy()  # as the training loop scores
        from flip.data.tokens import tokenize_texts

        texts = batch.column("text").to_pylist()
        starts = np.array(batch.column("span_start").to_pylist(), dtype=np.int64).reshape(len(texts), n_fields)
        ends = np.array(batch.column("span_end").to_pylist(), dtype=np.int64).reshape(len(texts), n_fields)
        tok = tokenize_texts(texts, starts, ends, bundle.tokenizer, bundle.max_length)
        ids = torch.from_numpy(tok["input_ids"].astype(np.int64)).to(device)
        mask = torch.from_numpy(tok["attention_mask"].astype(np.int64)).to(device)
        from flip.train.precision import autocast, use_bf16

        bf16 = bundle.info.get("text_precision") == "bf16" and use_bf16("auto", device, "text_precision")
        out = []
        for lo in range(0, len(texts), TEXT_CHUNK):
            sl = slice(lo, lo + TEXT_CHUNK)
            with autocast(device, bf16):
                logits = bundle.model(x[sl], ids[sl], mask[sl])[0] if bundle.uses_id else bundle.model(ids[sl], mask[sl])
            out.append(torch.sigmoid(logits.double()))
        return torch.cat(out).cpu().numpy()


def _check_value_sizes(batch: Any, fields: list[dict[str, Any]], position: int, where: str, limit: int) -> None:
    """A value longer than ``limit`` bytes (a Parquet input has no line to bound): a DataError naming it."""
    import pyarrow.compute as pc

    for k, f in enumerate(fields):
        lengths = pc.binary_length(batch.column(f"v_{k}"))
        longest = pc.max(lengths).as_py()
        if longest is not None and longest > limit:
            j = int(np.argmax(lengths.to_numpy(zero_copy_only=False)))
            raise DataError(f"a value of {longest:,} bytes, longer than {limit:,} (the longest flip predict reads)",
                            file=where, row=position + j + 1, column=f["name"],
                            fix="repair that row, or, if such values are real, raise the limit with --max-line-bytes")


def score_stream(bundle: Bundle, inputs: list[Path] | None = None, *, table: Any = None, batch_rows: int = BATCH_ROWS,
                 id_column: str = "", threads: int = 0, max_line_bytes: int = MAX_LINE_BYTES
                 ) -> tuple[Iterator[ScoredBatch], str]:
    """Score ``inputs`` (files, or one raw directory) or an in-memory Arrow ``table``, batch by batch.
    Returns the batches and the name of the id column. Lines and values longer than ``max_line_bytes``
    are refused (:func:`check_line_sizes`; 0: :data:`MAX_LINE_BYTES`)."""
    import shutil
    import tempfile

    import pyarrow as pa

    from flip.config import config_from_dict
    from flip.data.sql import locked_connection

    if int(batch_rows) <= 0:
        raise FlipError(f"--batch-rows {batch_rows}: give a positive number of rows (or 0 for the default)")
    max_line_bytes = int(max_line_bytes) or MAX_LINE_BYTES
    if max_line_bytes < 0:
        raise FlipError(f"--max-line-bytes {max_line_bytes}: give a positive number of bytes (or 0 for the default)")
    paths = [Path(p) for p in inputs or []]
    spill = tempfile.mkdtemp(prefix="flip-predict-")
    vocab_file = bundle.path / "vocab.parquet"
    try:  # it reads only the inputs and the vocabulary and writes only its spill folder (both are untrusted)
        con = locked_connection(read=[*(paths if table is None else []), vocab_file], write=[spill],
                                temp_directory=spill,
                                memory_limit=config_from_dict(bundle.info["config"]).preprocess.memory_limit,
                                memory_setting="the bundle's preprocess.memory_limit (model.json)",
                                threads=threads)
    except BaseException:
        shutil.rmtree(spill, ignore_errors=True)
        raise
    where = "(input table)"
    try:
        if table is not None:
            con.register("input_table", table)
            has_label, id_name = _table_rows(con, bundle, "input_table", where, id_column)
        else:
            if not paths:
                raise FlipError("no input given. Fix: flip predict --input FILE [--input FILE ...] --out FILE")
            for p in paths:
                if not p.exists():
                    raise DataError("input file is missing", file=str(p), fix="check the path given with --input")
                if p.is_file() and p.stat().st_size == 0:
                    raise DataError("input file is empty", file=str(p), fix="give a file with a header and rows")
            if len(paths) == 1 and paths[0].is_dir():
                has_label, id_name = _raw_rows(con, bundle, paths[0])
            else:
                check_line_sizes(paths, max_line_bytes)
                where = str(paths[0])
                has_label, id_name = _table_rows(con, bundle, _reader(paths, max_line_bytes), where, id_column)
        vocab = Vocabulary(con, bundle)
    except BaseException:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
        raise
    has_id = "_id" in con.sql("SELECT * FROM rows LIMIT 0").columns
    sql = _features_sql(bundle, has_id, has_label)
    oov_ids = np.array([f["oov_id"] for f in bundle.fields], dtype=np.int64)
    device = next(bundle.model.parameters()).device

    def read() -> Iterator[tuple[int, Any]]:
        import duckdb

        try:
            yield from enumerate(con.sql(sql).to_arrow_reader(batch_rows))
        except duckdb.Error as exc:  # (a line the reader refuses: its message's first line names it)
            raise DataError(f"cannot be read: {str(exc).splitlines()[0]}", file=where,
                            fix="repair the file (a CSV with one header line and rows of one length each)") from None

    def chunks() -> Iterator[tuple[int, Any, np.ndarray]]:
        """The stream's batches (number, batch, ids), their values mapped :data:`MAP_ROWS` rows at a time."""
        pending: list[tuple[int, Any]] = []
        position = waiting = 0
        for n, batch in read():
            if batch.num_rows == 0:
                continue
            _check_value_sizes(batch, bundle.fields, position, where, max_line_bytes)
            position += batch.num_rows
            pending.append((n, batch))
            waiting += batch.num_rows
            if waiting >= MAP_ROWS:
                yield from _mapped(pending)
                pending, waiting = [], 0
        yield from _mapped(pending)

    def _mapped(pending: list[tuple[int, Any]]) -> Iterator[tuple[int, Any, np.ndarray]]:
        if not pending:
            return
        ids = vocab.encode(pa.Table.from_batches([b for _, b in pending]))
        lo = 0
        for n, batch in pending:
            yield n, batch, ids[lo: lo + batch.num_rows]
            lo += batch.num_rows

    def batches() -> Iterator[ScoredBatch]:
        position = 0
        trim = malloc_trim()
        try:
            for n, batch, ids in chunks():
                if n % TRIM_EVERY == 0:
                    trim(0)
                prob = _score_batch(bundle, batch, ids, device)
                label = batch.column("label").to_numpy() if has_label else None
                row_ids = batch.column("_id") if has_id else pa.array(np.arange(position, position + batch.num_rows))
                position += batch.num_rows
                yield ScoredBatch(row_ids, prob, label, (ids == oov_ids).sum(0))
        finally:
            vocab.close()
            con.close()
            shutil.rmtree(spill, ignore_errors=True)

    return batches(), id_name


def predict(model: Path, inputs: list[Path], out: Path, *, batch_rows: int = BATCH_ROWS, id_column: str = "",
            threads: int = 0, progress: bool = True, max_line_bytes: int = MAX_LINE_BYTES) -> dict[str, Any]:
    """Score ``inputs`` with the bundle in ``model``; write ``out`` (id, prob[, label]); return a summary
    (rows, rows/s, OOV counts per field, AUC and logloss where the input has labels)."""
    import shutil
    import tempfile

    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from flip.config import config_from_dict

    bundle = load_bundle(model)
    out = Path(out)
    if out.suffix not in (".parquet", ".csv"):
        raise FlipError(f"--out {out}: give a .parquet or .csv file name")
    started = time.perf_counter()
    stream, id_name = score_stream(bundle, inputs, batch_rows=batch_rows, id_column=id_column, threads=threads,
                                   max_line_bytes=max_line_bytes)
    rows, oov = 0, np.zeros(len(bundle.fields), dtype=np.int64)
    scratch = Path(tempfile.mkdtemp(prefix="flip-metrics-"))  # where the labelled scores spill, if they must
    try:
        labelled = LabelledScores(scratch, memory_limit=config_from_dict(bundle.info["config"]).preprocess.memory_limit)
        writer = None
        with atomic_file(out) as tmp:
            try:
                for b in stream:
                    cols = {id_name: b.ids, "prob": pa.array(b.prob)}
                    if b.label is not None:
                        cols["label"] = pa.array(b.label.astype(np.int8))
                        labelled.add(b.label, b.prob)
                    chunk = pa.table(cols)
                    if writer is None:
                        writer = (pq.ParquetWriter(str(tmp), chunk.schema) if out.suffix == ".parquet"
                                  else pacsv.CSVWriter(str(tmp), chunk.schema))
                    writer.write_table(chunk)
                    rows += len(b.prob)
                    oov += b.oov
                    if progress:
                        print(f"[predict] {rows:,} rows scored ({rows / (time.perf_counter() - started):,.0f} "
                              "rows/s)", flush=True)
            finally:
                if writer is not None:
                    writer.close()
            if writer is None:
                raise DataError("no rows to score", file=str(inputs[0]), fix="give files with at least one data row")
        seconds = time.perf_counter() - started
        quality = labelled.result()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary: dict[str, Any] = {
        "model": str(model), "artifact": bundle.info.get("artifact"), "strategy": bundle.info["strategy"],
        "rows": rows, "seconds": round(seconds, 3), "rows_per_second": rows / max(seconds, 1e-9),
        "oov_rows": {f["name"]: int(n) for f, n in zip(bundle.fields, oov)}, "out": str(out)}
    summary.update(quality)
    return summary
