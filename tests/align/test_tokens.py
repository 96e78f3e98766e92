"""Tokenization with field value spans, the on-disk cache, and field-level text masking token by token."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import make_tiny_roberta

import flip.data.tokens as tokens_mod
from flip.align.masking import choose_fields, mask_text
from flip.config import PlmConfig
from flip.data.tokens import tokenize_split, tokenize_texts
from flip.models.plm import load_plm

FIELDS = [("Title", "Café au lait (Métisse) (1993)"), ("City", "Zürich"), ("Language", "日本語 😀"), ("Gender", "male")]


def make_row(fields: list[tuple[str, str]]) -> tuple[str, list[int], list[int]]:
    """The preprocess template: '<title> is <value>.' joined by spaces, with value spans."""
    text, starts, ends = "", [], []
    for k, (title, value) in enumerate(fields):
        prefix = ("" if k == 0 else " ") + f"{title} is "
        starts.append(len(text) + len(prefix))
        text += prefix + value
        ends.append(len(text))
        text += "."
    return text, starts, ends


def write_split(directory: Path, rows: list[list[tuple[str, str]]], split: str = "train") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    texts, starts, ends = zip(*(make_row(r) for r in rows))
    table = pa.table({
        "label": pa.array([0] * len(rows), pa.int8()),
        "text": pa.array(list(texts), pa.string()),
        "span_start": pa.array([list(s) for s in starts], pa.list_(pa.int32())),
        "span_end": pa.array([list(e) for e in ends], pa.list_(pa.int32())),
    })
    pq.write_table(table, directory / f"{split}.parquet")
    return directory


def encode(tokenizer, rows, max_length=64):
    texts, starts, ends = zip(*(make_row(r) for r in rows))
    arrays = tokenize_texts(list(texts), np.array(starts), np.array(ends), tokenizer, max_length)
    return {k: torch.from_numpy(v).long() for k, v in arrays.items()}


def masked_tokens(tokenizer, enc, fields: list[int]) -> list[str]:
    chosen = torch.zeros(1, enc["field_tok_start"].shape[1], dtype=torch.bool)
    chosen[0, fields] = True
    masked, labels = mask_text(enc["input_ids"], enc["field_tok_start"], enc["field_tok_end"], chosen,
                               tokenizer.mask_token_id)
    n = int(enc["attention_mask"][0].sum())
    # labels hold the original id exactly where the mask token was put
    where = labels[0] != -100
    assert torch.equal(labels[0][where], enc["input_ids"][0][where])
    assert torch.equal(masked[0][~where], enc["input_ids"][0][~where])
    return tokenizer.convert_ids_to_tokens(masked[0][:n].tolist())


# ----------------------------------------------------------------------------- token by token
def test_bert_field_masking_token_by_token(bert):
    _, tok = bert
    enc = encode(tok, [FIELDS])
    assert enc["field_tok_start"][0].tolist() == [3, 22, 31, 38]
    assert enc["field_tok_end"][0].tolist() == [19, 28, 35, 39]
    M = "[MASK]"
    expected = (["[CLS]", "title", "is"] + [M] * 16 + [".", "city", "is", "z", "##u", "##r", "##i", "##c", "##h", ".",
                "language", "is"] + [M] * 4 + [".", "gender", "is", "male", ".", "[SEP]"])
    assert masked_tokens(tok, enc, [0, 2]) == expected
    expected = (["[CLS]", "title", "is", "caf", "##e", "au", "lait", "(", "m", "##e", "##t", "##i", "##s", "##s",
                 "##e", ")", "(", "1993", ")", ".", "city", "is"] + [M] * 6 + [".", "language", "is", "日", "本",
                "語", "[UNK]", ".", "gender", "is", M, ".", "[SEP]"])
    assert masked_tokens(tok, enc, [1, 3]) == expected


def test_roberta_field_masking_token_by_token(tmp_path):
    """Byte-level BPE: leading 'Ġ' belongs to the value token, a lone 'Ġ' inside a value is masked,
    ')' merged with the template '.' into ').' straddles the boundary and is masked with the value."""
    _, tok = load_plm(PlmConfig(name=str(make_tiny_roberta(tmp_path / "rob"))))  # default corpus only
    enc = encode(tok, [FIELDS])
    tokens = tok.convert_ids_to_tokens(enc["input_ids"][0][: int(enc["attention_mask"][0].sum())].tolist())
    assert tokens == ["<s>", "Title", "Ġis", "ĠCafÃ©", "Ġau", "Ġlait", "Ġ(", "MÃ©tisse", ")", "Ġ(", "1993", ").",
                      "ĠCity", "Ġis", "ĠZÃ¼rich", ".", "ĠLanguage", "Ġis", "ĠæĹ¥æľ¬èªŀ", "Ġ", "ð", "Ł", "ĺ", "Ģ", ".",
                      "ĠGender", "Ġis", "Ġmale", ".", "</s>"]
    assert enc["field_tok_start"][0].tolist() == [3, 14, 18, 27]
    assert enc["field_tok_end"][0].tolist() == [12, 15, 24, 28]
    M = "<mask>"
    assert masked_tokens(tok, enc, [0, 2]) == (["<s>", "Title", "Ġis"] + [M] * 9 + ["ĠCity", "Ġis", "ĠZÃ¼rich", ".",
                                               "ĠLanguage", "Ġis"] + [M] * 6 + [".", "ĠGender", "Ġis", "Ġmale", ".", "</s>"])
    assert masked_tokens(tok, enc, [1, 3]) == (tokens[:14] + [M] + tokens[15:27] + [M] + tokens[28:])
    assert int(enc["input_ids"][0, -1]) == tok.pad_token_id == 1  # padded with RoBERTa's own pad id


@pytest.mark.parametrize("which", ["bert", "roberta"])
def test_spans_partition_text_on_real_rows(which, request, synthetic_dir):
    """On real synthetic rows: the value tokens decode to exactly the value and the tokens between
    values decode to exactly the template pieces (field name, 'is', '.'), for every field."""
    _, tok = request.getfixturevalue(which)
    table = pq.read_table(synthetic_dir / "train.parquet", columns=["text", "span_start", "span_end"]).slice(0, 200)
    texts = table.column("text").to_pylist()
    starts, ends = np.array(table.column("span_start").to_pylist()), np.array(table.column("span_end").to_pylist())
    arr = tokenize_texts(texts, starts, ends, tok, max_length=128)
    norm = tok.backend_tokenizer.normalizer

    def canon(s: str) -> str:
        return "".join((norm.normalize_str(s) if norm else s).split())

    def dec(ids) -> str:
        return "".join(tok.decode(ids).split())

    for i, text in enumerate(texts):
        ids = arr["input_ids"][i].tolist()
        n = int(arr["attention_mask"][i].sum())
        prev_tok, prev_char = 1, 0
        for f in range(starts.shape[1]):
            s, e = int(arr["field_tok_start"][i, f]), int(arr["field_tok_end"][i, f])
            assert s < e, (text, f)
            assert dec(ids[s:e]) == canon(text[starts[i, f]:ends[i, f]])
            assert dec(ids[prev_tok:s]) == canon(text[prev_char:starts[i, f]])
            prev_tok, prev_char = e, ends[i, f]
        assert dec(ids[prev_tok:n - 1]) == canon(text[prev_char:])


# -------------------------------------------------------------------------------- truncation
def test_truncated_fields_have_empty_spans_and_are_never_chosen(bert):
    _, tok = bert
    # 24 tokens: [CLS] + 22 + [SEP] keeps Title completely, City only as 'z' (cut inside the value)
    enc = encode(tok, [FIELDS] * 64, max_length=24)
    assert enc["field_tok_start"][0].tolist() == [3, 0, 0, 0]
    assert enc["field_tok_end"][0].tolist() == [19, 0, 0, 0]
    available = enc["field_tok_end"] > enc["field_tok_start"]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        chosen = choose_fields(64, 4, 0.5, g, available)
        assert chosen[:, 1:].sum() == 0 and chosen[:, 0].all()  # at least one field, only the kept one
    # the mask never touches what is left of the cut value
    masked, _ = mask_text(enc["input_ids"], enc["field_tok_start"], enc["field_tok_end"], chosen, tok.mask_token_id)
    assert masked[0, 20:23].tolist() == enc["input_ids"][0, 20:23].tolist()


def test_empty_value_gets_empty_span(bert):
    _, tok = bert
    enc = encode(tok, [[("Title", ""), ("Gender", "male")]])
    assert enc["field_tok_start"][0, 0] == enc["field_tok_end"][0, 0]
    assert enc["field_tok_end"][0, 1] - enc["field_tok_start"][0, 1] == 1


# ------------------------------------------------------------------------------------- cache
def test_cache_second_call_loads_without_tokenizing(bert, tmp_path, monkeypatch):
    _, tok = bert
    data = write_split(tmp_path / "ds", [FIELDS, FIELDS[::-1], FIELDS[1:] + FIELDS[:1]] * 5)
    calls = []
    real = tokens_mod.tokenize_texts

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tokens_mod, "tokenize_texts", counting)
    cache = tmp_path / "cache"
    a = tokenize_split(data, "train", tok, 32, cache, progress=False)
    assert len(calls) == 1 and len(list(cache.glob("*.safetensors"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("tokenizer called although the cache exists")

    monkeypatch.setattr(tokens_mod, "tokenize_texts", boom)
    monkeypatch.setattr(type(tok), "__call__", boom)
    b = tokenize_split(data, "train", tok, 32, cache, progress=False)
    for name in tokens_mod.TENSOR_NAMES:
        assert torch.equal(getattr(a, name), getattr(b, name))
    monkeypatch.undo()

    monkeypatch.setattr(tokens_mod, "tokenize_texts", counting)
    c = tokenize_split(data, "train", tok, 40, cache, progress=False)  # max_length changed -> re-tokenize
    assert len(calls) == 2 and c.max_length == 40 and len(list(cache.glob("*.safetensors"))) == 2
    write_split(tmp_path / "ds", [FIELDS] * 3)  # the split file changed -> re-tokenize
    d = tokenize_split(data, "train", tok, 32, cache, progress=False)
    assert len(calls) == 3 and len(d) == 3


def test_cache_key_depends_on_tokenizer(bert, roberta, tmp_path):
    data = write_split(tmp_path / "ds", [[("Gender", "male")]] * 2)
    a = tokenize_split(data, "train", bert[1], 32, tmp_path / "c", progress=False)
    b = tokenize_split(data, "train", roberta[1], 32, tmp_path / "c", progress=False)
    assert a.info["cache"] != b.info["cache"]
    assert int(b.input_ids[0, -1]) == 1 and int(a.input_ids[0, -1]) == 0
    assert b.input_ids.dtype == torch.int32 and b.attention_mask.dtype == torch.uint8


def test_spans_must_have_one_entry_per_field(bert, tmp_path):
    data = write_split(tmp_path / "ds", [FIELDS, FIELDS[:2]])
    with pytest.raises(ValueError, match="one span per field"):
        tokenize_split(data, "train", bert[1], 32, tmp_path / "c", progress=False)


def test_batch_trims_padding_and_returns_int64(bert, tmp_path):
    data = write_split(tmp_path / "ds", [FIELDS, [("Age", "1")] * 4])
    t = tokenize_split(data, "train", bert[1], 64, tmp_path / "c", progress=False)
    full = t.batch(torch.tensor([0, 1]))
    short = t.batch(torch.tensor([1]))
    assert full["input_ids"].dtype == torch.int64 and full["input_ids"].shape[1] == int(t.lengths[0])
    assert short["input_ids"].shape == (1, 18)  # [CLS] (age is 1 .) x 4 [SEP]
    assert t.batch(torch.tensor([1]), trim=False)["input_ids"].shape == (1, 64)


def _mapped_files() -> str:
    return Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""


def test_cache_is_memory_mapped_with_stored_lengths(bert, tmp_path):
    _, tok = bert
    data = write_split(tmp_path / "ds", [FIELDS, FIELDS[::-1], FIELDS[1:] + FIELDS[:1]] * 4)
    cache = tmp_path / "cache"
    fresh = tokenize_split(data, "train", tok, 32, cache, progress=False)
    again = tokenize_split(data, "train", tok, 32, cache, progress=False)
    [path] = cache.glob("*.safetensors")
    if _mapped_files():
        assert str(path) in _mapped_files()  # read through a mapping of the cache file, not loaded whole
    for name in tokens_mod.TENSOR_NAMES:
        assert torch.equal(getattr(fresh, name), getattr(again, name))
    # the stored lengths are the masks' row sums (bucketing and batch widths never read the masks)
    np.testing.assert_array_equal(again.row_lengths, again.attention_mask.sum(1).numpy())
    assert torch.equal(again.batch(torch.tensor([0, 2]))["input_ids"], fresh.batch(torch.tensor([0, 2]))["input_ids"])


def test_a_cache_whose_header_lies_is_rebuilt(bert, tmp_path):
    import json

    _, tok = bert
    data = write_split(tmp_path / "ds", [FIELDS] * 3)
    cache = tmp_path / "cache"
    want = tokenize_split(data, "train", tok, 32, cache, progress=False)
    [path] = cache.glob("*.safetensors")
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["input_ids"]["shape"] = [9, 32]  # claims more rows than the file holds (3), in as many bytes
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n  # the written header is padded; the compact one fits
    path.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n:])
    with pytest.raises(ValueError, match="does not fit"):
        tokens_mod.mmap_safetensors(path)
    got = tokenize_split(data, "train", tok, 32, cache, progress=False)  # rebuilt, not trusted
    assert torch.equal(got.input_ids, want.input_ids)
