"""Training metrics out of the process: a JSONL log, TensorBoard event files, a progress line.

``MetricWriter(workdir)`` records scalars twice, once in each of two formats:

- ``<workdir>/metrics.jsonl``: one JSON object per ``write_scalars`` call,
  ``{"step": 120, "time": 1700000000.1, "train/loss": 0.53, ...}``, read back by
  ``read_jsonl``. Runs resumed in the same workdir append to the same file.
- ``<workdir>/tensorboard/events.out.tfevents.*``: one event file per writer (per run or
  resume), for TensorBoard. The file format (TFRecord framing around ``Event`` protocol
  buffers) is written here by hand: the few messages used are encoded in a few lines, so
  neither TensorFlow nor a summary-writing package is needed at run time.

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
the points earlier files hold at that step or later: the same rule. Both rely on one
contract: a run writes non-decreasing steps, and its first scalars are at the step it
starts (or resumes) from or later, never, say, a step-0 summary after a resume.

**Local and remote workdirs.** Paths go through ``etils.epath``, so ``workdir`` may be a
``gs://`` URI. Object stores cannot append to an object, so a remote writer keeps both
files' bytes in memory and uploads each file whole when ``flush_seconds`` have passed
since the last upload, and at ``flush()`` and ``close()``. The metrics JSONL is small (a
few MB for a long run); event files are started anew past ``_REMOTE_EVENT_FILE_BYTES``
so their uploads stay small. A local writer appends, and hands every line to the
operating system as it is written, so a crash loses nothing already logged.

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
import struct
import sys
import time
from typing import Any, Callable, Mapping, TextIO

import numpy as np
from etils import epath

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
# CRC-32C (Castagnoli), which TFRecord framing uses. Records are a few hundred bytes, so a
# byte-at-a-time table lookup costs tens of microseconds; no extension module is needed.

def _crc32c_table() -> tuple[int, ...]:
  """The 256-entry lookup table of the reflected Castagnoli polynomial 0x82F63B78."""
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """Returns the CRC-32C checksum of ``data`` (``crc32c(b"123456789") == 0xE3069283``)."""
  table = _CRC32C_TABLE
  crc = 0xFFFFFFFF
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: CRC-32C rotated right by 15 bits plus a constant.

  TFRecord masks its checksums so that a CRC computed over bytes that themselves contain
  CRCs does not degenerate.
  """
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecord(data: bytes) -> bytes:
  """Frames one record: length, checksum of the length, the data, checksum of the data."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", _masked_crc32c(length)) + data
          + struct.pack("<I", _masked_crc32c(data)))


# ---------------------------------------------------------------------------------------
# Protocol-buffer wire format, for the handful of fields written (tensorboard's
# event.proto, summary.proto and tensor.proto): a key byte (field number << 3 | wire
# type), then a varint, 8 or 4 little-endian bytes, or a varint length and the bytes.

def _varint(value: int) -> bytes:
  """Encodes a non-negative integer as a base-128 varint, low groups first."""
  out = bytearray()
  while value > 0x7F:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _field_bytes(key: int, payload: bytes) -> bytes:
  """A length-delimited field (wire type 2): strings, bytes and nested messages."""
  return bytes((key,)) + _varint(len(payload)) + payload


def _float32_bytes(value: float) -> bytes:
  """``value`` as a little-endian float32, overflowing to ±inf as a float32 cast does."""
  try:
    return struct.pack("<f", value)
  except OverflowError:  # struct refuses finite doubles beyond float32's range
    return struct.pack("<f", math.copysign(math.inf, value))


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           summary: bytes | None = None, session_start: bool = False) -> bytes:
  """An ``Event``: wall_time (1, double), step (2, int64), file_version (3), summary (5),
  session_log (7).

  ``summary`` is an encoded ``Summary { repeated Value value = 1; }``: its value fields,
  concatenated. ``session_start`` adds ``SessionLog { status (1): START = 1 }``.
  """
  out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
  if file_version is not None:
    out += _field_bytes(0x1A, file_version.encode())
  if summary is not None:
    out += _field_bytes(0x2A, summary)
  if session_start:
    out += _field_bytes(0x3A, b"\x08\x01")
  return out


def _scalar_value_prefix(tag: str) -> bytes:
  """A scalar's ``Summary.value`` field up to its float: the key, length and ``tag`` (1),
  then the key of ``simple_value`` (2, float32). The 4 bytes of the value complete it.
  """
  tag_field = _field_bytes(0x0A, tag.encode())
  return b"\x0a" + _varint(len(tag_field) + 5) + tag_field + b"\x15"


# SummaryMetadata { plugin_data (1) { plugin_name (1): "text" } }: routes the tensor to
# TensorBoard's text dashboard.
_TEXT_METADATA = _field_bytes(0x4A, _field_bytes(0x0A, _field_bytes(0x0A, b"text")))


def _text_value(tag: str, text: str) -> bytes:
  """A ``Summary.value`` field holding ``text`` as a scalar string tensor, for the text
  plugin."""
  # TensorProto { dtype (1): DT_STRING = 7, tensor_shape (2): {} (a scalar),
  #               string_val (8): text }
  tensor = b"\x08\x07" + _field_bytes(0x12, b"") + _field_bytes(0x42, text.encode())
  return _field_bytes(0x0A, _field_bytes(0x0A, tag.encode()) + _TEXT_METADATA
                      + _field_bytes(0x42, tensor))


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
    self._value_prefixes: dict[str, bytes] = {}
    self._started = False  # whether the session start has been marked (write_scalars)
    self._held: list[bytes] = []  # text records written before that mark
    self._tb_dir = self.workdir / TENSORBOARD_DIR
    self._tb_dir.mkdir(parents=True, exist_ok=True)
    self._jsonl = _OutputFile(self.workdir / JSONL_NAME, remote=self._remote,
                              keep_existing=True)
    self._events = self._new_event_file()

  def _new_event_file(self) -> _OutputFile:
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
    events = _OutputFile(path, remote=self._remote, keep_existing=False)
    events.write(_tfrecord(_event(now, 0, file_version="brain.Event:2")))
    return events

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
    """
    if not self.enabled:
      return
    step = self._checked_step(step)
    scalars = _fetch_jax_values(scalars)
    now = time.time()
    record: dict[str, Any] = {"step": step, "time": now}
    values = []
    for key, value in scalars.items():
      if not isinstance(key, str) or not key or key in _RESERVED_KEYS:
        raise ValueError(f"Metric names must be non-empty strings other than "
                         f"{_RESERVED_KEYS}; got {key!r}.")
      number = _to_number(key, value)
      record[key] = _json_safe(number)
      prefix = self._value_prefixes.get(key)
      if prefix is None:  # encoded once per tag: the same keys come every step
        prefix = self._value_prefixes[key] = _scalar_value_prefix(key)
      values.append(prefix + _float32_bytes(float(number)))
    self._jsonl.write(json.dumps(record, allow_nan=False).encode() + b"\n")
    if not self._started:
      # Tells TensorBoard that points an earlier run wrote at this step or later were
      # abandoned (a resume from an older checkpoint): drop_superseded's rule. Text held
      # back goes after the mark, which would otherwise drop it too.
      self._events.write(_tfrecord(_event(now, step, session_start=True)))
      self._started = True
      for held in self._held:
        self._events.write(held)
      self._held.clear()
    self._events.write(_tfrecord(_event(now, step, summary=b"".join(values))))
    self._maybe_flush_remote()

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Logs ``text`` (Markdown, e.g. the config) under ``tag`` to TensorBoard's text tab.

    Text logged before this writer's first ``write_scalars`` is held back until then (or
    until ``close``), to follow the session-start mark (see module doc).
    """
    if not self.enabled:
      return
    step = self._checked_step(step)
    record = _tfrecord(_event(time.time(), step, summary=_text_value(tag, text)))
    if not self._started:
      self._held.append(record)
      return
    self._events.write(record)
    self._maybe_flush_remote()

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
    if self._remote and self._events.size > _REMOTE_EVENT_FILE_BYTES:
      self._events.close()
      self._events = self._new_event_file()

  def close(self) -> None:
    """Flushes and closes the files; later writes raise. Closing twice is harmless."""
    if not self.enabled or self._closed:
      return
    for held in self._held:  # no scalars came: no session-start mark to follow
      self._events.write(held)
    self._held.clear()
    self._jsonl.close()
    self._events.close()
    self._closed = True

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


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
