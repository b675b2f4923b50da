"""Test-wide settings (float64 for exactness checks, bounded hypothesis runs) and shared
fixtures."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)

settings.register_profile(
    "msjax",
    deadline=None,
    max_examples=int(os.environ.get("MSJAX_HYPOTHESIS_EXAMPLES", "40")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("msjax")


@pytest.fixture
def fake_gcs():
  """A local gs:// (``tests/gcs_fake.py``, bucket ``msjax-test``): yields the environment
  that points gcsfs and TensorStore at it (set it before they are imported)."""
  import gcs_fake
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  script = pathlib.Path(__file__).parent / "gcs_fake.py"
  server = subprocess.Popen([sys.executable, str(script), str(port), "msjax-test"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    assert server.stdout.readline().strip() == "ready"
    yield gcs_fake.environment(port)
  finally:
    server.kill()
    server.wait()
