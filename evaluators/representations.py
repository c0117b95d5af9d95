"""How similar are FlexiViT's internal representations at different patch sizes?

Paper section 6 ("FlexiViT's internal representation"): minibatch linear CKA (Nguyen
et al. 2021, unbiased HSIC averaged over minibatches) between the same model's
representations at two patch sizes, after every encoder block ("tokens": the whole
token map of an image, flattened; maps of different grid sizes compare fine, CKA only
needs the same examples) and for the pooled output ("pre_logits").

    config.evals.cka = dict(type="cka", data=dict(name="fine_shapes/96", split="test"),
                            pp_fn="decode|resize(96)|value_range(-1, 1)",
                            patch_sizes=[48, 32, 24, 16, 12, 8], batch_size=64,
                            max_examples=1024)

Logs CKA against the smallest patch size per layer (`patch_size=48/block_5`,
`patch_size=48/pre_logits`) and writes WORKDIR/<out_name>.json (every pair of sizes,
every layer) and .png. The predict fns must return "blocks" (trainers/train.py and
distill.py do, via `vit.apply_with_blocks`; scan=True models do not).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import evaluators
from evaluators import register, sweep
from flexi import sharding


def hsic1(k, l):
  """Unbiased HSIC estimator (Song et al. 2012) of two [n, n] Gram matrices, n >= 4."""
  n = k.shape[0]
  k = k - np.diag(np.diag(k))
  l = l - np.diag(np.diag(l))
  ones_k, ones_l = k.sum(axis=0), l.sum(axis=0)
  value = (np.sum(k * l) + ones_k.sum() * ones_l.sum() / ((n - 1) * (n - 2))
           - 2 / (n - 2) * np.dot(ones_k, ones_l))
  return value / (n * (n - 3))


class MinibatchCKA:
  """Accumulates sum HSIC1(K_i, L_i) over minibatches i for every pair of named
  representations; `cka(a, b)` = sum HSIC(a, b) / sqrt(sum HSIC(a, a) sum HSIC(b, b))."""

  def __init__(self):
    self.sums = {}

  def add(self, grams):
    """grams: {name: [n, n] Gram matrix of one minibatch (the same n examples)}; names
    are any sortable keys."""
    names = sorted(grams)
    for i, a in enumerate(names):
      for b in names[i:]:
        self.sums[(a, b)] = self.sums.get((a, b), 0.0) + hsic1(grams[a], grams[b])

  def cka(self, a, b):
    ab = self.sums[(a, b) if (a, b) in self.sums else (b, a)]
    return float(ab / np.sqrt(self.sums[(a, a)] * self.sums[(b, b)]))


@register("cka")
class Evaluator:
  """Minibatch CKA between patch sizes, per encoder block and for the pooled output."""

  @classmethod
  def validate(cls, name, kwargs, predict_fns):
    evaluators.require_options(name, "cka", kwargs)
    sweep.pred_names(kwargs.get("patch_sizes"), kwargs.get("seqhws"), kwargs.get("preds"),
                     predict_fns)

  def __init__(self, predict_fns, ctx, *, data=None, pp_fn=None, patch_sizes=None,
               seqhws=None, preds=None, batch_size=None, max_examples=1024,
               out_name="cka", plot=True, batches=None):
    self.names = sweep.pred_names(patch_sizes, seqhws, preds, predict_fns)
    if batches is None and (data is None or pp_fn is None):
      raise ValueError("cka evaluator needs `data` and `pp_fn`")  # (or `batches`, in code)
    self.data, self.pp_fn, self.ctx, self.batches_fn = data, pp_fn, ctx, batches
    self.batch_size = int(batch_size or ctx.default_batch_size)
    sharding.check_batch_size(self.batch_size, ctx.mesh, ctx.batch_axes)
    self.max_examples, self.out_name, self.plot = int(max_examples), out_name, plot
    rep = sharding.replicated(ctx.mesh)
    self.grams = {n: jax.jit(lambda v, b, fn=predict_fns[n]: _grams(fn(v, b)),
                             out_shardings=rep) for n in self.names}

  def _batches(self):
    local = (self.batches_fn() if self.batches_fn is not None else
             evaluators.local_eval_batches(self.data, self.pp_fn, self.batch_size))
    for b in local:
      yield sharding.to_global(b, self.ctx.mesh, self.ctx.batch_axes)

  def evaluate(self, variables):
    """{"layers": [...], "sizes": [...], "cka": {layer: [[CKA of size i vs j]]}}."""
    acc, seen, layers = MinibatchCKA(), 0, None
    for batch in self._batches():
      real = evaluators.to_host(batch["_mask"]) > 0
      if real.sum() < 4:  # The unbiased estimator needs n >= 4.
        continue
      grams = {}
      for n in self.names:
        per_layer = jax.device_get(self.grams[n](variables, batch))
        layers = layers or list(per_layer)
        for layer, g in per_layer.items():
          grams[(layer, n)] = np.asarray(g, np.float64)[np.ix_(real, real)]
      for layer in layers:  # Pairs of sizes within each layer.
        acc.add({(layer, n): grams[(layer, n)] for n in self.names})
      seen += int(real.sum())
      if seen >= self.max_examples:
        break
    if not layers:
      raise ValueError("cka evaluator: no batch with 4 or more examples")
    sizes = [sweep._kind_value(n)[1] for n in self.names]  # pylint: disable=protected-access
    matrix = {layer: [[acc.cka((layer, a), (layer, b)) for b in self.names]
                      for a in self.names] for layer in layers}
    return {"kind": sweep._kind_value(self.names[0])[0],  # pylint: disable=protected-access
            "sizes": sizes, "layers": layers, "num_examples": seen, "cka": matrix}

  def run(self, variables):
    res = self.evaluate(variables)
    ref = int(np.argmin(res["sizes"]) if res["kind"] == "patch_size" else
              np.argmax(res["sizes"]))  # The finest token grid.
    for i, size in enumerate(res["sizes"]):
      for layer in res["layers"]:
        yield f"{res['kind']}={size}/{layer}", res["cka"][layer][i][ref]
    if jax.process_index() == 0 and self.ctx.workdir:
      os.makedirs(self.ctx.workdir, exist_ok=True)
      base = os.path.join(self.ctx.workdir, self.out_name)
      with open(base + ".json.tmp", "w") as f:
        json.dump(res, f, indent=1)
      os.replace(base + ".json.tmp", base + ".json")
      if self.plot:
        plot_cka(res, ref, base + ".png")


def _grams(outputs):
  """{layer name: [n, n] linear Gram matrix} of one patch size's representations."""
  blocks = outputs.get("blocks") or ()
  if not blocks:
    raise ValueError("cka evaluator: the predict fn returns no 'blocks' (use "
                     "vit.apply_with_blocks; scan=True models do not collect them)")
  out = {}
  for i, x in enumerate(blocks):
    flat = jnp.reshape(x.astype(jnp.float32), (x.shape[0], -1))
    out[f"block_{i:02d}"] = flat @ flat.T
  pooled = outputs["pre_logits"].astype(jnp.float32)
  out["pre_logits"] = pooled @ pooled.T
  return out


def plot_cka(res, ref, path):
  """CKA against the finest grid, per layer (one line per patch size)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4))
  for i, size in enumerate(res["sizes"]):
    ax.plot(range(len(res["layers"])), [res["cka"][layer][i][ref] for layer in res["layers"]],
            "o-", label=f"{size}")
  ax.set_xticks(range(len(res["layers"])), res["layers"], rotation=45, fontsize=7)
  ax.set_ylabel(f"CKA vs {res['kind']} {res['sizes'][ref]}")
  ax.set_ylim(0, 1.05)
  ax.grid(alpha=.3)
  ax.legend(title=res["kind"], fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
