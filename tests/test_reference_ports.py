"""SR-STE and ERK against numpy ports of their reference code, on the same inputs.

* SR-STE: aojunzz/NM-sparsity, ``devkit/sparse_ops/sparse_ops.py``, ``Sparse``: the forward
  masks the ``M - N`` smallest ``|w|`` of every group of ``M`` consecutive entries of the
  PyTorch ``(out, in)`` weight (consecutive along ``in``), the backward returns
  ``grad + decay * (1 - mask) * weight``; trained with SGD and momentum as in the paper.
* ERK: google-research/rigl, ``rigl/sparse_utils.py``, ``get_sparsities_erdos_renyi``
  (``include_kernel=True``, no custom sparsities), whose budget counts
  ``floor(s * N_l)`` zeros per layer and whose loop makes the most probable layer dense, one
  at a time, until no density exceeds 1.

The other ports live beside their methods: MX (tests/mx_reference.py), SparseGPT, GPTQ, Wanda
and OWL (tests/oneshot_reference.py), STEP (test_step.py), RigL and SNIP (test_dst.py), Jin et
al.'s schedule and TF-MOT's (test_schedules.py).
"""

from __future__ import annotations

import math

import hypothesis
import hypothesis.strategies as st
import numpy as np
import optax

import jaxprune


def _reference_sparse_forward(weight: np.ndarray, n: int, m: int) -> np.ndarray:
  """``Sparse.forward``'s mask of a PyTorch ``(out, in)`` weight."""
  groups = np.abs(weight).reshape(-1, m)
  index = np.argsort(groups, axis=1, kind="stable")[:, : m - n]
  mask = np.ones_like(groups)
  np.put_along_axis(mask, index, 0.0, axis=1)
  return mask.reshape(weight.shape)


def _reference_sr_ste(weight, x, y, *, n, m, decay, lr, momentum, steps):
  """SGD with momentum (PyTorch's) on 0.5 mean ||x W_masked^T - y||^2 through ``Sparse``."""
  w = weight.astype(np.float64)
  buf = None
  masks = []
  for _ in range(steps):
    mask = _reference_sparse_forward(w, n, m)
    masks.append(mask.astype(bool))
    out = x @ (w * mask).T
    grad_out = x.T @ (out - y) / len(x)                 # d loss / d masked weight, (in, out)
    grad = grad_out.T + decay * (1 - mask) * w           # Sparse.backward
    buf = grad if buf is None else momentum * buf + grad
    w = w - lr * buf
  return w, masks


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**16))
def test_sr_ste_matches_a_port_of_the_reference(seed):
  rng = np.random.default_rng(seed)
  d_in, d_out, batch = 16, 6, 32
  weight = rng.standard_normal((d_out, d_in)).astype(np.float32)   # PyTorch (out, in)
  x = rng.standard_normal((batch, d_in)).astype(np.float32)
  y = rng.standard_normal((batch, d_out)).astype(np.float32)
  kw = dict(n=2, m=4, decay=2e-2, lr=0.05, momentum=0.9, steps=12)
  ref_w, ref_masks = _reference_sr_ste(weight, x, y, **kw)

  tx = jaxprune.sr_ste(optax.sgd(kw["lr"], momentum=kw["momentum"]), kw["n"], kw["m"],
                       decay=kw["decay"], select="w")
  params = {"w": weight.T.copy()}                                   # Flax (in, out)
  state = tx.init(params)
  params = tx.view(params)

  def loss(p):
    return 0.5 * ((x @ p["w"] - y) ** 2).sum(axis=1).mean()

  import jax

  grad_fn = jax.jit(jax.grad(loss))
  for t in range(kw["steps"]):
    np.testing.assert_array_equal(np.asarray(params["w"]).T != 0, ref_masks[t], err_msg=str(t))
    updates, state = tx.update(grad_fn(params), state, params)
    params = optax.apply_updates(params, updates)
  master = np.asarray(jaxprune.master_params(state)["w"]).T
  np.testing.assert_allclose(master, ref_w, rtol=2e-5, atol=2e-6)


def _reference_erk(shapes: dict[str, tuple[int, ...]], sparsity: float) -> dict[str, float]:
  """``get_sparsities_erdos_renyi`` with ``include_kernel=True`` and no custom sparsities."""
  dense = set()
  while True:
    divisor, rhs, raw = 0.0, 0.0, {}
    for name, shape in shapes.items():
      n_param = math.prod(shape)
      n_zeros = int(np.floor(sparsity * n_param))
      if name in dense:
        rhs -= n_zeros
      else:
        rhs += n_param - n_zeros
        raw[name] = np.sum(shape) / np.prod(shape)
        divisor += raw[name] * n_param
    eps = rhs / divisor
    max_prob = max(raw.values())
    if max_prob * eps > 1:
      dense.update(name for name, p in raw.items() if p == max_prob)
    else:
      break
  return {name: 0.0 if name in dense else 1.0 - eps * raw[name] for name in shapes}


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    dims=st.lists(st.tuples(st.integers(4, 64), st.integers(4, 64), st.integers(1, 3)),
                  min_size=2, max_size=6),
    sparsity=st.floats(0.05, 0.98))
def test_erk_matches_a_port_of_the_reference(dims, sparsity):
  shapes = {f"l{i}": ((k, k, a, b) if k > 1 else (a, b)) for i, (a, b, k) in enumerate(dims)}
  ours = jaxprune.erk_sparsities(shapes, sparsity)
  theirs = _reference_erk(shapes, sparsity)
  # sum of p_l N_l = sum(shape_l) over the layers ERK scales (not made dense)
  divisor = sum(np.sum(s) for n, s in shapes.items() if ours[n] > 0)
  for name, shape in shapes.items():
    # The reference's budget floors each layer's zero count (under one weight per layer); ours
    # is the real-valued target: eps differs by at most L / divisor over the free layers, and a
    # layer's density by p_l times that.
    p = np.sum(shape) / math.prod(shape)
    assert abs(ours[name] - theirs[name]) <= p * len(shapes) / max(divisor, 1) + 1e-12, name
