"""What the launchers share: running (or, with --dry-run, printing) commands, and the
command every worker runs to train."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LaunchError(RuntimeError):
  """A launcher precondition that does not hold; the message says how to fix it."""


class Runner:
  """Runs commands, or prints them when ``dry_run``: one shell-quoted line each, the
  exact argv that would run, prefixed with ``+ ``."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout

  def note(self, text: str) -> None:
    print(f"# {text}", file=self.out, flush=True)

  def run(self, argv: list[str], *, env: dict | None = None, check: bool = True,
          capture: bool = False) -> str:
    line = shlex.join(argv)
    if env:
      line = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + line
    print(f"+ {line}", file=self.out, flush=True)
    if self.dry_run:
      return ""
    full_env = {**os.environ, **(env or {})}
    done = subprocess.run(argv, env=full_env, check=False, text=True,
                          capture_output=capture)
    if check and done.returncode:
      detail = (done.stderr or "").strip()[-2000:] if capture else ""
      raise LaunchError(f"`{line}` exited with status {done.returncode}. {detail}")
    return done.stdout or ""


def train_command(*, python: str, config: str, workdir: str, overrides: list[str],
                  mode: str = "train") -> str:
  """The shell command a worker runs (from the msjax checkout): the same on every worker
  of a slice, with the same config; the processes find each other by themselves.
  ``python`` is a shell word (``$HOME/...`` expands on the worker); the rest is quoted."""
  argv = ["-m", "msjax.main", f"--config={config}", f"--workdir={workdir}"]
  if mode != "train":
    argv.append(f"--mode={mode}")
  return f"{python} {shlex.join([*argv, *overrides])}"


def background(command: str, log: str) -> str:
  """``command`` detached from the ssh session that starts it, its output appended to
  ``log`` (a shell word, e.g. ``"$HOME/msjax-train.log"``, expanded on the worker)."""
  shown = log.replace('"', "")
  return (f"nohup {command} >> {log} 2>&1 < /dev/null & "
          f"echo \"msjax started on $(hostname) (pid $!), log: {shown}\"")


def check_overrides(overrides: list[str]) -> list[str]:
  """The arguments after ``--`` are passed to ``msjax.main``; they must be flags."""
  for o in overrides:
    if o == "--dry-run":
      raise LaunchError("--dry-run after `--` would reach msjax.main, not the launcher; "
                        "put it before `--`.")
    if not o.startswith("--"):
      raise LaunchError(f"{o!r} after `--` is not a flag of python -m msjax.main; pass "
                        "config overrides as --config.FIELD=VALUE.")
  return overrides


def run_cli(parser, argv=None) -> int:
  """Parses ``argv`` and runs the chosen subcommand; a ``LaunchError`` exits 2 with its
  message, SIGTERM exits through the subcommand's cleanups."""
  args = parser.parse_args(argv)
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  try:
    args.fn(args, Runner(args.dry_run))
  except LaunchError as e:
    print(f"{parser.prog} {args.command}: {e}", file=sys.stderr)
    return 2
  return 0
