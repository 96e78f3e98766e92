"""What every dataset source provides, and the careful raw-file reader they share.

A source turns its raw files into one DuckDB table ``samples`` with the columns

    label INTEGER (0/1) · ts BIGINT (ordering key) · sort_user · sort_item ·
    v_0 … v_{F-1} VARCHAR (each field's human-readable value, used for both the id and the text)

``flip.data.preprocess`` does everything after that (sorting, splitting, vocabularies, encoding,
text and spans), identically for every source.
"""

from __future__ import annotations

import codecs
import gzip
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flip.data.sql import is_locked, safe_ident, sql_str  # noqa: F401 - sql_str re-exported for callers
from flip.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import duckdb


@dataclass(frozen=True)
class Field:
    """One feature field: ``key`` names the column, ``title`` is how the text names it."""

    key: str
    title: str


@dataclass(frozen=True)
class RawFile:
    """A file of a dataset's official layout, with where to get it."""

    name: str  # path relative to the dataset's raw directory, e.g. "ratings.dat"
    archive: str = ""  # the downloadable archive that contains it ("" = downloaded as is)


@dataclass(frozen=True)
class Download:
    """An archive or file to download, with its checksum (``algo:hex``; empty = record on first use)."""

    url: str
    filename: str
    checksum: str = ""
    size: int = 0


@dataclass
class SourceInfo:
    name: str  # dataset name in params (data.dataset)
    directory: str  # folder name in the mirror / raw dir, e.g. "ml-1m"
    fields: list[Field]
    files: list[RawFile]
    downloads: list[Download] = field(default_factory=list)
    user_field: str = ""
    item_field: str = ""
    label_rule: str = ""
    split_rule: str = "sorted by (timestamp, user id, item id)"


def find_raw(directory: Path, name: str) -> Path:
    """``directory/name``, or its gzip-compressed sibling ``name.gz`` where only that exists."""
    path = Path(directory) / name
    gz = path.with_name(path.name + ".gz")
    return gz if not path.exists() and gz.exists() else path


# RE2's \s (what clean_text collapses): space, tab, newline, form feed, carriage return
COLLAPSIBLE = ("'  '", "chr(9)", "chr(10)", "chr(12)", "chr(13)")


def clean_text(expr: str) -> str:
    """SQL: collapse whitespace (tabs, newlines) in a value, trim it, and map empty/NULL to 'unknown'.

    The regular expression runs only on the values that hold something to collapse (two spaces, or one
    of RE2's other ``\\s`` characters): the rest come out the same without it, and on a large log the
    regular expression was most of the cost of reading the values (``flip predict``, preprocessing)."""
    needs = " OR ".join(f"contains({expr}, {c})" for c in COLLAPSIBLE)
    collapsed = f"CASE WHEN {needs} THEN regexp_replace({expr}, '\\s+', ' ', 'g') ELSE {expr} END"
    return f"coalesce(nullif(trim({collapsed}), ''), 'unknown')"


# Official files of the datasets, by their first line: a file of another dataset (or another file of the
# same one) under an expected name is named as such.
KNOWN_FILES = [
    (re.compile(rb'^"?User-ID"?;"?Location"?;"?Age"?'), "BX-Users.csv from BookCrossing"),
    (re.compile(rb'^"?ISBN"?;"?Book-Title"?'), "BX-Books.csv from BookCrossing"),
    (re.compile(rb'^"?User-ID"?;"?ISBN"?;"?Book-Rating"?'), "BX-Book-Ratings.csv from BookCrossing"),
    (re.compile(rb"^\d+::\d+::[1-5]::\d+$"), "ratings.dat from MovieLens-1M"),
    (re.compile(rb"^\d+::[MF]::\d+::\d+::[^:]+$"), "users.dat from MovieLens-1M"),
    (re.compile(rb"^\d+::[^:]+ \(\d{4}\)::[^:]+$"), "movies.dat from MovieLens-1M"),
    (re.compile(rb'^\s*\{\s*"(user_id|book_id|isbn)"'), "a GoodReads JSON-lines file"),
]
UTF8_SEQUENCE = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")
HIGH_BYTE = re.compile(rb"[\x80-\xff]")
ARCHIVES = [(b"PK\x03\x04", "a zip archive", "unzip it"), (b"BZh", "bzip2-compressed", "bunzip2 it"),
            (b"\x28\xb5\x2f\xfd", "zstd-compressed", "zstd -d it"),
            (b"\xfd7zXZ\x00", "xz-compressed", "xz -d it"), (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "extract it")]


def _identify(first: bytes, path: Path) -> str | None:
    """Which known official file ``first`` (a first line) belongs to, when it is not ``path``'s own."""
    own = path.name[:-3] if path.name.endswith(".gz") else path.name
    for pattern, what in KNOWN_FILES:
        if pattern.search(first.strip()) and not what.startswith(own + " "):
            return what
    return None


def sniff(path: Path, encoding: str, *, known_names: bool) -> tuple[bool, str]:
    """Look at the bytes before parsing: (gzip-compressed?, encoding to read with).

    Names the real problem where a separator error would mislead: archives (gzip is read as it is;
    zip, bzip2, zstd, xz, 7z need unpacking first), UTF-16 (read through its byte-order mark), text
    full of NUL bytes, UTF-8 text in a file declared latin-1 (it would turn "Misérables" into
    "MisÃ©rables"), and, for the datasets' official file names, a file of another dataset."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    for magic, what, how in ARCHIVES:
        if head.startswith(magic):
            raise DataError(f"the file is {what}, not text", file=str(path),
                            fix=f"{how} first and put the extracted file here under this name")
    gz = head.startswith(b"\x1f\x8b")
    if gz:
        with gzip.open(path, "rb") as fh:
            head = fh.read(4096)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return gz, "utf-16"  # the byte-order mark says which: transcoded like any other encoding
    if head.count(b"\x00") > len(head) // 10:
        raise DataError("the file is full of NUL bytes: it looks like UTF-16 text without a byte-order mark, "
                        "or a binary file", file=str(path), fix="re-save it as UTF-8 text (or latin-1)")
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    if known_names:
        other = _identify(first, path)
        if other:
            raise DataError(f"this looks like {other}, not {path.name}", file=str(path), row=1,
                            value=first[:80].decode("latin-1"),
                            fix=f"put the right file under this name (the dataset's official {path.name})")
    if encoding.lower().replace("_", "-") in ("latin-1", "latin1", "iso-8859-1", "cp1252"):
        opener = gzip.open if gz else open
        with opener(path, "rb") as fh:
            data = fh.read(16 << 20)
        # UTF-8 multi-byte sequences make up most of the non-ASCII bytes: UTF-8 text (latin-1 text has
        # them only by accident: "Ã©" is a rare pair), even where a damaged byte breaks strict decoding
        sequences = list(UTF8_SEQUENCE.finditer(data))
        high = len(HIGH_BYTE.findall(data))
        if sequences and sum(len(m.group()) for m in sequences) >= 0.5 * high:
            at = sequences[0].start()
            lo = max(data.rfind(b" ", 0, at), data.rfind(b"\n", 0, at), data.rfind(b":", 0, at)) + 1
            hi = min([x for x in (data.find(b" ", at), data.find(b"\n", at), data.find(b":", at)) if x >= 0]
                     or [len(data)])
            word = data[lo:hi][:40]
            raise DataError(
                f"the file is declared {encoding} but its bytes are UTF-8: read as {encoding}, "
                f"{word.decode('utf-8', errors='replace')!r} would become {word.decode('latin-1')!r}",
                file=str(path), fix="use the official file (latin-1), or re-save this one as latin-1; for your "
                                    "own data set data.csv.encoding: utf-8")
    return gz, encoding


def final_line_complete(path: Path, gz: bool, encoding: str) -> tuple[int, bytes] | None:
    """None when the file ends with a line end, else (number of its last line, that line)."""
    opener = gzip.open if gz else open
    if encoding.lower().startswith("utf-16"):  # two bytes per line end: look at the decoded text
        with opener(path, "rb") as fh:
            text = fh.read().decode(encoding, errors="replace")  # (an odd byte count: cut in a character)
        return None if text.endswith("\n") else (text.count("\n") + 1, text.rsplit("\n", 1)[-1].encode())
    last, count = b"", 0
    with opener(path, "rb") as fh:
        for line in fh:
            count += 1
            last = line
    return None if last.endswith(b"\n") else (count, last)


def read_delimited(
    con: "duckdb.DuckDBPyConnection",
    path: Path,
    table: str,
    columns: list[str],
    *,
    delim: str,
    header: bool,
    encoding: str = "utf-8",
    quote: str = "",
    escape: str = "",
    fix: str = "",
    complete_lines: bool = False,
    names: list[str] | None = None,
) -> int:
    """Read a delimited file into ``table`` (all VARCHAR, plus ``_row``: 1-based data row number).

    ``columns`` are the SQL names of the columns, plain identifiers the code chose (``user_id``, or
    ``c_0 … c_{n-1}`` for a user's file); ``names`` are the names the user knows them by (a header's
    cells), used only in messages and to spot a repeated header: a header cell never becomes SQL.

    Fails with a :class:`DataError` naming file, row and column for: a missing or empty file,
    an archive, UTF-16 or UTF-8 text where ``encoding`` says otherwise (:func:`sniff`; gzip and
    UTF-16 are read as they are), a file without the expected separator, rows with too few or too
    many columns, bytes that are not valid in ``encoding``, and header lines repeated inside the
    data. ``complete_lines`` (the datasets' official files, which end with a line end): a file of
    another dataset under this name, and a last line without its line end (a cut-off file) fail
    too. Returns the row count.
    """
    for name in (table, *columns):
        safe_ident(name)
    shown = names if names is not None else columns
    if len(shown) != len(columns):
        raise ValueError("names and columns differ in length")
    if not path.exists():
        raise DataError("file is missing", file=str(path), fix=fix or "put the dataset's official files there")
    if path.stat().st_size == 0:
        raise DataError("file is empty", file=str(path), fix=fix or "re-download or re-export the file")
    gz, encoding = sniff(path, encoding, known_names=complete_lines)
    opener = gzip.open if gz else open
    if complete_lines:
        cut = final_line_complete(path, gz, encoding)
        if cut is not None:
            raise DataError("the last line has no line end: the file looks cut off (an interrupted download "
                            "or copy), and its last value may be truncated", file=str(path), row=cut[0],
                            value=cut[1][:80].decode("latin-1"),
                            fix="download or copy the file again (`flip download`)")
    with opener(path, "rb") as fh:
        if encoding.lower().startswith("utf-16"):
            first = fh.read(8192).decode(encoding, errors="ignore").split("\n", 1)[0].rstrip("\r").encode()
        else:
            first = fh.readline().rstrip(b"\r\n")
    if not first.strip():
        raise DataError("first line is empty", file=str(path), row=1, fix="remove blank lines at the top")
    if delim.encode() not in first and len(columns) > 1:
        seen = [d for d in ("::", ";", ",", "\t", "|") if d.encode() in first]
        raise DataError(
            f"the first line has no {delim!r} separator"
            + (f"; it looks separated by {seen[0]!r}" if seen else ""),
            file=str(path),
            row=1,
            value=first[:80].decode("latin-1"),
            fix=f"this file must be separated by {delim!r} (set the delimiter in params.yaml for a csv source)",
        )
    if encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
        # DuckDB's own transcoding drops a malformed last record silently: transcode to UTF-8 first
        # on a locked connection, transcode under its temp_directory (the only place it may read besides
        # the inputs); elsewhere under the system's temporary folder
        where = con.execute("SELECT current_setting('temp_directory')").fetchone()[0] if is_locked(con) else None
        with tempfile.TemporaryDirectory(prefix="flip-utf8-", dir=where or None) as tmp:
            utf8 = Path(tmp) / (path.name[:-3] if path.name.endswith(".gz") else path.name)
            decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
            done, lines = 0, 1
            with opener(path, "rb") as src, open(utf8, "wb") as dst:
                try:
                    for chunk in iter(lambda: src.read(1 << 22), b""):
                        text = decoder.decode(chunk)
                        dst.write(text.encode("utf-8"))
                        done, lines = done + len(chunk), lines + text.count("\n")
                    dst.write(decoder.decode(b"", final=True).encode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise DataError(f"bytes that are not valid {encoding} ({exc.reason}) after line {lines:,}, at "
                                    f"byte {done + exc.start:,}: a file cut inside a character, or another encoding",
                                    file=str(path),
                                    fix=f"re-save the file as {encoding} (or UTF-8), or download it again") from None
            try:
                return read_delimited(con, utf8, table, columns, delim=delim, header=header, quote=quote,
                                      escape=escape, fix=fix, complete_lines=False, names=names)
            except DataError as exc:  # name the user's file, not the transcoded copy
                exc.args = (str(exc).replace(str(utf8), str(path)),)
                exc.file = str(path)
                raise
    cols = "{" + ", ".join(f"{sql_str(c)}: 'VARCHAR'" for c in columns) + "}"
    options = [
        f"delim={sql_str(delim)}",
        f"header={'true' if header else 'false'}",
        f"columns={cols}",
        f"quote={sql_str(quote)}",
        f"escape={sql_str(escape)}",
        f"encoding={sql_str(encoding)}",
        f"compression={sql_str('gzip' if gz else 'none')}",
        "store_rejects=true",
        f"rejects_table={sql_str(table + '_rejects')}",
        f"rejects_scan={sql_str(table + '_rejects_scan')}",
        "auto_detect=false",
        "strict_mode=true",
        "max_line_size=10000000",
    ]
    con.execute(f"DROP TABLE IF EXISTS {table}_rejects")
    con.execute(f"DROP TABLE IF EXISTS {table}_rejects_scan")
    try:
        con.execute(
            f"CREATE OR REPLACE TABLE {table} AS SELECT row_number() OVER () AS _row, * "
            f"FROM read_csv($1, {', '.join(options)})", [str(path)]
        )
    except Exception as exc:  # duckdb.Error: sniffing / IO failures
        if "No space left on device" in str(exc):  # not the file's fault: the CLI reports a full disk (exit 75)
            raise
        raise DataError(
            f"cannot be parsed as {delim!r}-separated text in {encoding}: {str(exc).splitlines()[0]}",
            file=str(path),
            fix=fix or "check the separator and encoding of the file",
        ) from exc
    rejects = con.execute(
        f"SELECT line, column_name, error_type, csv_line, error_message FROM {table}_rejects ORDER BY line LIMIT 1"
    ).fetchall()
    if rejects:
        line, column, kind, text, message = rejects[0]
        column = dict(zip(columns, shown)).get(column, column)
        listed = ", ".join(repr(c) for c in shown) if names is not None else ", ".join(columns)
        total = con.execute(f"SELECT count(DISTINCT line) FROM {table}_rejects").fetchone()[0]
        hint = {
            "MISSING COLUMNS": f"each row needs {len(columns)} {delim!r}-separated columns "
            f"({listed}); the line looks truncated: repair or delete it",
            "TOO MANY COLUMNS": f"each row needs exactly {len(columns)} columns ({listed}); "
            f"remove the extra {delim!r} separators or quote the value",
            "INVALID ENCODING": f"the file is not valid {encoding}; re-save it as {encoding} "
            "(or set the encoding, e.g. latin-1, for a csv source)",
        }.get(kind, message)
        raise DataError(
            f"{kind.lower()} ({total} bad line{'s' if total > 1 else ''} in total)",
            file=str(path),
            row=int(line),
            column=column,
            value=text,
            fix=hint,
        )
    if header:
        first = list(range(min(2, len(columns))))  # the header's own cells, as parameters
        same = " AND ".join(f"{columns[j]} = ${j + 1}" for j in first)
        dup = con.execute(f"SELECT min(_row) FROM {table} WHERE {same}", [shown[j] for j in first]).fetchone()[0]
        if dup is not None:
            raise DataError(
                "the header line is repeated inside the data (files concatenated with their headers?)",
                file=str(path),
                row=int(dup) + 1,
                fix="delete the repeated header lines",
            )
    count = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    if count == 0:
        raise DataError("file has no data rows", file=str(path), fix=fix or "re-download or re-export the file")
    return int(count)
