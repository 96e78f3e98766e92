"""Preprocessing: label rules, split arithmetic, vocabularies, text spans, every source."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from helpers import write_bookcrossing, write_goodreads, write_ml1m
from flip.config import load_config
from flip.data.preprocess import preprocess, split_sizes, text_and_spans_sql
from flip.data.tensors import load_meta, load_tabular


def run(tmp_path, dataset, raw, *overrides):
    cfg = load_config(None, [f"data.dataset={dataset}", *overrides])
    out = tmp_path / "processed" / dataset
    meta = preprocess(cfg, raw, out, progress=False)
    return meta, out


def rows(out, split):
    return pq.read_table(out / f"{split}.parquet").to_pylist()


@pytest.mark.parametrize(
    "n, expected",
    [
        (360_434, {"train": 288_347, "valid": 36_043, "test": 36_044}),  # the MovieLens-1M copy
        (739_012, {"train": 591_209, "valid": 73_901, "test": 73_902}),  # the full MovieLens-1M
        (100, {"train": 80, "valid": 10, "test": 10}),
        (19, {"train": 16, "valid": 1, "test": 2}),
    ],
)
def test_split_arithmetic(n, expected):
    sizes = split_sizes(n)
    assert sizes == expected
    trval = sizes["train"] + sizes["valid"]
    assert trval == int(n * 9 // 10) and sizes["valid"] == trval // 9


def test_movielens_labels_split_and_vocab(tmp_path):
    raw = write_ml1m(tmp_path / "mirror")
    meta, out = run(tmp_path, "movielens-1m", raw)
    ratings = [tuple(map(int, line.split("::"))) for line in (raw / "ratings.dat").read_text().splitlines()]
    kept = [r for r in ratings if r[2] != 3]
    assert meta["counts"]["total"] == len(kept)
    assert meta["counts"] == {"total": len(kept), **split_sizes(len(kept))}
    all_rows = rows(out, "train") + rows(out, "valid") + rows(out, "test")
    # time order and labels: rating > 3 -> 1, < 3 -> 0 (3 dropped)
    expected = sorted(kept, key=lambda r: (r[3], r[0], r[1]))
    assert [r["timestamp"] for r in all_rows] == [e[3] for e in expected]
    assert [r["label"] for r in all_rows] == [int(e[2] > 3) for e in expected]
    assert [r["row"] for r in all_rows] == list(range(len(kept)))
    # reserved ids: 0 padding, 1 [MASK]; no real value takes them
    assert meta["pad_id"] == 0 and meta["mask_id"] == 1
    names = [f["name"] for f in meta["fields"]]
    assert names == ["user_id", "gender", "age", "occupation", "zipcode", "movie_id", "title", "genres"]
    for r in all_rows:
        for f in meta["fields"]:
            assert f["offset"] <= r[f["name"]] < f["offset"] + f["size"]
            assert r[f["name"]] >= 2
    # human-readable values
    text = all_rows[0]["text"]
    assert text.startswith("User ID is ") and "Occupation is " in text and "Age is " in text
    assert any("Age is 56 and over." in r["text"] or "Age is under 18." in r["text"] for r in all_rows)


def test_vocabulary_is_built_on_train_only(tmp_path):
    # user 5 only rates at the very end -> only in test -> its id is the user field's OOV id
    ratings = [(1 + i % 4, 1 + i % 4, 5 if i % 2 else 1, 978_300_000 + i) for i in range(90)]
    ratings += [(5, 1, 5, 978_305_000 + i) for i in range(10)]
    raw = write_ml1m(tmp_path / "mirror", ratings)
    meta, out = run(tmp_path, "movielens-1m", raw)
    user = next(f for f in meta["fields"] if f["name"] == "user_id")
    assert user["size"] == 4 + 1  # four training users + OOV
    test = rows(out, "test")
    assert all(r["user_id"] == user["oov_id"] for r in test)
    assert all(r["user_id"] != user["oov_id"] for r in rows(out, "train"))
    # feature frequencies from the training split: every field's counts sum to the train rows
    counts = pq.read_table(out / meta["feature_counts"]).column("count").to_pylist()
    assert len(counts) == meta["vocab_size"]
    for f in meta["fields"]:
        assert sum(counts[f["offset"]: f["offset"] + f["size"]]) == meta["counts"]["train"]
        assert counts[f["oov_id"]] == 0
    assert counts[0] == counts[1] == 0


def test_spans_recover_every_value_exactly_with_unicode(tmp_path):
    raw = write_ml1m(tmp_path / "mirror")
    meta, out = run(tmp_path, "movielens-1m", raw)
    titles = [f["title"] for f in meta["fields"]]
    seen_accent = False
    for r in rows(out, "train") + rows(out, "test"):
        values = [r["text"][a:b] for a, b in zip(r["span_start"], r["span_end"])]
        assert r["text"] == " ".join(f"{t} is {v}." for t, v in zip(titles, values))
        seen_accent |= "Café au lait (Métisse) (1993)" in values  # latin-1 bytes decoded correctly
    assert seen_accent


def test_spans_sql_counts_code_points(tmp_path):
    import duckdb

    text, starts, ends = text_and_spans_sql(["A", "Ü name"])
    con = duckdb.connect()
    values = ["e\u0301te\u0301 🎉", "日本語 — ok"]  # combining accents, emoji, CJK
    t, s, e = con.execute(f"SELECT {text}, {starts}, {ends} FROM (SELECT ? AS v_0, ? AS v_1)", values).fetchone()
    assert [t[a:b] for a, b in zip(s, e)] == values


def test_synthetic_is_deterministic_and_learnable(tmp_path):
    meta1, out1 = run(tmp_path / "a", "synthetic", tmp_path, "data.synthetic.rows=3000", "data.synthetic.fields=15")
    meta2, out2 = run(tmp_path / "b", "synthetic", tmp_path, "data.synthetic.rows=3000", "data.synthetic.fields=15")
    assert pq.read_table(out1 / "train.parquet").equals(pq.read_table(out2 / "train.parquet"))
    assert len(meta1["fields"]) == 15 and meta1["counts"]["total"] == 3000
    assert 0.15 < meta1["positive_rate"]["total"] < 0.6
    # the mood word of the user appearing in the item's genre raises the click rate
    r = rows(out1, "train")
    vals = [[x["text"][a:b] for a, b in zip(x["span_start"], x["span_end"])] for x in r]
    match = [x["label"] for x, v in zip(r, vals) if v[5] in v[6]]
    other = [x["label"] for x, v in zip(r, vals) if v[5] not in v[6]]
    assert sum(match) / len(match) > sum(other) / len(other) + 0.2
    split = load_tabular(out1, "train")
    assert split.x.shape == (meta1["counts"]["train"], 15) and split.y.shape == (meta1["counts"]["train"],)


def test_bookcrossing_fixture(tmp_path):
    raw = write_bookcrossing(tmp_path / "mirror")
    meta, out = run(tmp_path, "bookcrossing", raw)
    all_rows = rows(out, "train") + rows(out, "valid") + rows(out, "test")
    # 40 ratings; ISBN 000000006X is not in BX-Books -> dropped (rating i with (i*5)%7 == 6)
    kept = [i for i in range(40) if (i * 5) % 7 != 6]
    assert meta["counts"]["total"] == len(kept)
    assert sorted(r["label"] for r in all_rows) == sorted(int((i * 3) % 11 > 5) for i in kept)
    texts = " ".join(r["text"] for r in all_rows)
    assert 'Location is århus, "n/a", denmark.' in texts  # escaped quotes, latin-1
    assert "Location is cernusco s , milan, italy." in texts  # line break inside a value -> space
    assert "Age is unknown." in texts  # NULL age
    assert 'Book title is Livre n°1 "spécial".' in texts
    assert all(r["timestamp"] == 0 for r in all_rows)


def test_goodreads_fixture(tmp_path):
    raw = write_goodreads(tmp_path / "mirror")
    meta, out = run(tmp_path, "goodreads", raw)
    assert len(meta["fields"]) == 15
    assert meta["counts"]["total"] == sum(1 for i in range(50) if i % 6 > 0)  # rating 0 dropped
    r = rows(out, "train")[0]
    values = dict(zip([f["title"] for f in meta["fields"]], [r["text"][a:b] for a, b in zip(r["span_start"], r["span_end"])]))
    assert values["Book genres"] in {"fiction", "history, biography"}
    assert values["Author name"].startswith("Author ")
    assert values["Book title"].endswith("ünïcode")


def test_csv_source_with_rule_and_timestamps(tmp_path):
    log = tmp_path / "clicks.csv"
    lines = ["when,uid,item,cat,stars"]
    for i in range(50):
        lines.append(f"2024-01-{1 + i % 28:02d} 10:{i % 60:02d}:00,u{i % 7},it{i % 9},cat {i % 3},{1 + i % 5}")
    log.write_text("\n".join(lines) + "\n")
    meta, out = run(
        tmp_path, "csv", tmp_path,
        f"data.csv.files=[{log}]", "data.csv.label=stars", "data.csv.positive=value > 3", "data.csv.drop=value = 3",
        "data.csv.timestamp=when", "data.csv.user=uid", "data.csv.item=item",
        "data.csv.fields=[{column: uid, name: User}, {column: item, name: Item}, {column: cat, name: Category}]",
    )
    assert meta["counts"]["total"] == sum(1 for i in range(50) if 1 + i % 5 != 3)
    assert meta["user_field"] == "uid" and meta["item_field"] == "item"
    r = rows(out, "train")
    assert r[0]["text"].startswith("User is u") and "Category is cat " in r[0]["text"]
    ts = [x["timestamp"] for x in r]
    assert ts == sorted(ts)
    load_meta(out)
