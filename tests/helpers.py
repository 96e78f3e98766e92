"""Test helpers: project paths, the settings tests pin, the optional MovieLens-1M copy, tiny raw files in
official formats, tiny language models built in code and a synthetic processed dataset.

The session fixtures of ``tests/conftest.py`` (``synthetic_data``, ``tiny_bert``) build the last two once."""

from __future__ import annotations

import gzip
import json
import os
import re
import string
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FLIP_DATA_MIRROR") or ROOT.parent / "shared" / "data")

# ---------------------------------------------------------------- the one test-config builder
# Every test builds its configuration with preset_tree (preset_config, preset_overrides): Config() (=
# params.yaml, the quick profile), then PINNED, then a named preset, then the test's own values.
#
# PINNED: the settings the tests were written for, where the quick profile differs (the paper's, mostly),
# so that a change of the profile does not change what a test computes.
PINNED: dict[str, dict[str, Any]] = {
    "plm": {"max_length": 100},
    "pretrain": {"epochs": 30, "batch_size": 1024, "lr": 5e-5, "plm_lr": 5e-5, "warmup_steps": 0, "train_rows": 0},
    "finetune": {"train_rows": 0, "eval_rows": 0, "lr_grid": [], "plm_epochs": 20, "plm_batch_size": 1024,
                 "alpha_init": 0.0},
    "run": {"seeds": [2012]},
}
_CPU = {"device": "cpu", "threads": 1, "progress": False}  # one thread: immune to other processes on the cores
TINY_DCNV2 = {"name": "dcnv2", "embedding_dim": 8, "dnn_hidden_units": [32, 16], "dropout": 0.0, "cross_layers": 1,
              "low_rank": 4, "num_experts": 2}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "pinned": {},
    # the loop and finetuning on tests/train's tiny dataset: a small DCNv2, a few epochs
    "tiny_loop": {
        "id_model": {"name": "dcnv2", "embedding_dim": 8, "dnn_hidden_units": [32, 32], "low_rank": 8,
                     "num_experts": 2, "dropout": 0.1},
        "finetune": {"strategy": "scratch", "epochs": 4, "batch_size": 256, "lr": 3e-3, "patience": 2,
                     "eval_batch_size": 512, "l2_embedding": 1e-4, "precision": "fp32"},
        "run": {"seeds": [7], **_CPU},
    },
    # pretraining on a synthetic dataset with a tiny BERT (the test adds plm.name and plm.cache_dir)
    "tiny_pretrain": {
        "id_model": TINY_DCNV2,
        "plm": {"max_length": 64},
        "pretrain": {"epochs": 100, "batch_size": 32, "lr": 1e-2, "plm_lr": 1e-2, "warmup_steps": 5, "max_steps": 60,
                     "precision": "fp32"},  # fp32: exact on every CPU (auto picks bf16 where the CPU has it)
        "run": {"seeds": [1], **_CPU},
    },
    # every finetuning strategy, language models included, on the same (the test adds the plm paths)
    "tiny_strategies": {
        "id_model": TINY_DCNV2,
        "plm": {"max_length": 64},
        "finetune": {"strategy": "scratch", "epochs": 2, "batch_size": 128, "plm_epochs": 2, "plm_batch_size": 128,
                     "lr": 3e-3, "plm_lr": 1e-3, "patience": 2, "eval_batch_size": 512, "l2_embedding": 1e-4,
                     "precision": "fp32"},
        "run": {"seeds": [3], **_CPU},
    },
    # a served scratch model: preprocess a synthetic log, train, package (tests/deploy)
    "served": {
        "data": {"dataset": "synthetic", "synthetic": {"rows": 3000, "fields": 6}},
        "id_model": {"embedding_dim": 8, "dnn_hidden_units": [32, 16], "low_rank": 4, "num_experts": 2},
        "finetune": {"strategy": "scratch", "epochs": 2, "batch_size": 256, "plm_batch_size": 256,
                     "eval_batch_size": 512, "precision": "fp32"},
        "run": {"seeds": [1, 2], "threads": 1, "progress": False},
    },
    # every DVC stage on 3,000 synthetic rows with a tiny BERT, in a few minutes (tests/pipeline; the test
    # adds plm.name). Laid over the repository's params.yaml, not over PINNED: the pipeline as shipped.
    "pipeline": {
        "data": {"dataset": "synthetic", "synthetic": {"rows": 3000, "fields": 6}},
        "id_model": {"embedding_dim": 8, "dnn_hidden_units": [32, 16], "low_rank": 4, "num_experts": 2},
        "plm": {"max_length": 48},
        "pretrain": {"batch_size": 64, "max_steps": 6, "warmup_steps": 0, "lr": 1e-3, "precision": "fp32"},
        "finetune": {"epochs": 2, "train_rows": 400, "eval_rows": 150, "plm_epochs": 1, "plm_batch_size": 64,
                     "eval_batch_size": 512},
        "run": {"progress": False, "threads": 1},
    },
}


def layer(base: dict[str, Any], *trees: dict[str, Any] | None) -> dict[str, Any]:
    """``trees`` over ``base`` (params.yaml-shaped dicts), key by key at every depth; a copy."""
    out = json.loads(json.dumps(base))
    for tree in trees:
        for key, value in (tree or {}).items():
            out[key] = layer(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
                else json.loads(json.dumps(value))
    return out


def preset_tree(preset: str = "pinned", *trees: dict[str, Any] | None) -> dict[str, Any]:
    """The test-config builder: :data:`PINNED`, then ``PRESETS[preset]``, then ``trees`` (the test's own)."""
    base = {} if preset == "pipeline" else PINNED
    return layer(base, PRESETS[preset], *trees)


def preset_config(preset: str = "pinned", *trees: dict[str, Any] | None):
    """``config_from_dict(preset_tree(preset, *trees))``."""
    from flip.config import config_from_dict

    return config_from_dict(preset_tree(preset, *trees))


def preset_overrides(*overrides: str, preset: str = "pinned") -> list[str]:
    """``preset_tree(preset)`` as ``-S`` overrides (for ``load_config(None, ...)`` or the CLI), then ``overrides``."""
    def flat(tree: dict[str, Any], prefix: str = "") -> list[str]:
        return [item for k, v in tree.items()
                for item in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}={json.dumps(v)}"])]
    return [*flat(preset_tree(preset)), *overrides]


def ml1m_available() -> bool:
    return (SHARED_DATA / "ml-1m" / "ratings.dat").exists()


# ------------------------------------------------------------------ tiny files in official layouts
def write_ml1m(root: Path, ratings: list[tuple] | None = None) -> Path:
    """A tiny MovieLens-1M in the official layout (``::``, latin-1) under ``root/ml-1m``."""
    d = root / "ml-1m"
    d.mkdir(parents=True, exist_ok=True)
    users = [(1, "F", 1, 10, "48067"), (2, "M", 56, 16, "70072"), (3, "M", 25, 15, "55117"),
             (4, "M", 45, 7, "02460"), (5, "M", 25, 20, "55455")]
    movies = [(1, "Toy Story (1995)", "Animation|Children's|Comedy"), (2, "Jumanji (1995)", "Adventure"),
              (3, "Café au lait (Métisse) (1993)", "Comedy"), (4, "Heat (1995)", "Action|Crime|Thriller")]
    if ratings is None:
        ratings = []
        t = 978300000
        for i in range(60):
            u, m = 1 + i % 5, 1 + (i * 7) % 4
            ratings.append((u, m, 1 + (i * 3 + u) % 5, t + i * 10))
    (d / "users.dat").write_bytes("".join("::".join(map(str, u)) + "\n" for u in users).encode("latin-1"))
    (d / "movies.dat").write_bytes("".join("::".join(map(str, m)) + "\n" for m in movies).encode("latin-1"))
    (d / "ratings.dat").write_bytes("".join("::".join(map(str, r)) + "\n" for r in ratings).encode("latin-1"))
    return d


def write_bookcrossing(root: Path) -> Path:
    """A tiny Book-Crossing dump: ``;``-separated, quoted, latin-1, NULL ages, \\" escapes, a line break."""
    d = root / "bookcrossing"
    d.mkdir(parents=True, exist_ok=True)
    users = ['"User-ID";"Location";"Age"', '"1";"nyc, new york, usa";NULL', '"2";"århus, \\"n/a\\", denmark";"34"',
             '"3";"cernusco s\n, milan, italy";"25"', '"4";"porto, porto, portugal";"51"']
    books = ['"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher";"Image-URL-S";"Image-URL-M";"Image-URL-L"']
    for k in range(6):
        books.append(f'"00000000{k}X";"Livre n°{k} \\"spécial\\"";"Auteur {k}";"{1990 + k}";"Éditions {k % 2}";"s";"m";"l"')
    ratings = ['"User-ID";"ISBN";"Book-Rating"']
    for i in range(40):
        ratings.append(f'"{1 + i % 4}";"00000000{(i * 5) % 7}X";"{(i * 3) % 11}"')  # ISBN ...6X has no book
    for name, lines in (("BX-Users.csv", users), ("BX-Books.csv", books), ("BX-Book-Ratings.csv", ratings)):
        (d / name).write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return d


def write_goodreads(root: Path) -> Path:
    """A tiny UCSD GoodReads (JSON lines, gzip) with the official keys."""
    d = root / "goodreads"
    d.mkdir(parents=True, exist_ok=True)

    def dump(name: str, rows: list[dict]) -> None:
        with gzip.open(d / name, "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)

    books = [{"book_id": str(b), "title": f"Book {b} – ünïcode", "average_rating": "3.9", "text_reviews_count": "12",
              "authors": [{"author_id": str(100 + b % 3), "role": ""}], "num_pages": "320", "is_ebook": "false",
              "format": "Paperback", "publisher": "Pub", "publication_year": "2001", "work_id": str(900 + b),
              "language_code": "eng"} for b in range(5)]
    dump("goodreads_books.json.gz", books)
    dump("goodreads_book_authors.json.gz", [{"author_id": str(100 + a), "name": f"Author {a}"} for a in range(3)])
    dump("goodreads_book_genres_initial.json.gz",
         [{"book_id": str(b), "genres": {"fiction": 10 + b, "history, biography": 20 - b * 5}} for b in range(5)])
    inter = [{"user_id": f"u{i % 6}", "book_id": str(i % 5), "rating": i % 6,
              "date_added": f"Thu Dec {1 + i % 28:02d} 11:31:02 -0800 2015"} for i in range(50)]
    dump("goodreads_interactions_dedup.json.gz", inter)
    return d


# ---------------------------------------------------------------- tiny language models, built in code
# BERT: a WordPiece vocabulary written by hand: the specials ([PAD]=0, [UNK], [CLS], [SEP], [MASK]),
# every ASCII letter/digit/punctuation mark with its ``##`` continuation (so any ASCII word can be split),
# a few CJK characters, and the whole words of ``corpus`` (lower-cased); the tokenizer lower-cases and
# strips accents like bert-base-uncased; emoji become [UNK]. RoBERTa: a byte-level BPE trained on
# ``corpus`` (specials <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4, as roberta-base), so any unicode text is
# covered. Both models: 2 layers, hidden 32, 2 heads (a forward pass takes milliseconds).
DEFAULT_CORPUS = [
    "User ID is u160. Item ID is i65. Gender is male. Age is 25-34. City is oslo.",
    "Favourite mood is romantic. Genre is romantic tale. Title is the red mirror.",
    "User ID is 12. Gender is female. Age is under 18. Occupation is college student.",
    "Title is Toy Story (1995). Genre is Animation. Zipcode is 48067.",
    "Title is Café au lait (Métisse) (1993). City is Zürich. Language is 日本語. Author is 東京.",
]
CJK = list("東京日本語")


def corpus_words(corpus: list[str]) -> list[str]:
    words: dict[str, None] = {}
    for text in corpus:
        for w in re.findall(r"[a-z0-9]+", text.lower()):
            words[w] = None
    return list(words)


def make_tiny_bert(directory: str | Path, corpus: list[str] | None = None, hidden: int = 32, layers: int = 2,
                   heads: int = 2, max_positions: int = 256, seed: int = 0) -> Path:
    """Write a tiny random BertModel + fast WordPiece tokenizer to ``directory``; returns it."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = Path(directory)
    corpus = DEFAULT_CORPUS + list(corpus or [])
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation) + CJK
    vocab: dict[str, int] = {}
    for tok in specials + chars + ["##" + c for c in chars if c not in CJK] + corpus_words(corpus):
        vocab.setdefault(tok, len(vocab))
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    assert tokenizer.is_fast
    tokenizer.model_max_length = max_positions
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden,
                        max_position_embeddings=max_positions, pad_token_id=0)
    torch.manual_seed(seed)
    model = BertModel(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_tiny_roberta(directory: str | Path, corpus: list[str] | None = None, hidden: int = 32, layers: int = 2,
                      heads: int = 2, max_length: int = 256, vocab_size: int = 600, seed: int = 0) -> Path:
    """Write a tiny random RobertaModel + fast byte-level BPE tokenizer to ``directory``."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    directory = Path(directory)
    corpus = DEFAULT_CORPUS + list(corpus or [])
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    raw = directory / "bpe"
    raw.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(raw))
    tokenizer = RobertaTokenizer(vocab=str(raw / "vocab.json"), merges=str(raw / "merges.txt"))
    assert tokenizer.is_fast and tokenizer.pad_token_id == 1
    tokenizer.model_max_length = max_length
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=2 * hidden,
                           max_position_embeddings=max_length + 2, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, type_vocab_size=1)
    torch.manual_seed(seed)
    model = RobertaModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def small_id_config(**changes):
    """A small DCNv2 (``IdModelConfig``) for fast tests."""
    from flip.config import IdModelConfig

    base = dict(name="dcnv2", embedding_dim=8, dnn_hidden_units=[32, 16], dropout=0.0, cross_layers=1,
                low_rank=4, num_experts=2)
    base.update(changes)
    return IdModelConfig(**base)


# --------------------------------------------------------------------- a synthetic processed dataset
def write_synthetic(root: Path, rows: int, **synthetic: Any) -> Path:
    """``flip preprocess`` of the synthetic source (``rows`` rows, other ``data.synthetic`` keys as given)
    into ``root/processed/synthetic``; returns that directory."""
    from flip.config import config_from_dict
    from flip.data.preprocess import preprocess

    data = root / "processed" / "synthetic"
    preprocess(config_from_dict({"data": {"dataset": "synthetic", "synthetic": {"rows": rows, **synthetic}}}),
               root / "raw", data, progress=False)
    return data


def write_tiny_bert_for(directory: Path, data: Path, texts: int, dropout: bool = True) -> Path:
    """A tiny BERT whose vocabulary holds the words of the first ``texts`` training texts of ``data``
    (``dropout=False``: hidden and attention dropout 0, for exact comparisons)."""
    from flip.data.tensors import load_text

    bert = make_tiny_bert(directory, corpus=load_text(data, "train")[0][:texts])
    if not dropout:
        config = json.loads((bert / "config.json").read_text())
        config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        (bert / "config.json").write_text(json.dumps(config))
    return bert


def assert_one_paragraph_failure(result, out, *fragments: str) -> str:
    """A CLI result that failed as the project promises: exit 2, one ``error: `` paragraph (no
    traceback) holding each of ``fragments``, and no output at ``out``. Returns the message."""
    assert result.exit_code == 2, (result.output, result.exception)
    message = result.output.strip()
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not out.exists(), "no partial output"
    return message
