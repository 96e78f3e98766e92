"""Bad input: every case is one readable paragraph (file, row, column, fix), exit code 2, no output."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import write_bookcrossing, write_ml1m
from flip.cli import app

runner = CliRunner()


def preprocess(raw: Path, out: Path, *overrides: str):
    args = ["preprocess", "--raw", str(raw), "--out", str(out), "-q"]
    for o in overrides:
        args += ["-S", o]
    return runner.invoke(app, args)


def assert_clean_failure(result, out: Path, *fragments: str):
    assert result.exit_code == 2, result.output
    message = result.output.replace("\n", " ")
    assert message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "Fix:" in message
    assert not out.exists(), "no partial output"
    assert not [p for p in out.parent.glob(".*") if p.name.startswith(f".{out.name}")] if out.parent.exists() else True


def ml1m_with(tmp_path: Path, file: str, mutate) -> Path:
    raw = write_ml1m(tmp_path / "mirror")
    path = raw / file
    path.write_bytes(mutate(path.read_bytes()))
    return raw


@pytest.mark.parametrize(
    "case, file, mutate, fragments",
    [
        ("truncated line", "ratings.dat", lambda b: b.replace(b"\n", b"\n2::3\n", 1),
         ["ratings.dat", "row 2", "'rating'", "missing columns", "truncated"]),
        ("extra column", "users.dat", lambda b: b.replace(b"\n", b"::extra\n", 1),
         ["users.dat", "row 1", "too many columns"]),
        ("malformed number", "ratings.dat", lambda b: b.replace(b"\n", b"\n1::x2::4::978300000\n", 1),
         ["ratings.dat", "row 2", "'movie_id'", "expected a number", "x2"]),
        ("label outside the rule", "ratings.dat", lambda b: b + b"1::2::7::978309999\n",
         ["ratings.dat", "row 61", "'rating'", "1..5"]),
        ("wrong separator", "ratings.dat", lambda b: b.replace(b"::", b","),
         ["ratings.dat", "row 1", "separator", "looks separated by ','"]),
        ("empty file", "movies.dat", lambda b: b"", ["movies.dat", "empty"]),
        ("header inside a headerless file", "ratings.dat", lambda b: b"UserID::MovieID::Rating::Timestamp\n" + b,
         ["ratings.dat", "row 1", "header line"]),
        ("duplicate key", "users.dat", lambda b: b + b"1::F::1::10::48067\n", ["users.dat", "row 6", "duplicate"]),
        ("unknown movie", "ratings.dat", lambda b: b + b"1::99::4::978309999\n",
         ["ratings.dat", "row 61", "'movie_id'", "not in movies.dat"]),
    ],
)
def test_movielens_bad_input(tmp_path, case, file, mutate, fragments):
    raw = ml1m_with(tmp_path, file, mutate)
    out = tmp_path / "processed" / "movielens-1m"
    assert_clean_failure(preprocess(raw, out), out, *fragments)


def test_wrong_encoding_in_a_csv_log(tmp_path):
    log = tmp_path / "clicks.csv"
    log.write_bytes("user,item,label\nu1,caf\xe9,1\nu2,tea,0\n".encode("latin-1"))  # latin-1 bytes, utf-8 declared
    out = tmp_path / "processed" / "csv"
    result = preprocess(tmp_path, out, "data.dataset=csv", f"data.csv.files=[{log}]",
                        "data.csv.fields=[{column: user, name: User}, {column: item, name: Item}]")
    assert_clean_failure(result, out, "clicks.csv", "row 2", "invalid encoding", "latin-1")


def test_missing_column_in_a_csv_log(tmp_path):
    log = tmp_path / "clicks.csv"
    log.write_text("user,item,clicked\nu1,a,1\n")
    out = tmp_path / "processed" / "csv"
    result = preprocess(tmp_path, out, "data.dataset=csv", f"data.csv.files=[{log}]",
                        "data.csv.fields=[{column: user, name: User}, {column: item, name: Item}]")
    assert_clean_failure(result, out, "clicks.csv", "missing column(s) label", "the file has: user, item, clicked")


def test_duplicate_header_rows_in_a_csv_log(tmp_path):
    log = tmp_path / "clicks.csv"
    log.write_text("user,item,label\nu1,a,1\nu2,b,0\nuser,item,label\nu3,c,1\n")
    out = tmp_path / "processed" / "csv"
    result = preprocess(tmp_path, out, "data.dataset=csv", f"data.csv.files=[{log}]",
                        "data.csv.fields=[{column: user, name: User}, {column: item, name: Item}]")
    assert_clean_failure(result, out, "clicks.csv", "row 4", "header line is repeated")


def test_labels_outside_the_rule_in_a_csv_log(tmp_path):
    log = tmp_path / "clicks.csv"
    log.write_text("user,item,label\nu1,a,1\nu2,b,2\n")
    out = tmp_path / "processed" / "csv"
    result = preprocess(tmp_path, out, "data.dataset=csv", f"data.csv.files=[{log}]",
                        "data.csv.fields=[{column: user, name: User}, {column: item, name: Item}]")
    assert_clean_failure(result, out, "clicks.csv", "row 3", "'label'", "0 or 1")


def test_bookcrossing_truncated_quote(tmp_path):
    raw = write_bookcrossing(tmp_path / "mirror")
    path = raw / "BX-Book-Ratings.csv"
    path.write_bytes(path.read_bytes() + b'"9";"0000000001X\n')
    out = tmp_path / "processed" / "bookcrossing"
    result = preprocess(raw, out, "data.dataset=bookcrossing")
    assert_clean_failure(result, out, "BX-Book-Ratings.csv", "row 42")


def test_mirror_with_a_missing_file(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    raw = write_ml1m(mirror)
    (raw / "movies.dat").unlink()
    out = tmp_path / "raw" / "movielens-1m"
    monkeypatch.setenv("FLIP_DATA_MIRROR", str(mirror))
    result = runner.invoke(app, ["download", "--out", str(out), "-q"])
    assert result.exit_code == 2
    assert "mirror lacks movies.dat" in result.output and "Fix:" in result.output


def test_no_network_and_no_mirror_says_where_to_put_files(tmp_path, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    out = tmp_path / "raw" / "movielens-1m"
    result = runner.invoke(app, ["download", "--out", str(out), "-q"])
    assert result.exit_code == 75  # EX_TEMPFAIL: the retrain flow retries it, unlike bad input (2)
    msg = result.output.replace("\n", " ")
    assert "cannot download https://files.grouplens.org/datasets/movielens/ml-1m.zip" in msg
    assert "put ratings.dat, users.dat, movies.dat" in msg and "FLIP_DATA_MIRROR" in msg


def test_unknown_override_key_is_rejected(tmp_path):
    result = runner.invoke(app, ["preprocess", "-S", "preprocess.tset_fraction=0.2", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "unknown key(s) preprocess.tset_fraction" in result.output


# ------------------------------------------------------------------ settings: one paragraph, exit 2, no output
def _one_paragraph(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.startswith("error: ")
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def test_unknown_strategy_and_model_are_one_paragraph_without_output(tmp_path):
    out = tmp_path / "run"
    msg = _one_paragraph(runner.invoke(app, ["finetune", "-S", "finetune.strategy=magic", "--data", str(tmp_path),
                                             "--out", str(out)]))
    assert "unknown finetune.strategy='magic'" in msg and "scratch" in msg and "Fix:" in msg
    msg = _one_paragraph(runner.invoke(app, ["finetune", "-S", "id_model.name=dcnv9", "--data", str(tmp_path),
                                             "--out", str(out)]))
    assert "unknown id_model.name 'dcnv9'" in msg and "dcnv2" in msg and "Fix:" in msg
    msg = _one_paragraph(runner.invoke(app, ["pretrain", "-S", "id_model.name=dcnv9", "--data", str(tmp_path),
                                             "--out", str(out)]))
    assert "dcnv9" in msg
    msg = _one_paragraph(runner.invoke(app, ["finetune", "--data", str(tmp_path / "nowhere"), "--out", str(out)]))
    assert "is not a processed dataset" in msg and "flip preprocess" in msg
    assert not out.exists()


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  dataset: synthetic\nfinetune:\n  lr: [0.1\n  epochs: 2\n")
    msg = _one_paragraph(runner.invoke(app, ["validate", "--params", str(params)]))
    assert f"{params}, line" in msg and "column" in msg and "not valid YAML" in msg and "Fix:" in msg
    msg = _one_paragraph(runner.invoke(app, ["validate", "-S", "finetune.lr=[1,"]))
    assert "not valid YAML" in msg


# ------------------------------------------------------------- the right diagnosis for a broken file
def _zip(data: bytes) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ratings.dat", data)
    return buf.getvalue()


@pytest.mark.parametrize(
    "case, file, mutate, fragments",
    [
        ("last line cut inside its last field", "ratings.dat", lambda b: b + b"1::2::4::97732",
         ["ratings.dat", "row 61", "no line end", "cut off", "97732"]),
        ("UTF-8 bytes in a latin-1 file", "movies.dat", lambda b: b.decode("latin-1").encode("utf-8"),
         ["movies.dat", "declared latin-1 but its bytes are UTF-8", "Ã©"]),
        ("UTF-16 without a byte-order mark", "users.dat", lambda b: b.decode("latin-1").encode("utf-16-le"),
         ["users.dat", "NUL bytes", "UTF-16"]),
        ("a zip archive under the plain name", "ratings.dat", _zip, ["ratings.dat", "zip archive", "unzip"]),
        ("a bzip2 file under the plain name", "ratings.dat", lambda b: __import__("bz2").compress(b),
         ["ratings.dat", "bzip2", "bunzip2"]),
        ("another dataset's file", "ratings.dat",
         lambda b: b'"User-ID";"Location";"Age"\n"1";"nyc, new york, usa";NULL\n',
         ["ratings.dat", "looks like BX-Users.csv from BookCrossing"]),
        ("another file of the same dataset", "ratings.dat", lambda b: b"1::F::1::10::48067\n",
         ["ratings.dat", "looks like users.dat from MovieLens-1M"]),
    ],
)
def test_broken_files_get_the_right_diagnosis(tmp_path, case, file, mutate, fragments):
    raw = ml1m_with(tmp_path, file, mutate)
    out = tmp_path / "processed" / "movielens-1m"
    result = preprocess(raw, out)
    assert_clean_failure(result, out, *fragments)
    assert "separator" not in result.output  # not the misleading diagnosis


@pytest.mark.parametrize("case, file, mutate", [
    ("gzip under the plain name", "ratings.dat", lambda b: __import__("gzip").compress(b)),
    ("UTF-16 with a byte-order mark", "users.dat", lambda b: b.decode("latin-1").encode("utf-16")),
])
def test_gzip_and_utf16_files_are_read_as_they_are(tmp_path, case, file, mutate):
    plain = tmp_path / "plain"
    plain.mkdir()
    reference = preprocess(ml1m_with(plain, file, lambda b: b), plain / "out")
    assert reference.exit_code == 0, reference.output
    raw = ml1m_with(tmp_path, file, mutate)
    result = preprocess(raw, tmp_path / "out")
    assert result.exit_code == 0, result.output
    for split in ("train", "valid", "test"):
        assert (tmp_path / "out" / f"{split}.parquet").read_bytes() == (plain / "out" / f"{split}.parquet").read_bytes()


@pytest.mark.parametrize("labels, positive, fragments", [
    (["1", "2", "0", "5", "yes"], "", ["3 row(s)", "'clicked'", "row 3: '2'", "row 5: '5'", "row 6: 'yes'",
                                       "not 0 or 1 (text)", "export 'clicked' as 0/1"]),
    (["1", "4", "0", "5", "1"], "", ["2 row(s)", "'clicked'", "not 0 or 1", "data.csv.positive"]),
    (["1", "4", "n/a", "5", "1"], "value > 3", ["1 row(s)", "'clicked'", "not a number", "row 4: 'n/a'"]),
])
def test_own_data_label_errors_name_the_users_column_and_count_the_rows(tmp_path, labels, positive, fragments):
    log = tmp_path / "clicks.csv"
    log.write_text("user,item,clicked\n" + "".join(f"u{i},i{i},{v}\n" for i, v in enumerate(labels)))
    out = tmp_path / "processed" / "csv"
    result = preprocess(tmp_path, out, "data.dataset=csv", f"data.csv.files=[{log}]", "data.csv.label=clicked",
                        f"data.csv.positive={positive}",
                        "data.csv.fields=[{column: user, name: User}, {column: item, name: Item}]")
    assert_clean_failure(result, out, "clicks.csv", *fragments)
    assert "'label'" not in result.output


def _own(tmp_path: Path, body: str, *overrides: str):
    log = tmp_path / "clicks.csv"
    log.write_text("user,item,genre,clicked\n" + body)
    out = tmp_path / "processed" / "csv"
    fields = "data.csv.fields=[{column: user, name: User}, {column: item, name: Item}, {column: genre, name: Genre}]"
    return preprocess(tmp_path, out, "data.dataset=csv", f"data.csv.files=[{log}]", "data.csv.label=clicked",
                      "data.csv.user=user", "data.csv.item=item", fields, *overrides), out


def test_empty_user_or_item_ids_are_always_an_error(tmp_path):
    result, out = _own(tmp_path, "u1,i1,drama,1\n,i2,drama,0\nu3,i3,comedy,1\n ,i4,drama,0\n",
                       "data.csv.missing=drop")
    assert_clean_failure(result, out, "clicks.csv", "2 row(s) have an empty id (rows 3, 5)", "row 3", "'user'",
                         "may never be empty")


def test_missing_feature_values_follow_the_policy_and_are_counted(tmp_path):
    body = "".join(f"u{i % 7},i{i % 5},{'' if i % 10 == 0 else 'drama'},{i % 2}\n" for i in range(60))
    result, out = _own(tmp_path, body, "data.csv.missing=error")
    assert_clean_failure(result, out, "clicks.csv", "6 row(s) have an empty value (rows 2, 12, 22)", "'genre'",
                         "data.csv.missing")
    for policy, rows in (("unknown", 60), ("drop", 54)):
        target = tmp_path / policy
        result = preprocess(tmp_path, target, "data.dataset=csv", f"data.csv.files=[{tmp_path / 'clicks.csv'}]",
                            "data.csv.label=clicked", "data.csv.user=user", "data.csv.item=item",
                            f"data.csv.missing={policy}",
                            "data.csv.fields=[{column: user, name: User}, {column: item, name: Item}, "
                            "{column: genre, name: Genre}]")
        assert result.exit_code == 0, result.output
        import json

        meta = json.loads((target / "meta.json").read_text())
        assert meta["counts"]["total"] == rows and meta["missing_values"] == {"genre": {"rows": 6, "policy": policy}}


def test_a_failed_first_download_leaves_no_folder(tmp_path):
    mirror = tmp_path / "mirror"
    write_ml1m(mirror)
    (mirror / "ml-1m" / "users.dat").unlink()
    out = tmp_path / "raw" / "movielens-1m"
    result = runner.invoke(app, ["download", "--out", str(out), "-q", "-S", "data.dataset=movielens-1m",
                                 "-S", f"data.mirror={mirror}"])
    assert_clean_failure(result, out, "users.dat", "mirror lacks users.dat")
