"""Byte data: stdlib corpus, user corpora, fingerprint, splits, batches, errors."""

import hashlib
import pathlib
import platform
import sysconfig

import numpy as np
import pytest

from jaxprune import data


@pytest.fixture(scope="module")
def stdlib_corpus():
  return data.load_corpus()


def write_files(root: pathlib.Path, files: dict[str, bytes]) -> None:
  for name, content in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


# --- stdlib corpus -------------------------------------------------------------


def test_stdlib_files_exclude_third_party_and_tests():
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = data.stdlib_files()
  rels = [f.relative_to(root) for f in files]
  assert {"os.py", "json/__init__.py"} <= {r.as_posix() for r in rels}
  assert all(f.suffix == ".py" for f in files)
  for r in rels:
    dirs = set(r.parts[:-1])
    assert not dirs & {"site-packages", "dist-packages", "test", "tests"}, r
    assert r.parts[:2] != ("idlelib", "idle_test"), r
  assert rels == sorted(rels, key=lambda r: r.parts)

  with_tests = data.stdlib_files(include_tests=True)
  assert set(files) < set(with_tests)
  assert any(f.relative_to(root).parts[0] == "test" for f in with_tests)
  assert not any("site-packages" in f.relative_to(root).parts for f in with_tests)


def test_stdlib_corpus(stdlib_corpus):
  train, valid, fp = stdlib_corpus
  assert train.dtype == valid.dtype == np.uint8 and train.ndim == valid.ndim == 1
  assert fp["source"] == "stdlib" and fp["python"] == platform.python_version()
  assert fp["split"] == "file" and fp["include_tests"] is False
  nonempty = [f for f in data.stdlib_files() if f.stat().st_size]
  assert fp["num_files"] == len(nonempty) > 100
  assert fp["num_bytes"] == sum(f.stat().st_size for f in nonempty) > 5_000_000
  assert (fp["train_bytes"], fp["valid_bytes"]) == (train.size, valid.size)
  assert train.size + valid.size == fp["num_bytes"]
  assert 0.02 < valid.size / fp["num_bytes"] < 0.1  # Every 20th file: about 5% of the bytes.
  assert not train.flags.writeable  # Shared read-only: nobody mutates the corpus.


def test_stdlib_fingerprint_stable(stdlib_corpus):
  again = data.load_corpus()
  assert again.fingerprint == stdlib_corpus.fingerprint
  np.testing.assert_array_equal(again.valid, stdlib_corpus.valid)


# --- user corpora --------------------------------------------------------------


def test_fingerprint_of_directory(tmp_path):
  write_files(tmp_path, {"a.txt": b"alpha\n", "sub/b.txt": b"beta\n", "c.txt": b"gamma\n"})
  fp = data.load_corpus(tmp_path).fingerprint
  assert fp["source"] == str(tmp_path.resolve()) and fp["python"] is None
  assert (fp["num_files"], fp["num_bytes"]) == (3, 17)
  expected = hashlib.sha256()
  for name, content in [("a.txt", b"alpha\n"), ("c.txt", b"gamma\n"), ("sub/b.txt", b"beta\n")]:
    expected.update(name.encode() + b"\0%d\0" % len(content) + content)
  assert fp["sha256"] == expected.hexdigest()

  # Hidden files and directories, and empty files, are not part of the corpus.
  write_files(tmp_path, {".hidden": b"x", ".git/config": b"y", "empty.txt": b""})
  assert data.load_corpus(tmp_path).fingerprint == fp

  (tmp_path / "sub/b.txt").write_bytes(b"bete\n")  # Same size, one byte changed.
  changed = data.load_corpus(tmp_path).fingerprint
  assert changed["sha256"] != fp["sha256"] and changed["num_bytes"] == fp["num_bytes"]

  # Moving a byte from one file into the next file's name must change the digest.
  other = tmp_path / "other"
  write_files(other, {"a": b"xb", "c": b"y"})
  first = data.load_corpus(other).fingerprint["sha256"]
  (other / "a").write_bytes(b"x")
  (other / "c").rename(other / "bc")
  assert data.load_corpus(other).fingerprint["sha256"] != first


def test_split_by_file_is_disjoint_and_deterministic(tmp_path):
  # Created in reverse so that directory order differs from sorted order.
  names = [f"f{i:02d}.txt" for i in range(10)]
  for name in reversed(names):
    (tmp_path / name).write_bytes(f"<{name}>".encode())
  corpus = data.load_corpus(tmp_path, valid_fraction=0.2)  # k = 5: files 4 and 9.
  assert corpus.fingerprint["split"] == "file"
  valid_names = [names[4], names[9]]
  assert corpus.valid.tobytes() == b"".join(f"<{n}>".encode() for n in valid_names)
  train_names = [n for n in names if n not in valid_names]
  assert corpus.train.tobytes() == b"".join(f"<{n}>".encode() for n in train_names)

  again = data.load_corpus(tmp_path, valid_fraction=0.2)
  assert again.fingerprint == corpus.fingerprint
  np.testing.assert_array_equal(again.train, corpus.train)
  np.testing.assert_array_equal(again.valid, corpus.valid)


def test_single_file_splits_by_bytes(tmp_path):
  content = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
  path = tmp_path / "corpus.bin"  # Not UTF-8: read as bytes all the same.
  path.write_bytes(content)
  corpus = data.load_corpus(str(path))
  assert corpus.fingerprint["split"] == "bytes"
  assert corpus.train.tobytes() == content[:950]
  assert corpus.valid.tobytes() == content[950:]
  # Tiny fractions still leave a byte to validate on.
  assert data.load_corpus(path, valid_fraction=1e-6).valid.size == 1


def test_too_few_files_split_by_bytes(tmp_path):
  write_files(tmp_path, {"a": b"a" * 60, "b": b"b" * 40})
  corpus = data.load_corpus(tmp_path, valid_fraction=0.1)  # k = 10 > 2 files.
  assert corpus.fingerprint["split"] == "bytes"
  assert corpus.train.tobytes() == b"a" * 60 + b"b" * 30
  assert corpus.valid.tobytes() == b"b" * 10
  # k = round(1 / 0.9) = 1 would put every file in validation.
  corpus = data.load_corpus(tmp_path, valid_fraction=0.9)
  assert corpus.fingerprint["split"] == "bytes" and corpus.train.size == 10


# --- batches -------------------------------------------------------------------


def random_tokens(n=5000, seed=0):
  return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def test_train_batch_pure_function_of_seed_and_step():
  tokens = random_tokens()
  batch = data.train_batch(tokens, 7, batch_size=8, context=16, seed=3)
  assert batch.shape == (8, 17) and batch.dtype == np.int32
  again = data.train_batch(tokens, 7, batch_size=8, context=16, seed=3)
  np.testing.assert_array_equal(batch, again)
  for step, seed in [(8, 3), (7, 4)]:
    other = data.train_batch(tokens, step, batch_size=8, context=16, seed=seed)
    assert not np.array_equal(batch, other)


def test_train_batch_rows_are_windows():
  tokens = random_tokens()
  context = 16
  windows = np.lib.stride_tricks.sliding_window_view(tokens, context + 1)
  for step in range(3):
    rows = data.train_batch(tokens, step, batch_size=8, context=context, seed=0)
    found = (windows[None] == rows[:, None]).all(-1)  # [rows, offsets]
    assert found.any(-1).all()

  # On a stream of consecutive integers a genuine window is consecutive, and the
  # targets row[1:] are the inputs row[:-1] shifted by one position.
  stream = np.arange(10_000, dtype=np.int32)
  rows = data.train_batch(stream, 0, batch_size=4, context=32, seed=0)
  np.testing.assert_array_equal(rows[:, 1:], rows[:, :-1] + 1)


def test_train_batch_offsets_cover_range():
  # len = context + 3: offsets 0, 1, 2 are the only windows; all must appear, none beyond.
  context = 5
  tokens = np.arange(context + 3, dtype=np.int32)
  firsts = {
      int(x)
      for step in range(50)
      for x in data.train_batch(tokens, step, batch_size=4, context=context, seed=0)[:, 0]
  }
  assert firsts == {0, 1, 2}


def test_eval_batches_deterministic_and_evenly_spaced():
  tokens = np.arange(1000, dtype=np.int32)
  batches = data.eval_batches(tokens, batch_size=4, context=10, num_batches=3)
  assert batches.shape == (3, 4, 11) and batches.dtype == np.int32
  np.testing.assert_array_equal(
      batches, data.eval_batches(tokens, batch_size=4, context=10, num_batches=3)
  )
  offsets = batches[..., 0].ravel()
  assert offsets[0] == 0 and batches[-1, -1, -1] == 999  # First byte to last byte.
  np.testing.assert_array_equal(batches[..., 1:], batches[..., :-1] + 1)
  gaps = np.diff(offsets)
  assert gaps.min() >= gaps.max() - 1 and gaps.min() > 0
  single = data.eval_batches(tokens, batch_size=1, context=10, num_batches=1)
  np.testing.assert_array_equal(single[0, 0], np.arange(11))


def test_eval_batches_independent_of_train_seed():
  # eval_batches takes no seed, and drawing training batches must not disturb it
  # (no hidden global RNG state).
  tokens = random_tokens(2000, seed=1)
  before = data.eval_batches(tokens, batch_size=2, context=8, num_batches=2)
  np.random.seed(123)
  data.train_batch(tokens, 0, batch_size=4, context=8, seed=99)
  after = data.eval_batches(tokens, batch_size=2, context=8, num_batches=2)
  np.testing.assert_array_equal(before, after)


def test_check_context(tmp_path):
  (tmp_path / "t.txt").write_bytes(b"x" * 100)
  corpus = data.load_corpus(tmp_path / "t.txt", valid_fraction=0.1)  # train 90, valid 10.
  data.check_context(corpus, 9)
  with pytest.raises(ValueError, match=r"train: 90 bytes, valid: 10 bytes.*\[1, 9\]"):
    data.check_context(corpus, 10)
  with pytest.raises(ValueError, match="`context` must be >= 1"):
    data.check_context(corpus, 0)


# --- errors --------------------------------------------------------------------


def test_load_corpus_errors(tmp_path):
  with pytest.raises(ValueError, match="`path` .*does not exist"):
    data.load_corpus(tmp_path / "missing")
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="`path` .*0 non-empty files"):
    data.load_corpus(tmp_path / "empty.txt")
  (tmp_path / "dir").mkdir()
  write_files(tmp_path / "dir", {"e": b"", ".hidden": b"text"})
  with pytest.raises(ValueError, match="`path` .*0 non-empty files"):
    data.load_corpus(tmp_path / "dir")
  (tmp_path / "one").write_bytes(b"x")
  with pytest.raises(ValueError, match="at least 2 bytes"):
    data.load_corpus(tmp_path / "one")
  for bad in [0.0, 1.0, -0.1, 1.5]:
    with pytest.raises(ValueError, match=r"`valid_fraction` must be in \(0, 1\)"):
      data.load_corpus(tmp_path / "dir", valid_fraction=bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "`batch_size` must be >= 1"),
        (dict(context=0), "`context` must be >= 1"),
        (dict(context=100), r"`context` \+ 1 = 101 exceeds .* length 100.*\[1, 99\]"),
        (dict(seed=-1), "`seed` must be >= 0"),
        (dict(step=-1), "`step` must be >= 0"),
        (dict(batch_size=2.0), "`batch_size` must be an integer"),
    ],
)
def test_train_batch_errors(kwargs, match):
  args = dict(step=0, batch_size=2, context=8, seed=0) | kwargs
  with pytest.raises(ValueError, match=match):
    data.train_batch(np.zeros(100, np.uint8), **args)


def test_eval_batches_errors():
  tokens = np.zeros(50, np.uint8)
  for kwargs, match in [
      (dict(num_batches=0), "`num_batches` must be >= 1"),
      (dict(batch_size=0), "`batch_size` must be >= 1"),
      (dict(context=0), "`context` must be >= 1"),
      (dict(context=50), r"`context` \+ 1 = 51 exceeds .* length 50"),
  ]:
    with pytest.raises(ValueError, match=match):
      data.eval_batches(tokens, **(dict(batch_size=2, context=8, num_batches=2) | kwargs))
  with pytest.raises(ValueError, match="`tokens` must be 1-D"):
    data.eval_batches(tokens.reshape(5, 10), batch_size=1, context=2, num_batches=1)


def test_readme_comparison_names_the_corpus_only_when_it_differs():
  readme = {"source": "stdlib", "python": data.README_CORPUS["python"],
            "num_bytes": data.README_CORPUS["num_bytes"], "sha256": data.README_CORPUS["sha256"]}
  assert data.readme_comparison(readme) is None
  other = dict(readme, python="3.12.1", num_bytes=11574468, sha256="27ae12a01b61" + "0" * 52)
  message = data.readme_comparison(other)
  assert "Python 3.12.1" in message and "11,574,468 bytes" in message
  assert "not the one README's tables were measured on" in message
  user = data.readme_comparison({"source": "/data/text", "sha256": "ab" * 32})
  assert user.startswith("This run's corpus (/data/text, sha256 abababababab")
