"""Shared pytest configuration: the backend every result below was computed on."""

from __future__ import annotations

import os


def pytest_report_header(config):
  import jax

  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  flags = os.environ.get("XLA_FLAGS", "")
  return [f"jax {jax.__version__}: backend {jax.default_backend()}, {len(devices)} device(s) "
          f"({', '.join(kinds)})" + (f"; XLA_FLAGS={flags}" if flags else "")]
