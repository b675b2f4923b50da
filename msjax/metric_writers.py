"""Training metrics out of the process: a JSONL log, TensorBoard event files, a progress line.

``MetricWriter(workdir)`` records scalars twice, once in each of two formats:

- ``<workdir>/metrics.jsonl``: one JSON object per ``write_scalars`` call,
  ``{"step": 120, "time": 1700000000.1, "train/loss": 0.53, ...}``, read back by
  ``read_jsonl``. Runs resumed in the same workdir append to the same file.
- ``<workdir>/tensorboard/events.out.tfevents.*``: one event file per writer (per run or
  resume), for TensorBoard. The events are TensorBoard's own protocol buffers, framed by
  TensorBoard's own record writer (``tensorboard.summary.writer.record_writer``), so the
  files are exactly what TensorBoard reads, without TensorFlow. Text (``write_text``) and
  histograms (``write_histograms``: already-binned counts, such as the GPW telemetry's)
  go to TensorBoard only.

**Non-finite values.** TensorBoard receives them as they are (a NaN loss plots as NaN).
Strict JSON has no NaN or infinity, so in the JSONL they are the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` (Python's and JavaScript's spellings). Every line
stays valid for ``json.loads`` and for strict parsers; ``read_jsonl`` turns the strings
back into floats.

**Resumed runs and repeated steps.** Nothing already written is rewritten: a run resumed
from a checkpoint older than its last logged step writes those steps again, after the
abandoned run's lines. ``drop_superseded`` removes the abandoned lines when reading: a
step lower than one before it marks a resume, and the earlier lines at or after that step
are dropped; any remaining duplicates (the same step logged twice) should be read as the
last value per step and key. For TensorBoard, a writer's first ``write_scalars`` also
writes a session-start record at its step, from which TensorBoard's event loader drops
the points earlier files hold at that step or later: the same rule. Text and histograms
written before that first ``write_scalars`` are held back until it, so the mark cannot
drop them. Both rules rely on one contract: a run writes non-decreasing steps, and its
first scalars are at the step it starts (or resumes) from or later, never, say, a step-0
summary after a resume.

**Local and remote workdirs.** Paths go through ``etils.epath``, so ``workdir`` may be a
``gs://`` URI. Object stores cannot append to an object, so a remote writer keeps both
files' bytes in memory and uploads each file whole when ``flush_seconds`` have passed
since the last upload, and at ``flush()`` and ``close()``. The metrics JSONL is small (a
few MB for a long run); event files are started anew past ``_REMOTE_EVENT_FILE_BYTES``
so their uploads stay small. A local writer appends, and hands every record to the
operating system as it is written, so a crash loses nothing already logged. (TensorBoard's
own ``EventFileWriter`` is not used: without TensorFlow it reaches ``gs://`` through
fsspec in append mode, which Cloud Storage does not have, and each record would replace
the object instead of extending it.)

**Multi-host runs.** Only process 0 writes by default; the others get a writer whose
methods do nothing, so the training loop calls it unconditionally. ``Progress`` prints
from process 0 only, the same way.
"""

from __future__ import annotations

import json
import math
import operator
import os
import socket
import sys
import time
from typing import Any, Callable, Mapping, TextIO

import numpy as np
from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Strict-JSON stand-ins for the non-finite floats, and back.
_NONFINITE_TO_JSON = {math.inf: "Infinity", -math.inf: "-Infinity"}
_JSON_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_RESERVED_KEYS = ("step", "time")
# A remote event file is uploaded whole at each flush; past this size the next events go
# to a new file, so one upload stays small however long the run.
_REMOTE_EVENT_FILE_BYTES = 4 << 20
# The creation second in the name of this process's last event file (see
# MetricWriter._new_event_file).
_last_event_file_second = 0


def _default_enabled() -> bool:
  """Whether this process writes: only process 0 of a multi-host run does."""
  import jax  # Deferred: reading logs (read_jsonl) should not need to import jax.
  return jax.process_index() == 0


def _is_remote(path: epath.Path) -> bool:
  """Whether ``path`` is on an object store (``gs://`` and the like), which cannot append."""
  return "://" in os.fspath(path)


# ---------------------------------------------------------------------------------------
# Files: appended locally, rewritten whole remotely.

class _OutputFile:
  """One output file: appended to on a local disk, uploaded whole on an object store.

  With ``keep_existing`` an existing file is continued (the metrics log of a resumed run);
  a partial last line left by a crash mid-write is cut off first, so every line of the
  file stays whole.
  """

  def __init__(self, path: epath.Path, *, remote: bool, keep_existing: bool):
    self.path = path
    self.remote = remote
    self.size = 0
    if remote:
      existing = path.read_bytes() if keep_existing and path.exists() else b""
      self._buffer = bytearray(existing[:existing.rfind(b"\n") + 1])
      self._dirty = True  # create the object (or drop a cut-off tail) at the first flush
      self.size = len(self._buffer)
    else:
      if keep_existing:
        _cut_partial_line(path)
      self._file = open(os.fspath(path), "ab")

  def write(self, data: bytes) -> None:
    """Appends ``data``; locally it reaches the operating system before this returns."""
    self.size += len(data)
    if self.remote:
      self._buffer += data
      self._dirty = True
    else:
      self._file.write(data)
      self._file.flush()

  def flush(self) -> None:
    """Remotely, uploads the whole object if anything changed; locally, nothing is left
    to do (no fsync: metrics need not survive a power cut, and flush must stay cheap)."""
    if self.remote:
      if self._dirty:
        self.path.write_bytes(bytes(self._buffer))
        self._dirty = False
    else:
      self._file.flush()

  def close(self) -> None:
    """Flushes, then releases the file."""
    self.flush()
    if not self.remote:
      self._file.close()


def _cut_partial_line(path: epath.Path) -> None:
  """Truncates a local file after its last newline (a crash can leave half a line)."""
  name = os.fspath(path)
  if not os.path.exists(name):
    return
  with open(name, "r+b") as f:
    end = f.seek(0, os.SEEK_END)
    if end == 0:
      return
    f.seek(end - 1)
    if f.read(1) == b"\n":
      return
    f.seek(0)
    f.truncate(f.read().rfind(b"\n") + 1)


# ---------------------------------------------------------------------------------------
# Scalars.

def _to_number(key: str, value: Any) -> int | float:
  """``value`` as a Python int or float; NumPy and (fetched) JAX scalars included."""
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, (int, float)):
    return value
  array = np.asarray(value)
  if array.ndim != 0 or array.dtype.kind not in "biuf":
    raise TypeError(f"Metric {key!r} must be a real scalar; got {type(value).__name__} "
                    f"with shape {array.shape} and dtype {array.dtype}.")
  number = array.item()
  return int(number) if isinstance(number, bool) else number


def _fetch_jax_values(scalars: Mapping[str, Any]) -> Mapping[str, Any]:
  """Copies JAX arrays to the host in one batch rather than one blocking copy per value."""
  jax = sys.modules.get("jax")  # Not imported means no value can be a JAX array.
  if jax is not None and any(isinstance(v, jax.Array) for v in scalars.values()):
    fetched = jax.device_get(dict(scalars))
    return {key: fetched[key] for key in scalars}  # device_get sorts the keys
  return scalars


def _json_safe(value: int | float) -> int | float | str:
  """Non-finite floats as their strict-JSON stand-in strings; other numbers unchanged."""
  if isinstance(value, float) and not math.isfinite(value):
    return "NaN" if math.isnan(value) else _NONFINITE_TO_JSON[value]
  return value


class MetricWriter:
  """Writes scalars to ``<workdir>/metrics.jsonl`` and to TensorBoard (see module doc).

  Args:
    workdir: the run's directory, local or remote (``gs://...``); created if missing.
    enabled: whether this process writes; defaults to ``jax.process_index() == 0``. A
      disabled writer creates nothing and its methods return at once.
    flush_seconds: remote workdirs only: at most this long between uploads of the files
      (each upload rewrites whole objects). Local files are appended as written.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None,
               flush_seconds: float = 60.0):
    self.enabled = _default_enabled() if enabled is None else bool(enabled)
    self._closed = False
    if not self.enabled:
      return
    self.workdir = epath.Path(workdir)
    self._remote = _is_remote(self.workdir)
    self._flush_seconds = flush_seconds
    self._last_flush = time.monotonic()
    self._started = False  # whether the session start has been marked (write_scalars)
    self._held: list[event_pb2.Event] = []  # text and histograms from before that mark
    self._tb_dir = self.workdir / TENSORBOARD_DIR
    self._tb_dir.mkdir(parents=True, exist_ok=True)
    self._jsonl = _OutputFile(self.workdir / JSONL_NAME, remote=self._remote,
                              keep_existing=True)
    self._new_event_file()

  def _new_event_file(self) -> None:
    """Starts a new event file; its first record declares the event format version."""
    # TensorBoard reads a directory's event files in name order, and an existing file
    # must not be continued: the creation second leads the name, and is bumped past the
    # last one this process used and past any existing name.
    global _last_event_file_second
    now = time.time()
    second = max(int(now), _last_event_file_second + 1)
    while True:
      path = self._tb_dir / (f"events.out.tfevents.{second:010d}."
                             f"{socket.gethostname()}.{os.getpid()}")
      if not path.exists():
        break
      second += 1
    _last_event_file_second = second
    self._event_file = _OutputFile(path, remote=self._remote, keep_existing=False)
    self._events = RecordWriter(self._event_file)
    self._write_event(event_pb2.Event(wall_time=now, file_version="brain.Event:2"))

  def _write_event(self, event: event_pb2.Event) -> None:
    self._events.write(event.SerializeToString())

  def _write_summary(self, step: int, summary: summary_pb2.Summary) -> None:
    """Writes ``summary`` at ``step``, or holds it until the session start is marked."""
    event = event_pb2.Event(wall_time=time.time(), step=step, summary=summary)
    if not self._started:
      self._held.append(event)
      return
    self._write_event(event)
    self._maybe_flush_remote()

  def _check_open(self) -> None:
    if self._closed:
      raise RuntimeError("MetricWriter is closed.")

  def _checked_step(self, step) -> int:
    """``step`` as an int ≥ 0, on an open writer."""
    self._check_open()
    step = operator.index(step)
    if step < 0:
      raise ValueError(f"step must be >= 0; got {step}.")
    return step

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs ``scalars`` at ``step``: one JSONL line and one TensorBoard event.

    Values may be Python, NumPy or JAX real scalars; JAX values are fetched to the host
    together. Keys are TensorBoard tags (``train/loss``); ``step`` and ``time`` are taken.
    TensorBoard stores float32: values beyond its range become ±inf there.
    """
    if not self.enabled:
      return
    step = self._checked_step(step)
    scalars = _fetch_jax_values(scalars)
    now = time.time()
    record: dict[str, Any] = {"step": step, "time": now}
    summary = summary_pb2.Summary()
    for key, value in scalars.items():
      if not isinstance(key, str) or not key or key in _RESERVED_KEYS:
        raise ValueError(f"Metric names must be non-empty strings other than "
                         f"{_RESERVED_KEYS}; got {key!r}.")
      number = _to_number(key, value)
      record[key] = _json_safe(number)
      summary.value.add(tag=key, simple_value=float(number))
    self._jsonl.write(json.dumps(record, allow_nan=False).encode() + b"\n")
    if not self._started:
      # Tells TensorBoard that points an earlier run wrote at this step or later were
      # abandoned (a resume from an older checkpoint): drop_superseded's rule. What was
      # held back goes after the mark, which would otherwise drop it too.
      self._write_event(event_pb2.Event(
          wall_time=now, step=step,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
      self._started = True
      for held in self._held:
        self._write_event(held)
      self._held.clear()
    self._write_event(event_pb2.Event(wall_time=now, step=step, summary=summary))
    self._maybe_flush_remote()

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Logs ``text`` (Markdown, e.g. the config) under ``tag`` to TensorBoard's text tab.

    Text logged before this writer's first ``write_scalars`` is held back until then (or
    until ``close``), to follow the session-start mark (see module doc).
    """
    if not self.enabled:
      return
    step = self._checked_step(step)
    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=text_metadata.create_summary_metadata(tag, ""),
                      tensor=tensor_util.make_tensor_proto(text))
    self._write_summary(step, summary)

  def write_histograms(self, step: int, histograms: Mapping[str, tuple[Any, Any]]) -> None:
    """Logs already-binned counts as TensorBoard histograms, one event for all tags.

    ``histograms`` maps a tag to ``(edges, counts)``: ``counts[i]`` values fell in
    ``[edges[i], edges[i + 1])``, so ``edges`` has one entry more than ``counts`` and
    increases. Empty bins at either end are left out (TensorBoard draws from the first
    non-empty bin to the last); a histogram with no values has no buckets. Held back
    like text before the first ``write_scalars``.
    """
    if not self.enabled:
      return
    step = self._checked_step(step)
    summary = summary_pb2.Summary()
    for tag, (edges, counts) in histograms.items():
      summary.value.add(tag=tag, metadata=histogram_metadata.create_summary_metadata(
                            display_name=tag, description=""),
                        tensor=tensor_util.make_tensor_proto(_buckets(tag, edges, counts)))
    self._write_summary(step, summary)

  def _maybe_flush_remote(self) -> None:
    """Remote workdirs: uploads when ``flush_seconds`` have passed since the last upload."""
    if self._remote and time.monotonic() - self._last_flush >= self._flush_seconds:
      self.flush()

  def flush(self) -> None:
    """Uploads the files of a remote workdir; local files are already up to date."""
    if not self.enabled or self._closed:
      return
    self._jsonl.flush()
    self._events.flush()
    self._last_flush = time.monotonic()
    if self._remote and self._event_file.size > _REMOTE_EVENT_FILE_BYTES:
      self._events.close()
      self._new_event_file()

  def close(self) -> None:
    """Flushes and closes the files; later writes raise. Closing twice is harmless."""
    if not self.enabled or self._closed:
      return
    for held in self._held:  # no scalars came: no session-start mark to follow
      self._write_event(held)
    self._held.clear()
    self._jsonl.close()
    self._events.close()
    self._closed = True

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _buckets(tag: str, edges, counts) -> np.ndarray:
  """``[k, 3]`` rows of (left edge, right edge, count): TensorBoard's histogram tensor,
  trimmed to the bins from the first non-empty one to the last."""
  edges = np.asarray(edges, np.float64)
  counts = np.asarray(counts, np.float64)
  if (counts.ndim != 1 or edges.shape != (counts.size + 1,)
      or not np.all(np.diff(edges) > 0) or not np.all(counts >= 0)):
    raise ValueError(f"Histogram {tag!r} needs counts [k] >= 0 and increasing edges "
                     f"[k + 1]; got counts of shape {counts.shape} and edges of shape "
                     f"{edges.shape}.")
  filled = np.flatnonzero(counts)
  if filled.size == 0:
    return np.zeros((0, 3))
  first, last = filled[0], filled[-1] + 1
  return np.stack([edges[first:last], edges[first + 1:last + 1], counts[first:last]], 1)


# ---------------------------------------------------------------------------------------
# Reading the log back.

def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Returns every record of a metrics JSONL file in file order, non-finite floats restored.

  A last line without its newline that does not parse is skipped: the file may be read
  while a run is still writing it. Any other line that does not parse raises.
  """
  text = epath.Path(path).read_text()
  lines = text.split("\n")
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines):  # no newline after it: a line still being written
        break
      raise ValueError(f"{path}:{number}: not a JSON line: {e}") from e
    records.append({k: _JSON_TO_NONFINITE.get(v, v) if isinstance(v, str) else v
                    for k, v in record.items()})
  return records


def drop_superseded(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Drops the records of abandoned runs that a resume from an earlier step overwrote.

  A record whose step is lower than an earlier record's marks a run resumed from an older
  checkpoint: the earlier records at that step or later are dropped. Repeats of the same
  step that remain should be read as last value wins, per key.
  """
  kept: list[dict[str, Any]] = []
  highest = -1
  for record in records:
    step = record["step"]
    if step < highest:
      kept = [r for r in kept if r["step"] < step]
      highest = step
    kept.append(record)
    highest = max(highest, step)
  return kept


# ---------------------------------------------------------------------------------------
# The progress line.

def format_duration(seconds: float) -> str:
  """``45s``, ``3m12s``, ``1h02m`` or ``2d03h``: two units at most, for an ETA."""
  s = max(0, int(round(seconds)))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  if s < 86400:
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
  return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _format_value(value: Any) -> str:
  """A metric for the progress line: 4 decimals, or 4 significant digits if tiny or huge."""
  if isinstance(value, str):
    return value
  number = np.asarray(value).item()
  if isinstance(number, bool) or not isinstance(number, (int, float)):
    return str(number)
  if isinstance(number, int):
    return f"{number:,}"
  if math.isfinite(number) and number != 0 and not 1e-3 <= abs(number) < 1e4:
    return f"{number:.4g}"
  return f"{number:.4f}"


class Progress:
  """Prints ``step 120/3000  loss 0.5321  1,234 img/s  ETA 3m12s`` now and then.

  Throughput and ETA count from the first ``update`` of this process, so compilation
  before it and the steps a resumed run skipped do not distort them.

  Args:
    total_steps: the step training ends at.
    enabled: whether to print; defaults to ``jax.process_index() == 0``.
    every_seconds: the least time between two lines; the first update and the one that
      reaches ``total_steps`` always print.
    batch_size: images per step (all processes together), for images/s; an
      ``images_per_s`` value passed to ``update`` takes precedence.
    stream: where lines go; defaults to ``sys.stderr`` at the time of printing.
    clock: seconds from a monotonic clock (tests pass a fake one).
  """

  def __init__(self, total_steps: int, *, enabled: bool | None = None,
               every_seconds: float = 30.0, batch_size: int | None = None,
               stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
    self.total_steps = total_steps
    self.enabled = _default_enabled() if enabled is None else bool(enabled)
    self.every_seconds = every_seconds
    self.batch_size = batch_size
    self._stream = stream
    self._clock = clock
    self._start: tuple[int, float] | None = None  # (step, time) of the first update
    self._last_print = -math.inf

  def update(self, step: int, **values: Any) -> str | None:
    """Prints a line if due and returns it, else returns None.

    ``values`` (``loss=...``) are printed in the given order; they are converted only
    when a line is printed, so passing device arrays costs nothing between lines.
    """
    if not self.enabled:
      return None
    now = self._clock()
    if self._start is None:
      self._start = (step, now)
    elif step < self.total_steps and now - self._last_print < self.every_seconds:
      return None
    self._last_print = now
    images_per_s = values.pop("images_per_s", None)
    parts = [f"step {step}/{self.total_steps}"]
    parts += [f"{name} {_format_value(value)}" for name, value in values.items()]
    start_step, start_time = self._start
    steps_per_s = (step - start_step) / (now - start_time) if now > start_time else 0.0
    if images_per_s is None and self.batch_size and steps_per_s > 0:
      images_per_s = steps_per_s * self.batch_size
    if images_per_s is not None:
      parts.append(f"{float(images_per_s):,.0f} img/s")
    if steps_per_s > 0 and step < self.total_steps:
      parts.append(f"ETA {format_duration((self.total_steps - step) / steps_per_s)}")
    line = "  ".join(parts)
    stream = self._stream if self._stream is not None else sys.stderr
    print(line, file=stream, flush=True)
    return line
