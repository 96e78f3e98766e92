"""clean_text: the regular expression runs only where there is whitespace to collapse; same values."""

from __future__ import annotations

import duckdb

from flip.data.sources.base import clean_text

VALUES = ["plain", "two words", "  lead and trail  ", "a  b", "a\tb", "a\nb", "a\r\nb", "a\fb", "a\x0bb",
          "a\u00a0b", "\t", "", "   ", "tab\t\tand  spaces \n", "Café  (1993)", "日本語\t😀", None]


def test_clean_text_gives_what_the_regular_expression_alone_gives():
    con = duckdb.connect()
    con.execute("CREATE TABLE t (v VARCHAR)")
    con.executemany("INSERT INTO t VALUES (?)", [[v] for v in VALUES])
    regex_only = "coalesce(nullif(trim(regexp_replace(v, '\\s+', ' ', 'g')), ''), 'unknown')"
    got = con.execute(f"SELECT v, {clean_text('v')} AS new, {regex_only} AS old FROM t").fetchall()
    assert len(got) == len(VALUES)
    for value, new, old in got:
        assert new == old, (value, new, old)
    assert dict((v, n) for v, n, _ in got)["a\tb"] == "a b"  # the collapsing still happens
    assert dict((v, n) for v, n, _ in got)[None] == "unknown"
