"""Inference-only timing per patch size and batch size (big_vision's flexivit timing).

    config.evals.timing = dict(type="timing", image_size=240,
                               patch_sizes=[48, 40, 30, 24, 20, 16, 15, 12, 10, 8],
                               batch_sizes=[1, 64], repeats=10)

Random inputs, no data pipeline: each (patch size, batch size) is compiled ahead of
time, warmed up once, then timed over `repeats` calls (median). Batches are sharded
over the mesh's batch axes when they divide evenly, else replicated (batch 1 latency).
Writes WORKDIR/<out_name>.json (rows usable by `flexi.budget`, ms_per_img).
"""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import evaluators
from evaluators import register
from evaluators import sweep as sweep_lib
from flexi import sharding


def _pair(x):
  return (int(x), int(x)) if np.isscalar(x) else tuple(int(v) for v in x)


@register("timing")
class Evaluator:
  """Median wall time of the predict function per (patch size, batch size)."""

  def __init__(self, predict_fns, ctx, *, image_size, patch_sizes=None, seqhws=None,
               preds=None, batch_sizes=(1,), repeats=10, channels=3, outputs_key="logits",
               out_name="timing", verbose=True, data=None, pp_fn=None):
    del data, pp_fn  # Accepted so a timing eval can sit next to data evals in configs.
    self.names = sweep_lib.pred_names(patch_sizes, seqhws, preds, predict_fns)
    self.image_hw = _pair(image_size)
    self.ctx, self.repeats, self.channels = ctx, int(repeats), int(channels)
    self.outputs_key, self.out_name, self.verbose = outputs_key, out_name, verbose
    if self.repeats < 1:
      raise ValueError(f"timing evaluator: repeats must be >= 1, got {repeats}")
    self.batch_sizes = [int(b) for b in batch_sizes]
    for b in self.batch_sizes:
      if b < 1:
        raise ValueError(f"timing evaluator: batch size {b} must be positive")
    self.n_dev = int(np.prod([ctx.mesh.shape[a] for a in ctx.batch_axes]))
    self.patch = {}
    for n in self.names:
      kind, value = sweep_lib._kind_value(n)  # pylint: disable=protected-access
      ps = _pair(value) if kind == "patch_size" else (
          self.image_hw[0] // value, self.image_hw[1] // value)
      grid = (self.image_hw[0] / ps[0], self.image_hw[1] / ps[1])
      if kind == "seqhw" and self.image_hw[0] % value or grid[0] % 1 or grid[1] % 1:
        raise ValueError(f"timing evaluator: {n} does not tile image size {self.image_hw}")
      self.patch[n] = ps
    self.predict_fns = {n: predict_fns[n] for n in self.names}
    self.flops = {}

  @classmethod
  def validate(cls, name, kwargs, predict_fns):
    evaluators.require_options(name, "timing", kwargs, ("image_size",))
    sweep_lib.pred_names(kwargs.get("patch_sizes"), kwargs.get("seqhws"),
                         kwargs.get("preds"), predict_fns)

  def _time_one(self, name, variables, batch_size):
    fn = self.predict_fns[name]
    out_key = self.outputs_key
    # A batch the devices cannot split (e.g. 1: latency) is replicated instead.
    shard = sharding.batch_sharding(self.ctx.mesh, self.ctx.batch_axes) \
        if batch_size % self.n_dev == 0 else sharding.replicated(self.ctx.mesh)
    image = jax.device_put(
        jnp.asarray(np.random.default_rng(0).normal(
            size=(batch_size, *self.image_hw, self.channels)), jnp.float32), shard)
    jitted = jax.jit(lambda v, x: fn(v, {"image": x})[out_key])
    t0 = time.perf_counter()
    compiled = jitted.lower(variables, image).compile()
    compile_sec = time.perf_counter() - t0
    jax.block_until_ready(compiled(variables, image))  # Warm-up.
    times = []
    for _ in range(self.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(variables, image))
      times.append(time.perf_counter() - t0)
    ms = 1e3 * float(np.median(times))
    if name not in self.flops:
      spec = {"image": jax.ShapeDtypeStruct((2, *image.shape[1:]), image.dtype)}
      self.flops[name] = sweep_lib.per_example_flops(fn, variables, spec)
    per_ex, per_call = self.flops[name]
    ps = self.patch[name]
    return {"patch_size": ps[0], "seqhw": [self.image_hw[0] // ps[0],
                                            self.image_hw[1] // ps[1]],
            "batch_size": batch_size, "ms": ms, "ms_per_img": ms / batch_size,
            "img_per_sec": 1e3 * batch_size / ms, "gflops": per_ex / 1e9,
            "gflops_per_call": per_call / 1e9,
            "compile_sec": compile_sec}

  def run(self, variables):
    rows = []
    for n in self.names:
      for b in self.batch_sizes:
        row = self._time_one(n, variables, b)
        rows.append(row)
        prefix = f"patch_size={row['patch_size']}/batch={b}"
        yield f"{prefix}/ms", row["ms"]
        yield f"{prefix}/img_per_sec", row["img_per_sec"]
    self.report(rows)

  def report(self, rows):
    if jax.process_index() != 0:
      return
    if self.verbose:
      lines = ["| patch | batch | ms/batch | img/s | GFLOPs/img |", "|---|---|---|---|---|"]
      for r in rows:
        lines.append(f"| {r['patch_size']} | {r['batch_size']} | {r['ms']:.2f} | "
                     f"{r['img_per_sec']:.1f} | {r['gflops']:.4g} |")
      print("\n".join(lines), flush=True)
    if self.ctx.workdir:
      os.makedirs(self.ctx.workdir, exist_ok=True)
      sweep_lib.write_json(rows, os.path.join(self.ctx.workdir, self.out_name + ".json"),
                           image_size=list(self.image_hw))
