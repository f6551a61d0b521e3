"""The exactness tests of quant, compress, QAT and GPTQ's grids, rerun under XLA:CPU's fast math.

XLA on GPUs and TPUs may divide by multiplying with an approximate reciprocal
and flush subnormals; with these flags XLA:CPU does the same (and reassociates),
so this is the CPU stand-in for an accelerator run: every result that promises
exact bits must survive it. The subset (``-k`` below) is the tests that compare
bits with an oracle (ml_dtypes casts, the microxcaling and Harma et al. ports, n * s, the
compressed export's decoder, QAT's representability after every step, its hand-computed
first update and its fast grids against the general path, GPTQ's and SparseGPT's results
exactly representable), so that it stays near two minutes
on two cores; the hypothesis-driven ones among them cover every int, FP8, MX and NVFP4 format.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FAST_MATH = "--xla_cpu_enable_fast_math=true --xla_cpu_fast_math_honor_division=false"
ROOT = Path(__file__).resolve().parents[1]
FILES = ["tests/test_quant.py", "tests/test_nvfp4.py", "tests/test_quant_conventions.py",
         "tests/test_compress.py", "tests/test_qat.py", "tests/test_qat_grid.py",
         "tests/test_oneshot_layers.py"]
SUBSET = " or ".join([
    "fp8_matches_ml_dtypes", "int_fp8_invariants", "int_fp8_subnormal", "int8_per_channel",
    "fp8_ties", "int_asymmetric_invariants", "mx_matches_microxcaling", "nvfp4",
    "mx_rounding", "round_nearest", "harma", "export_round_trip", "invariants_after_every_step",
    "collapse", "closed_form", "fast_amax", "mx_fast",
    # GPTQ / SparseGPT grids: int scales and roundings on correctly rounded divisions.
    "exactly_representable", "keeps_the_scale_entry", "round_to_nearest", "joint_quantization",
])


def _env() -> dict[str, str]:
  flags = f"{os.environ.get('XLA_FLAGS', '')} {FAST_MATH}".strip()
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")


def _run(args: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=900)


def test_fast_math_flags_take_effect():
  # Without this the test below could pass vacuously (e.g. if XLA dropped the flags).
  script = (
      "import jax, numpy as np\n"
      "rng = np.random.default_rng(0)\n"
      "a, b = rng.uniform(1, 2, 4096).astype(np.float32), np.float32(3)\n"
      "got = np.asarray(jax.jit(lambda a, b: a / b)(a, b))\n"  # b is broadcast: a * (1 / b)
      "print(int((got != a / b).sum()))\n")
  result = _run(["-c", script])
  assert result.returncode == 0, result.stderr[-3000:]
  assert int(result.stdout.split()[-1]) > 0


@pytest.mark.slow
def test_exact_results_survive_fast_math():
  result = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES, "-k", SUBSET])
  assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
