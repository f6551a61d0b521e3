"""Token corpora: BPE preparation, memory-mapped loading, exact byte counts, bad files."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from jaxprune import data, tokens

tokenizers = pytest.importorskip("tokenizers")

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "prepare_data.py"


def _text_dir(root: pathlib.Path) -> pathlib.Path:
  rng = np.random.default_rng(0)
  words = ["def", "return", "self", "import", "jax", "numpy", "α", "βeta", "x", "=", "(", ")"]
  src = root / "text"
  src.mkdir()
  for i in range(40):
    lines = [" ".join(rng.choice(words, size=8)) for _ in range(30)]
    (src / f"f{i:02d}.py").write_text("\n".join(lines) + "\n", encoding="utf-8")
  return src


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("tok")
  src = _text_dir(root)
  meta = tokens.prepare_token_corpus(root / "out", path=src, vocab_size=300)
  return root, src, meta


def test_round_trip_and_exact_byte_counts(prepared):
  root, src, meta = prepared
  corpus = tokens.load_token_corpus(root / "out")
  byte_corpus = data.load_corpus(src)
  tok = tokenizers.Tokenizer.from_file(str(root / "out" / tokens.TOKENIZER_FILE))
  for ids, raw in ((corpus.train, byte_corpus.train), (corpus.valid, byte_corpus.valid)):
    assert tok.decode(np.asarray(ids).tolist()).encode("utf-8") == raw.tobytes()
    assert int(corpus.token_bytes[ids].sum()) == raw.size
  assert meta["undecodable_bytes"] == 0
  assert corpus.vocab_size == meta["vocab_size"] <= 300
  assert isinstance(corpus.train, np.memmap) and not corpus.train.flags.writeable
  assert corpus.fingerprint["prepared_from"]["sha256"] == byte_corpus.fingerprint["sha256"]


def test_preparation_is_deterministic_and_edits_change_the_fingerprint(prepared, tmp_path):
  root, src, _ = prepared
  tokens.prepare_token_corpus(tmp_path / "again", path=src, vocab_size=300)
  first = tokens.load_token_corpus(root / "out").fingerprint
  again = tokens.load_token_corpus(tmp_path / "again").fingerprint
  assert first["sha256"] == again["sha256"]
  ids = np.fromfile(tmp_path / "again" / tokens.VALID_FILE, np.uint16)
  ids[3] = (ids[3] + 1) % 256
  ids.tofile(tmp_path / "again" / tokens.VALID_FILE)
  assert tokens.load_token_corpus(tmp_path / "again").fingerprint["sha256"] != first["sha256"]


def test_batches_from_the_memory_map_are_a_function_of_seed_and_step(prepared):
  corpus = tokens.load_token_corpus(prepared[0] / "out")
  a = data.train_batch(corpus.train, 7, batch_size=4, context=16, seed=3)
  b = data.train_batch(np.asarray(corpus.train), 7, batch_size=4, context=16, seed=3)
  np.testing.assert_array_equal(a, b)
  assert a.dtype == np.int32 and a.max() < corpus.vocab_size


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  dst.mkdir()
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


def test_bad_token_files_name_the_file(prepared, tmp_path):
  out = prepared[0] / "out"
  odd = _copy(out, tmp_path / "odd")
  with open(odd / tokens.TRAIN_FILE, "ab") as f:
    f.write(b"\x01")
  with pytest.raises(ValueError, match=r"train\.bin: \d+ bytes is not a multiple of the 2-byte"):
    tokens.load_token_corpus(odd)

  big = _copy(out, tmp_path / "big")
  ids = np.fromfile(big / tokens.VALID_FILE, np.uint16)
  ids[5] = 60000
  ids.tofile(big / tokens.VALID_FILE)
  with pytest.raises(ValueError, match=r"val\.bin: token id 60000 .* position 5\) .* vocabulary"):
    tokens.load_token_corpus(big)

  bare = _copy(out, tmp_path / "bare")
  (bare / tokens.TOKENIZER_FILE).unlink()
  with pytest.raises(ValueError, match=r"tokenizer\.json is missing\. Token files need"):
    tokens.load_token_corpus(bare)

  wordpiece = _copy(out, tmp_path / "wordpiece")
  spec = json.loads((wordpiece / tokens.TOKENIZER_FILE).read_text())
  spec["pre_tokenizer"] = {"type": "Whitespace"}
  (wordpiece / tokens.TOKENIZER_FILE).write_text(json.dumps(spec))
  with pytest.raises(ValueError, match="only byte-level BPE"):
    tokens.load_token_corpus(wordpiece)

  corpus = tokens.load_token_corpus(out)
  with pytest.raises(ValueError, match=r"val\.bin .* shorter than one sequence"):
    tokens.check_context(corpus, corpus.valid.size)


def _cli():
  spec = importlib.util.spec_from_file_location("prepare_data", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_cli_writes_the_corpus_and_refuses_bad_flags(prepared, tmp_path, capsys):
  cli = _cli()
  assert cli.main(["--out", str(tmp_path / "c"), "--path", str(prepared[1]),
                   "--vocab-size", "280"]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["vocab_size"] <= 280 and summary["undecodable_bytes"] == 0
  with pytest.raises(SystemExit) as e:
    cli.main(["--out", str(tmp_path / "d"), "--path", str(prepared[1]), "--vocab-size", "10"])
  assert e.value.code == 2
  assert "--vocab-size must be an integer in [257, 2**32)" in capsys.readouterr().err
  assert not (tmp_path / "d").exists()
  with pytest.raises(SystemExit):
    cli.main(["--out", str(tmp_path / "c"), "--path", str(prepared[1])])
  assert "exists and is not empty" in capsys.readouterr().err
