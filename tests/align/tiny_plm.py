"""Tiny random BERT and RoBERTa models with fast tokenizers, built in code (no network).

    path = make_tiny_bert(tmp_path / "bert")          # a Hugging Face directory (config, weights, tokenizer)
    encoder, tokenizer = load_plm(PlmConfig(name=str(path), max_length=64))

* BERT: a WordPiece vocabulary written by hand: the specials ([PAD]=0, [UNK], [CLS], [SEP],
  [MASK]), every ASCII letter/digit/punctuation mark with its ``##`` continuation (so any ASCII
  word can be split), a few CJK characters, and the whole words of ``corpus`` (lower-cased). The
  tokenizer lower-cases and strips accents like bert-base-uncased; emoji become [UNK].
* RoBERTa: a byte-level BPE trained on ``corpus`` with the ``tokenizers`` library (specials
  <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4, as roberta-base), so any unicode text is covered.

Both models are 2 layers, hidden 32, 2 heads (a forward pass takes milliseconds). Other test
folders can reuse this file: ``sys.path.insert(0, str(ROOT / "tests" / "align"))`` then
``from tiny_plm import make_tiny_bert``.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

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
