"""What a benchmark result was measured on: the CPU, the versions, the msjax commit."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def environment(**versions) -> dict:
  """CPU, core count, Python, date, the git commit and whether msjax/ had edits; plus
  ``versions`` (e.g. ``jax=jax.__version__``)."""
  info = dict(python=platform.python_version(), cpu_count=os.cpu_count(), **versions,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  with open("/proc/cpuinfo") as f:
    info["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")),
                       platform.processor())
  info["git_head"] = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"],
                                    capture_output=True, text=True).stdout.strip()
  dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "msjax"],
                         capture_output=True, text=True).stdout.strip()
  info["msjax_tree"] = "with uncommitted changes in msjax/" if dirty else "clean"
  return info


def write_results(name: str, payload, markdown: str, *, indent: int = 1,
                  out: str | None = None) -> tuple[str, str]:
  """``benchmarks/results/<name>.json`` (``payload``) and ``<name>.md`` (``markdown``), or,
  with ``out``, ``out`` with its extension replaced by ``.json`` and ``.md``; returns the
  two paths."""
  base = (os.path.splitext(out)[0] if out
          else os.path.join(REPO, "benchmarks", "results", name))
  os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
  with open(base + ".json", "w") as f:
    json.dump(payload, f, indent=indent)
  with open(base + ".md", "w") as f:
    f.write(markdown)
  return base + ".json", base + ".md"
