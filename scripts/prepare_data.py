r"""Write a token corpus: train a byte-level BPE tokenizer offline and tokenize a byte corpus.

    python scripts/prepare_data.py --out /tmp/stdlib-bpe4k       # the stdlib, 4,096 tokens
    python scripts/prepare_data.py --out data/mytext --path ~/text --vocab-size 16384

Writes ``train.bin`` / ``val.bin`` (flat uint16 or uint32 ids, nanoGPT's layout),
``tokenizer.json`` and ``meta.json`` (see :mod:`jaxprune.tokens`). Train on them with
``--config.data.format=tokens --config.data.path=OUT``. Needs ``pip install 'jaxprune[tokens]'``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from jaxprune import tokens


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="directory to write the token corpus into")
  parser.add_argument("--path", default=None,
                      help="a text file or directory (default: the Python standard library)")
  parser.add_argument("--vocab-size", type=int, default=4096,
                      help="vocabulary size, in [257, 2**32) (default 4096)")
  parser.add_argument("--valid-fraction", type=float, default=0.05,
                      help="validation share, in (0, 1), split by file (default 0.05)")
  parser.add_argument("--include-tests", action="store_true",
                      help="stdlib corpus only: include the test suite")
  parser.add_argument("--min-frequency", type=int, default=2,
                      help="pairs seen fewer times are not merged, >= 1 (default 2)")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  if out.exists() and any(out.iterdir()):
    parser.exit(2, f"error: --out {out} exists and is not empty; choose a new directory.\n")
  if args.min_frequency < 1:
    parser.exit(2, f"error: --min-frequency must be >= 1, got {args.min_frequency}.\n")
  start = time.perf_counter()
  try:
    meta = tokens.prepare_token_corpus(
        out, path=args.path, vocab_size=args.vocab_size, valid_fraction=args.valid_fraction,
        include_tests=args.include_tests, min_frequency=args.min_frequency)
  except (ValueError, ImportError) as e:
    flag = {"`vocab_size`": "--vocab-size", "`valid_fraction`": "--valid-fraction",
            "`path`": "--path"}
    message = str(e)
    for name, option in flag.items():
      message = message.replace(name, option)
    if out.exists() and not any(out.iterdir()):
      out.rmdir()
    parser.exit(2, f"error: {message}\n")
  summary = {k: meta[k] for k in ("vocab_size", "dtype", "train_tokens", "valid_tokens",
                                  "train_bytes", "valid_bytes", "undecodable_bytes")}
  summary["bytes_per_token"] = round(meta["train_bytes"] / max(meta["train_tokens"], 1), 3)
  summary["seconds"] = round(time.perf_counter() - start, 1)
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
