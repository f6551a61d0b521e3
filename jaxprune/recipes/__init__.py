"""The training recipes: one ``get_config(preset)`` per file (see :mod:`jaxprune.train_config`).

They are installed with the package, so ``jaxprune-train --config gmp`` works without a
checkout; in a checkout, ``recipes/`` at the top links here, so ``--config recipes/gmp.py``
works too.
"""
