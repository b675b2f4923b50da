"""MetricWriter's JSONL and TensorBoard files, read back independently; Progress lines.

TensorBoard files are read by TensorBoard's own loader (no TensorFlow), which checks both
CRCs of every record and decodes the events, and its event accumulator, which applies
the session-start rule as the TensorBoard server does.
"""

import io
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from tensorboard.backend.event_processing import event_accumulator, event_file_loader
from tensorboard.compat.proto import event_pb2
from tensorboard.util import tensor_util

from msjax import metric_writers as mw


def event_files(workdir):
  return sorted((epath.Path(workdir) / mw.TENSORBOARD_DIR).glob("*tfevents*"))


def raw_events(path):
  """Every record of an event file, decoded by TensorBoard's own protobuf classes."""
  loader = event_file_loader.RawEventFileLoader(os.fspath(path))
  return [event_pb2.Event.FromString(record) for record in loader.Load()]


def accumulate(workdir):
  acc = event_accumulator.EventAccumulator(
      os.fspath(epath.Path(workdir) / mw.TENSORBOARD_DIR),
      size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0})
  acc.Reload()
  return acc


def assert_tensorboard_matches_jsonl(workdir):
  """TensorBoard's reader finds every scalar tag of ``metrics.jsonl`` with the same value
  (as float32) at the same steps, each step once, after ``drop_superseded``'s rule (last
  value per step and key); ``workdir`` may be a ``gs://`` path. Returns the accumulator."""
  expected: dict[str, dict[int, float]] = {}
  for record in mw.drop_superseded(mw.read_jsonl(epath.Path(workdir) / mw.JSONL_NAME)):
    for key, value in record.items():
      if key not in ("step", "time"):
        expected.setdefault(key, {})[record["step"]] = float(np.float32(value))
  acc = accumulate(workdir)
  assert sorted(acc.Tags()["scalars"]) == sorted(expected)
  for key, points in expected.items():
    events = acc.Scalars(key)
    assert [e.step for e in events] == sorted(points), key  # no step twice
    for e in events:
      assert same_float(e.value, points[e.step]), (key, e.step, e.value, points[e.step])
  return acc


def strict_loads(line):
  """json.loads that refuses the non-standard NaN/Infinity literals."""
  def refuse(name):
    raise ValueError(f"non-standard JSON constant {name}")
  return json.loads(line, parse_constant=refuse)


def same_float(a, b):
  return (math.isnan(a) and math.isnan(b)) or a == b


# ---------------------------------------------------------------------------------------
# JSONL.

MIXED = {
    "train/loss": 0.5321,
    "train/step_time": np.float32(0.125),
    "train/images": np.int64(12345),
    "train/flag": np.bool_(True),
    "gpw/w_pos_mean": jnp.float32(0.75),
    "gpw/count": jnp.int32(7),
    "eval/recall@1": 1,
    "x/nan": math.nan,
    "x/inf": np.float64(np.inf),
    "x/ninf": jnp.float32(-np.inf),
    "x/huge": 1e300,  # finite in JSON, beyond float32 in TensorBoard
}
EXPECTED_JSON = {
    "train/loss": 0.5321, "train/step_time": 0.125, "train/images": 12345,
    "train/flag": 1, "gpw/w_pos_mean": 0.75, "gpw/count": 7, "eval/recall@1": 1,
    "x/nan": math.nan, "x/inf": math.inf, "x/ninf": -math.inf, "x/huge": 1e300,
}


def test_jsonl_round_trip(tmp_path):
  with mw.MetricWriter(tmp_path, enabled=True) as w:
    w.write_scalars(0, MIXED)
    for step in range(10, 1000, 10):
      w.write_scalars(step, {"train/loss": 1.0 / step, "train/lr": 1e-5})
  path = tmp_path / mw.JSONL_NAME
  lines = path.read_text().splitlines()
  assert len(lines) == 100
  first = strict_loads(lines[0])  # every line is strict JSON
  assert first["x/nan"] == "NaN" and first["x/inf"] == "Infinity"
  assert first["x/ninf"] == "-Infinity"
  assert isinstance(first["train/images"], int) and isinstance(first["gpw/count"], int)
  for line in lines[1:]:
    strict_loads(line)

  records = mw.read_jsonl(path)
  assert list(records[0]) == ["step", "time"] + list(MIXED)
  assert records[0]["step"] == 0
  for key, value in EXPECTED_JSON.items():
    assert same_float(records[0][key], value), key
  assert [r["step"] for r in records[1:]] == list(range(10, 1000, 10))
  assert all(r["train/loss"] == 1.0 / r["step"] for r in records[1:])
  times = [r["time"] for r in records]
  assert times == sorted(times) and abs(times[0] - __import__("time").time()) < 60


def test_read_jsonl_tolerates_only_a_last_partial_line(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 1, "a": 2}\n\n{"step": 2, "a": 3}\n{"step": 3, "a"')
  assert mw.read_jsonl(path) == [{"step": 1, "a": 2}, {"step": 2, "a": 3}]
  path.write_text('{"step": 1, "a": 2}\n{"step": 2, "a"\n{"step": 3, "a": 4}\n')
  with pytest.raises(ValueError, match=":2:"):
    mw.read_jsonl(path)


def test_resumed_run_appends_and_superseded_lines_drop(tmp_path):
  # Run 1 logs steps 0..50 and dies; run 2 resumes from the checkpoint at step 30.
  with mw.MetricWriter(tmp_path, enabled=True) as w:
    w.write_text(0, "config", "run 1")
    for step in range(0, 60, 10):
      w.write_scalars(step, {"train/loss": float(step)})
    w.write_scalars(50, {"eval/recall@1": 0.5})
  with mw.MetricWriter(tmp_path, enabled=True) as w:
    w.write_text(30, "config", "run 2")
    w.flush()
    for step in range(30, 90, 10):
      w.write_scalars(step, {"train/loss": step + 0.5})
    w.write_scalars(80, {"eval/recall@1": 0.8})

  records = mw.read_jsonl(tmp_path / mw.JSONL_NAME)
  assert [r["step"] for r in records] == [0, 10, 20, 30, 40, 50, 50,
                                          30, 40, 50, 60, 70, 80, 80]  # nothing rewritten
  kept = mw.drop_superseded(records)
  assert [(r["step"], r.get("train/loss"), r.get("eval/recall@1")) for r in kept] == [
      (0, 0.0, None), (10, 10.0, None), (20, 20.0, None), (30, 30.5, None),
      (40, 40.5, None), (50, 50.5, None), (60, 60.5, None), (70, 70.5, None),
      (80, 80.5, None), (80, None, 0.8)]

  # One event file per writer; TensorBoard's loader drops the same points.
  assert len(event_files(tmp_path)) == 2
  acc = accumulate(tmp_path)
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == (
      [(0, 0.0), (10, 10.0), (20, 20.0)] + [(s, s + 0.5) for s in range(30, 90, 10)])
  assert [(e.step, e.value) for e in acc.Scalars("eval/recall@1")] == [
      (80, float(np.float32(0.8)))]
  # The resumed run's config, logged at its start step before any scalar, survives.
  assert [(e.step, tensor_util.make_ndarray(e.tensor_proto).item())
          for e in acc.Tensors("config")] == [(0, b"run 1"), (30, b"run 2")]


def test_drop_superseded_repeated_resumes():
  steps = [0, 1, 2, 3, 4, 2, 3, 1, 2, 3, 3, 5]
  records = [{"step": s, "i": i} for i, s in enumerate(steps)]
  assert [(r["step"], r["i"]) for r in mw.drop_superseded(records)] == [
      (0, 0), (1, 7), (2, 8), (3, 9), (3, 10), (5, 11)]


def test_partial_line_from_a_crash_is_cut_on_reopen(tmp_path):
  with mw.MetricWriter(tmp_path, enabled=True) as w:
    w.write_scalars(1, {"a": 1.0})
  path = tmp_path / mw.JSONL_NAME
  with open(path, "ab") as f:
    f.write(b'{"step": 2, "time": 17000')
  with mw.MetricWriter(tmp_path, enabled=True) as w:
    w.write_scalars(2, {"a": 2.0})
  for line in path.read_text().splitlines():
    strict_loads(line)
  assert [(r["step"], r["a"]) for r in mw.read_jsonl(path)] == [(1, 1.0), (2, 2.0)]


# ---------------------------------------------------------------------------------------
# TensorBoard.

def test_tensorboard_scalars_and_text(tmp_path):
  steps = list(range(0, 500, 5))
  with mw.MetricWriter(tmp_path, enabled=True) as w:
    w.write_text(0, "config", "# Config\n`lr = 1e-5` — ünïcode")
    w.write_scalars(0, MIXED)
    for step in steps[1:]:
      w.write_scalars(step, {"train/loss": 1.0 / step, "eval/recall@1": step / 1000})

  (path,) = event_files(tmp_path)
  events = raw_events(path)
  assert events[0].file_version == "brain.Event:2"
  assert events[1].session_log.status == event_pb2.SessionLog.START
  assert events[1].step == 0
  assert events[2].summary.value[0].tag == "config"  # held back until after the mark
  scalar_event = events[3]
  assert scalar_event.step == 0
  assert [v.tag for v in scalar_event.summary.value] == list(MIXED)
  json_time = mw.read_jsonl(tmp_path / mw.JSONL_NAME)[0]["time"]
  assert scalar_event.wall_time == json_time

  acc = accumulate(tmp_path)
  assert sorted(acc.Tags()["scalars"]) == sorted(MIXED)
  assert acc.Tags()["tensors"] == ["config"]
  expected = {k: float(np.float32(v)) for k, v in EXPECTED_JSON.items()
              if k != "x/huge"}
  expected["x/huge"] = math.inf  # a float32 cast overflows
  for key, value in expected.items():
    point = acc.Scalars(key)[0]
    assert point.step == 0 and same_float(point.value, value), key
  loss = acc.Scalars("train/loss")
  assert [e.step for e in loss] == steps
  assert [e.value for e in loss[1:]] == [float(np.float32(1.0 / s)) for s in steps[1:]]
  assert [e.value for e in acc.Scalars("eval/recall@1")[1:]] == [
      float(np.float32(s / 1000)) for s in steps[1:]]

  (text_event,) = acc.Tensors("config")
  assert tensor_util.make_ndarray(text_event.tensor_proto).item().decode() == (
      "# Config\n`lr = 1e-5` — ünïcode")
  metadata = acc.SummaryMetadata("config")
  assert metadata.plugin_data.plugin_name == "text"


def tensor_events(acc, tag):
  return [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]


def test_histograms_round_trip_trimmed(tmp_path):
  edges = np.linspace(-1.0, 1.0, 9)
  counts = np.array([0, 0, 3, 0, 5, 1, 0, 0])
  with mw.MetricWriter(tmp_path, enabled=True) as w:
    w.write_histograms(0, {"h": (edges, counts)})  # held back until the scalars
    w.write_scalars(0, {"a": 1.0})
    w.write_histograms(4, {"h": (edges, np.zeros(8, np.int32)),
                           "g": (np.array([1e-3, 1e-2, 1e-1]), np.array([2, 7]))})
  acc = accumulate(tmp_path)
  assert sorted(acc.Tags()["tensors"]) == ["g", "h"]
  assert acc.SummaryMetadata("h").plugin_data.plugin_name == "histograms"
  (s0, h0), (s4, h4) = tensor_events(acc, "h")
  assert (s0, s4) == (0, 4)
  # Bins 2..5, from the first non-empty one to the last, empty inner bins kept.
  np.testing.assert_array_equal(h0, [[-0.5, -0.25, 3], [-0.25, 0, 0], [0, 0.25, 5],
                                     [0.25, 0.5, 1]])
  assert h4.shape == (0, 3)  # nothing counted: no buckets
  ((_, g),) = tensor_events(acc, "g")
  np.testing.assert_array_equal(g, [[1e-3, 1e-2, 2], [1e-2, 1e-1, 7]])


@pytest.mark.parametrize("edges, counts", [
    (np.linspace(0, 1, 4), np.ones(4)),          # one edge short
    (np.array([0.0, 1.0, 1.0]), np.ones(2)),     # edges not increasing
    (np.linspace(0, 1, 3), np.array([1, -1])),   # a negative count
    (np.linspace(0, 1, 5), np.ones((2, 2))),     # counts not 1-D
])
def test_bad_histograms_raise(tmp_path, edges, counts):
  with mw.MetricWriter(tmp_path, enabled=True) as w:
    with pytest.raises(ValueError, match="Histogram 'h' needs"):
      w.write_histograms(1, {"h": (edges, counts)})


def test_long_tags_and_large_steps(tmp_path):
  tag = "eval/" + "x" * 300  # a tag longer than one varint byte of length
  step = 2**40 + 3
  with mw.MetricWriter(tmp_path, enabled=True) as w:
    w.write_scalars(step, {tag: 2.5})
  (path,) = event_files(tmp_path)
  event = raw_events(path)[2]
  assert event.step == step and event.summary.value[0].tag == tag
  assert event.summary.value[0].simple_value == 2.5


# ---------------------------------------------------------------------------------------
# Remote workdirs: the buffer-and-upload path, exercised on a local directory.

def test_remote_mode_uploads_whole_files(tmp_path, monkeypatch):
  monkeypatch.setattr(mw, "_is_remote", lambda path: True)
  monkeypatch.setattr(mw, "_REMOTE_EVENT_FILE_BYTES", 2000)
  path = tmp_path / mw.JSONL_NAME
  path.write_text('{"step": 0, "a": 0.0}\n{"step": 1, "a"')  # an earlier run's crash
  w = mw.MetricWriter(tmp_path, enabled=True, flush_seconds=3600)
  for step in range(1, 41):
    w.write_scalars(step, {"a": float(step), "b": -float(step)})
  # Nothing uploaded before a flush: the old file is untouched, no event file yet.
  assert path.read_text().endswith('"a"') and event_files(tmp_path) == []
  w.flush()
  assert [r["a"] for r in mw.read_jsonl(path)] == [float(s) for s in range(41)]
  for step in range(41, 81):
    w.write_scalars(step, {"a": float(step), "b": -float(step)})
    if step % 10 == 0:
      w.flush()  # past 2000 bytes, the next events start a new file
  w.close()
  for line in path.read_text().splitlines():
    strict_loads(line)
  assert [r["a"] for r in mw.read_jsonl(path)] == [float(s) for s in range(81)]
  files = event_files(tmp_path)
  assert len(files) > 1 and files == sorted(files)
  assert all(raw_events(f)[0].file_version == "brain.Event:2" for f in files)
  acc = accumulate(tmp_path)
  assert [(e.step, e.value) for e in acc.Scalars("b")] == [
      (s, -float(s)) for s in range(1, 81)]


def test_remote_mode_flush_seconds(tmp_path, monkeypatch):
  monkeypatch.setattr(mw, "_is_remote", lambda path: True)
  with mw.MetricWriter(tmp_path, enabled=True, flush_seconds=0) as w:
    w.write_scalars(3, {"a": 1.0})
    assert mw.read_jsonl(tmp_path / mw.JSONL_NAME)[0]["step"] == 3


def test_gs_paths_are_remote():
  assert mw._is_remote(epath.Path("gs://bucket/runs/cub"))
  assert not mw._is_remote(epath.Path("/tmp/runs/cub"))


# ---------------------------------------------------------------------------------------
# Enabled or not; misuse.

def test_text_without_scalars_is_written_at_close(tmp_path):
  with mw.MetricWriter(tmp_path, enabled=True) as w:
    w.write_text(7, "notes", "only text")
  (path,) = event_files(tmp_path)
  events = raw_events(path)
  assert len(events) == 2 and events[1].step == 7
  assert events[1].summary.value[0].tag == "notes"


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with mw.MetricWriter(workdir, enabled=False) as w:
    w.write_scalars(1, {"a": 1.0})
    w.write_text(1, "config", "x")
    w.flush()
  w.write_scalars(2, {"a": 1.0})  # even after close
  assert not workdir.exists()


def test_default_enabled_on_process_zero(tmp_path):
  w = mw.MetricWriter(tmp_path / "run")  # the tests are one process: index 0
  assert w.enabled
  w.close()
  assert (tmp_path / "run" / mw.JSONL_NAME).exists()


@pytest.mark.parametrize("scalars, error", [
    ({"a": np.zeros(3)}, TypeError),
    ({"a": jnp.ones((1,))}, TypeError),
    ({"a": "0.5"}, TypeError),
    ({"a": 1j}, TypeError),
    ({"step": 1.0}, ValueError),
    ({"": 1.0}, ValueError),
    ({3: 1.0}, ValueError),
])
def test_bad_scalars_raise(tmp_path, scalars, error):
  with mw.MetricWriter(tmp_path, enabled=True) as w:
    with pytest.raises(error):
      w.write_scalars(1, scalars)


def test_steps_and_closing(tmp_path):
  w = mw.MetricWriter(tmp_path, enabled=True)
  w.write_scalars(np.int64(4), {"a": 1.0})
  w.write_scalars(jnp.int32(5), {"a": 1.0})
  with pytest.raises(ValueError):
    w.write_scalars(-1, {"a": 1.0})
  with pytest.raises(TypeError):
    w.write_scalars(1.5, {"a": 1.0})
  w.close()
  w.close()
  with pytest.raises(RuntimeError):
    w.write_scalars(6, {"a": 1.0})
  assert [r["step"] for r in mw.read_jsonl(tmp_path / mw.JSONL_NAME)] == [4, 5]


# ---------------------------------------------------------------------------------------
# Progress.

class FakeClock:
  def __init__(self):
    self.t = 1000.0

  def __call__(self):
    return self.t


def test_progress_format_throttle_and_eta():
  clock, out = FakeClock(), io.StringIO()
  p = mw.Progress(3000, enabled=True, every_seconds=10, batch_size=80, stream=out,
                  clock=clock)
  # The first update (after compilation) prints and starts the clock: no rate yet.
  assert p.update(100, loss=jnp.float32(0.69314)) == "step 100/3000  loss 0.6931"
  clock.t += 5
  assert p.update(110, loss=0.6) is None  # within every_seconds
  clock.t += 5
  # 20 steps in 10 s since the first update: 2 steps/s, 160 img/s, 2880 steps left.
  assert p.update(120, loss=0.5321, lr=1e-5) == (
      "step 120/3000  loss 0.5321  lr 1e-05  160 img/s  ETA 24m00s")
  clock.t += 9.9
  assert p.update(140) is None
  clock.t += 0.1
  # 40 steps in 20 s: 2 steps/s still; the images/s passed in take precedence.
  assert p.update(140, images_per_s=1234.4) == "step 140/3000  1,234 img/s  ETA 23m50s"
  clock.t += 1
  # The last step prints however soon, without an ETA.
  assert p.update(3000, loss=math.nan).startswith("step 3000/3000  loss nan  ")
  assert out.getvalue().splitlines() == [
      "step 100/3000  loss 0.6931",
      "step 120/3000  loss 0.5321  lr 1e-05  160 img/s  ETA 24m00s",
      "step 140/3000  1,234 img/s  ETA 23m50s",
      "step 3000/3000  loss nan  11,048 img/s"]  # 2900 steps in 21 s


def test_progress_after_resume_counts_from_first_update():
  clock, out = FakeClock(), io.StringIO()
  p = mw.Progress(10_000, enabled=True, every_seconds=0, stream=out, clock=clock)
  p.update(8000)  # resumed at 8000: those steps took no time in this process
  clock.t += 100
  assert p.update(8100, n=np.int64(12345)) == "step 8100/10000  n 12,345  ETA 31m40s"


def test_progress_disabled_and_default_stream(capsys):
  assert mw.Progress(10, enabled=False).update(1, loss=1.0) is None
  mw.Progress(10, enabled=True).update(10, loss=2.0)
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err == "step 10/10  loss 2.0000\n"


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (44.6, "45s"), (60, "1m00s"), (192, "3m12s"), (3600, "1h00m"),
    (3725, "1h02m"), (86400 * 2 + 3 * 3600 + 59, "2d03h"), (-5, "0s")])
def test_format_duration(seconds, text):
  assert mw.format_duration(seconds) == text
