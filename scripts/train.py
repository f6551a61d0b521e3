r"""Train a small transformer LM with a jaxprune method and report (see :mod:`jaxprune.cli`).

    python scripts/train.py --config recipes/gmp.py --workdir /tmp/gmp
    python scripts/train.py --config recipes/sr_ste_2of4.py:tiny --workdir /tmp/t \
        --config.steps=200 --config.optimizer.lr=1e-3

The same command as ``jaxprune-train`` (installed with the package) and
``python -m jaxprune.train``.
"""

from jaxprune import cli

if __name__ == "__main__":
  cli.run()
