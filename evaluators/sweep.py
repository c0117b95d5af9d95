"""Classification at many patch sizes in ONE pass over the data (each image decoded once).

    config.evals.sweep = dict(type="sweep", data=dict(name="fine_shapes/96", split="test"),
                              pp_fn="decode|resize(96)|value_range(-1, 1)|onehot(10)",
                              patch_sizes=[48, 32, 24, 16, 12, 8],  # or seqhws=[...]
                              batch_size=64, real_key=None)

Every batch goes through one compiled step per patch size. Per patch size: top-1
("prec@1"), ReaL-style accuracy ("real@1": top-1 in the label set, over examples whose
set is not empty) when labels are multi-hot or `real_key` names such labels, mean loss,
GFLOPs/image (XLA cost analysis of the unsharded predict function: the flop count's
growth per example between batch n and 2n, so the once-per-call kernel PI-resize is
reported apart as "gflops_per_call") and
measured images/s. Padded rows (`_mask` == 0) are never counted. Writes
WORKDIR/<out_name>.json and .png and prints a table.

`ensembles=[[48, 24], [30, 20, 15]]` also scores the same model run at several patch
sizes with its predictions averaged (softmax probabilities; sigmoid ones for sigmoid
losses), at the members' summed GFLOPs: the paper's ensembling analysis (one model at
a compute budget beats an ensemble of smaller runs at the same total compute).
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import evaluators
from evaluators import register
from flexi import budget, losses, sharding, vit


def pad_batches(arrays: dict, batch_size: int):
  """Process-local numpy batches of `arrays` (the last one padded, with `_mask`)."""
  n = len(next(iter(arrays.values())))
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    batch = {}
    for k, v in arrays.items():
      chunk = np.asarray(v[start:stop])
      pad = [(0, batch_size - (stop - start))] + [(0, 0)] * (chunk.ndim - 1)
      batch[k] = np.pad(chunk, pad)
    batch["_mask"] = np.arange(batch_size) < (stop - start)
    yield batch


def flops_of(fn, variables, batch_spec):
  """XLA's flop count of `fn(variables, batch)` for an unsharded batch_spec."""
  strip = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  compiled = jax.jit(fn).lower(jax.tree.map(strip, variables),
                               jax.tree.map(strip, batch_spec)).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0]
  if not cost or "flops" not in cost:
    raise RuntimeError("XLA cost analysis gave no flop count on this backend")
  return float(cost["flops"])


def per_example_flops(fn, variables, batch_spec, n=None):
  """(flops per example, flops per call independent of the batch) from two compiles.

  Differencing the counts at batch n and 2n removes per-call work such as PI-resizing
  the stored kernel, which a fixed-patch export does not pay at inference.
  """
  n = int(n or next(iter(batch_spec.values())).shape[0])
  spec = lambda b: {k: jax.ShapeDtypeStruct((b, *v.shape[1:]), v.dtype)
                    for k, v in batch_spec.items()}
  f1, f2 = flops_of(fn, variables, spec(n)), flops_of(fn, variables, spec(2 * n))
  per_example = (f2 - f1) / n
  return per_example, max(f1 - n * per_example, 0.0)


def _kind_value(name):
  body = name[len("predict_"):] if name.startswith("predict_") else name
  kind, _, value = body.partition("=")
  if kind not in ("patch_size", "seqhw") or not value.isdigit() or int(value) == 0:
    raise ValueError(f"sweep evaluator: predict fn {name!r} is not "
                     "'predict_patch_size=<p>' or 'predict_seqhw=<s>'")
  return kind, int(value)


def pred_names(patch_sizes=None, seqhws=None, preds=None, predict_fns=None):
  """The predict-fn names to sweep (exactly one of the three ways to list them)."""
  given = [x is not None for x in (patch_sizes, seqhws, preds)]
  if sum(given) > 1:
    raise ValueError("sweep evaluator: set one of patch_sizes, seqhws or preds")
  if patch_sizes is not None:
    names = [f"predict_patch_size={int(p)}" for p in patch_sizes]
  elif seqhws is not None:
    names = [f"predict_seqhw={int(s)}" for s in seqhws]
  elif preds is not None:
    names = list(preds)
  else:
    names = list(getattr(predict_fns, "flexi_names", None) or
                 [n for n in predict_fns if n != "predict"])
  if not names:
    raise ValueError("sweep evaluator: no patch sizes to evaluate")
  for n in names:
    _kind_value(n)
    if predict_fns is not None and n not in predict_fns:
      raise ValueError(f"sweep evaluator: unknown predict fn {n!r}; known: "
                       f"{sorted(predict_fns)}")
  return names


def ensemble_members(ensembles, names):
  """{"ensemble=48+24": [member predict-fn names]}; members must be swept sizes."""
  out = {}
  for members in ensembles or ():
    members = [int(m) for m in members]
    if len(members) < 2:
      raise ValueError(f"sweep ensembles: {members} has fewer than 2 patch sizes")
    kind = _kind_value(names[0])[0]
    chosen = [f"predict_{kind}={m}" for m in members]
    missing = [m for m, n in zip(members, chosen) if n not in names]
    if missing:
      raise ValueError(f"sweep ensembles: {missing} not among the swept {kind}s "
                       f"{[_kind_value(n)[1] for n in names]}")
    out["ensemble=" + "+".join(map(str, members))] = chosen
  return out


def _ensemble_logits(logits, sigmoid):
  """Logits of the averaged predictions (one member: its logits)."""
  if len(logits) == 1:
    return logits[0]
  stacked = jnp.stack(logits)
  if sigmoid:  # logit(mean sigmoid) in log space: exact for confident logits too.
    return (jax.nn.logsumexp(jax.nn.log_sigmoid(stacked), axis=0)
            - jax.nn.logsumexp(jax.nn.log_sigmoid(-stacked), axis=0))
  return jax.nn.logsumexp(jax.nn.log_softmax(stacked), axis=0) - jnp.log(len(logits))


def _hits(logits, labels):
  top1 = jnp.argmax(logits, axis=-1)
  return jnp.take_along_axis(labels, top1[:, None], axis=-1)[:, 0] > 0


@register("sweep")
class Evaluator:
  """One pass, every patch size (see module docstring)."""

  def __init__(self, predict_fns, ctx, *, data=None, pp_fn=None, patch_sizes=None,
               seqhws=None, preds=None, batch_size=None, loss_name="softmax_xent",
               label_key="labels", real_key=None, outputs_key="logits", out_name="sweep",
               plot=True, verbose=True, flops_batch=None, batches=None, timing_reps=3,
               ensembles=None):
    self.names = pred_names(patch_sizes, seqhws, preds, predict_fns)
    self.ensembles = ensemble_members(ensembles, self.names)
    if batches is None and (data is None or pp_fn is None):
      raise ValueError("sweep evaluator needs `data` and `pp_fn`")
    self.data, self.pp_fn, self.ctx = data, pp_fn, ctx
    self.batches_fn = batches  # Tests/scripts: () -> iterable of process-local batches.
    self.batch_size = int(batch_size or ctx.default_batch_size)
    sharding.check_batch_size(self.batch_size, ctx.mesh, ctx.batch_axes)
    self.label_key, self.real_key, self.outputs_key = label_key, real_key, outputs_key
    self.out_name, self.plot, self.verbose = out_name, plot, verbose
    self.flops_batch = int(flops_batch or 2)  # Flops are linear in it: small is cheap.
    self.timing_reps = max(int(timing_reps), 1)
    self.predict_fns = {n: predict_fns[n] for n in self.names}
    self.loss_fn = losses.get(loss_name)
    self.sigmoid = loss_name.startswith("sigmoid")
    members = {m for ms in self.ensembles.values() for m in ms}
    self.steps = {n: self._make_step(fn, keep_logits=n in members)
                  for n, fn in self.predict_fns.items()}
    # An ensemble combines its members' logits of the same batch: no forward pass again.
    self.ensemble_step = jax.jit(
        lambda logits, batch: self._stats(_ensemble_logits(logits, self.sigmoid), batch),
        out_shardings=sharding.replicated(ctx.mesh))
    self.compiled, self.gflops = {}, {}

  @classmethod
  def validate(cls, name, kwargs, predict_fns):
    evaluators.require_options(name, "sweep", kwargs)
    names = pred_names(kwargs.get("patch_sizes"), kwargs.get("seqhws"), kwargs.get("preds"),
                       predict_fns)
    ensemble_members(kwargs.get("ensembles"), names)

  def _make_step(self, fn, keep_logits):
    """Jitted: (variables, batch) -> (stats, logits if `keep_logits` (an ensemble member)
    else None)."""
    def step(variables, batch):
      logits = fn(variables, batch)[self.outputs_key].astype(jnp.float32)
      return self._stats(logits, batch), (logits if keep_logits else None)
    return jax.jit(step, out_shardings=(
        sharding.replicated(self.ctx.mesh),
        sharding.batch_sharding(self.ctx.mesh, self.ctx.batch_axes) if keep_logits else None))

  def _stats(self, logits, batch):
    """[hits, loss, count, real_hits, real_count, max label-set size] of one batch."""
    labels = batch[self.label_key]
    if labels.ndim == 1:
      labels = jax.nn.one_hot(labels, logits.shape[-1])
    mask = evaluators.labelled_mask(batch["_mask"], labels)
    loss = self.loss_fn(logits, labels, reduction=False)
    real = batch[self.real_key] if self.real_key else labels
    real_valid = mask * (jnp.sum(real, axis=-1) > 0)
    return jnp.stack([
        jnp.sum(_hits(logits, labels) * mask),
        jnp.sum(jnp.where(mask > 0, loss, 0.)),
        jnp.sum(mask),
        jnp.sum(_hits(logits, real) * real_valid),
        jnp.sum(real_valid),
        jnp.max(jnp.sum(real > 0, axis=-1) * mask)])  # >1: labels are sets.

  def _local_batches(self):
    if self.batches_fn is not None:
      yield from self.batches_fn()
      return
    yield from evaluators.local_eval_batches(self.data, self.pp_fn, self.batch_size)

  def _compile(self, variables, batch):
    """AOT-compiles every step on the first batch; GFLOPs from the predict fns."""
    for n, step in self.steps.items():
      self.compiled[n] = step.lower(variables, batch).compile()
      if n not in self.gflops:
        per_ex, per_call = per_example_flops(self.predict_fns[n], variables, batch,
                                             self.flops_batch)
        self.gflops[n] = (per_ex / 1e9, per_call / 1e9)

  def evaluate(self, variables):
    """The pass itself: {name: dict of metrics} (also the JSON rows)."""
    sums = {n: np.zeros(6) for n in [*self.steps, *self.ensembles]}
    image_hw, batch = None, None
    for local in self._local_batches():
      batch = sharding.to_global(local, self.ctx.mesh, self.ctx.batch_axes)
      if not self.compiled:
        self._compile(variables, batch)
      if image_hw is None and "image" in batch:
        image_hw = tuple(batch["image"].shape[1:3])
      logits = {}
      for n in self.steps:
        stats, logits[n] = self.compiled[n](variables, batch)
        self._add(sums[n], stats)
      for e, members in self.ensembles.items():
        self._add(sums[e], self.ensemble_step([logits[m] for m in members], batch))
    secs = self._seconds_per_image(variables, batch) if batch is not None else {}
    secs.update({e: sum(secs.get(m, np.nan) for m in members)  # Every member runs.
                 for e, members in self.ensembles.items()})
    return {n: self._row(n, sums[n], secs.get(n, np.nan), image_hw) for n in sums}

  @staticmethod
  def _add(total, stats):
    stats = np.asarray(jax.device_get(stats), np.float64)
    total[:5] += stats[:5]
    total[5] = max(total[5], stats[5])

  def _seconds_per_image(self, variables, batch):
    """Each size's compute time per image: the fastest of `timing_reps` rounds over the
    sizes on one batch already in memory. Timed inside the pass, a size shared the
    cores with tf.data decoding the next batch, so its img/s depended on its place in
    the list (up to 4x on 2 cores)."""
    best = {n: np.inf for n in self.steps}
    for _ in range(self.timing_reps):
      for n in self.steps:
        t0 = time.perf_counter()
        jax.device_get(self.compiled[n](variables, batch)[0])
        best[n] = min(best[n], time.perf_counter() - t0)
    size = next(iter(batch.values())).shape[0]
    return {n: t / size for n, t in best.items()}

  def _row(self, name, s, sec_per_img, image_hw):
    hits, loss, count, real_hits, real_count, max_set = s
    if name in self.ensembles:
      members = self.ensembles[name]
      kind, value = _kind_value(members[0])[0], [_kind_value(m)[1] for m in members]
      gflops = tuple(sum(self.gflops.get(m, (np.nan, np.nan))[i] for m in members)
                     for i in (0, 1))
      image_hw = None  # (No single patch size.)
    else:
      kind, value = _kind_value(name)
      gflops = self.gflops.get(name, (np.nan, np.nan))
    row = {kind: value, "prec@1": hits / max(count, 1), "loss": loss / max(count, 1),
           "num_examples": int(count), "gflops": gflops[0], "gflops_per_call": gflops[1],
           "img_per_sec": 1 / sec_per_img if sec_per_img > 0 else float("nan"),
           "ms_per_img": 1e3 * sec_per_img}
    if self.real_key or max_set > 1:
      row["real@1"] = real_hits / max(real_count, 1)
      row["real_examples"] = int(real_count)
    if image_hw:
      patch = (value, value) if kind == "patch_size" else vit.patch_size_for(image_hw, value)
      row["patch_size"], row["patch_hw"] = patch[0], list(patch)  # Differ off the square.
      row["seqhw"] = [image_hw[0] // patch[0], image_hw[1] // patch[1]]
      row["tokens"] = row["seqhw"][0] * row["seqhw"][1]
    return row

  def run(self, variables):
    rows = self.evaluate(variables)
    for n, row in rows.items():
      prefix = n if n in self.ensembles else "=".join(map(str, _kind_value(n)))
      for metric in ("prec@1", "real@1", "loss", "gflops", "img_per_sec"):
        if metric in row:
          yield f"{prefix}/{metric}", row[metric]
    self.report([rows[n] for n in self.names], [rows[e] for e in self.ensembles])

  def report(self, rows, ensemble_rows=()):
    """Tables on the console; JSON and PNG in the workdir (process 0 only)."""
    if jax.process_index() != 0:
      return
    if self.verbose:
      print(format_table(rows), flush=True)
      if ensemble_rows:
        print(format_ensembles(ensemble_rows), flush=True)
    if self.ctx.workdir:
      os.makedirs(self.ctx.workdir, exist_ok=True)
      base = os.path.join(self.ctx.workdir, self.out_name)
      extra = {"ensembles": list(ensemble_rows)} if ensemble_rows else {}
      write_json(rows, base + ".json", batch_size=self.batch_size, **extra)
      if self.plot:
        plot_sweep(rows, base + ".png", ensembles=ensemble_rows)


def format_table(rows) -> str:
  """Markdown table of sweep rows, ordered by patch size (large first)."""
  has_real = any("real@1" in r for r in rows)
  head = "| patch | tokens | prec@1 |" + (" real@1 |" if has_real else "") + \
      " loss | GFLOPs/img | img/s |"
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in sorted(rows, key=lambda r: -r.get("patch_size", 0)):
    real = f" {r['real@1']:.4f} |" if has_real else ""
    lines.append(f"| {r.get('patch_size', '?')} | {r.get('tokens', '?')} | "
                 f"{r['prec@1']:.4f} |{real} {r['loss']:.4f} | {r['gflops']:.4g} | "
                 f"{r['img_per_sec']:.1f} |")
  return "\n".join(lines)


def format_ensembles(rows) -> str:
  """Markdown table of ensemble rows."""
  lines = ["| ensemble of patch sizes | prec@1 | loss | GFLOPs/img | img/s |",
           "|---|---|---|---|---|"]
  for r in rows:
    members = r.get("patch_size", r.get("seqhw"))
    lines.append(f"| {'+'.join(map(str, members))} | {r['prec@1']:.4f} | {r['loss']:.4f} | "
                 f"{r['gflops']:.4g} | {r['img_per_sec']:.1f} |")
  return "\n".join(lines)


def write_json(rows, path, **extra):
  """Atomically writes {"rows": [...], **extra} (the budget picker's input)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"rows": rows, **extra}, f, indent=1)
  os.replace(tmp, path)


def plot_sweep(rows, path, title="FlexiViT patch-size sweep", ensembles=()):
  """Accuracy vs patch size, and accuracy vs GFLOPs with the Pareto front marked."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel,unused-import
  rows = sorted(rows, key=lambda r: r["patch_size"])
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  ps = [r["patch_size"] for r in rows]
  acc = [100 * r["prec@1"] for r in rows]
  ax1.plot(ps, acc, "o-")
  ax1.set_xlabel("patch size")
  ax1.set_ylabel("top-1 accuracy (%)")
  ax1.set_xticks(ps)
  ax1.grid(alpha=.3)
  gf = [r["gflops"] for r in rows]
  ax2.plot(gf, acc, "o", color="gray", label="patch sizes")
  front = budget.pareto_front(rows, "gflops")
  ax2.plot([r["gflops"] for r in front], [100 * r["prec@1"] for r in front], "o-",
           color="C3", label="Pareto front")
  for r in rows:
    ax2.annotate(str(r["patch_size"]), (r["gflops"], 100 * r["prec@1"]),
                 textcoords="offset points", xytext=(4, 4), fontsize=8)
  if ensembles:
    ax2.plot([r["gflops"] for r in ensembles], [100 * r["prec@1"] for r in ensembles], "x",
             color="C0", label="ensembles")
  ax2.set_xscale("log")
  ax2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax2.set_xticks(gf, [f"{g:.2g}" for g in gf], fontsize=7, rotation=45)
  ax2.set_xlabel("GFLOPs / image")
  ax2.set_ylabel("top-1 accuracy (%)")
  ax2.grid(alpha=.3)
  ax2.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
