"""A table of bad inputs: each raises a ValueError at construction or ``init`` naming the
parameter (or, for checks that need the params, at the first ``update``, before anything runs).

``test_the_table_has_no_silent_case`` prints the counts of the table by stage; every row is an
input that used to be silently wrong or fail late and unclearly (issue 16).
"""

from __future__ import annotations

import collections
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune
from jaxprune import quant, train_config

PARAMS = {"a": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)},
          "b": {"kernel": jnp.ones((8, 4))}}
BOTH = jaxprune.select(head=None)
ADAM = optax.adam(1e-3)


def _config(**fields):
  c = train_config.default_config()
  for name, value in fields.items():
    node = c
    *parents, leaf = name.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _first_update(tx, params, grads=None):
  state = tx.init(PARAMS)
  grads = jax.tree.map(jnp.ones_like, params) if grads is None else grads
  return tx.update(grads, state, params)


# (label, build, stage, regex naming the parameter). ``stage``: 'construction' (build()
# raises), 'init' (build() returns a transform whose init(PARAMS) raises), 'update' (build()
# raises at the first update, checked before anything is computed).
TABLE = [
    ("sparsity as a string", lambda: jaxprune.magnitude_pruning(ADAM, "0.5"), "construction",
     r"`sparsity` must be a number in \[0, 1\), got '0.5'"),
    ("sparsity None", lambda: jaxprune.magnitude_pruning(ADAM, None), "construction",
     r"`sparsity` must be a number in \[0, 1\), got None"),
    ("sparsity in a list", lambda: jaxprune.magnitude_pruning(ADAM, [0.5]), "construction",
     r"`sparsity` must be a number"),
    ("sparsity as a 1-d array", lambda: jaxprune.random_pruning(ADAM, np.array([0.5])),
     "construction", r"`sparsity` must be a number"),
    ("sparsity 1.0", lambda: jaxprune.magnitude_pruning(ADAM, 1.0), "construction",
     r"`sparsity` must be in \[0, 1\)"),
    ("sparsity NaN", lambda: jaxprune.saliency_pruning(ADAM, math.nan), "construction",
     r"`sparsity` must be in \[0, 1\)"),
    ("select(123)", lambda: jaxprune.select(123), "construction",
     r"`include` must be a regex string"),
    ("select matching nothing", lambda: jaxprune.magnitude_pruning(
        ADAM, 0.5, select="nothing"), "init", r"`include` regex 'nothing' matches no leaf"),
    ("N:M with n > m", lambda: jaxprune.nm_pruning(ADAM, 5, 4), "construction",
     r"`n` must be in \[1, m\] = \[1, 4\], got n=5"),
    ("N:M with n = 0", lambda: jaxprune.sr_ste(ADAM, 0, 4), "construction",
     r"`n` must be >= 1, got 0"),
    ("prune_step -1", lambda: jaxprune.nm_pruning(ADAM, 2, 4, prune_step=-1), "construction",
     r"`prune_step` must be >= 0, got -1"),
    ("m that divides no axis", lambda: jaxprune.nm_pruning(ADAM, 2, 3, select=BOTH), "init",
     r"m=3 does not divide"),
    ("an uncalled optimizer factory", lambda: jaxprune.rigl(optax.adam, 0.5, end_step=10),
     "construction", r"got the function adam: call it"),
    ("an uncalled factory in a view", lambda: jaxprune.ste(optax.sgd, jaxprune.nm(2, 4)),
     "construction", r"got the function sgd: call it"),
    ("bool leaf selected", lambda: jaxprune.magnitude_pruning(ADAM, 0.5, select="flag"),
     "init:flag", r"bool leaves cannot be pruned: flag"),
    ("integer leaf selected", lambda: jaxprune.magnitude_pruning(ADAM, 0.5, select="step"),
     "init:step", r"integer leaves cannot be pruned: step"),
    ("end_step beyond int32", lambda: jaxprune.polynomial_schedule(0.0, 0.8, 0, 2**40),
     "construction", r"`end_step` must be <= 2147483647, got 1099511627776"),
    ("end_step before begin_step", lambda: jaxprune.polynomial_schedule(0.0, 0.8, 10, 5),
     "construction", r"`end_step` must be > `begin_step` = 10"),
    ("schedule frequency 0", lambda: jaxprune.geometric_schedule(0.8, 0, 10, frequency=0),
     "construction", r"`frequency` must be >= 1"),
    ("STEP b2 so close to 1 the window is huge", lambda: jaxprune.step_adam(1e-3, b2=1 - 1e-10),
     "construction", r"`b2` = .* gives an AutoSwitch window T_w"),
    ("STEP unknown preconditioner", lambda: jaxprune.step_adam(1e-3, preconditioner="adam"),
     "construction", r"`preconditioner` must be one of \('corrected', 'reference'\)"),
    ("STEP b1 = 1", lambda: jaxprune.step_adam(1e-3, b1=1.0), "construction",
     r"`b1` must be in \[0, 1\)"),
    ("STEP t_max past the run", lambda: jaxprune.step_adam(1e-3, t_max=99, total_steps=100),
     "construction", r"`t_max` = 99 forces the switch"),
    ("RigL drop_fraction 1.5", lambda: jaxprune.rigl(ADAM, 0.5, end_step=10, drop_fraction=1.5),
     "construction", r"`drop_fraction`"),
    ("RigL end_step 0", lambda: jaxprune.rigl(ADAM, 0.5, end_step=0), "construction",
     r"`end_step` must be >= 1"),
    ("RigL on a layer left with no active weight", lambda: jaxprune.rigl(
        ADAM, 0.99, end_step=10, select="b/kernel"), "init",
     r"b/kernel \(shape \(8, 4\)\) would keep no active weight"),
    ("gradient flow coef < 0", lambda: jaxprune.gradient_flow(
        ADAM, 1, 8, total_steps=10, decay="exp", coef=-1.0), "construction",
     r"`coef` must be a finite number > 0"),
    ("gradient flow unknown decay", lambda: jaxprune.gradient_flow(
        ADAM, 1, 8, total_steps=10, decay="cosine"), "construction", r"`decay` must be one of"),
    ("gradient flow empty window", lambda: jaxprune.gradient_flow(
        ADAM, 1, 8, total_steps=10, dense_steps=5, finetune_steps=5), "construction",
     r"`dense_steps` \+ `finetune_steps` must be < `total_steps`"),
    ("unknown quantization format", lambda: quant.quantize(jnp.ones(4), "fp4"), "construction",
     r"Unknown format"),
    ("QAT with an unknown format", lambda: jaxprune.quantization(ADAM, "int33"), "construction",
     r"format"),
    ("quantize an integer array", lambda: quant.quantize(jnp.ones(4, jnp.int32), "int8"),
     "construction", r"quantize expects floating-point input"),
    ("block_size that does not divide", lambda: quant.quantize(
        jnp.ones((8, 6)), "int8", block_size=4, axis=1), "construction", r"`block_size`=4"),
    ("NVFP4 with blocks other than 16", lambda: quant.quantize(
        jnp.ones((8, 32)), "nvfp4", block_size=32), "construction",
     r"`block_size` must be 16 or None, got 32"),
    ("NVFP4 QAT on a kernel whose axis 16 does not divide", lambda: jaxprune.quantization(
        ADAM, "nvfp4", select=BOTH), "init", r"a/kernel: `block_size`=16 must divide the size 8"),
    ("unknown rounding", lambda: quant.quantize(jnp.ones(4), "int8", round="up"),
     "construction", r"`round` must be one of \('even', 'nearest'\), got 'up'"),
    ("unknown quantizer convention", lambda: quant.quantize(
        jnp.ones(4), "int8", convention="gptq"), "construction",
     r"`convention` must be one of \('absmax', 'harma'\), got 'gptq'"),
    ("Harma's convention on an MX format", lambda: quant.quantize(
        jnp.ones(32), "mxfp4_e2m1", convention="harma"), "construction",
     r"`convention`='harma'.*int format"),
    ("nearest rounding with NVFP4", lambda: quant.quantize(
        jnp.ones(16), "nvfp4", round="nearest"), "construction",
     r"`round`='nearest' is not defined for NVFP4"),
    ("config.sparsity 1.5", lambda: train_config.check_config(_config(sparsity=1.5)),
     "construction", r"`config.sparsity` must be a number in \[0, 1\), got 1.5"),
    ("config one_shot_fraction 1.5", lambda: train_config.check_config(
        _config(one_shot_fraction=1.5)), "construction", r"`config.one_shot_fraction`"),
    ("config dst.end_fraction -1", lambda: train_config.check_config(
        _config(dst__end_fraction=-1.0)), "construction", r"`config.dst.end_fraction`"),
    ("config lr NaN", lambda: train_config.check_config(_config(optimizer__lr=math.nan)),
     "construction", r"`config.optimizer.lr` must be a finite number > 0"),
    ("config unknown dtype", lambda: train_config.check_config(_config(model__dtype="fp8")),
     "construction", r"`config.model.dtype` must be one of"),
    ("config unknown field", lambda: train_config.check_config(_config(sparsty=0.5)),
     "construction", r"unknown config field\(s\) \['sparsty'\]"),
    ("an unselected leaf that changes shape", lambda: _first_update(
        jaxprune.magnitude_pruning(ADAM, 0.5),
        {**PARAMS, "a": {**PARAMS["a"], "bias": jnp.zeros(1)}}), "update", r"a/bias"),
]

OTHER_PARAMS = {"flag": jnp.ones((8, 8), bool), "step": jnp.ones((8, 8), jnp.int32),
                "w": jnp.ones((8, 8))}


def _raises_at(build, stage):
  """Builds; the stage at which the ValueError came ('construction', 'init' or 'update')."""
  try:
    tx = build()
  except ValueError as e:
    return "update" if stage == "update" else "construction", e
  params = OTHER_PARAMS if stage.startswith("init:") else PARAMS
  try:
    tx.init(params)
  except ValueError as e:
    return "init", e
  return None, None


@pytest.mark.parametrize("label,build,stage,match", TABLE, ids=[row[0] for row in TABLE])
def test_bad_input_raises_naming_the_parameter(label, build, stage, match):
  at, error = _raises_at(build, stage)
  assert at == stage.split(":")[0], f"{label}: raised at {at}, expected at {stage}"
  assert error is not None
  assert re.search(match, str(error)), f"{label}: {error}"


def test_the_table_has_no_silent_case(capsys):
  counts = collections.Counter(_raises_at(build, stage)[0] for _, build, stage, _ in TABLE)
  with capsys.disabled():
    print(f"\nbad inputs: {len(TABLE)} tried; construction {counts['construction']}, "
          f"init {counts['init']}, first update {counts['update']}, silent {counts[None]}")
  assert counts[None] == 0
  assert counts["update"] <= 1   # only the check that needs the update's params
