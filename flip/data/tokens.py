"""Tokenize a processed split once, locate every field's value tokens, and cache it on disk.

    tok = tokenize_split(dataset_dir, "train", tokenizer, max_length=100, cache_dir="data/tokens")
    b = tok.batch(idx)      # dict: input_ids, attention_mask (B, L_b) int64, field_tok_start/end (B, F)

**Field token spans.** Each row of a processed split carries ``text`` and the character span
``[span_start[f], span_end[f])`` of every field's *value* inside it. The fast tokenizer's
``return_offsets_mapping`` gives each token's character span; a (non-special) token belongs to
field ``f`` when its span overlaps the value span (``tok_start < end and tok_end > start``). A
token that straddles the value boundary (byte-level BPE may merge a closing ``)`` with the
template's ``.``) therefore counts as a value token, and zero-width tokens (RoBERTa's lone ``Ġ``)
count only when strictly inside the value. ``field_tok_start``/``field_tok_end`` = ``[first,
last + 1)`` of the field's tokens, indices into the padded sequence (0 = [CLS]/<s>).

A field whose value is not *completely* inside the kept tokens (cut by ``max_length``
truncation, wholly or partly) or whose value is empty gets the empty span ``start == end == 0``:
masking never chooses it (``flip.align.masking``).

**Cache.** The result is written once to ``cache_dir/<dataset>-<split>-<key>.safetensors`` (plain
tensors, no pickle; written atomically) and memory-mapped from there afterwards without calling the
tokenizer (:func:`mmap_safetensors`: a batch reads its rows' pages, never the whole split; the rows'
lengths are stored, so that bucketing and batch widths do not read the masks). ``key`` hashes the
tokenizer (its full serialised definition: vocabulary, merges, normaliser, special tokens; not the
transient padding/truncation settings), ``max_length``, the split file's content (SHA-256) and the
cache format version, so any change re-tokenizes.

Storage is compact (ids int32, mask uint8, spans int16/int32); ``batch`` returns int64 tensors and
trims the padding columns that no row of the batch uses (rows are right-padded), so short texts do
not pay for ``max_length``. ``row_lengths`` keeps every row's length on the host: the trim width of a
batch whose rows are given on the CPU is a host max (no GPU sync), and length bucketing
(``flip.train.bucketing``) sorts by it.

Imports only torch, pyarrow, numpy, safetensors, tqdm and the standard library (all installed with
torch + transformers).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from flip.io import file_sha256

FORMAT_VERSION = 2  # 2: the host row lengths are stored (reading them never touches the whole mask)
TENSOR_NAMES = ("input_ids", "attention_mask", "field_tok_start", "field_tok_end")
SAFETENSORS_DTYPES = {"I32": np.int32, "U8": np.uint8, "I16": np.int16, "I64": np.int64, "F32": np.float32}


@dataclass
class TokenizedSplit:
    """One tokenized split. ``N`` rows, ``L = max_length``, ``F`` fields.

    ``input_ids`` (N, L) int32 (padded with the tokenizer's own pad id), ``attention_mask``
    (N, L) uint8, ``field_tok_start``/``field_tok_end`` (N, F) int32: token span of each field's
    value, empty (0, 0) when the field was truncated away or is empty.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    field_tok_start: torch.Tensor
    field_tok_end: torch.Tensor
    pad_token_id: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    row_lengths: np.ndarray | None = None  # (N,) integer real tokens per row, on the host (computed when None)

    def __post_init__(self) -> None:
        if self.row_lengths is None:
            self.row_lengths = self.attention_mask.sum(dim=1, dtype=torch.int64).cpu().numpy()

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.input_ids, self.attention_mask, self.field_tok_start,
                                                           self.field_tok_end))

    @property
    def max_length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) number of real tokens per row (specials included)."""
        return self.attention_mask.sum(dim=1, dtype=torch.int64)

    @property
    def available(self) -> torch.Tensor:
        """(N, F) bool: the field's value is fully present in the tokens (maskable)."""
        return self.field_tok_end > self.field_tok_start

    def batch(self, idx: torch.Tensor | slice, device: torch.device | str | None = None,
              trim: bool = True) -> dict[str, torch.Tensor]:
        """Rows ``idx`` as int64 tensors (``input_ids``, ``attention_mask``, ``field_tok_start``,
        ``field_tok_end``); with ``trim`` the trailing all-padding columns are cut off.

        ``idx`` on the CPU (or a slice) while the split is on a GPU: the trim width is the host max of
        ``row_lengths`` (no device sync) and ``idx`` is copied over without waiting; ``idx`` on the
        split's device: the width is read from the device (one sync on a GPU)."""
        host = isinstance(idx, slice) or idx.device.type == "cpu"
        width = None
        if trim and host:
            rows = self.row_lengths[idx] if isinstance(idx, slice) else self.row_lengths[idx.numpy()]
            width = int(rows.max()) if rows.shape[0] > 0 else None
        if not isinstance(idx, slice) and idx.device != self.input_ids.device:
            idx = idx.to(self.input_ids.device, non_blocking=True)
        ids = self.input_ids[idx]
        mask = self.attention_mask[idx]
        if trim and width is None and ids.shape[0] > 0:
            width = int(mask.sum(dim=1).max())
        if width is not None:
            ids, mask = ids[:, :width], mask[:, :width]
        out = {
            "input_ids": ids.long(),
            "attention_mask": mask.long(),
            "field_tok_start": self.field_tok_start[idx].long(),
            "field_tok_end": self.field_tok_end[idx].long(),
        }
        if device is not None:
            out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
        return out

    def to(self, device: torch.device | str) -> "TokenizedSplit":
        """The whole split on ``device`` (e.g. kept on the GPU; ML-1M at L = 100 is ~0.3 GB)."""
        return TokenizedSplit(self.input_ids.to(device), self.attention_mask.to(device),
                              self.field_tok_start.to(device), self.field_tok_end.to(device),
                              self.pad_token_id, dict(self.info), self.row_lengths)

    def take(self, idx: torch.Tensor) -> "TokenizedSplit":
        """The rows ``idx`` (a LongTensor of positions), in that order."""
        return TokenizedSplit(self.input_ids[idx], self.attention_mask[idx], self.field_tok_start[idx],
                              self.field_tok_end[idx], self.pad_token_id, dict(self.info),
                              self.row_lengths[idx.cpu().numpy()])

    def head(self, n: int) -> "TokenizedSplit":
        if not 0 < n < len(self):
            return self
        return TokenizedSplit(self.input_ids[:n], self.attention_mask[:n], self.field_tok_start[:n],
                              self.field_tok_end[:n], self.pad_token_id, dict(self.info), self.row_lengths[:n])


# ------------------------------------------------------------------------------------ cache key
def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's full definition (vocabulary, merges, normaliser, specials).

    Uses the Rust backend's JSON without its transient ``truncation``/``padding`` state (calling
    the tokenizer with ``truncation=True`` changes that state but not the tokenization).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        text = json.dumps(spec, sort_keys=True, ensure_ascii=False)
    else:  # not a fast tokenizer; keep a usable (if weaker) key
        text = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    extra = {
        "class": type(tokenizer).__name__,
        "special": sorted(int(i) for i in tokenizer.all_special_ids),
        "pad": tokenizer.pad_token_id,
        "padding_side": getattr(tokenizer, "padding_side", "right"),
    }
    return hashlib.sha256((text + json.dumps(extra, sort_keys=True)).encode("utf-8")).hexdigest()


def cache_key(split_file: Path, tokenizer: Any, max_length: int) -> str:
    parts = {
        "format": FORMAT_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": int(max_length),
        "data": file_sha256(split_file),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def cache_path(dataset_dir: str | os.PathLike, split: str, tokenizer: Any, max_length: int,
               cache_dir: str | os.PathLike) -> Path:
    dataset_dir = Path(dataset_dir)
    key = cache_key(dataset_dir / f"{split}.parquet", tokenizer, max_length)
    return Path(cache_dir) / f"{dataset_dir.resolve().name}-{split}-{key}.safetensors"


# --------------------------------------------------------------------------------- tokenization
def field_token_spans(offsets: np.ndarray, special: np.ndarray, char_start: np.ndarray,
                      char_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token spans of the field values, vectorised over a batch.

    ``offsets`` (B, L, 2) character span of each token, ``special`` (B, L) bool (specials and
    padding), ``char_start``/``char_end`` (B, F) character span of each value.
    Returns ``start``, ``end`` (B, F) int32 with ``[start, end)`` the value's tokens, or ``(0, 0)``
    when the value is empty or not completely kept.
    """
    tok_s = offsets[..., 0][:, None, :]  # (B, 1, L)
    tok_e = offsets[..., 1][:, None, :]
    real = ~special[:, None, :]
    cs, ce = char_start[:, :, None], char_end[:, :, None]  # (B, F, 1)
    member = real & (tok_s < ce) & (tok_e > cs)  # (B, F, L): token overlaps the value
    L = offsets.shape[1]
    has = member.any(axis=2)
    first = member.argmax(axis=2)
    last = L - 1 - member[:, :, ::-1].argmax(axis=2)
    # the value is complete iff its last character lies inside the kept (untruncated) text
    kept_end = np.where(special, -1, offsets[..., 1]).max(axis=1)  # (B,) char end of the last kept token
    complete = has & (char_end <= kept_end[:, None]) & (char_end > char_start)
    start = np.where(complete, first, 0).astype(np.int32)
    end = np.where(complete, last + 1, 0).astype(np.int32)
    return start, end


def _list_column(table, name: str, n: int) -> np.ndarray:
    col = table.column(name).combine_chunks()
    if n == 0:
        return np.zeros((0, 0), dtype=np.int64)
    lengths = col.value_lengths().to_numpy(zero_copy_only=False)
    if col.null_count or (lengths != lengths[0]).any():
        raise ValueError(f"column {name}: every row must hold one span per field")
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    return flat.reshape(n, int(lengths[0]))


def tokenize_texts(texts: list[str], char_start: np.ndarray, char_end: np.ndarray, tokenizer: Any,
                   max_length: int, batch_size: int = 2048, progress: bool = False,
                   desc: str = "tokenize") -> dict[str, np.ndarray]:
    """Tokenize ``texts`` in batches (fast tokenizer batch call) -> arrays of a ``TokenizedSplit``."""
    n = len(texts)
    num_fields = char_start.shape[1] if char_start.ndim == 2 else 0
    ids = np.full((n, max_length), tokenizer.pad_token_id, dtype=np.int32)
    mask = np.zeros((n, max_length), dtype=np.uint8)
    fs = np.zeros((n, num_fields), dtype=np.int32)
    fe = np.zeros((n, num_fields), dtype=np.int32)
    from flip.progress import progress as bar_of

    bar = bar_of(n, desc, "row", enabled=progress)
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        enc = tokenizer(
            texts[lo:hi],
            max_length=max_length,
            truncation=True,
            padding="max_length",
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            return_attention_mask=True,
            return_token_type_ids=False,
            return_tensors="np",
        )
        batch_ids = np.asarray(enc["input_ids"])
        batch_mask = np.asarray(enc["attention_mask"])
        special = (np.asarray(enc["special_tokens_mask"]) == 1) | (batch_mask == 0)
        offsets = np.asarray(enc["offset_mapping"]).astype(np.int64)
        ids[lo:hi] = batch_ids
        mask[lo:hi] = batch_mask
        if num_fields:
            fs[lo:hi], fe[lo:hi] = field_token_spans(offsets, special, char_start[lo:hi], char_end[lo:hi])
        bar.update(hi - lo)
    bar.close()
    return {"input_ids": ids, "attention_mask": mask, "field_tok_start": fs, "field_tok_end": fe}


def tokenize_split(dataset_dir: str | os.PathLike, split: str, tokenizer: Any, max_length: int,
                   cache_dir: str | os.PathLike, *, batch_size: int = 2048, progress: bool = True,
                   refresh: bool = False, rows: np.ndarray | None = None) -> TokenizedSplit:
    """Tokenized ``split`` of the processed dataset in ``dataset_dir``, from the cache when possible.

    ``max_length`` counts the special tokens ([CLS] ... [SEP]). The first call tokenizes (batched,
    with a progress bar when ``progress``) and writes the cache; later calls with the same tokenizer,
    ``max_length`` and split file load it without tokenizing. ``refresh=True`` re-tokenizes.
    ``rows`` (positions in the split): only those rows, in that order, taken from the whole split's
    cache when it exists, else tokenized and cached on their own (a profile that trains on the last
    8,000 rows does not tokenize all the others first).
    """
    from safetensors.torch import save_file

    from flip.io import atomic_file

    dataset_dir = Path(dataset_dir)
    split_file = dataset_dir / f"{split}.parquet"
    if max_length < 3:
        raise ValueError(f"max_length={max_length} leaves no room for text")
    path = cache_path(dataset_dir, split, tokenizer, max_length, cache_dir)
    whole: TokenizedSplit | None = None
    if path.exists() and not refresh:
        try:
            whole = _from_tensors(mmap_safetensors(path), tokenizer.pad_token_id, path)
        except Exception:  # unreadable / partial cache from another version: rebuild it
            whole = None
    if whole is not None:
        return whole if rows is None else whole.take(torch.from_numpy(np.asarray(rows, dtype=np.int64)))
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        digest = hashlib.sha256(rows.tobytes()).hexdigest()[:12]
        path = path.with_name(f"{path.stem}-rows-{len(rows)}-{digest}{path.suffix}")
        if path.exists() and not refresh:
            try:
                return _from_tensors(mmap_safetensors(path), tokenizer.pad_token_id, path)
            except Exception:
                pass

    table = pq.read_table(split_file, columns=["text", "span_start", "span_end"])
    if rows is not None:
        table = table.take(pa.array(rows))
    n = table.num_rows
    texts = table.column("text").to_pylist()
    char_start = _list_column(table, "span_start", n)
    char_end = _list_column(table, "span_end", n)
    arrays = tokenize_texts(texts, char_start, char_end, tokenizer, max_length, batch_size=batch_size,
                            progress=progress, desc=f"tokenize {split}")
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    tensors["row_lengths"] = torch.from_numpy(arrays["attention_mask"].sum(axis=1, dtype=np.int32))
    meta = {
        "format": str(FORMAT_VERSION),
        "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
        "max_length": str(max_length),
        "split_file": str(split_file.resolve()),
        "rows": str(n),
        **({"positions": f"{len(rows)} rows (sha256 {digest})"} if rows is not None else {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    del tensors, arrays  # what was just written is read back memory-mapped, as on later calls
    return _from_tensors(mmap_safetensors(path), tokenizer.pad_token_id, path)


def mmap_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as memory-mapped CPU tensors (nothing is read until used: a
    batch reads its rows' pages). The header is checked against the file: a tensor outside it, or whose
    size is not its shape's, raises ``ValueError``."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise ValueError(f"{path}: header of {n} bytes in a file of {size}")
        header = json.loads(fh.read(n))
    base, out = 8 + n, {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype = np.dtype(SAFETENSORS_DTYPES[spec["dtype"]])
        shape = tuple(int(d) for d in spec["shape"])
        begin, end = (int(o) for o in spec["data_offsets"])
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= end <= size - base or end - begin != count * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} does not fit the file")
        if count == 0:
            out[name] = torch.from_numpy(np.zeros(shape, dtype))
            continue
        # copy-on-write mapping: writable for torch, shared with the page cache, never written
        out[name] = torch.from_numpy(np.memmap(path, dtype=dtype, mode="c", offset=base + begin, shape=shape))
    return out


def _from_tensors(tensors: dict[str, torch.Tensor], pad_token_id: int, path: Path) -> TokenizedSplit:
    missing = [k for k in TENSOR_NAMES if k not in tensors]
    if missing:
        raise ValueError(f"token cache {path} lacks {missing}")
    lengths = tensors.get("row_lengths")
    return TokenizedSplit(
        input_ids=tensors["input_ids"],
        attention_mask=tensors["attention_mask"],
        field_tok_start=tensors["field_tok_start"],
        field_tok_end=tensors["field_tok_end"],
        pad_token_id=int(pad_token_id),
        info={"cache": str(path)},
        row_lengths=lengths.numpy() if lengths is not None else None,
    )


__all__ = ["TokenizedSplit", "cache_path", "field_token_spans", "mmap_safetensors", "tokenize_split", "tokenize_texts",
           "tokenizer_fingerprint"]
