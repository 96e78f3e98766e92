"""No input runs as code: header cells, column names, file names and the positive:/drop: rules of a
user's click log reach DuckDB as values or quoted names, never as SQL; a locked connection can touch
no file outside its folders. Each crafted input either loads correctly or ends with exit 2 and one
paragraph, and nothing is written outside the output."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from flip.cli import app
from flip.data.preprocess import split_values
from flip.data.sources.csv import field_key
from flip.data.sql import check_rule, locked_connection, quote_ident, sql_str
from flip.errors import SettingError
from flip.io import read_json
from helpers import assert_one_paragraph_failure

runner = CliRunner()
ROWS = 30


def write_log(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def rows_for(n: int = ROWS) -> list[list[str]]:
    """user, item, genre, rating (1..5, so that a rule decides the label)."""
    return [[f"u{i % 7}", f"i{i % 5}", ["rock", "jazz", "pop"][i % 3], str(1 + i % 5)] for i in range(n)]


def run_preprocess(tmp_path: Path, files: list[Path], columns: list[str], label: str, **csv_settings):
    """``flip preprocess`` on ``files`` with the fields ``columns`` (settings in a params file, so that any
    text survives the YAML)."""
    params = {"data": {"dataset": "csv", "csv": {
        "files": [str(f) for f in files], "label": label,
        "fields": [{"column": c, "name": f"Field {k}"} for k, c in enumerate(columns)], **csv_settings}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    out = tmp_path / "processed" / "csv"
    result = runner.invoke(app, ["preprocess", "--params", str(tmp_path / "params.yaml"), "--raw", str(tmp_path),
                                 "--out", str(out), "-q"])
    return result, out


def values_by_field(out: Path) -> dict[str, list[str]]:
    """Each field's values, in the input's row order (no timestamp: file order)."""
    tables = [split_values(out, s).to_pylist() for s in ("train", "valid", "test")]
    rows = sorted((r for t in tables for r in t), key=lambda r: r["row"])
    return {f["name"]: [r[f["name"]] for r in rows] for f in read_json(out / "meta.json")["fields"]}


def pwn_target(tmp_path: Path) -> Path:
    """A path outside the output folder that an injected COPY would write."""
    return tmp_path / "pwned.csv"


# ---------------------------------------------------------------------------------------- identifiers

def test_the_reproduced_exploit_writes_nothing(tmp_path):
    """The header that, before the fix, closed the quoted name in the repeated-header check and ran a COPY
    writing a file outside the output (reproduced: pwned.csv appeared and the run ended with exit 2)."""
    target = pwn_target(tmp_path)
    evil = f"user\" IS NULL OR \"user\" = 'user'; COPY (SELECT 1) TO '{target}'; SELECT \"user"
    log = write_log(tmp_path / "clicks.csv", ["user", evil, "genre", "rating"], rows_for())
    result, out = run_preprocess(tmp_path, [log], ["user", "genre"], "rating", positive="value > 3")
    assert result.exit_code == 0, result.output
    assert not target.exists()
    assert values_by_field(out)["genre"] == [r[2] for r in rows_for()]


def test_header_cell_that_closes_the_quoted_name_is_only_a_name(tmp_path):
    target = pwn_target(tmp_path)
    evil = f"x\" ; COPY (SELECT 1) TO '{target}'; --"
    genre = f"g\" = 'g' OR 1=1; COPY (SELECT 42) TO '{target}'; SELECT \"x"
    log = write_log(tmp_path / "clicks.csv", ["user", evil, genre, "rating"], rows_for())
    result, out = run_preprocess(tmp_path, [log], ["user", evil, genre], "rating", positive="value > 3")
    assert result.exit_code == 0, result.output
    assert not target.exists()
    values = values_by_field(out)
    rows = rows_for()
    assert list(values) == ["user", field_key(evil), field_key(genre)]
    assert values[field_key(evil)] == [r[1] for r in rows] and values[field_key(genre)] == [r[2] for r in rows]
    assert [f["title"] for f in read_json(out / "meta.json")["fields"]] == ["Field 0", "Field 1", "Field 2"]


def test_label_and_missing_value_columns_with_quotes_are_names(tmp_path):
    target = pwn_target(tmp_path)
    label = f"r\"); COPY (SELECT 1) TO '{target}'; --"
    rows = rows_for()
    rows[3][2] = ""  # an empty value: the missing-value check names the column too
    log = write_log(tmp_path / "clicks.csv", ["user", "item", "it's \"genre\"", label], rows)
    result, out = run_preprocess(tmp_path, [log], ["user", "item", "it's \"genre\""], label, positive="value > 3",
                                 user="user", item="item")
    assert result.exit_code == 0, result.output
    assert not target.exists()
    meta = read_json(out / "meta.json")
    assert meta["missing_values"] == {"it's \"genre\"": {"rows": 1, "policy": "unknown"}}
    labels = [int(r[3]) > 3 for r in rows]
    assert meta["counts"]["total"] == ROWS and meta["positive_rate"]["total"] == pytest.approx(sum(labels) / ROWS)


def test_a_bad_label_in_a_column_with_a_crafted_name_is_one_paragraph(tmp_path):
    target = pwn_target(tmp_path)
    label = f"l\"; COPY (SELECT 1) TO '{target}'; --"
    rows = rows_for()
    rows[4][3] = "five"
    log = write_log(tmp_path / "clicks.csv", ["user", "item", "genre", label], rows)
    result, out = run_preprocess(tmp_path, [log], ["user", "item"], label, positive="value > 3")
    assert_one_paragraph_failure(result, out, "row 6", repr(label), "not a number")
    assert not target.exists()


def test_file_names_with_quotes_are_values(tmp_path):
    target = pwn_target(tmp_path)
    folder = tmp_path / "it's"
    folder.mkdir()
    name = f"a'); COPY (SELECT 1) TO '{target.name}'; --\".csv"
    log = write_log(folder / name, ["user", "item", "genre", "rating"], rows_for())
    result, out = run_preprocess(tmp_path, [log], ["user", "item", "genre"], "rating", positive="value > 3")
    assert result.exit_code == 0, result.output
    assert not target.exists() and not (Path.cwd() / target.name).exists()
    assert values_by_field(out)["genre"] == [r[2] for r in rows_for()]


def test_parquet_column_names_with_quotes_are_names(tmp_path):
    import pyarrow as pa

    target = pwn_target(tmp_path)
    evil = f"g\"; COPY (SELECT 1) TO '{target}'; --"
    rows = rows_for()
    pq.write_table(pa.table({"user": [r[0] for r in rows], "item": [r[1] for r in rows], evil: [r[2] for r in rows],
                             "clicked": [int(int(r[3]) > 3) for r in rows]}), tmp_path / "log.parquet")
    result, out = run_preprocess(tmp_path, [tmp_path / "log.parquet"], ["user", "item", evil], "clicked")
    assert result.exit_code == 0, result.output
    assert not target.exists()
    assert values_by_field(out)[field_key(evil)] == [r[2] for r in rows]


def test_a_latin1_log_is_transcoded_inside_the_locked_connections_folders(tmp_path):
    """Non-UTF-8 files are transcoded first; the copy lies under the connection's spill folder, which is
    the only place besides the inputs that it may read."""
    log = tmp_path / "clicks.csv"
    lines = ["user,it\"em,genre,rating"] + [",".join(r[:2] + ["caf\xe9" if i % 2 else r[2], r[3]])
                                          for i, r in enumerate(rows_for())]
    log.write_bytes(("\n".join(lines) + "\n").replace('it"em', '"it""em"').encode("latin-1"))
    result, out = run_preprocess(tmp_path, [log], ["user", 'it"em', "genre"], "rating", positive="value > 3",
                                 encoding="latin-1")
    assert result.exit_code == 0, result.output
    values = values_by_field(out)
    assert values["genre"][1] == "caf\xe9" and values["it_em"] == [r[1] for r in rows_for()]


def test_a_memory_limit_setting_is_a_value(tmp_path):
    target = pwn_target(tmp_path)
    log = write_log(tmp_path / "clicks.csv", ["user", "item", "genre", "rating"], rows_for())
    params = {"data": {"dataset": "csv", "csv": {"files": [str(log)], "label": "rating", "positive": "value > 3",
                                                 "fields": [{"column": "user", "name": "User"}]}},
              "preprocess": {"memory_limit": f"1GB'; COPY (SELECT 1) TO '{target}'; SET memory_limit = '2GB"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "processed" / "csv"
    result = runner.invoke(app, ["preprocess", "--params", str(tmp_path / "params.yaml"), "--out", str(out), "-q"])
    assert_one_paragraph_failure(result, out, "preprocess.memory_limit")
    assert not target.exists()


def test_a_header_cell_with_a_line_break_is_refused_in_one_paragraph(tmp_path):
    log = write_log(tmp_path / "clicks.csv", ["user", "it\nem", "genre", "rating"], rows_for())
    result, out = run_preprocess(tmp_path, [log], ["user", "it\nem"], "rating", positive="value > 3")
    assert_one_paragraph_failure(result, out, "clicks.csv", "row 1", "header")


def test_a_needed_column_named_twice_is_refused(tmp_path):
    log = write_log(tmp_path / "clicks.csv", ["user", "item", "item", "rating"], rows_for())
    result, out = run_preprocess(tmp_path, [log], ["user", "item"], "rating", positive="value > 3")
    assert_one_paragraph_failure(result, out, "column 'item'", "appears 2 times")


# ---------------------------------------------------------------------------------------------- rules

@pytest.mark.parametrize("setting, rule, fragment", [
    ("positive", "value > 3; COPY (SELECT 1) TO '{target}'", "';'"),
    ("positive", "value > 3); COPY (SELECT 1) TO '{target}'; SELECT (1", "';'"),
    ("drop", "value = 3; COPY (SELECT 1) TO '{target}'", "';'"),
    ("positive", "value IN (SELECT 4)", "subquery"),
    ("positive", "value > (SELECT count(*) FROM read_text('/etc/passwd'))", "subquery"),
    ("positive", "length(read_text('/etc/passwd')) > value", "read_text"),
    ("drop", "EXISTS (SELECT * FROM glob('/etc/*'))", "subquery"),
    ("positive", "value) FROM read_text('/etc/passwd') WHERE (value > 3", "parentheses"),
    ("positive", "value > 3 -- and more", "comment"),
    ("positive", "rating > 3", "only column a rule can use is value"),
    ("positive", "value > $1", "parameter"),
    ("positive", "getenv('HOME') = 'x'", "getenv"),
])
def test_a_rule_is_one_expression_over_value(tmp_path, setting, rule, fragment):
    target = pwn_target(tmp_path)
    rule = rule.format(target=target)
    log = write_log(tmp_path / "clicks.csv", ["user", "item", "genre", "rating"], rows_for())
    settings = {"positive": "value > 3", setting: rule}
    result, out = run_preprocess(tmp_path, [log], ["user", "item", "genre"], "rating", **settings)
    assert_one_paragraph_failure(result, out, f"data.csv.{setting}", fragment, "Fix:")
    assert not target.exists()


def test_the_word_value_inside_a_string_literal_keeps_its_meaning(tmp_path):
    log = write_log(tmp_path / "clicks.csv", ["user", "item", "genre", "rating"], rows_for())
    # a textual replace of `value` would turn 'value' into a 17-character string: every row positive
    result, out = run_preprocess(tmp_path, [log], ["user", "item", "genre"], "rating",
                                 positive="value > 3 OR length('value') <> 5", drop="value = 3 AND 'value' = 'value'")
    assert result.exit_code == 0, result.output
    meta = read_json(out / "meta.json")
    kept = [int(r[3]) for r in rows_for() if int(r[3]) != 3]
    assert meta["counts"]["total"] == len(kept)
    assert meta["positive_rate"]["total"] == pytest.approx(sum(v > 3 for v in kept) / len(kept))


def test_check_rule_accepts_plain_expressions_and_refuses_the_rest():
    for rule in ("value > 3", "value BETWEEN 2 AND 4", "value IN (1, 2)", "abs(value - 3) < 1",
                 "CASE WHEN value > 3 THEN true ELSE false END", "value::INTEGER % 2 = 0", "value > ';'"):
        assert check_rule(rule, "data.csv.positive") == rule
    for rule in ("", "value > 3;", "1) + (2", "value > 3 UNION SELECT 1", "sum(value) OVER () > 1",
                 "list_filter([1], x -> x > value)[1] > 0", "main.abs(value) > 1", "value > 3 /* c */"):
        with pytest.raises(SettingError, match="data.csv.positive"):
            check_rule(rule, "data.csv.positive")


# ---------------------------------------------------------------------------------------- connections

def test_a_locked_connection_reads_and_writes_only_its_folders(tmp_path):
    import duckdb

    inside, outside = tmp_path / "in", tmp_path / "elsewhere"
    for folder in (inside, outside, tmp_path / "out"):
        folder.mkdir()
    (inside / "a.csv").write_text("x\n1\n")
    (outside / "secret.txt").write_text("secret\n")
    with locked_connection(read=[inside], write=[tmp_path / "out"], temp_directory=tmp_path / "spill") as con:
        assert con.execute("SELECT x FROM read_csv($1)", [str(inside / "a.csv")]).fetchall() == [(1,)]
        con.execute(f"COPY (SELECT 1) TO {sql_str(str(tmp_path / 'out' / 'ok.csv'))}")
        assert (tmp_path / "out" / "ok.csv").exists()
        for sql in (f"SELECT * FROM read_text({sql_str(str(outside / 'secret.txt'))})",
                    "SELECT * FROM read_text('/etc/passwd')",
                    f"COPY (SELECT 1) TO {sql_str(str(outside / 'pwned.csv'))}",
                    f"COPY (SELECT 1) TO {sql_str(str(tmp_path / 'out' / '..' / 'pwned.csv'))}",
                    f"SELECT 1; COPY (SELECT 1) TO {sql_str(str(outside / 'pwned2.csv'))}",
                    f"ATTACH {sql_str(str(outside / 'x.duckdb'))}",
                    "SELECT * FROM glob('/etc/*')",
                    "SET enable_external_access = true", "SET allowed_directories = ['/']",
                    "SET lock_configuration = false"):
            with pytest.raises(duckdb.Error):
                con.execute(sql)
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"] and not (tmp_path / "pwned.csv").exists()


def test_quote_ident_and_sql_str_round_trip_any_text():
    import duckdb

    with locked_connection() as con:
        for text in ['a"b', "it's", 'x" ; DROP TABLE t; --', "\\", "ü\u00e9\u4e2d", " ", "a\nb"]:
            con.execute(f"CREATE OR REPLACE TABLE t AS SELECT {sql_str(text)} AS {quote_ident(text)}")
            assert con.execute("SELECT * FROM t").fetchall() == [(text,)]
            assert [d[0] for d in con.execute("SELECT * FROM t").description] == [text]
        with pytest.raises(Exception):
            quote_ident("")
        with pytest.raises(duckdb.Error):
            con.execute("COPY t TO '/tmp/flip-should-not-exist.csv'")


def test_split_values_quotes_field_names_from_meta(tmp_path):
    """meta.json is a file like any other: a field name in it is a name, not SQL."""
    log = write_log(tmp_path / "clicks.csv", ["user", "item", "genre", "rating"], rows_for())
    result, out = run_preprocess(tmp_path, [log], ["user", "item", "genre"], "rating", positive="value > 3")
    assert result.exit_code == 0, result.output
    meta = read_json(out / "meta.json")
    target = pwn_target(tmp_path)
    meta["fields"][2]["name"] = f"g\" FROM x; COPY (SELECT 1) TO '{target}'; --"
    (out / "meta.json").write_text(json.dumps(meta))
    table = split_values(out, "test")
    assert table.column_names[-1] == meta["fields"][2]["name"] and not target.exists()


def test_validations_exact_checks_and_sample_quote_field_names_from_meta(tmp_path):
    """The DuckDB aggregates and the seeded sample of flip validate (large splits) splice field names
    of meta.json and the split's path: a name built to break out is a name, a file is not written."""
    import pyarrow.parquet as pq

    from flip.config import config_from_dict
    from flip.data.validate import _sample, exact_checks

    log = write_log(tmp_path / "clicks.csv", ["user", "item", "genre", "rating"], rows_for())
    result, out = run_preprocess(tmp_path, [log], ["user", "item", "genre"], "rating", positive="value > 3")
    assert result.exit_code == 0, result.output
    meta = read_json(out / "meta.json")
    target = pwn_target(tmp_path)
    old, new = meta["fields"][2]["name"], f"g\" FROM x; COPY (SELECT 1) TO '{target}'; --"
    meta["fields"][2]["name"] = new
    table = pq.read_table(out / "test.parquet")
    crafted = tmp_path / "it's \"test\".parquet"
    pq.write_table(table.rename_columns([new if c == old else c for c in table.column_names]), crafted)
    rows, failed, _ = exact_checks(crafted, meta, config_from_dict({}), "test", (0, 2**62))
    assert rows == table.num_rows and not target.exists(), failed
    sample = _sample(crafted, [new], 5)
    assert list(sample.columns) == [new] and len(sample) == min(5, table.num_rows) and not target.exists()


# ------------------------------------------------------------------------------------- property test

ALPHABET = list("abcXYZ09_ -") + ['"', '""', "'", ";", "--", "\\", "/*", "*/", "(", ")", ",", "$1", "ü", "é",
                                   "中", "🙂", "\t", "\u200b"]
BREAKS = ["\n", "\r", "\x00"]  # rarer: a header cell holding one is refused
SQL_BITS = ['" ; COPY (SELECT 1) TO \'{target}\'; --', "'); DROP TABLE samples; --", "\" OR 1=1 --", '"::INT',
            "value", "label", "c_0", "_row", "v_0"]


def random_name(rng: random.Random, target: Path, prefix: str) -> str:
    """A column name: sometimes a plain prefix with noise, sometimes only noise, sometimes empty or SQL."""
    kind = rng.random()
    noise = "".join(rng.choice(BREAKS if rng.random() < 0.02 else ALPHABET) for _ in range(rng.randint(0, 6)))
    if kind < 0.05:
        return ""
    if kind < 0.3:
        return rng.choice(SQL_BITS).format(target=target) + noise
    if kind < 0.45:
        return noise
    return prefix + noise


@pytest.mark.slow
def test_random_header_cells_load_under_their_names_or_fail_in_one_paragraph(tmp_path):
    """Seeded random column names (quotes, semicolons, line breaks, comments, backslashes, unicode, empty)
    as header cells and as data.csv column names: each case loads with exactly the fields given, each
    value under its own field, or ends with exit 2 and one paragraph; nothing is written outside."""
    rng = random.Random(19)
    loaded = failed = 0
    for case in range(100):
        root = tmp_path / f"case{case}"
        root.mkdir()
        target = root / "pwned.csv"
        names = [random_name(rng, target, p) for p in ("user", "item", "genre", "rating")]
        wanted = list(names)
        if rng.random() < 0.1:  # the settings name a column the file does not have
            wanted[rng.randrange(3)] += "?"
        rows = rows_for()
        try:
            log = write_log(root / "clicks.csv", names, rows)
        except csv.Error:  # (a name the csv module itself cannot write)
            continue
        result, out = run_preprocess(root, [log], wanted[:3], wanted[3], positive="value > 3")
        assert not target.exists(), (case, names)
        assert {p.name for p in root.iterdir()} <= {"clicks.csv", "params.yaml", "processed"}, case
        made = [p.name for p in (root / "processed").iterdir()] if (root / "processed").exists() else []
        assert made == (["csv"] if result.exit_code == 0 else []), (case, made)
        if result.exit_code == 0:
            loaded += 1
            values = values_by_field(out)
            assert list(values) == [field_key(n) for n in wanted[:3]], (case, names)
            for k in range(3):
                assert values[field_key(wanted[k])] == [r[k] for r in rows], (case, names, k)
        else:
            failed += 1
            assert_one_paragraph_failure(result, out)
    assert loaded >= 40 and failed >= 5, (loaded, failed)  # both outcomes are exercised
