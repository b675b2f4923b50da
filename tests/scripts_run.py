"""Runs a check script from tests/scripts/ in its own Python process.

Virtual CPU devices (``jax_num_cpu_devices``) must be set before JAX starts, so the
multi-device checks run as separate processes that print one JSON line.
"""

import json
import pathlib
import subprocess
import sys

SCRIPTS = pathlib.Path(__file__).parent / "scripts"


def run_json_script(name, *args, timeout=900):
  out = subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True,
                       text=True, timeout=timeout, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout)
