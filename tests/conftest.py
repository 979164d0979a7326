"""Shared test fixtures. Tests run on CPU; multi-device tests start their
own subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
