#!/usr/bin/env python3
"""msjax on one host with several GPUs: one process drives every GPU it is given.

    python launch/gpu.py setup                                    # jax[cuda12] + msjax
    python launch/gpu.py train --config configs/sop.py --workdir runs/sop --gpus 0,1,2,3 \\
        -- --config.data.root=/data/Stanford_Online_Products --config.model.dtype=bfloat16
    python launch/gpu.py logs --workdir runs/sop
    python launch/gpu.py stop                                     # checkpoint and exit

Run it on the GPU host, or from elsewhere with ``--host user@gpu-host`` (over ssh; ``setup``
then copies this checkout's HEAD there first). Every subcommand takes ``--dry-run``: it
prints each command it would run (``+ ...``) and runs none.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (REPO, LaunchError, Runner, background, check_overrides,  # noqa: E402
                     run_cli, train_command)

REMOTE_DIR = '"$HOME"/msjax'
ARCHIVE = "msjax-src.tar.gz"
LOG_NAME = "msjax-train.log"


def _code_dir(a) -> str:
  return REMOTE_DIR if a.host else shlex.quote(a.source)


def _python(a) -> str:
  return f"{REMOTE_DIR}/.venv/bin/python" if a.host else shlex.quote(a.python)


def _shell(a, r: Runner, script: str) -> None:
  """Runs a shell script here, or on ``--host`` over ssh."""
  if a.host:
    r.run(["ssh", a.host, script])
  else:
    r.run(["bash", "-c", script])


def _local_workdir(a) -> str | None:
  """The workdir when it is a filesystem path (absolute, if on this machine)."""
  if not a.workdir or "://" in a.workdir:
    return None
  return a.workdir if a.host else os.path.abspath(a.workdir)


def _log(a) -> str:
  """The training log: in the workdir when it is a filesystem path, else in the checkout."""
  workdir = _local_workdir(a)
  if workdir:
    return shlex.quote(os.path.join(workdir, LOG_NAME))
  return f"{_code_dir(a)}/{LOG_NAME}"


def setup(a, r: Runner) -> None:
  """Installs msjax with the CUDA build of JAX (on ``--host``: copies this checkout's HEAD
  there and installs into a virtual environment in it)."""
  jax = f"jax[cuda{a.cuda}]" + (f"=={a.jax_version}" if a.jax_version else "")
  if a.host:
    archive = os.path.join(a.tmp_dir, ARCHIVE)
    r.run(["git", "-C", a.source, "archive", "--format=tar.gz", f"--output={archive}",
           "HEAD"])
    r.run(["scp", archive, f"{a.host}:{ARCHIVE}"])
    script = " && ".join([
        "set -e", f"mkdir -p {REMOTE_DIR}", f"tar -xzf \"$HOME\"/{ARCHIVE} -C {REMOTE_DIR}",
        "python3 -m pip install --user --quiet --upgrade uv",
        f"python3 -m uv venv --quiet --allow-existing --python 3.11 {REMOTE_DIR}/.venv",
        f"python3 -m uv pip install --quiet --python {_python(a)} -e \"$HOME/msjax[plot]\" "
        f"{shlex.quote(jax)}"])
  else:
    script = (f"cd {_code_dir(a)} && {_python(a)} -m pip install -e '.[plot]' "
              f"{shlex.quote(jax)}")
  _shell(a, r, script + f" && {_python(a)} -c 'import jax; print(jax.devices())'")


def train(a, r: Runner) -> None:
  """``python -m msjax.main`` on the host's GPUs (``--gpus``: which ones; default all)."""
  overrides = check_overrides(a.overrides)
  if not a.host and not os.path.isfile(os.path.join(a.source, a.config)):
    raise LaunchError(f"--config={a.config} is not a file of {a.source}; pass a path "
                      "relative to the msjax checkout, e.g. configs/sop.py.")
  env = {"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
         # JAX takes 75% of each GPU by default; the step needs what it can get.
         "XLA_PYTHON_CLIENT_MEM_FRACTION": str(a.mem_fraction)}
  if a.gpus:
    if not all(g.strip().isdigit() for g in a.gpus.split(",")):
      raise LaunchError(f"--gpus={a.gpus}: give GPU indices like 0,1,2,3.")
    env["CUDA_VISIBLE_DEVICES"] = a.gpus
  workdir = _local_workdir(a) or a.workdir
  command = train_command(python=_python(a), config=a.config, workdir=workdir,
                          overrides=overrides, mode=a.mode)
  command = "env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + command
  prepare = f"cd {_code_dir(a)}"
  if _local_workdir(a):
    prepare = f"mkdir -p {shlex.quote(workdir)} && {prepare}"
  if a.foreground:
    _shell(a, r, f"{prepare} && exec {command}")
  else:
    _shell(a, r, f"{prepare} && " + background(command, _log(a)))
    r.note(f"follow it with: python launch/gpu.py logs --workdir={a.workdir}"
           + (f" --host={a.host}" if a.host else ""))


def logs(a, r: Runner) -> None:
  """Follows the training log of ``--workdir``'s run."""
  _shell(a, r, f"tail -n {a.lines}{' -f' if a.follow else ''} {_log(a)}")


def stop(a, r: Runner) -> None:
  """SIGTERM: msjax checkpoints and exits; `train` with the same workdir resumes."""
  _shell(a, r, "pkill -TERM -f 'msjax.main' || echo 'no msjax process running'")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python launch/gpu.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)

  def command(name, fn):
    s = sub.add_parser(name, help=fn.__doc__.split("\n")[0])
    s.set_defaults(fn=fn, workdir=None)
    s.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    s.add_argument("--host", default=None, help="user@host to run on over ssh")
    s.add_argument("--source", default=REPO, help="the msjax checkout (here)")
    s.add_argument("--python", default=sys.executable, help="Python here (not --host)")
    s.add_argument("--tmp-dir", default="/tmp")
    return s

  s = command("setup", setup)
  s.add_argument("--cuda", choices=("12", "13"), default="12")
  s.add_argument("--jax-version", default=None)

  s = command("train", train)
  s.add_argument("--config", required=True)
  s.add_argument("--workdir", required=True, help="a local path or gs://")
  s.add_argument("--mode", choices=("train", "eval"), default="train")
  s.add_argument("--gpus", default=None, help="e.g. 0,1,2,3 (default: every GPU)")
  s.add_argument("--mem-fraction", type=float, default=0.9)
  s.add_argument("--foreground", action="store_true", help="stay attached instead of nohup")
  s.add_argument("overrides", nargs="*", help="after --: flags for python -m msjax.main")

  s = command("logs", logs)
  s.add_argument("--workdir", required=True)
  s.add_argument("--lines", type=int, default=100)
  s.add_argument("--follow", action=argparse.BooleanOptionalAction, default=True)

  command("stop", stop)
  return p


def main(argv=None) -> int:
  return run_cli(parser(), argv)


if __name__ == "__main__":
  sys.exit(main())
