"""Byte-level language-modelling data: a corpus, a split, and batches that resume exactly.

The vocabulary is the 256 byte values: no tokenizer, no download, no network.
The default corpus is the Python standard library of the running interpreter
(its ``.py`` files, see :func:`stdlib_files`), which every machine with Python
already has; ``path`` points :func:`load_corpus` at any other text instead.

Three properties make runs comparable and restartable:

* :func:`load_corpus` returns a ``fingerprint`` (source, file count, bytes,
  SHA-256, split sizes) to record in every run's metadata: two runs with the
  same fingerprint trained and validated on the same bytes.
* :func:`train_batch` is a pure function of ``(seed, step)``: the data position
  *is* the step, so resuming from a checkpoint at step ``t`` continues with
  exactly the batches an uninterrupted run would have seen, with no iterator
  state to save.
* :func:`eval_batches` is a fixed set of windows independent of the seed, so
  validation losses of different seeds and methods measure the same text.

Measured on the development machine (Linux, pyenv CPython; ``.py`` files as
listed by :func:`stdlib_files`, of which 3 are empty and dropped, 28 and 27
with tests; MB = 10**6 bytes):

=======  ======================  ========================  ==================
Python   default                 ``include_tests=True``    load time, default
=======  ======================  ========================  ==================
3.11.7   734 files, 12.12 MB     1790 files, 31.53 MB      0.08 s - 0.7 s
3.12.1   686 files, 11.57 MB     1740 files, 31.72 MB      0.15 s - 0.3 s
=======  ======================  ========================  ==================

(The longer load times are the first load in a process with a cold page
cache on a busy 2-core machine; with tests it is 0.2 s - 0.7 s.) That is well
under the cost of compiling a model, so nothing is cached in-process: a cache
would only add a way for a stale corpus to outlive a change on disk.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import platform
import sysconfig
from typing import NamedTuple

import numpy as np

from jaxprune import _checks

#: The corpus that README's result tables were measured on: the default corpus of the
#: reference machine's CPython 3.11.7 (731 non-empty files, 12,118,641 bytes). Another
#: interpreter's standard library is other text (3.12.1: 683 files, 11.57 MB, and the same
#: `gmp` recipe then reaches perplexity 5.84 instead of 5.378), so a run on it is not comparable
#: with those tables; :func:`readme_comparison` says so. Shipping a frozen copy of the text would
#: add 12 MB to every checkout and still not be what the recipes' users train on, so the
#: difference is reported instead.
README_CORPUS = {"python": "3.11.7", "num_bytes": 12118641,
                 "sha256": "2cfe21fc8b54144406b4f47a3acc73c47017b1a0c6acc740829ef9466e26519c"}

# Directories never part of the standard library corpus: third-party packages.
_THIRD_PARTY_DIRS = frozenset({"site-packages", "dist-packages"})
# The test suite: ~60% of the stdlib's bytes, and mostly fixtures, not idiomatic code.
_TEST_DIRS = frozenset({"test", "tests"})
_IDLE_TEST = ("idlelib", "idle_test")


class Corpus(NamedTuple):
  """A byte corpus split into training and validation streams.

  Attributes:
    train: ``uint8`` 1-D array, the training bytes (read-only).
    valid: ``uint8`` 1-D array, the validation bytes (read-only).
    fingerprint: JSON-serialisable description of exactly which bytes these
      are; record it with every run. Keys: ``source`` (``'stdlib'`` or the
      resolved user path), ``python`` (version when ``source == 'stdlib'``,
      else ``None``), ``include_tests`` (stdlib only, else ``None``),
      ``num_files``, ``num_bytes``, ``sha256``, ``valid_fraction``, ``split``
      (``'file'`` or ``'bytes'``), ``train_bytes``, ``valid_bytes``.
  """

  train: np.ndarray
  valid: np.ndarray
  fingerprint: dict


def _sort_key(rel: pathlib.PurePath) -> tuple[str, ...]:
  # By path components, so the order is the same on every OS and Python version.
  return rel.parts


def _walk(root: pathlib.Path, keep_dir, keep_file) -> list[pathlib.Path]:
  """Files under ``root`` (not following directory links), sorted by relative path.

  ``keep_dir(rel)`` prunes whole subtrees, which is what keeps the stdlib walk
  fast: ``site-packages`` can hold far more files than the stdlib itself.
  """
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    rel_dir = pathlib.Path(dirpath).relative_to(root)
    dirnames[:] = [d for d in dirnames if keep_dir(rel_dir / d)]
    for name in filenames:
      path = pathlib.Path(dirpath, name)
      if keep_file(rel_dir / name) and path.is_file():
        files.append(path)
  return sorted(files, key=lambda p: _sort_key(p.relative_to(root)))


def _stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(include_tests: bool = False) -> list[pathlib.Path]:
  """The ``.py`` files of the running interpreter's standard library, sorted.

  The root is ``sysconfig.get_paths()['stdlib']``. Directories named
  ``site-packages`` or ``dist-packages`` are skipped (installed packages differ
  between machines; the stdlib of one Python version does not). Unless
  ``include_tests``, the test suite is skipped too: every directory named
  ``test`` or ``tests`` and ``idlelib/idle_test``. Paths are absolute and
  sorted by their path components relative to the root.
  """

  def keep_dir(rel: pathlib.Path) -> bool:
    if rel.name in _THIRD_PARTY_DIRS:
      return False
    if include_tests:
      return True
    return rel.name not in _TEST_DIRS and rel.parts != _IDLE_TEST

  return _walk(_stdlib_root(), keep_dir, lambda rel: rel.suffix == ".py")


def _user_files(path: pathlib.Path) -> tuple[pathlib.Path, list[pathlib.Path]]:
  """(root that relative paths are taken from, sorted files) for a user path."""
  if path.is_file():
    return path.parent, [path]
  if path.is_dir():

    def visible(rel: pathlib.Path) -> bool:
      return not rel.name.startswith(".")

    return path, _walk(path, visible, visible)
  raise ValueError(f"`path` must be a regular file or a directory, got {str(path)!r}.")


def _split_by_file(n_files: int, valid_fraction: float) -> np.ndarray | None:
  """Boolean validation mask over files, or ``None`` when a by-file split is impossible.

  Every k-th file (indices k-1, 2k-1, ...) with ``k = round(1 / valid_fraction)``
  goes to validation. That needs ``k >= 2`` (else nothing is left to train on)
  and at least ``k`` files (else nothing goes to validation).
  """
  k = round(1.0 / valid_fraction)
  if k < 2 or n_files < k:
    return None
  return np.arange(n_files) % k == k - 1


def _as_tokens(chunks: list[bytes]) -> np.ndarray:
  # frombuffer over immutable bytes gives a read-only array: no caller can
  # change the corpus under another's feet.
  return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def load_corpus(
    path: str | os.PathLike | None = None,
    *,
    valid_fraction: float = 0.05,
    include_tests: bool = False,
) -> Corpus:
  """Loads a byte corpus and splits it deterministically into train and validation.

  Args:
    path: ``None`` for the standard library corpus (:func:`stdlib_files`), or
      a file, or a directory. A directory contributes every regular file below
      it (following links to files, not to directories), sorted by relative
      path, skipping files and directories whose name starts with ``.``
      (``.git`` and editor state are not the text one means). Files are read
      as raw bytes and never decoded: the model's vocabulary is bytes, so
      non-UTF-8 files are kept rather than silently dropped.
    valid_fraction: in ``(0, 1)``. With ``k = round(1 / valid_fraction)``, every
      k-th file of the sorted list (the k-th, 2k-th, ...) is validation, so no
      file is in both splits and whole files are held out. For a single file,
      or too few files for both splits to get one (fewer than ``k``, or
      ``k < 2``), the split is by bytes instead: the last
      ``round(valid_fraction * num_bytes)`` bytes (at least 1, at most all but
      one) are validation.
    include_tests: stdlib corpus only: include the test suite (~31 MB instead
      of ~12 MB).

  Within a split, files are concatenated in order with no separator, so a
  window may span the end of one file and the start of the next. Empty files
  are dropped before splitting: they carry no bytes and would only take a
  validation slot.

  Returns:
    A :class:`Corpus`.

  Raises:
    ValueError: ``valid_fraction`` outside ``(0, 1)``; ``path`` that does not
      exist; a file or directory with no non-empty files, or fewer than 2 bytes.
  """
  valid_fraction = float(valid_fraction)
  if not 0.0 < valid_fraction < 1.0:
    raise ValueError(f"`valid_fraction` must be in (0, 1), got {valid_fraction}.")
  if path is None:
    root, files = _stdlib_root(), stdlib_files(include_tests)
    source, python, tests = "stdlib", platform.python_version(), bool(include_tests)
  else:
    resolved = pathlib.Path(path).expanduser().resolve()
    if not resolved.exists():
      raise ValueError(f"`path` {str(path)!r} does not exist.")
    root, files = _user_files(resolved)
    source, python, tests = str(resolved), None, None

  names, contents = [], []
  for file in files:
    content = file.read_bytes()
    if content:
      names.append(file.relative_to(root).as_posix())
      contents.append(content)
  num_bytes = sum(map(len, contents))
  if num_bytes < 2:
    raise ValueError(
        f"`path` {source!r} holds {len(contents)} non-empty files and {num_bytes} bytes; "
        "need at least 2 bytes to give both a training and a validation split."
    )

  digest = hashlib.sha256()
  for name, content in zip(names, contents, strict=True):
    # The length makes the encoding unambiguous: without it, moving bytes from
    # the end of one file into the name of the next would keep the digest.
    digest.update(name.encode("utf-8", "surrogateescape"))
    digest.update(b"\0%d\0" % len(content))
    digest.update(content)

  is_valid = _split_by_file(len(contents), valid_fraction)
  if is_valid is not None:
    split = "file"
    train = _as_tokens([c for c, v in zip(contents, is_valid, strict=True) if not v])
    valid = _as_tokens([c for c, v in zip(contents, is_valid, strict=True) if v])
  else:
    split = "bytes"
    tokens = _as_tokens(contents)
    num_valid = min(max(round(valid_fraction * num_bytes), 1), num_bytes - 1)
    train, valid = tokens[: num_bytes - num_valid], tokens[num_bytes - num_valid :]

  fingerprint = {
      "source": source,
      "python": python,
      "include_tests": tests,
      "num_files": len(contents),
      "num_bytes": num_bytes,
      "sha256": digest.hexdigest(),
      "valid_fraction": valid_fraction,
      "split": split,
      "train_bytes": int(train.size),
      "valid_bytes": int(valid.size),
  }
  return Corpus(train, valid, fingerprint)


def _check_tokens(tokens: np.ndarray, context: int) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"`tokens` must be 1-D, got shape {tokens.shape}.")
  if context + 1 > tokens.size:
    raise ValueError(
        f"`context` + 1 = {context + 1} exceeds the token stream length {tokens.size}; "
        f"`context` must be in [1, {tokens.size - 1}]."
    )
  return tokens


def _windows(tokens: np.ndarray, offsets: np.ndarray, context: int) -> np.ndarray:
  return tokens[offsets[..., None] + np.arange(context + 1)].astype(np.int32)


def train_batch(
    tokens: np.ndarray, step: int, *, batch_size: int, context: int, seed: int
) -> np.ndarray:
  """Training batch ``step``: random windows, a pure function of ``(seed, step)``.

  As in nanoGPT, row ``i`` is ``tokens[o_i : o_i + context + 1]`` with offsets
  ``o ~ U{0, ..., len(tokens) - context - 1}`` drawn by
  ``np.random.default_rng([seed, step])``. Because no state carries from one
  step to the next, a run resumed at step ``t`` sees the same batches as one
  that never stopped.

  Args:
    tokens: 1-D token stream, usually ``Corpus.train``.
    step: training step, ``>= 0``.
    batch_size: rows, ``>= 1``.
    context: model context length, in ``[1, len(tokens) - 1]``.
    seed: data seed, ``>= 0``.

  Returns:
    ``int32`` array ``[batch_size, context + 1]``; inputs are ``[:, :-1]``,
    targets ``[:, 1:]``.
  """
  step = _checks.check_int("step", step, minimum=0)
  batch_size = _checks.check_int("batch_size", batch_size, minimum=1)
  context = _checks.check_int("context", context, minimum=1)
  seed = _checks.check_int("seed", seed, minimum=0)
  tokens = _check_tokens(tokens, context)
  rng = np.random.default_rng([seed, step])
  offsets = rng.integers(0, tokens.size - context, size=batch_size)
  return _windows(tokens, offsets, context)


def eval_batches(
    tokens: np.ndarray, *, batch_size: int, context: int, num_batches: int
) -> np.ndarray:
  """Fixed evaluation windows, evenly spaced over ``tokens`` and independent of any seed.

  The ``n = num_batches * batch_size`` offsets are
  ``o_j = floor(j (len(tokens) - context - 1) / (n - 1))``: the first window
  starts at the first byte and the last ends at the last byte, so the windows
  sample the whole validation split (they overlap when ``n (context + 1)``
  exceeds its length).

  Args:
    tokens: 1-D token stream, usually ``Corpus.valid``.
    batch_size: rows per batch, ``>= 1``.
    context: model context length, in ``[1, len(tokens) - 1]``.
    num_batches: ``>= 1``.

  Returns:
    ``int32`` array ``[num_batches, batch_size, context + 1]``.
  """
  batch_size = _checks.check_int("batch_size", batch_size, minimum=1)
  context = _checks.check_int("context", context, minimum=1)
  num_batches = _checks.check_int("num_batches", num_batches, minimum=1)
  tokens = _check_tokens(tokens, context)
  n = num_batches * batch_size
  offsets = np.arange(n, dtype=np.int64) * (tokens.size - context - 1) // max(n - 1, 1)
  return _windows(tokens, offsets.reshape(num_batches, batch_size), context)


def readme_comparison(fingerprint: dict) -> str | None:
  """``None`` when ``fingerprint`` is README's corpus (:data:`README_CORPUS`), else why not.

  The sentence is meant for reports: results on another corpus cannot be compared
  with README's tables.
  """
  if fingerprint.get("sha256") == README_CORPUS["sha256"]:
    return None
  if fingerprint.get("source") == "stdlib":
    what = (f"the standard library of Python {fingerprint.get('python')} "
            f"({fingerprint.get('num_bytes'):,} bytes)")
  else:
    what = f"{fingerprint.get('source')}"
  return (f"This run's corpus ({what}, sha256 {str(fingerprint.get('sha256'))[:12]}...) is not "
          f"the one README's tables were measured on (Python {README_CORPUS['python']}'s "
          f"standard library, sha256 {README_CORPUS['sha256'][:12]}...): compare it with runs "
          "on the same corpus, not with README.")


def check_context(corpus: Corpus, context: int) -> None:
  """Raises ``ValueError`` unless both splits hold at least ``context + 1`` bytes.

  Call it once before training so that a too-long context fails with the split
  sizes in the message rather than at the first evaluation.
  """
  context = _checks.check_int("context", context, minimum=1)
  train, valid = corpus.train.size, corpus.valid.size
  if context + 1 > min(train, valid):
    raise ValueError(
        f"`context` + 1 = {context + 1} is longer than a split (train: {train} bytes, "
        f"valid: {valid} bytes); `context` must be in [1, {min(train, valid) - 1}]."
    )
