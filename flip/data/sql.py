"""No input runs as code: quoting, rule checking and locked-down DuckDB connections.

Text from a file (header cells, column names, file names) or from a setting (``params.yaml``, a
bundle's ``model.json``) reaches DuckDB only

* as a **value**: bound as a parameter (``con.execute(sql, [value])``) or quoted by :func:`sql_str`;
* as an **identifier**: quoted by :func:`quote_ident` (or, better, not at all: the readers rename
  the columns of a file by position, ``c_0 … c_{n-1}``, and keep the names in Python);
* as a **rule** (``data.csv.positive`` / ``drop``): checked by :func:`check_rule` to be one boolean
  expression over ``value`` (no statement, subquery, table function or file access), refused otherwise.

And every connection that runs SQL built from input comes from :func:`locked_connection`: it may
read and write only the folders it is given, cannot load extensions, and its configuration is locked,
so a statement that slipped through could neither read nor write another file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flip.errors import FlipError, SettingError

SAFE_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def sql_str(text: str) -> str:
    """Quote a Python string as a SQL literal ('' doubles a quote; DuckDB gives backslashes no meaning)."""
    return "'" + str(text).replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    """Quote ``name`` as a SQL identifier (a ``"`` inside is doubled). DuckDB has no empty identifier:
    an empty name is refused (name it by position instead)."""
    name = str(name)
    if not name:
        raise FlipError("an empty name cannot be used as a SQL identifier. Fix: give the column a name")
    return '"' + name.replace('"', '""') + '"'


def safe_ident(name: str) -> str:
    """``name`` when it is a plain identifier the code made (``part_0``, ``v_3``); else a ValueError: a
    guard for the places that splice a table or column name they did not quote."""
    if not SAFE_IDENT.fullmatch(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


def positional(n: int) -> list[str]:
    """The SQL names ``c_0 … c_{n-1}`` by which a file's columns are read (their own names stay in Python)."""
    return [f"c_{j}" for j in range(n)]


def sample_sql(source: str, rows: int, seed: int, columns: str = "*", key: str = "row") -> str:
    """A query of ``columns`` over ``source`` (a table function or a view: SQL the caller built) that
    keeps the ``rows`` rows of the smallest ``hash(key, seed)``, in ``key`` order: a seeded uniform
    sample that is the same whatever the thread count, the scan order or whether the rows come from a
    Parquet file or a DataFrame (a reservoir sample is not). The keys are chosen first (DuckDB's top-N
    over the key column alone: the memory of ``rows`` keys), then only those rows' ``columns`` are
    computed. ``key`` is a unique integer column (the processed splits' ``row``)."""
    key = safe_ident(key)
    return (f"SELECT {columns} FROM {source} WHERE {key} IN (SELECT {key} FROM {source} "
            f"ORDER BY hash({key}::BIGINT, {int(seed)}::BIGINT), {key} LIMIT {int(rows)}) ORDER BY {key}")


# ----------------------------------------------------------------------------------------------- rules

# parsed-expression classes a rule may use: comparisons, arithmetic, CASE, casts, constants, functions,
# and the column ``value``; never a subquery, window, lambda, star, parameter or positional reference
RULE_CLASSES = {"BETWEEN", "CASE", "CAST", "COLUMN_REF", "COMPARISON", "CONJUNCTION", "CONSTANT", "FUNCTION",
                "OPERATOR", "COLLATE", "TYPE"}
# functions that read files, run SQL text or reveal the environment (table functions cannot appear in
# an expression at all; these names are refused with a clear message whatever their kind)
RULE_FUNCTIONS = re.compile(r"^(read_|parquet_|sniff_|glob|query|getenv|current_setting|duckdb_|pragma_|"
                            r"json_execute|sql_|load|install|attach|copy|export|import|iceberg|delta_|"
                            r"system|shell|which_secret|secret|http)", re.IGNORECASE)


def _rule_error(setting: str, rule: str, problem: str) -> SettingError:
    return SettingError(
        f"{setting} = {rule!r} is not allowed: {problem}. A rule is ONE boolean SQL expression over the "
        "label column, named value (comparisons, arithmetic, AND/OR/NOT, IN (...) lists, CASE, casts and "
        "scalar functions); no ';', no SELECT or subquery, no table or file function (read_csv, read_text, "
        f"glob, ...), no comment. Fix: write it like {setting.rsplit('.', 1)[-1]}: \"value > 3\"")


def _walk(node: Any, found: list[dict]) -> None:
    if isinstance(node, dict):
        if "class" in node or "node" in node or node.get("type") in ("SELECT_NODE", "SET_OPERATION_NODE"):
            found.append(node)
        for v in node.values():
            _walk(v, found)
    elif isinstance(node, list):
        for v in node:
            _walk(v, found)


def check_rule(rule: str, setting: str, con: Any = None) -> str:
    """``rule`` itself when it is one boolean expression over ``value``, else a :class:`SettingError`
    naming ``setting``. Checked on DuckDB's own tokens and parse tree: no ``;`` or comment, balanced
    parentheses, one SELECT item with no FROM, and only allowed expression nodes (no subquery, window,
    lambda, parameter), columns and functions. Refuses, never repairs. ``con``: a connection to parse
    on (the rule is passed as a string parameter to ``json_serialize_sql``, never run); default a new
    locked one."""
    import duckdb

    if not isinstance(rule, str) or not rule.strip():
        raise _rule_error(setting, str(rule), "it is empty")
    if "\x00" in rule:
        raise _rule_error(setting, rule, "it holds a NUL character")
    try:
        tokens = duckdb.tokenize(rule)
    except Exception as exc:  # noqa: BLE001 - the tokenizer's own error
        raise _rule_error(setting, rule, f"it cannot be read as SQL ({str(exc).splitlines()[0]})") from None
    depth = 0
    for i, (pos, kind) in enumerate(tokens):
        end = tokens[i + 1][0] if i + 1 < len(tokens) else len(rule)
        text = rule[pos:end].strip()
        if kind == duckdb.token_type.comment:
            raise _rule_error(setting, rule, "it holds a comment")
        if kind == duckdb.token_type.operator:
            if ";" in text:
                raise _rule_error(setting, rule, "it holds ';' (a second statement)")
            depth += text.count("(") - text.count(")")
            if depth < 0:
                raise _rule_error(setting, rule, "its parentheses do not match")
    if depth != 0:
        raise _rule_error(setting, rule, "its parentheses do not match")
    wrapped = f"SELECT (\n{rule}\n)"
    try:
        statements = duckdb.extract_statements(wrapped)
    except Exception as exc:  # noqa: BLE001 - a parser error: not SQL
        raise _rule_error(setting, rule, f"it is not valid SQL ({str(exc).splitlines()[0]})") from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise _rule_error(setting, rule, "it is not a single expression")
    if con is None:
        with locked_connection() as own:
            return check_rule(rule, setting, own)
    tree = json.loads(con.execute("SELECT json_serialize_sql($1)", [wrapped]).fetchone()[0])
    if tree.get("error") or len(tree.get("statements", [])) != 1:
        raise _rule_error(setting, rule, f"it is not a single expression ({tree.get('error_message', '')})")
    node = tree["statements"][0]["node"]
    if (node.get("type") != "SELECT_NODE" or len(node.get("select_list", [])) != 1
            or node.get("from_table", {}).get("type") != "EMPTY" or node.get("modifiers")
            or node.get("cte_map", {}).get("map") or node.get("group_expressions") or node.get("group_sets")
            or any(node.get(k) is not None for k in ("where_clause", "having", "qualify", "sample"))):
        raise _rule_error(setting, rule, "it is not a single expression")
    found: list[dict] = []
    _walk(node["select_list"][0], found)
    for n in found:
        cls = n.get("class")
        if "node" in n or n.get("type") in ("SELECT_NODE", "SET_OPERATION_NODE") or cls == "SUBQUERY":
            raise _rule_error(setting, rule, "it holds a subquery")
        if cls is None:
            continue
        if cls not in RULE_CLASSES:
            raise _rule_error(setting, rule, f"it holds a {cls.lower().replace('_', ' ')}")
        if cls == "COLUMN_REF" and [c.lower() for c in n.get("column_names", [])] != ["value"]:
            raise _rule_error(setting, rule, f"it names {'.'.join(n.get('column_names', []))!r}; the only "
                                             "column a rule can use is value")
        if cls == "FUNCTION":
            name = str(n.get("function_name", ""))
            if n.get("schema") or n.get("catalog") or RULE_FUNCTIONS.match(name):
                raise _rule_error(setting, rule, f"it calls {name}(), which a rule may not use")
    return rule


def rule_sql(rule: str, setting: str, con: Any = None) -> str:
    """The checked rule, parenthesised on lines of its own, for a query whose FROM exposes a column
    ``value`` (the rule's ``value`` binds to it by name: string literals are left as they are)."""
    return f"(\n{check_rule(rule, setting, con)}\n)"


# ----------------------------------------------------------------------------------------- connections

def _dirs(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Each path as given (absolute) and resolved (symlinks followed), without duplicates."""
    out: list[str] = []
    for p in paths:
        if p is None or str(p) == "":
            continue
        for q in (Path(p).absolute(), Path(p).resolve()):
            if str(q) not in out:
                out.append(str(q))
    return out


def locked_connection(database: str | os.PathLike | None = None, *, read: Iterable[str | os.PathLike] = (),
                      write: Iterable[str | os.PathLike] = (), memory_limit: str = "", threads: int = 0,
                      temp_directory: str | os.PathLike | None = None, memory_setting: str = "preprocess.memory_limit"
                      ) -> Any:
    """A DuckDB connection that can touch only ``read`` and ``write`` (files or folders, and the
    ``temp_directory`` it spills to): ``allowed_directories`` / ``allowed_paths`` are set, then external
    access and extension auto-install/auto-load are switched off and the configuration is locked, so no
    later statement (``SET``, ``COPY … TO``, ``read_text``, ``ATTACH``, ``INSTALL``) can widen it.
    Call it after the inputs are known and before any SQL built from them runs. Python objects
    registered with ``con.register`` still work. ``memory_limit`` comes from a setting
    (``memory_setting`` names it in the error)."""
    import duckdb

    config: dict[str, Any] = {"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                              "preserve_insertion_order": True}
    if threads:
        config["threads"] = int(threads)
    if temp_directory is not None:
        Path(temp_directory).mkdir(parents=True, exist_ok=True)
        config["temp_directory"] = str(Path(temp_directory).absolute())
    try:
        con = duckdb.connect(str(database) if database is not None else ":memory:", config=config)
    except duckdb.Error as exc:
        raise FlipError(f"cannot open the DuckDB database {database}: {str(exc).splitlines()[0]}") from exc
    try:
        if memory_limit:
            try:
                con.execute(f"SET memory_limit = {sql_str(memory_limit)}")
            except duckdb.Error as exc:
                raise SettingError(f"{memory_setting} = {memory_limit!r} is not a memory size "
                                   f"({str(exc).splitlines()[0]}). Fix: give e.g. 4GB or 512MB") from None
        paths = [Path(p) for p in [*read, *write] if p is not None and str(p) != ""]
        if temp_directory is not None:
            paths.append(Path(temp_directory))
        dirs = _dirs(p for p in paths if not p.is_file())
        files = _dirs(p for p in paths if p.is_file())
        con.execute("SET allowed_directories = $1", [dirs])
        con.execute("SET allowed_paths = $1", [files])
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def is_locked(con: Any) -> bool:
    """Whether ``con`` has external access switched off (then its temp_directory is the place to write)."""
    try:
        return not con.execute("SELECT current_setting('enable_external_access')").fetchone()[0]
    except Exception:  # noqa: BLE001 - an old or foreign connection: treat as not locked
        return False
