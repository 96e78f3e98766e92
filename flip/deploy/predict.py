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
``preprocess.memory_limit``).
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
from flip.io import atomic_file

TEXT_CHUNK = 256  # rows per language-model forward pass
TRIM_EVERY = 8  # batches between returns of freed memory to the system (see _malloc_trim)


@dataclass
class ScoredBatch:
    ids: Any  # pyarrow array: the row ids
    prob: np.ndarray  # (B,) float64
    label: np.ndarray | None  # (B,) 0/1, when the input has labels
    oov: np.ndarray  # (F,) rows of this batch whose value of field k was unseen in training


def _reader(paths: list[Path]) -> str:
    """The table function reading ``paths`` (each path a quoted SQL literal: a view cannot hold parameters)."""
    from flip.data.sql import sql_str

    files = "[" + ", ".join(sql_str(str(p)) for p in paths) + "]"
    suffixes = {"".join(p.suffixes[-2:]) if p.suffix == ".gz" else p.suffix for p in paths}
    if suffixes <= {".parquet"}:
        return f"read_parquet({files})"
    if suffixes <= {".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz"}:
        return f"read_csv({files}, all_varchar = true, header = true)"
    raise DataError(f"cannot read files of type {', '.join(sorted(suffixes))}", file=str(paths[0]),
                    fix="give CSV (.csv, .tsv, .txt, optionally .gz) or Parquet files, all of one kind")


OUTPUT_COLUMNS = ("prob", "label")  # written next to the id column


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
    """The bundle's training vocabularies: each batch's values -> global ids (unseen -> the field's OOV id)."""

    def __init__(self, bundle: Bundle) -> None:
        import pyarrow.parquet as pq

        table = pq.read_table(bundle.path / "vocab.parquet").to_pydict()
        self.ids: dict[str, dict[str, int]] = {f["name"]: {} for f in bundle.fields}
        for field, value, i in zip(table["field"], table["value"], table["id"]):
            self.ids[field][value] = int(i)
        self.fields = bundle.fields

    def encode(self, batch: Any) -> np.ndarray:
        """(B, F) int64 ids of a batch with the value columns ``v_0 … v_{F-1}`` (one dictionary
        lookup per distinct value of the batch, then a vectorised take)."""
        import pyarrow.compute as pc

        out = np.empty((batch.num_rows, len(self.fields)), dtype=np.int64)
        for k, f in enumerate(self.fields):
            enc = pc.dictionary_encode(batch.column(f"v_{k}"))
            ids, oov = self.ids[f["name"]], int(f["oov_id"])
            table = np.array([ids.get(v, oov) for v in enc.dictionary.to_pylist()] or [oov], dtype=np.int64)
            out[:, k] = table[enc.indices.to_numpy(zero_copy_only=False)]
        return out


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


def _malloc_trim():
    """glibc's ``malloc_trim(0)`` (a no-op elsewhere). The scoring loop's large short-lived tensors
    fragment glibc's heap: without it the peak RSS of scoring 2.2M rows varied from 0.5 to 3.5 GB
    between identical runs; trimming every ``TRIM_EVERY`` batches keeps it flat at no measurable cost
    (benchmarks/predict_ml1m.py)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda *_: None


def score_stream(bundle: Bundle, inputs: list[Path] | None = None, *, table: Any = None, batch_rows: int = 8192,
                 id_column: str = "", threads: int = 0) -> tuple[Iterator[ScoredBatch], str]:
    """Score ``inputs`` (files, or one raw directory) or an in-memory Arrow ``table``, batch by batch.
    Returns the batches and the name of the id column."""
    import shutil
    import tempfile

    import pyarrow as pa

    from flip.config import config_from_dict
    from flip.data.sql import locked_connection

    paths = [Path(p) for p in inputs or []]
    spill = tempfile.mkdtemp(prefix="flip-predict-")
    try:  # it reads only the inputs and writes only its spill folder (the bundle and inputs are untrusted)
        con = locked_connection(read=paths if table is None else [], write=[spill], temp_directory=spill,
                                memory_limit=config_from_dict(bundle.info["config"]).preprocess.memory_limit,
                                memory_setting="the bundle's preprocess.memory_limit (model.json)",
                                threads=threads)
    except BaseException:
        shutil.rmtree(spill, ignore_errors=True)
        raise
    try:
        if table is not None:
            con.register("input_table", table)
            has_label, id_name = _table_rows(con, bundle, "input_table", "(input table)", id_column)
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
                has_label, id_name = _table_rows(con, bundle, _reader(paths), str(paths[0]), id_column)
    except BaseException:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
        raise
    has_id = "_id" in con.sql("SELECT * FROM rows LIMIT 0").columns
    sql = _features_sql(bundle, has_id, has_label)
    vocab = Vocabulary(bundle)
    oov_ids = np.array([f["oov_id"] for f in bundle.fields], dtype=np.int64)
    device = next(bundle.model.parameters()).device

    def batches() -> Iterator[ScoredBatch]:
        position = 0
        trim = _malloc_trim()
        try:
            for n, batch in enumerate(con.sql(sql).to_arrow_reader(batch_rows)):
                if n % TRIM_EVERY == 0:
                    trim(0)
                if batch.num_rows == 0:
                    continue
                ids = vocab.encode(batch)
                prob = _score_batch(bundle, batch, ids, device)
                label = batch.column("label").to_numpy() if has_label else None
                row_ids = batch.column("_id") if has_id else pa.array(np.arange(position, position + batch.num_rows))
                position += batch.num_rows
                yield ScoredBatch(row_ids, prob, label, (ids == oov_ids).sum(0))
        finally:
            con.close()
            shutil.rmtree(spill, ignore_errors=True)

    return batches(), id_name


def predict(model: Path, inputs: list[Path], out: Path, *, batch_rows: int = 8192, id_column: str = "",
            threads: int = 0, progress: bool = True) -> dict[str, Any]:
    """Score ``inputs`` with the bundle in ``model``; write ``out`` (id, prob[, label]); return a summary
    (rows, rows/s, OOV counts per field, AUC and logloss where the input has labels)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from flip.metrics import auc, logloss

    bundle = load_bundle(model)
    out = Path(out)
    if out.suffix not in (".parquet", ".csv"):
        raise FlipError(f"--out {out}: give a .parquet or .csv file name")
    started = time.perf_counter()
    stream, id_name = score_stream(bundle, inputs, batch_rows=batch_rows, id_column=id_column, threads=threads)
    rows, oov = 0, np.zeros(len(bundle.fields), dtype=np.int64)
    labels, probs = [], []
    writer = None
    with atomic_file(out) as tmp:
        try:
            for b in stream:
                cols = {id_name: b.ids, "prob": pa.array(b.prob)}
                if b.label is not None:
                    cols["label"] = pa.array(b.label.astype(np.int8))
                    labels.append(b.label.astype(np.int8))
                    probs.append(b.prob)
                chunk = pa.table(cols)
                if writer is None:
                    writer = (pq.ParquetWriter(str(tmp), chunk.schema) if out.suffix == ".parquet"
                              else pacsv.CSVWriter(str(tmp), chunk.schema))
                writer.write_table(chunk)
                rows += len(b.prob)
                oov += b.oov
                if progress:
                    print(f"[predict] {rows:,} rows scored ({rows / (time.perf_counter() - started):,.0f} rows/s)",
                          flush=True)
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise DataError("no rows to score", file=str(inputs[0]), fix="give files with at least one data row")
    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {
        "model": str(model), "artifact": bundle.info.get("artifact"), "strategy": bundle.info["strategy"],
        "rows": rows, "seconds": round(seconds, 3), "rows_per_second": rows / max(seconds, 1e-9),
        "oov_rows": {f["name"]: int(n) for f, n in zip(bundle.fields, oov)}, "out": str(out)}
    if labels:
        y, p = np.concatenate(labels), np.concatenate(probs)
        if len(np.unique(y)) == 2:
            summary.update(auc=auc(y, p), logloss=logloss(y, p))
    return summary
