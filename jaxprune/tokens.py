"""Tokenized corpora: flat token files (nanoGPT's layout) with their byte-level BPE tokenizer.

A token corpus is a directory holding

* ``train.bin`` and ``val.bin``: the token ids of each split, one after the
  other, as flat little-endian ``uint16`` (vocabularies up to 65,536) or
  ``uint32``: the convention of nanoGPT's ``prepare.py``, so files that
  researchers already have on disk work as they are;
* ``tokenizer.json``: the Hugging Face ``tokenizers`` file that produced them
  (required: it gives the vocabulary size and the bytes each token stands for);
* ``meta.json`` (optional for files made elsewhere): the id dtype and the
  provenance that :func:`prepare_token_corpus` records.

:func:`load_token_corpus` memory-maps the two files, so corpora larger than
RAM work: a batch reads only its windows (``data.train_batch`` is a pure
function of ``(seed, step)`` over any 1-D array, so resume stays exact). It
checks every id against the vocabulary and fingerprints the three files with
SHA-256 in one streaming pass (about a second per GB), so an edited or
truncated file is caught, never trained on as if it were the recorded one.

Loss per token and per byte. Byte-level and BPE runs are compared per byte:
for a byte-level BPE vocabulary each token stands for a fixed number of bytes
(the length of its ``ByteLevel`` string), so the bytes behind any set of
target tokens are counted exactly (:attr:`TokenCorpus.token_bytes`) and

.. math::  \\text{loss/byte} = \\frac{\\sum_t \\ell_t}{\\sum_t \\text{bytes}(y_t)}
   = \\frac{\\text{loss/token}}{\\text{mean bytes per target token}}.

:func:`prepare_token_corpus` (``scripts/prepare_data.py``) trains that
tokenizer offline with the ``tokenizers`` package on the training split of a
byte corpus (:func:`jaxprune.data.load_corpus`: the standard library or a
user's text, split by file as the byte-level recipes split it, so both see
the same validation text) and writes the directory. Text is decoded as UTF-8;
undecodable bytes become U+FFFD and are counted in ``meta.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import NamedTuple

import numpy as np

from jaxprune import data as data_lib

TRAIN_FILE, VALID_FILE = "train.bin", "val.bin"
TOKENIZER_FILE, META_FILE = "tokenizer.json", "meta.json"
DTYPES = ("uint16", "uint32")
_CHUNK = 1 << 24   # ids per streaming step (32-64 MB)


class TokenCorpus(NamedTuple):
  """A token corpus, used like :class:`jaxprune.data.Corpus`.

  Attributes:
    train: 1-D read-only memory map of the training ids.
    valid: 1-D read-only memory map of the validation ids.
    fingerprint: JSON-serialisable: SHA-256 of each file, sizes, dtype,
      vocabulary size and ``meta.json``'s provenance.
    vocab_size: the tokenizer's vocabulary size (model's embedding rows).
    token_bytes: ``int32[vocab_size]``, bytes each token stands for (0 for
      special tokens).
  """

  train: np.ndarray
  valid: np.ndarray
  fingerprint: dict
  vocab_size: int
  token_bytes: np.ndarray


# --------------------------------------------------------------------------- #
# Tokenizer facts without the tokenizers package (loading needs only numpy).
# --------------------------------------------------------------------------- #


def _tokenizer_facts(path: pathlib.Path) -> tuple[int, np.ndarray]:
  """``(vocab_size, token_bytes)`` of a ``tokenizer.json`` with a byte-level BPE model."""
  try:
    spec = json.loads(path.read_text())
    vocab = dict(spec["model"]["vocab"])
    added = spec.get("added_tokens") or []
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a readable tokenizers JSON file with a model vocabulary "
                     f"({type(e).__name__}: {e}).") from e
  ids = list(vocab.values()) + [t["id"] for t in added]
  vocab_size = max(ids) + 1
  if sorted(set(ids)) != list(range(vocab_size)):
    raise ValueError(f"{path}: token ids are not 0..{vocab_size - 1} without gaps.")
  if (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
    raise ValueError(f"{path}: only byte-level BPE tokenizers are supported (pre_tokenizer "
                     f"{(spec.get('pre_tokenizer') or {}).get('type')!r}): the bytes per "
                     "token that loss per byte needs are defined for them.")
  token_bytes = np.zeros(vocab_size, np.int32)
  for token, i in vocab.items():
    token_bytes[i] = len(token)   # One ByteLevel character per byte.
  for t in added:
    token_bytes[t["id"]] = 0
  return vocab_size, token_bytes


def vocabulary(directory: str | os.PathLike) -> int:
  """The vocabulary size of the token corpus in ``directory`` (read from its tokenizer only)."""
  path = pathlib.Path(directory).expanduser() / TOKENIZER_FILE
  if not path.is_file():
    raise ValueError(f"{path} is missing. Token files need the tokenizer that made them next to "
                     "them (write it with scripts/prepare_data.py, or save yours as "
                     "tokenizer.json).")
  return _tokenizer_facts(path)[0]


# --------------------------------------------------------------------------- #
# Loading.
# --------------------------------------------------------------------------- #


def _dtype_of(directory: pathlib.Path, vocab_size: int) -> tuple[str, dict]:
  meta_path = directory / META_FILE
  meta = {}
  if meta_path.exists():
    try:
      meta = json.loads(meta_path.read_text())
    except ValueError as e:
      raise ValueError(f"{meta_path}: not valid JSON ({e}).") from e
  dtype = meta.get("dtype") or ("uint16" if vocab_size <= 1 << 16 else "uint32")
  if dtype not in DTYPES:
    raise ValueError(f"{meta_path}: `dtype` must be one of {DTYPES}, got {dtype!r}.")
  return dtype, meta


def _scan(path: pathlib.Path, dtype: str, vocab_size: int) -> tuple[np.ndarray, str]:
  """Memory map of ``path``, after checking its size and ids; and its SHA-256."""
  itemsize = np.dtype(dtype).itemsize
  size = path.stat().st_size
  if size % itemsize:
    raise ValueError(f"{path}: {size} bytes is not a multiple of the {itemsize}-byte "
                     f"{dtype} token ids; the file is truncated or not {dtype}.")
  if size == 0:
    raise ValueError(f"{path} holds no tokens.")
  ids = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
  digest = hashlib.sha256()
  for start in range(0, ids.size, _CHUNK):
    chunk = np.asarray(ids[start:start + _CHUNK])
    top = int(chunk.max())
    if top >= vocab_size:
      where = start + int(np.argmax(chunk >= vocab_size))
      raise ValueError(f"{path}: token id {top} (first out-of-range id at position {where}) "
                       f"is outside the tokenizer's vocabulary of {vocab_size}; the file does "
                       "not belong to this tokenizer.")
    digest.update(chunk.tobytes())
  return ids, digest.hexdigest()


def load_token_corpus(directory: str | os.PathLike) -> TokenCorpus:
  """Memory-maps a token corpus directory (see the module docstring) and checks it.

  Raises:
    ValueError: naming the file, for a missing ``train.bin``, ``val.bin`` or
      ``tokenizer.json``; a file whose size is not a multiple of the id
      dtype; an id outside the tokenizer's vocabulary; an unreadable
      ``tokenizer.json`` or ``meta.json``.
  """
  directory = pathlib.Path(directory).expanduser().resolve()
  if not directory.is_dir():
    raise ValueError(f"`data.path` {str(directory)!r} is not a directory of token files "
                     f"({TRAIN_FILE}, {VALID_FILE}, {TOKENIZER_FILE}).")
  for name in (TRAIN_FILE, VALID_FILE, TOKENIZER_FILE):
    if not (directory / name).is_file():
      hint = (" Token files need the tokenizer that made them next to them (write it with "
              "scripts/prepare_data.py, or save yours as tokenizer.json)."
              if name == TOKENIZER_FILE else "")
      raise ValueError(f"{directory / name} is missing.{hint}")
  tokenizer = directory / TOKENIZER_FILE
  vocab_size, token_bytes = _tokenizer_facts(tokenizer)
  dtype, meta = _dtype_of(directory, vocab_size)
  train, train_sha = _scan(directory / TRAIN_FILE, dtype, vocab_size)
  valid, valid_sha = _scan(directory / VALID_FILE, dtype, vocab_size)
  fingerprint = {
      "source": str(directory),
      "format": "tokens",
      "dtype": dtype,
      "vocab_size": vocab_size,
      "train_tokens": int(train.size),
      "valid_tokens": int(valid.size),
      "sha256": hashlib.sha256(
          f"{train_sha} {valid_sha} {hashlib.sha256(tokenizer.read_bytes()).hexdigest()}"
          .encode()).hexdigest(),
      "train_sha256": train_sha,
      "valid_sha256": valid_sha,
      "prepared_from": meta.get("source_fingerprint"),
  }
  return TokenCorpus(train, valid, fingerprint, vocab_size, token_bytes)


def check_context(corpus, context: int) -> None:
  """Like :func:`jaxprune.data.check_context`, naming the token files."""
  train, valid = corpus.train.size, corpus.valid.size
  if context + 1 > min(train, valid):
    name = TRAIN_FILE if train < valid else VALID_FILE
    raise ValueError(f"{name} in {corpus.fingerprint['source']} holds "
                     f"{min(train, valid)} tokens, shorter than one sequence of `context` + 1 "
                     f"= {context + 1} tokens; `model.context` must be in "
                     f"[1, {min(train, valid) - 1}].")


# --------------------------------------------------------------------------- #
# Preparing: train a byte-level BPE tokenizer, write the files.
# --------------------------------------------------------------------------- #


def _texts(stream: np.ndarray, piece: int = 1 << 20) -> tuple[list[str], int]:
  """The byte stream as UTF-8 text pieces cut at newlines; and the count of U+FFFD added."""
  raw = stream.tobytes()
  pieces, start = [], 0
  while start < len(raw):
    end = raw.find(b"\n", start + piece)
    end = len(raw) if end < 0 else end + 1
    pieces.append(raw[start:end])
    start = end
  texts = [p.decode("utf-8", errors="replace") for p in pieces]
  replaced = sum(t.count("\ufffd") for t in texts) - sum(p.count("\ufffd".encode()) for p in pieces)
  return texts, replaced


def prepare_token_corpus(out_dir: str | os.PathLike, *, path: str | os.PathLike | None = None,
                         vocab_size: int = 4096, valid_fraction: float = 0.05,
                         include_tests: bool = False, min_frequency: int = 2) -> dict:
  """Trains a byte-level BPE tokenizer on a byte corpus and writes a token corpus directory.

  Args:
    out_dir: created if needed; ``train.bin``, ``val.bin``, ``tokenizer.json``
      and ``meta.json`` are written into it.
    path, valid_fraction, include_tests: the byte corpus, as
      :func:`jaxprune.data.load_corpus` takes them (``None``: the standard
      library). Its train/validation split is kept, and the tokenizer sees
      only the training split.
    vocab_size: in ``[257, 2**32)``, including the 256 byte tokens.
    min_frequency: a pair must occur at least this often to be merged.

  Returns:
    The contents of ``meta.json``.
  """
  try:
    import tokenizers
  except ImportError as e:
    raise ImportError("preparing token files needs the `tokenizers` package: "
                      "pip install 'jaxprune[tokens]'") from e
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not (
      257 <= vocab_size < 1 << 32):
    raise ValueError(f"`vocab_size` must be an integer in [257, 2**32), got {vocab_size!r}.")
  corpus = data_lib.load_corpus(path, valid_fraction=valid_fraction, include_tests=include_tests)
  train_texts, train_bad = _texts(corpus.train)
  valid_texts, valid_bad = _texts(corpus.valid)

  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
  tok.train_from_iterator(train_texts, trainer=trainer)
  actual_vocab = tok.get_vocab_size()
  dtype = "uint16" if actual_vocab <= 1 << 16 else "uint32"

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  counts = {}
  for name, texts in ((TRAIN_FILE, train_texts), (VALID_FILE, valid_texts)):
    ids = [np.asarray(e.ids, dtype) for e in tok.encode_batch(texts)]
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype)
    flat.astype(np.dtype(dtype).newbyteorder("<")).tofile(out / name)
    counts[name] = int(flat.size)
  tok.save(str(out / TOKENIZER_FILE))
  meta = {
      "dtype": dtype,
      "vocab_size": actual_vocab,
      "requested_vocab_size": vocab_size,
      "min_frequency": min_frequency,
      "tokenizers_version": tokenizers.__version__,
      "train_tokens": counts[TRAIN_FILE],
      "valid_tokens": counts[VALID_FILE],
      "train_bytes": int(corpus.train.size),
      "valid_bytes": int(corpus.valid.size),
      "undecodable_bytes": int(train_bad + valid_bad),
      "source_fingerprint": corpus.fingerprint,
  }
  (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
  return meta
