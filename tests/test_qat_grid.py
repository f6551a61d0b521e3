"""QAT's MX fast path (``qat_grid._fast_mx``) against ``quantize``'s general path, bit for bit.

The general path is itself tested bit for bit against microxcaling (``tests/mx_reference.py``),
so equality here means the fast path is microxcaling's ``round='even'`` too (zeros ``+0.0``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from marks import quick_sample

from jaxprune import qat_grid, quant

MX = [f for f in quant.FORMATS if quant.get_format(f).kind == "mx"]


def bits(x) -> np.ndarray:
  return np.asarray(x, np.float32).view(np.int32)


def element_grid(fmt: quant.Format) -> np.ndarray:
  """Every non-negative value of the element format, in float64."""
  if not fmt.ebits:  # mxint8: k / 64
    return np.arange(int(fmt.max_normal * 2**fmt.mbits) + 1) * 2.0**-fmt.mbits
  values = {r * 2.0 ** (p - fmt.mbits) for p in range(fmt.emin, fmt.emax + 1)
            for r in range(2 ** (fmt.mbits + 1))}
  return np.array(sorted(v for v in values if v <= fmt.max_normal))


def adversarial_blocks(fmt: quant.Format, rng, n_blocks: int, block: int) -> np.ndarray:
  """Blocks of element-grid values, their midpoints (exact ties), the floats next to both,
  values past saturation, microxcaling's ``t = 1/2 - 2^-25`` and tiny values, each block
  scaled by a random ``2^e`` with its first entry ``max_normal 2^e`` (which sets the scale
  to ``2^e``), or just below a power of two (where ``fl32(log2 amax)`` rounds up)."""
  grid = element_grid(fmt)
  mids = (grid[:-1] + grid[1:]) / 2
  top = 2.0 ** (fmt.emax + 1)
  quirk = (0.5 - 2.0**-25) * 2.0 ** ((fmt.emin if fmt.ebits else 0) - fmt.mbits)
  pool = np.concatenate([grid, mids, np.linspace(fmt.max_normal, top, 9), [quirk, 2.0**-30]])
  pool = pool.astype(np.float32)
  pool = np.concatenate([pool, np.nextafter(pool, np.float32(np.inf)),
                         np.nextafter(pool, np.float32(0))])
  x = rng.choice(pool, size=(n_blocks, block)) * rng.choice([-1.0, 1.0], size=(n_blocks, block))
  e = rng.integers(-40, 40, size=(n_blocks, 1))
  x = (x * np.exp2(e)).astype(np.float32)
  x[:, 0] = np.float32(fmt.max_normal) * np.exp2(e[:, 0]).astype(np.float32)
  below_power = rng.random(n_blocks) < 0.25
  x[below_power, 0] = np.nextafter(np.exp2(e[below_power, 0] + fmt.emax + 1).astype(np.float32),
                                   np.float32(0))
  return x


def grid_fns(fmt: str, shape, axis: int):
  spec = quant.make_spec(fmt, shape, jnp.float32, axis, None, None, True)
  fast = jax.jit(functools.partial(qat_grid.grid_quantize, spec=spec, bits=None))
  general = jax.jit(functools.partial(qat_grid.general_grid_quantize, spec=spec, bits=None))
  return fast, general


@pytest.mark.parametrize("fmt", quick_sample(MX, 3))
@pytest.mark.parametrize("axis", [0, 1])
def test_mx_fast_path_is_the_general_path(fmt, axis):
  """Blocks along either axis of a kernel, built of exact ties and their neighbours."""
  rng = np.random.default_rng(len(fmt) + axis)
  blocks = adversarial_blocks(quant.get_format(fmt), rng, 96, 32)  # 96 blocks of 32
  x = blocks.reshape(3, 32, 32).transpose(1, 0, 2).reshape(32, 96)  # blocks along axis 0
  x = x if axis == 0 else np.ascontiguousarray(x.T)
  fast, general = grid_fns(fmt, x.shape, axis)
  assert bool(qat_grid._fast_amax(jnp.asarray(x).reshape(-1, 32, 96) if axis == 0 else
                                  jnp.asarray(x).reshape(96, -1, 32), 1 if axis == 0 else 2,
                                  qat_grid._FAST_LIMIT)[0])  # the fast path is taken
  np.testing.assert_array_equal(bits(fast(x)), bits(general(x)))


def test_mx_fast_path_closed_form():
  """mxfp4_e2m1 by hand: a block with amax 6 has scale 2^0; 2.5 is a tie between 2 and 3
  (to even: 2), 5 between 4 and 6 (to even: 4), 7 saturates to 6, 0.25 ties 0 and 0.5
  (to 0); -0.75 ties -0.5 and -1 (to -1). Scaled by 2^-20 every result scales with it."""
  row = np.array([6, 2.5, 5, 7, 0.25, -0.75, 1.5, -3] * 4, np.float32)
  want = np.array([6, 2, 4, 6, 0, -1, 1.5, -3] * 4, np.float32)
  x = np.stack([row, row * np.float32(2.0**-20)])
  fast, _ = grid_fns("mxfp4_e2m1", x.shape, 1)
  np.testing.assert_array_equal(np.asarray(fast(x)), np.stack([want, want * 2.0**-20]))


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "mxint8"])
def test_mx_fast_routing_matches_general_path(fmt):
  """Tensors with a zero, subnormal, tiny (< 2^-60), huge (>= 2^100), infinite or NaN block
  take the integer check, and every result is the general path's, bit for bit."""
  rng = np.random.default_rng(5)
  base = rng.standard_normal((64, 8)).astype(np.float32)
  fast, general = grid_fns(fmt, base.shape, 0)
  specials = {"zero": 0.0, "subnormal": 1e-40, "tiny": 2.0**-80, "huge": 2.0**110,
              "inf": np.inf, "nan": np.nan}
  for name, value in specials.items():
    x = base.copy()
    x[:32, 3] = value * np.sign(base[:32, 3])  # one block
    x[40, 5] = np.float32(value)               # and one entry of another
    with np.errstate(over="ignore"):
      np.testing.assert_array_equal(bits(fast(x)), bits(general(x)), err_msg=name)


def nvfp4_adversarial(rng, shape, axis: int) -> np.ndarray:
  """A tensor whose per-tensor scale ``s~`` has 14 bits and whose blocks (of 16 along ``axis``)
  each have a chosen E4M3 scale ``s_b`` (first entry ``6 s_b s~``; one block has 448, which
  sets the tensor's maximum 2688 s~); the other entries are E2M1 values, their midpoints
  (exact ties), values past 6, and the floats next to all of them, times ``s_b s~``."""
  s_t = np.float32(rng.integers(2**13, 2**14) * 2.0 ** int(rng.integers(-40, 20)))
  e4m3 = np.unique(np.abs(quant.quantize(jnp.asarray(rng.standard_normal(4096) * 100,
                                                     jnp.float32), "fp8_e4m3")))
  e4m3 = np.asarray(e4m3[(e4m3 >= 2.0**-6)], np.float32)
  e2m1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
  pool = np.concatenate([e2m1, (e2m1[:-1] + e2m1[1:]) / 2, [6.5, 0.25, 2.0**-20]])
  pool = np.asarray(pool, np.float32)
  pool = np.concatenate([pool, np.nextafter(pool, np.float32(np.inf)),
                         np.nextafter(pool, np.float32(0))])
  moved = (shape[axis] // 16, 16, int(np.prod(shape)) // shape[axis])
  s_b = rng.choice(e4m3, size=(moved[0], 1, moved[2])).astype(np.float32)
  s_b[0, 0, 0] = 448.0
  x = rng.choice(pool, size=moved) * rng.choice([-1.0, 1.0], size=moved)
  x[:, 0] = 6.0
  x = (x * s_b * s_t).astype(np.float32)  # exact: at most 3 + 4 + 14 significant bits
  x = x.reshape(shape[axis], -1)
  return np.ascontiguousarray(x if axis == 0 else x.T)


def nvfp4_fns(spec):
  bits = qat_grid.NVFP4_SCALE_BITS
  return (jax.jit(functools.partial(qat_grid.grid_quantize, spec=spec, bits=bits)),
          jax.jit(functools.partial(qat_grid.general_grid_quantize, spec=spec, bits=bits)))


@pytest.mark.parametrize("axis", [0, 1])
def test_nvfp4_fast_path_is_the_general_path(axis):
  """Ties of every E2M1 step, their neighbours and saturation in blocks of chosen E4M3 scales,
  and plain Gaussian tensors of several magnitudes."""
  rng = np.random.default_rng(11 + axis)
  shape = (64, 48)
  spec = quant.make_spec("nvfp4", shape, jnp.float32, axis, None, None, True)
  fast, general = nvfp4_fns(spec)
  tensors = [nvfp4_adversarial(rng, shape, axis) for _ in range(4)]
  tensors += [(rng.standard_normal(shape) * 10.0**k).astype(np.float32) for k in (-15, 0, 20)]
  for x in tensors:
    assert bool(qat_grid._fast_amax(jnp.asarray(x), None, qat_grid._FAST_LIMIT)[0])
    np.testing.assert_array_equal(bits(fast(x)), bits(general(x)))


def test_nvfp4_fast_routing_matches_general_path():
  """Zero, subnormal, tiny, huge, infinite or NaN entries route to the general path; all-zero
  and subnormal-only tensors too. Every result is the general path's, bit for bit."""
  rng = np.random.default_rng(7)
  base = rng.standard_normal((32, 16)).astype(np.float32)
  spec = quant.make_spec("nvfp4", base.shape, jnp.float32, 0, None, None, True)
  fast, general = nvfp4_fns(spec)
  cases = {"zeros": np.zeros_like(base), "subnormal": np.full_like(base, 1e-40),
           "tiny": base * np.float32(2.0**-80)}
  for name, value in {"subnormal entry": 1e-40, "huge": 2.0**110, "inf": np.inf,
                      "nan": np.nan}.items():
    x = base.copy()
    x[3, 5] = np.float32(value)
    cases[name] = x
  for name, x in cases.items():
    np.testing.assert_array_equal(bits(fast(x)), bits(general(x)), err_msg=name)
