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
    self._json = self._tb = self._path = None
    if self.enabled and workdir:
      os.makedirs(workdir, exist_ok=True)
      self._path = os.path.join(workdir, "metrics.jsonl")
      self._json = open(self._path, "a")
      if tensorboard:
        import input_pipeline  # pylint: disable=import-outside-toplevel,unused-import  # TF off the GPUs.
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        from tensorflow.core.framework import summary_pb2  # pylint: disable=import-outside-toplevel
        self._tf = tf
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tb"))
        # TensorBoard's scalar-plugin metadata, so tf.summary.write needs no tensorboard
        # package (tf.summary.scalar does).
        self._scalar_meta = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
            data_class=summary_pb2.DATA_CLASS_SCALAR).SerializeToString()

  def rows(self):
    """The rows in metrics.jsonl (process 0; [] elsewhere)."""
    if not self._path or not os.path.exists(self._path):
      return []
    with open(self._path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def drop_after(self, step: int):
    """Removes the rows of steps after `step` from metrics.jsonl (atomically). TensorBoard
    drops them itself when the repeated steps arrive (out-of-order steps are purged)."""
    if not self._json:
      return
    keep = [r for r in self.rows() if r.get("step", 0) <= step]
    self._json.close()
    tmp = self._path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(tmp, self._path)
    self._json = open(self._path, "a")

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _to_py(v) for k, v in metrics.items()}}
    if self._json:
      self._json.write(json.dumps(row) + "\n")
      self._json.flush()
    if self._tb:
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
