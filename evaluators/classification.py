"""Top-1 accuracy and loss of a classifier at one or several patch sizes.

Reads the data once per run; every requested predict function sees every batch.
Metrics: "prec@1", "loss" for a single `pred`, else "<kind>=<v>/prec@1" etc.
"""
import jax
import jax.numpy as jnp
import numpy as np

import evaluators
from evaluators import register
from flexi import losses, sharding


def _suffix(name):
  return name[len("predict_"):] if name.startswith("predict_") else name


@register("classification")
class Evaluator:
  """Plain classification evaluator (the sweep evaluator generalises it)."""

  def __init__(self, predict_fns, ctx, *, data, pp_fn, pred=None, preds=None,
               batch_size=None, loss_name="softmax_xent", label_key="labels",
               outputs_key="logits"):
    self.names = self.pred_names(pred, preds, predict_fns)
    self.single = pred is not None
    self.data, self.pp_fn = dict(data), pp_fn
    self.ctx = ctx
    self.batch_size = int(batch_size or ctx.default_batch_size)
    sharding.check_batch_size(self.batch_size, ctx.mesh, ctx.batch_axes)
    loss_fn = losses.get(loss_name)
    rep = sharding.replicated(ctx.mesh)

    def make(fn):
      def step(variables, batch):
        logits = fn(variables, batch)[outputs_key]
        labels = batch[label_key]
        if labels.ndim == 1:
          labels = jax.nn.one_hot(labels, logits.shape[-1])
        mask = evaluators.labelled_mask(batch["_mask"], labels)
        top1 = jnp.argmax(logits, axis=-1)
        hit = jnp.take_along_axis(labels, top1[:, None], axis=-1)[:, 0] > 0
        loss = loss_fn(logits.astype(jnp.float32), labels, reduction=False)
        return (jnp.sum(hit * mask), jnp.sum(jnp.where(mask > 0, loss, 0.)), jnp.sum(mask))
      return jax.jit(step, out_shardings=rep)
    self.steps = {n: make(predict_fns[n]) for n in self.names}

  @staticmethod
  def pred_names(pred, preds, predict_fns):
    return evaluators.select_predict_fns(pred, preds, predict_fns, "classification")

  @classmethod
  def validate(cls, name, kwargs, predict_fns):
    evaluators.require_options(name, "classification", kwargs)
    cls.pred_names(kwargs.get("pred"), kwargs.get("preds"), predict_fns)

  def _batches(self):
    return evaluators.global_eval_batches(self.data, self.pp_fn, self.batch_size, self.ctx)

  def run(self, variables):
    totals = {n: np.zeros(3) for n in self.names}
    for batch in self._batches():
      outs = {n: step(variables, batch) for n, step in self.steps.items()}
      for n, o in outs.items():
        totals[n] += np.asarray(jax.device_get(o), np.float64)
    for n in self.names:
      hits, loss, count = totals[n]
      prefix = "" if self.single else f"{_suffix(n)}/"
      yield f"{prefix}prec@1", hits / max(count, 1)
      yield f"{prefix}loss", loss / max(count, 1)
