#!/usr/bin/env python3
"""msjax on a Cloud TPU VM or slice, in a few commands (run from your machine, with gcloud).

    python launch/tpu.py create --name ms-v4 --zone us-central2-b --accelerator-type v4-8 --spot
    python launch/tpu.py setup  --name ms-v4 --zone us-central2-b
    python launch/tpu.py stage  --name ms-v4 --zone us-central2-b \\
        --src gs://my-bucket/data/InShop --dst /home/msjax-data/InShop
    python launch/tpu.py train  --name ms-v4 --zone us-central2-b --config configs/inshop.py \\
        --workdir gs://my-bucket/runs/inshop -- --config.data.root=/home/msjax-data/InShop
    python launch/tpu.py logs   --name ms-v4 --zone us-central2-b
    python launch/tpu.py stop   --name ms-v4 --zone us-central2-b    # checkpoint and exit
    python launch/tpu.py delete --name ms-v4 --zone us-central2-b --yes

Every subcommand takes ``--dry-run``: it prints each command it would run (``+ ...``) and
runs none. ``train --local-processes N`` runs the workers' command as N processes on this
machine instead (CPU), the way a slice's hosts run it; see docs/launching.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (REPO, LaunchError, Runner, background, check_overrides,  # noqa: E402
                     run_cli, train_command)

CODE_DIR = '"$HOME"/msjax'        # the checkout on every worker
VENV = '"$HOME"/msjax-venv'       # its Python (TPU images ship 3.10; msjax needs 3.11+)
PYTHON = f"{VENV}/bin/python"
LOG = '"$HOME"/msjax-train.log'
ARCHIVE = "msjax-src.tar.gz"
# v4 and v5p; v5e takes v2-alpha-tpuv5-lite and v6e v2-alpha-tpuv6e (--runtime-version).
DEFAULT_RUNTIME = "tpu-ubuntu2204-base"
POLL_SECONDS = 30


def _where(a) -> list[str]:
  flags = [f"--zone={a.zone}"]
  if a.project:
    flags.append(f"--project={a.project}")
  return flags


def _qr_name(a) -> str:
  return a.queued_resource or f"{a.name}-qr"


def _ssh(a, command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", a.name, *_where(a),
          f"--worker={worker}", f"--command={command}"]


def hosts_of(accelerator_type: str) -> int | None:
  """Hosts (TPU VM workers) of a v2/v3/v4/v5p accelerator type, whose number counts
  TensorCores, 8 a host; None for the others, whose hosts differ by size."""
  m = re.fullmatch(r"(v2|v3|v4|v5p)-(\d+)", accelerator_type)
  return max(1, int(m.group(2)) // 8) if m else None


# ---------------------------------------------------------------------------- subcommands


def create(a, r: Runner) -> None:
  """A TPU VM or slice, through a queued resource (the default) or directly."""
  if a.spot and a.reserved:
    raise LaunchError("--spot and --reserved exclude each other: spot capacity is "
                      "preemptible, reserved capacity comes from your reservation.")
  hosts = hosts_of(a.accelerator_type)
  r.note(f"{a.accelerator_type}: {hosts or 'an unknown number of'} host(s); billing starts "
         "when the VM is up and stops only at `delete`.")
  if a.queued:
    argv = ["gcloud", "compute", "tpus", "queued-resources", "create", _qr_name(a),
            f"--node-id={a.name}", *_where(a), f"--accelerator-type={a.accelerator_type}",
            f"--runtime-version={a.runtime_version}"]
    if a.spot:
      argv.append("--spot")
    if a.reserved:
      argv.append("--reserved")
    if a.valid_until:
      argv.append(f"--valid-until-duration={a.valid_until}")
    r.run(argv)
    describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", _qr_name(a),
                *_where(a), "--format=value(state.state)"]
    r.note(f"waiting for the queued resource to become ACTIVE (polled every "
           f"{POLL_SECONDS} s)")
    while True:
      state = r.run(describe, capture=True).strip()
      if r.dry_run or state == "ACTIVE":
        break
      if state in ("FAILED", "SUSPENDED"):
        raise LaunchError(f"queued resource {_qr_name(a)} is {state}; see `gcloud compute "
                          f"tpus queued-resources describe {_qr_name(a)} --zone={a.zone}`, "
                          "then `delete` it and try another zone or --spot.")
      print(f"  {state or 'not listed yet'} ...", flush=True)
      time.sleep(POLL_SECONDS)
  else:
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "create", a.name, *_where(a),
            f"--accelerator-type={a.accelerator_type}", f"--version={a.runtime_version}"]
    if a.spot:
      argv.append("--spot")
    if a.reserved:
      argv.append("--reserved")
    r.run(argv)


def setup(a, r: Runner) -> None:
  """Copies this checkout (its committed HEAD) to every worker and installs msjax with the
  TPU build of JAX into a Python 3.11 virtual environment there."""
  archive = os.path.join(a.tmp_dir, ARCHIVE)
  if not a.dry_run and subprocess.run(["git", "-C", a.source, "status", "--porcelain"],
                                      capture_output=True, text=True).stdout.strip():
    r.note(f"{a.source} has uncommitted changes; only the committed HEAD is copied.")
  r.run(["git", "-C", a.source, "archive", "--format=tar.gz", f"--output={archive}", "HEAD"])
  r.run(["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{a.name}:{ARCHIVE}",
         *_where(a), "--worker=all"])
  jax = f"jax[tpu]=={a.jax_version}" if a.jax_version else "jax[tpu]"
  script = " && ".join([
      "set -e",
      f"rm -rf {CODE_DIR}", f"mkdir -p {CODE_DIR}",
      f"tar -xzf \"$HOME\"/{ARCHIVE} -C {CODE_DIR}",
      "python3 -m pip install --user --quiet --upgrade uv",
      f"python3 -m uv venv --quiet --allow-existing --python 3.11 {VENV}",
      f"python3 -m uv pip install --quiet --python {PYTHON} -e \"$HOME/msjax[plot]\" "
      f"{shlex.quote(jax)}",
      f"{PYTHON} -c 'import jax; print(jax.process_index(), jax.device_count(), "
      "jax.devices()[0].device_kind)'",
  ])
  r.run(_ssh(a, script))


def stage(a, r: Runner) -> None:
  """Data for training: uploaded to GCS (``--upload``), then copied from GCS to the same
  path on every worker's disk (``--dst``); a TFDS data_dir can also stay on GCS."""
  if a.upload:
    if not a.src.startswith("gs://"):
      raise LaunchError("--upload copies a local folder to --src, which must be gs://...")
    r.run(["gcloud", "storage", "cp", "--recursive", a.upload.rstrip("/") + "/*",
           a.src.rstrip("/") + "/"])
  if not a.dst:
    r.note(f"no --dst: the data stays on GCS; point the run at it with "
           f"-- --config.data.format=tfds --config.data.root={a.src} (TFDS data_dir)")
    return
  if not a.dst.startswith("/"):
    raise LaunchError(f"--dst={a.dst} must be an absolute path on the workers.")
  dst = shlex.quote(a.dst)
  r.run(_ssh(a, f"set -e && mkdir -p {dst} && gcloud storage rsync --recursive "
                f"{shlex.quote(a.src)} {dst} && du -sh {dst}"))
  r.note(f"train with: -- --config.data.root={a.dst}")


def train(a, r: Runner) -> None:
  """``python -m msjax.main`` with the same config on every worker, in the background."""
  overrides = check_overrides(a.overrides)
  if not os.path.isfile(os.path.join(a.source, a.config)):
    raise LaunchError(f"--config={a.config} is not a file of {a.source}; pass a path "
                      "relative to the msjax checkout, e.g. configs/inshop.py.")
  if a.local_processes:
    return _train_locally(a, r, overrides)
  if not (a.name and a.zone):
    raise LaunchError("train needs --name and --zone of the TPU VM (or --local-processes N "
                      "to run the workers' command on this machine).")
  if not a.workdir.startswith("gs://"):
    raise LaunchError(
        f"--workdir={a.workdir} is not on GCS. Every host of a slice must reach the same "
        "workdir, and a TPU VM's disk is lost at `delete`; use gs://BUCKET/runs/NAME "
        "(a bucket in the TPU's region).")
  command = train_command(python=PYTHON, config=a.config, workdir=a.workdir,
                          overrides=overrides, mode=a.mode)
  env = "PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2"
  r.run(_ssh(a, f"cd {CODE_DIR} && " + background(f"env {env} {command}", LOG)))
  r.note(f"follow it with: python launch/tpu.py logs --name={a.name} --zone={a.zone}; "
         f"metrics and checkpoints go to {a.workdir}")


def _train_locally(a, r: Runner, overrides: list[str]) -> None:
  """The workers' command as ``a.local_processes`` CPU processes of this machine, joined
  through ``MSJAX_COORDINATOR_ADDRESS`` where a slice's hosts find each other by themselves."""
  n = a.local_processes
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  command = train_command(python=shlex.quote(sys.executable), config=a.config,
                          workdir=a.workdir, overrides=overrides, mode=a.mode)
  procs = []
  for i in range(n):
    env = {"MSJAX_COORDINATOR_ADDRESS": f"localhost:{port}", "MSJAX_NUM_PROCESSES": str(n),
           "MSJAX_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu"}
    argv = ["bash", "-c", f"cd {shlex.quote(a.source)} && {command}"]
    line = " ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(argv)
    print(f"+ {line}", flush=True)
    if not r.dry_run:
      log = open(os.path.join(a.tmp_dir, f"msjax-process-{i}.log"), "w")
      procs.append((subprocess.Popen(argv, env={**os.environ, **env}, stdout=log,
                                     stderr=subprocess.STDOUT), log))
  failed = []
  try:
    while procs and any(p.poll() is None for p, _ in procs):
      failed = [i for i, (p, _) in enumerate(procs) if p.poll()]
      if failed:  # the others would wait for it in their next collective
        break
      time.sleep(0.5)
  finally:  # a failure, Ctrl-C or SIGTERM of the launcher: no orphaned process
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, log) in enumerate(procs):
    log.close()
    if p.wait() and i not in failed:
      failed.append(i)
  if failed:
    raise LaunchError(f"local process(es) {failed} failed; see "
                      f"{os.path.join(a.tmp_dir, 'msjax-process-<i>.log')}.")
  if procs:
    print(f"{n} local processes finished; logs in {a.tmp_dir}/msjax-process-*.log")


def logs(a, r: Runner) -> None:
  """Follows worker ``--worker``'s training log (0 logs the progress and metrics)."""
  follow = " -f" if a.follow else ""
  r.run(_ssh(a, f"tail -n {a.lines}{follow} {LOG}", worker=a.worker))


def stop(a, r: Runner) -> None:
  """SIGTERM on every worker: msjax checkpoints at a step all hosts agree on and exits;
  `train` with the same workdir resumes from there."""
  r.run(_ssh(a, "pkill -TERM -f 'msjax.main' || echo \"no msjax process on $(hostname)\""))


def delete(a, r: Runner) -> None:
  """Deletes the VM (and its queued resource): its disks go with it."""
  if not (a.yes or a.dry_run):
    raise LaunchError(
        f"delete removes {a.name} and its disks: the code, any staged data and anything "
        "written outside gs://. Checkpoints and logs in a gs:// workdir are kept. Rerun "
        "with --yes to delete.")
  if a.queued:
    r.run(["gcloud", "compute", "tpus", "queued-resources", "delete", _qr_name(a),
           *_where(a), "--force", "--quiet"])
  else:
    r.run(["gcloud", "compute", "tpus", "tpu-vm", "delete", a.name, *_where(a), "--quiet"])


# ---------------------------------------------------------------------------- arguments


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python launch/tpu.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)

  def command(name, fn, *, vm_required=True):
    s = sub.add_parser(name, help=fn.__doc__.split("\n")[0])
    s.set_defaults(fn=fn)
    s.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    s.add_argument("--tmp-dir", default="/tmp", help="local scratch (archive, local logs)")
    s.add_argument("--name", required=vm_required, help="the TPU VM (node) name")
    s.add_argument("--zone", required=vm_required, help="e.g. us-central2-b (v4)")
    s.add_argument("--project", default=None, help="default: gcloud's configured project")
    return s

  def queued_flags(s):
    s.add_argument("--queued", action=argparse.BooleanOptionalAction, default=True,
                   help="through a queued resource (default) or a direct create")
    s.add_argument("--queued-resource", default=None, help="default: NAME-qr")

  s = command("create", create)
  s.add_argument("--accelerator-type", required=True, help="v4-8, v4-32, v5p-8, ...")
  s.add_argument("--runtime-version", default=DEFAULT_RUNTIME)
  s.add_argument("--spot", action="store_true", help="preemptible, much cheaper")
  s.add_argument("--reserved", action="store_true", help="from your reservation")
  s.add_argument("--valid-until", default=None,
                 help="give up a queued request after this long, e.g. 6h")
  queued_flags(s)

  s = command("setup", setup)
  s.add_argument("--source", default=REPO, help="the msjax checkout to copy (its HEAD)")
  s.add_argument("--jax-version", default=None, help="pin jax[tpu], e.g. 0.10.2")

  s = command("stage", stage)
  s.add_argument("--src", required=True, help="gs:// folder holding the dataset")
  s.add_argument("--dst", default=None, help="absolute path on every worker's disk")
  s.add_argument("--upload", default=None, help="a local folder to upload to --src first")

  s = command("train", train, vm_required=False)
  s.add_argument("--config", required=True, help="configs/<dataset>.py, relative to msjax")
  s.add_argument("--workdir", required=True, help="gs://BUCKET/runs/NAME")
  s.add_argument("--mode", choices=("train", "eval"), default="train")
  s.add_argument("--local-processes", type=int, default=0,
                 help="run the workers' command as N CPU processes here instead")
  s.add_argument("--source", default=REPO, help="with --local-processes: the checkout")
  s.add_argument("overrides", nargs="*", help="after --: flags for python -m msjax.main")

  s = command("logs", logs)
  s.add_argument("--worker", default="0", help="0 (progress and metrics), or another")
  s.add_argument("--lines", type=int, default=100)
  s.add_argument("--follow", action=argparse.BooleanOptionalAction, default=True)

  command("stop", stop)

  s = command("delete", delete)
  s.add_argument("--yes", action="store_true", help="really delete")
  queued_flags(s)
  return p


def main(argv=None) -> int:
  return run_cli(parser(), argv)


if __name__ == "__main__":
  sys.exit(main())
