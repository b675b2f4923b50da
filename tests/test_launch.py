"""The launchers: every subcommand's exact commands in --dry-run (which runs nothing), the
shell they send to workers passes shellcheck, mistakes are refused, and the workers'
command itself trains the synthetic config as two processes with a gs:// workdir."""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest


REPO = pathlib.Path(__file__).parents[1]
TPU = ["launch/tpu.py"]
GPU = ["launch/gpu.py"]
VM = ["--name=ms-v4", "--zone=us-central2-b"]
SSH = "gcloud compute tpus tpu-vm ssh ms-v4 --zone=us-central2-b"


@pytest.fixture
def no_tools(tmp_path):
  """A PATH whose gcloud, ssh, scp and git only record that they were called."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  called = tmp_path / "called"
  for tool in ("gcloud", "ssh", "scp", "git"):
    (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {called}\nexit 1\n")
    (bin_dir / tool).chmod(0o755)
  yield {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
  assert not called.exists(), f"--dry-run ran: {called.read_text()}"


def launch(script, *args, env=None, check=True, timeout=120):
  """Runs a launcher; on a timeout, SIGTERM lets it stop the processes it started."""
  proc = subprocess.Popen([sys.executable, *script, *args], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={**os.environ, **(env or {})})
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.terminate()
    stdout, stderr = proc.communicate(timeout=30)
    raise AssertionError(f"{script} {args} timed out:\n{stdout[-2000:]}\n{stderr[-2000:]}")
  out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
  if check:
    assert out.returncode == 0, out.stderr
  return out


def commands(out) -> list[str]:
  return [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]


def remote_script(command: str) -> str:
  """The shell script a printed command hands to workers (ssh, gcloud ssh, bash -c)."""
  argv = shlex.split(command)
  for arg in argv:
    if arg.startswith("--command="):
      return arg[len("--command="):]
  if argv[0] in ("ssh", "bash"):
    return argv[-1]
  raise AssertionError(f"no script in {command}")


def shellcheck(script: str) -> None:
  out = subprocess.run(["shellcheck", "--shell=bash", "-"], input=script, text=True,
                       capture_output=True, check=False)
  assert out.returncode == 0, out.stdout


# ---------------------------------------------------------------------------- TPU VMs


def test_tpu_create_queued_spot(no_tools):
  out = launch(TPU, "create", *VM, "--accelerator-type=v4-32", "--spot", "--valid-until=6h",
               "--dry-run", env=no_tools)
  assert commands(out) == [
      "gcloud compute tpus queued-resources create ms-v4-qr --node-id=ms-v4 "
      "--zone=us-central2-b --accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base "
      "--spot --valid-until-duration=6h",
      "gcloud compute tpus queued-resources describe ms-v4-qr --zone=us-central2-b "
      "'--format=value(state.state)'"]
  assert "v4-32: 4 host(s)" in out.stdout


def test_tpu_create_direct_reserved_in_a_project(no_tools):
  out = launch(TPU, "create", *VM, "--project=my-proj", "--accelerator-type=v4-8",
               "--reserved", "--no-queued", "--runtime-version=v2-alpha-tpuv4", "--dry-run",
               env=no_tools)
  assert commands(out) == [
      "gcloud compute tpus tpu-vm create ms-v4 --zone=us-central2-b --project=my-proj "
      "--accelerator-type=v4-8 --version=v2-alpha-tpuv4 --reserved"]
  assert "v4-8: 1 host(s)" in out.stdout


def test_tpu_setup_installs_the_checkout_with_tpu_jax_on_every_worker(no_tools):
  out = launch(TPU, "setup", *VM, "--jax-version=0.10.2", "--tmp-dir=/scratch", "--dry-run",
               env=no_tools)
  archive, copy, install = commands(out)
  assert archive == f"git -C {REPO} archive --format=tar.gz " \
                    "--output=/scratch/msjax-src.tar.gz HEAD"
  assert copy == ("gcloud compute tpus tpu-vm scp /scratch/msjax-src.tar.gz "
                  "ms-v4:msjax-src.tar.gz --zone=us-central2-b --worker=all")
  assert install.startswith(f"{SSH} --worker=all '--command=")
  script = remote_script(install)
  assert script == (
      'set -e && rm -rf "$HOME"/msjax && mkdir -p "$HOME"/msjax && '
      'tar -xzf "$HOME"/msjax-src.tar.gz -C "$HOME"/msjax && '
      "python3 -m pip install --user --quiet --upgrade uv && "
      'python3 -m uv venv --quiet --allow-existing --python 3.11 "$HOME"/msjax-venv && '
      'python3 -m uv pip install --quiet --python "$HOME"/msjax-venv/bin/python '
      "-e \"$HOME/msjax[plot]\" 'jax[tpu]==0.10.2' && "
      '"$HOME"/msjax-venv/bin/python -c \'import jax; print(jax.process_index(), '
      "jax.device_count(), jax.devices()[0].device_kind)'")
  shellcheck(script)


def test_tpu_stage_uploads_then_copies_to_every_worker(no_tools):
  out = launch(TPU, "stage", *VM, "--upload=/data/InShop", "--src=gs://b/data/InShop",
               "--dst=/home/msjax-data/InShop", "--dry-run", env=no_tools)
  upload, copy = commands(out)
  assert upload == "gcloud storage cp --recursive '/data/InShop/*' gs://b/data/InShop/"
  assert copy == (f"{SSH} --worker=all '--command=set -e && mkdir -p /home/msjax-data/InShop "
                  "&& gcloud storage rsync --recursive gs://b/data/InShop "
                  "/home/msjax-data/InShop && du -sh /home/msjax-data/InShop'")
  shellcheck(remote_script(copy))
  assert "--config.data.root=/home/msjax-data/InShop" in out.stdout


def test_tpu_stage_can_leave_a_tfds_data_dir_on_gcs(no_tools):
  out = launch(TPU, "stage", *VM, "--src=gs://b/tfds", "--dry-run", env=no_tools)
  assert commands(out) == []
  assert "--config.data.format=tfds --config.data.root=gs://b/tfds" in out.stdout


def test_tpu_train_runs_one_command_on_every_worker(no_tools):
  out = launch(TPU, "train", *VM, "--config=configs/inshop.py",
               "--workdir=gs://b/runs/inshop", "--dry-run", "--",
               "--config.data.root=/home/msjax-data/InShop", "--config.train.num_steps=100",
               env=no_tools)
  (command,) = commands(out)  # one ssh, to --worker=all: the same config everywhere
  assert command.startswith(f"{SSH} --worker=all '--command=")
  script = remote_script(command)
  assert script == (
      'cd "$HOME"/msjax && nohup env PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 '
      '"$HOME"/msjax-venv/bin/python -m msjax.main --config=configs/inshop.py '
      "--workdir=gs://b/runs/inshop --config.data.root=/home/msjax-data/InShop "
      '--config.train.num_steps=100 >> "$HOME"/msjax-train.log 2>&1 < /dev/null & '
      'echo "msjax started on $(hostname) (pid $!), log: $HOME/msjax-train.log"')
  assert "coordinator" not in script  # the slice's hosts find each other by themselves
  shellcheck(script)


def test_tpu_logs_stop_delete(no_tools):
  logs = commands(launch(TPU, "logs", *VM, "--dry-run", env=no_tools))
  assert logs == [f"{SSH} --worker=0 '--command=tail -n 100 -f \"$HOME\"/msjax-train.log'"]
  stop = commands(launch(TPU, "stop", *VM, "--dry-run", env=no_tools))
  assert stop == [f"{SSH} --worker=all '--command=pkill -TERM -f '\"'\"'msjax.main'\"'\"' || "
                  "echo \"no msjax process on $(hostname)\"'"]
  for line in logs + stop:
    shellcheck(remote_script(line))
  delete = commands(launch(TPU, "delete", *VM, "--dry-run", env=no_tools))
  assert delete == ["gcloud compute tpus queued-resources delete ms-v4-qr "
                    "--zone=us-central2-b --force --quiet"]
  delete = commands(launch(TPU, "delete", *VM, "--no-queued", "--dry-run", env=no_tools))
  assert delete == ["gcloud compute tpus tpu-vm delete ms-v4 --zone=us-central2-b --quiet"]


@pytest.mark.parametrize("args, message", [
    (["train", *VM, "--config=configs/inshop.py", "--workdir=/home/me/runs/x"],
     "is not on GCS"),
    (["train", *VM, "--config=configs/nope.py", "--workdir=gs://b/x"],
     "--config=configs/nope.py is not a file"),
    (["train", *VM, "--config=configs/inshop.py", "--workdir=gs://b/x", "--", "--dry-run"],
     "put it before `--`"),
    (["train", *VM, "--config=configs/inshop.py", "--workdir=gs://b/x", "--", "data.root=/d"],
     "pass config overrides as --config.FIELD=VALUE"),
    (["train", "--config=configs/inshop.py", "--workdir=gs://b/x"], "needs --name and --zone"),
    (["create", *VM, "--accelerator-type=v4-8", "--spot", "--reserved"], "exclude each other"),
    (["delete", *VM], "Rerun with --yes"),
    (["stage", *VM, "--src=gs://b/d", "--dst=data/d"], "must be an absolute path"),
])
def test_tpu_mistakes_are_refused_before_anything_runs(no_tools, args, message):
  out = launch(TPU, *args, env=no_tools, check=False)
  assert out.returncode == 2 and message in out.stderr, out.stderr
  assert commands(out) == []


# ---------------------------------------------------------------------------- GPU hosts


def test_gpu_train_here_and_over_ssh(no_tools, tmp_path):
  out = launch(GPU, "train", "--config=configs/sop.py", f"--workdir={tmp_path}/sop",
               "--gpus=0,1,2,3", "--dry-run", "--", "--config.model.dtype=bfloat16",
               env=no_tools)
  (command,) = commands(out)
  py = shlex.quote(sys.executable)
  script = remote_script(command)
  assert script == (
      f"mkdir -p {tmp_path}/sop && cd {REPO} && nohup env PYTHONUNBUFFERED=1 "
      "TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 CUDA_VISIBLE_DEVICES=0,1,2,3 "
      f"{py} -m msjax.main --config=configs/sop.py --workdir={tmp_path}/sop "
      f"--config.model.dtype=bfloat16 >> {tmp_path}/sop/msjax-train.log 2>&1 < /dev/null & "
      f'echo "msjax started on $(hostname) (pid $!), log: {tmp_path}/sop/msjax-train.log"')
  shellcheck(script)
  out = launch(GPU, "train", "--config=configs/sop.py", "--workdir=gs://b/runs/sop",
               "--host=me@gpu-box", "--foreground", "--dry-run", env=no_tools)
  (command,) = commands(out)
  assert shlex.split(command)[:2] == ["ssh", "me@gpu-box"]
  script = remote_script(command)
  assert script == (
      'cd "$HOME"/msjax && exec env PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 '
      'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 "$HOME"/msjax/.venv/bin/python -m msjax.main '
      "--config=configs/sop.py --workdir=gs://b/runs/sop")
  shellcheck(script)


def test_gpu_setup_logs_stop(no_tools):
  here = commands(launch(GPU, "setup", "--cuda=13", "--dry-run", env=no_tools))
  py = shlex.quote(sys.executable)
  assert [remote_script(c) for c in here] == [
      f"cd {REPO} && {py} -m pip install -e '.[plot]' 'jax[cuda13]' && "
      f"{py} -c 'import jax; print(jax.devices())'"]
  remote = commands(launch(GPU, "setup", "--host=me@gpu-box", "--tmp-dir=/scratch",
                           "--dry-run", env=no_tools))
  assert remote[:2] == [
      f"git -C {REPO} archive --format=tar.gz --output=/scratch/msjax-src.tar.gz HEAD",
      "scp /scratch/msjax-src.tar.gz me@gpu-box:msjax-src.tar.gz"]
  assert "'jax[cuda12]'" in remote[2]
  logs = commands(launch(GPU, "logs", "--workdir=/runs/sop", "--dry-run", env=no_tools))
  assert logs == ["bash -c 'tail -n 100 -f /runs/sop/msjax-train.log'"]
  stop = commands(launch(GPU, "stop", "--host=me@gpu-box", "--dry-run", env=no_tools))
  assert stop == ["ssh me@gpu-box 'pkill -TERM -f '\"'\"'msjax.main'\"'\"' || "
                  "echo '\"'\"'no msjax process running'\"'\"''"]
  for line in here + remote[2:] + logs + stop:
    shellcheck(remote_script(line))
  out = launch(GPU, "train", "--config=configs/sop.py", "--workdir=/r", "--gpus=a,b",
               "--dry-run", env=no_tools, check=False)
  assert out.returncode == 2 and "give GPU indices" in out.stderr


# ---------------------------------------------------------------------------- start-up


@pytest.fixture
def recorded_initialize(monkeypatch):
  import jax
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a: calls.append(a))
  monkeypatch.setattr(jax.config, "update", lambda *a: None)
  for key in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
              "MSJAX_COORDINATOR_ADDRESS", "MSJAX_NUM_PROCESSES", "MSJAX_PROCESS_ID"):
    monkeypatch.delenv(key, raising=False)
  return calls


def test_a_tpu_vm_joins_its_slice_without_flags(recorded_initialize, monkeypatch):
  from jax._src import hardware_utils

  from msjax import sharding
  sharding.initialize()
  assert recorded_initialize == []  # this machine: no TPU, one process
  monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id",
                      lambda: (4, hardware_utils.TpuVersion.v4))
  sharding.initialize()
  assert recorded_initialize == [()]  # jax.distributed reads the slice from the metadata


def test_the_launcher_environment_names_the_coordinator(recorded_initialize, monkeypatch):
  from msjax import sharding
  monkeypatch.setenv("MSJAX_COORDINATOR_ADDRESS", "10.0.0.2:1234")
  monkeypatch.setenv("MSJAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("MSJAX_PROCESS_ID", "3")
  sharding.initialize()
  assert recorded_initialize == [("10.0.0.2:1234", 4, 3)]
  monkeypatch.setenv("MSJAX_PROCESS_ID", "")
  with pytest.raises(ValueError, match="needs MSJAX_NUM_PROCESSES and MSJAX_PROCESS_ID"):
    sharding.initialize()


# ---------------------------------------------------------------------------- a real run


def test_two_processes_train_through_the_workers_command_on_gcs(fake_gcs, tmp_path):
  """``train --local-processes 2``: the command every TPU worker runs, as two CPU processes
  joined through the environment, with a gs:// workdir (orbax, TensorBoard, JSONL). The
  run stops at step 3 (as a preempted slice would) and the same command resumes it."""
  from etils import epath
  workdir = "gs://msjax-test/runs/two"
  args = ["train", "--config=configs/synthetic.py", f"--workdir={workdir}",
          "--local-processes=2", f"--tmp-dir={tmp_path}", "--",
          "--config.train.num_steps=6", "--config.train.log_every=2",
          "--config.train.checkpoint_every=0", "--config.train.eval_untrained=False",
          "--config.data.synthetic.num_test_classes=16"]
  env = {**fake_gcs, "PATH": os.environ["PATH"]}
  first = launch(TPU, *args, "--config.train.stop_at_step=3", env=env, check=False,
                 timeout=600)
  logs = {i: (tmp_path / f"msjax-process-{i}.log").read_text() for i in (0, 1)}
  assert first.returncode == 0, first.stderr + logs[0][-3000:] + logs[1][-3000:]
  assert "2 processes, 2 cpu devices" in logs[0]
  assert "Stopping at step 3" in logs[0]
  second = launch(TPU, *args, env=env, check=False, timeout=600)
  logs = {i: (tmp_path / f"msjax-process-{i}.log").read_text() for i in (0, 1)}
  assert second.returncode == 0, second.stderr + logs[0][-3000:] + logs[1][-3000:]
  assert "Resuming gs://msjax-test/runs/two at step 3" in logs[0]
  os.environ.update(fake_gcs)  # this process reads the bucket too
  try:
    root = epath.Path(workdir)
    final = json.loads((root / "final_metrics.json").read_text())
    assert final["step"] == 6 and final["num_queries"] == 16 * 32
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["3", "6"]
    logged = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    # One writer (process 0), each step once across the stop and the resume.
    assert [r["step"] for r in logged if "train/loss" in r] == [2, 4, 6]
    assert all("gpw/neg_mined_fraction" in r for r in logged if "train/loss" in r)
    # TensorBoard's reader, on the bucket itself: every JSONL tag and value, once a step.
    from test_metric_writers import assert_tensorboard_matches_jsonl
    acc = assert_tensorboard_matches_jsonl(workdir)
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in acc.Tensors("gpw/neg_sim")] == [2, 4, 6]
  finally:
    for k in fake_gcs:
      os.environ.pop(k, None)
