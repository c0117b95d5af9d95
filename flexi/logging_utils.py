"""Metrics: console progress line, workdir/metrics.jsonl, TensorBoard (process 0 only)."""
import json
import math
import os
import sys
import time

import jax
import numpy as np


def _to_py(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


class MetricWriter:
  """One JSON line per `write` and TensorBoard scalars; no-op on processes != 0.

  Both are on disk when `write` returns (tf.summary's writer, flushed; tensorboardX's
  background queue lost the rows of a killed run). A resumed run calls
  `drop_after(step)` so the steps it repeats are not logged twice.
  """

  def __init__(self, workdir, *, enabled=None, tensorboard=True, stream=None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.stream = stream
    self._json = self._tb = self._path = self._tb_dir = None
    self._tb_not_before = 0.0  # After a resume marker: the next file sorts after it.
    if self.enabled and workdir:
      os.makedirs(workdir, exist_ok=True)
      self._path = os.path.join(workdir, "metrics.jsonl")
      self._json = open(self._path, "a")
      if tensorboard:
        self._tb_dir = os.path.join(workdir, "tb")

  def _tensorboard(self):
    """The tf.summary writer, created on the first write (after a resume's marker)."""
    if self._tb is None and self._tb_dir:
      time.sleep(max(0.0, self._tb_not_before - time.time()))  # (At most 1 s, once.)
      import input_pipeline  # pylint: disable=import-outside-toplevel,unused-import  # TF off the GPUs.
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      from tensorflow.core.framework import summary_pb2  # pylint: disable=import-outside-toplevel
      self._tf = tf
      self._tb = tf.summary.create_file_writer(self._tb_dir)
      # TensorBoard's scalar-plugin metadata, so tf.summary.write needs no tensorboard
      # package (tf.summary.scalar does).
      self._scalar_meta = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
          data_class=summary_pb2.DATA_CLASS_SCALAR).SerializeToString()
    return self._tb

  def rows(self):
    """The rows in metrics.jsonl (process 0; [] elsewhere). A line cut short by a crash
    mid-write is skipped, and dropped by the next `drop_after`."""
    if not self._path or not os.path.exists(self._path):
      return []
    rows = []
    with open(self._path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          if line.strip():
            print(f"warning: skipping a damaged line in {self._path}: {line[:60]!r}",
                  file=sys.stderr)
    return rows

  def drop_after(self, step: int):
    """Removes the rows of steps after `step` from metrics.jsonl (atomically), and tells
    TensorBoard to discard its events from step+1 on (a SessionLog START, as a restarted
    TF job writes), since the resumed run logs those steps again."""
    if not self._json:
      return
    keep = [r for r in self.rows() if r.get("step", 0) <= step]
    self._json.close()
    tmp = self._path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in keep)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self._path)
    self._json = open(self._path, "a")
    if self._tb_dir and self._tb is None:
      self._tb_not_before = _write_tensorboard_restart(self._tb_dir, step + 1) + 1

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _to_py(v) for k, v in metrics.items()}}
    if self._json:
      self._json.write(json.dumps(row) + "\n")
      self._json.flush()
    if self._tensorboard():
      with self._tb.as_default():
        for k, v in row.items():
          if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
            self._tf.summary.write(k, self._tf.constant(float(v), self._tf.float32),
                                   step=int(step), metadata=self._scalar_meta)
      self._tb.flush()

  def info(self, msg: str):
    if self.enabled:
      print(msg, file=self.stream or sys.stdout, flush=True)

  def close(self):
    if self._json:
      self._json.close()
    if self._tb:
      self._tb.close()


def _write_tensorboard_restart(tb_dir, step):
  """An event file holding only a SessionLog START at `step`: TensorBoard then purges
  the events at `step` and later that were read before it. TensorBoard reads event
  files in name order, and names start with the creation second: this one takes the
  newest existing file's second (or now) and a suffix that sorts after any host name,
  and the resumed run's own file must start a later second. Returns that second."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorflow.core.util import event_pb2  # pylint: disable=import-outside-toplevel
  os.makedirs(tb_dir, exist_ok=True)
  seconds = [int(time.time())]
  for name in os.listdir(tb_dir):
    parts = name.split(".")
    if name.startswith("events.out.tfevents.") and len(parts) > 3 and parts[3].isdigit():
      seconds.append(int(parts[3]))
  second = max(seconds)
  path = os.path.join(tb_dir, f"events.out.tfevents.{second}.~restart")
  with tf.io.TFRecordWriter(path) as f:
    now = time.time()
    f.write(event_pb2.Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
    f.write(event_pb2.Event(wall_time=now, step=int(step), session_log=event_pb2.SessionLog(
        status=event_pb2.SessionLog.START)).SerializeToString())
  return second


def fmt_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """Tracks images/s and ETA between log steps."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int):
    self.total, self.batch = total_steps, batch_size
    self.t0, self.s0 = time.perf_counter(), start_step
    self.t_last, self.s_last = self.t0, start_step

  def reset(self, step: int):
    """Restart the rate window (after evals/checkpoints, so they do not count)."""
    self.t_last, self.s_last = time.perf_counter(), step

  def tick(self, step: int) -> dict:
    now = time.perf_counter()
    dt = max(now - self.t_last, 1e-9)
    rate = (step - self.s_last) / dt
    self.t_last, self.s_last = now, step
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    return {"img_per_sec": rate * self.batch, "steps_per_sec": rate, "eta_sec": eta}


def progress_line(step, total, m: dict) -> str:
  parts = [f"step {step}/{total}"]
  if "train/loss" in m:
    parts.append(f"loss {m['train/loss']:.4f}")
  if "train/lr" in m:
    parts.append(f"lr {m['train/lr']:.2e}")
  if "train/patch_size" in m:
    parts.append(f"patch {m['train/patch_size']}")
  if "img_per_sec" in m:
    parts.append(f"{m['img_per_sec']:.1f} img/s")
  if "eta_sec" in m:
    parts.append(f"ETA {fmt_eta(m['eta_sec'])}")
  return " | ".join(parts)


def eval_table(eval_metrics: dict, metric="prec@1") -> str:
  """Markdown table, one row per "<eval>/<kind>=<v>/<metric>" entry, ordered by v."""
  rows = []
  for key, value in eval_metrics.items():
    parts = key.split("/")
    if parts[-1] != metric or len(parts) < 3 or "=" not in parts[-2]:
      continue
    kind, v = parts[-2].split("=", 1)
    loss = eval_metrics.get("/".join(parts[:-1] + ["loss"]))
    rows.append((parts[0], kind, int(v), value, loss))
  if not rows:
    return ""
  lines = [f"| eval | {rows[0][1]} | {metric} | loss |", "|---|---|---|---|"]
  for name, _, v, value, loss in sorted(rows, key=lambda r: (r[0], r[2])):
    loss_s = f"{loss:.3f}" if loss is not None else ""
    lines.append(f"| {name} | {v} | {value:.4f} | {loss_s} |")
  return "\n".join(lines)
