"""The table of quantization formats: scaled integers, scaled FP8, OCP Microscaling (MX), NVFP4.

Each :class:`Format` describes one element type (its bits, exponent and
fraction bits, range) and how its groups are scaled (``kind``). The
definitions of the scaling and rounding are in :mod:`jaxprune.quant`.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple


class Format(NamedTuple):
  """A quantization format.

  Attributes:
    name: its name in ``FORMATS``.
    kind: ``'int'`` (scaled integer), ``'fp'`` (scaled FP8), ``'mx'`` or ``'nvfp4'``.
    bits: storage bits per element, sign included (the MX and NVFP4 scales are not
      counted).
    ebits: exponent bits of the element (0 for integer elements).
    mbits: fraction bits of the element: explicit mantissa bits for floats, 6
      for mxint8's 1.6 fixed point, 0 for integers.
    emax: ``floor(log2(max_normal))``, the exponent of the largest normal.
    emin: exponent of the smallest normal (``2 - 2^(ebits-1)``); 0 for integers.
    max_normal: largest magnitude of the element (``2^(k-1) - 1`` for ``intk``).
  """

  name: str
  kind: str
  bits: int
  ebits: int
  mbits: int
  emax: int
  emin: int
  max_normal: float


def _float_element(name: str, kind: str, ebits: int, mbits: int, max_normal: float) -> Format:
  return Format(
    name, kind, 1 + ebits + mbits, ebits, mbits, math.floor(math.log2(max_normal)),
    2 - 2 ** (ebits - 1), max_normal)


_ALL = (
  *(Format(f"int{k}", "int", k, 0, 0, k - 2, 0, float(2 ** (k - 1) - 1)) for k in range(2, 9)),
  _float_element("fp8_e4m3", "fp", 4, 3, 448.0),
  _float_element("fp8_e5m2", "fp", 5, 2, 57344.0),
  _float_element("mxfp8_e4m3", "mx", 4, 3, 448.0),
  _float_element("mxfp8_e5m2", "mx", 5, 2, 57344.0),
  _float_element("mxfp6_e3m2", "mx", 3, 2, 28.0),
  _float_element("mxfp6_e2m3", "mx", 2, 3, 7.5),
  _float_element("mxfp4_e2m1", "mx", 2, 1, 6.0),
  Format("mxint8", "mx", 8, 0, 6, 0, 0, 127 / 64),
  _float_element("nvfp4", "nvfp4", 2, 1, 6.0),
)
_BY_NAME = {f.name: f for f in _ALL}
FORMATS: tuple[str, ...] = tuple(_BY_NAME)


def get_format(fmt: str | Format) -> Format:
  """The ``Format`` called ``fmt``; raises ``ValueError`` listing ``FORMATS`` if none is."""
  name = fmt.name if isinstance(fmt, Format) else fmt
  if not isinstance(name, str) or name not in _BY_NAME or (
      isinstance(fmt, Format) and fmt != _BY_NAME[name]):
    raise ValueError(f"Unknown format `fmt`={fmt!r}; valid names: {', '.join(FORMATS)}.")
  return _BY_NAME[name]


def int_format(bits: int) -> Format:
  """The symmetric scaled-integer format with ``bits`` bits, ``2 <= bits <= 8``."""
  if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 2 <= bits <= 8:
    raise ValueError(f"`bits` must be an integer in [2, 8], got {bits!r}.")
  return _BY_NAME[f"int{int(bits)}"]
