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
  """One JSON line per `write` and TensorBoard scalars; no-op on processes != 0."""

  def __init__(self, workdir, *, enabled=None, tensorboard=True, stream=None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.stream = stream
    self._json = self._tb = None
    if self.enabled and workdir:
      os.makedirs(workdir, exist_ok=True)
      self._json = open(os.path.join(workdir, "metrics.jsonl"), "a")
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _to_py(v) for k, v in metrics.items()}}
    if self._json:
      self._json.write(json.dumps(row) + "\n")
      self._json.flush()
    if self._tb:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, int(step))
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
