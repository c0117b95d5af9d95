"""Flexi-LiT (paper section 5.2): a text tower trained contrastively against a locked
FlexiViT whose patch size is sampled at every step, so one text tower serves all sizes.

    python -m trainers.train --config configs/demo.py:data=shape_captions/64 \
        --workdir workdirs/demo_captions                                     # image tower
    python -m trainers.lit --config configs/flexilit_b.py:runlocal --workdir workdirs/lit
    python -m trainers.lit --config configs/flexilit_b.py:runlocal,fixed=16 --workdir ...

Defines only the two-tower model, the contrastive loss, what is frozen and the predict
function; the loop is `flexi.train_loop.train_and_evaluate`. Batches carry "image" and
"labels" (token ids from the `tokenize` pp op).
"""
import dataclasses
import sys

import jax

from flexi import cli, host, train_loop, two_tower
from flexi import config as config_lib

TEXT_KEY = "labels"
LOSSES = ("softmax", "sigmoid")


def schema() -> config_lib.Schema:
  """Base keys plus the `lit` section."""
  return config_lib.base_schema().extend(dict(lit=dict(
      loss="softmax",     # softmax (CLIP/LiT, learnable temperature) | sigmoid (SigLIP).
      lock_img=True,      # Locked image tower: no gradient, no optimizer state, eval mode.
  )))


def make_model(config) -> two_tower.Model:
  kw = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  fields = {f.name for f in dataclasses.fields(two_tower.Model)} - {"parent", "name"}
  unknown = sorted(set(kw) - fields)
  if unknown:
    raise ValueError(f"unknown config.model key(s) {unknown} for the two-tower model; "
                     f"known: {sorted(fields)}")
  return two_tower.Model(**kw)


def _model_init(config):
  init = config.model_init
  return init.to_dict() if hasattr(init, "to_dict") else init


def make_trainer(config) -> train_loop.Trainer:
  """The LiT trainer for `config` (loaded with `schema()`)."""
  if "lit" not in config:
    raise ValueError("config has no `lit` section: load it with trainers.lit.schema()")
  model = make_model(config)
  loss_kind, lock = config.lit.loss, bool(config.lit.lock_img)
  if loss_kind not in LOSSES:
    raise ValueError(f"unknown config.lit.loss {loss_kind!r}; known: {LOSSES}")
  if loss_kind == "sigmoid" and config.model.get("bias_init") is None:
    raise ValueError("config.lit.loss='sigmoid' needs config.model.bias_init (e.g. -10.0)")

  def init_params(rng, batch_spec):
    for key in ("image", TEXT_KEY):
      if key not in batch_spec:
        raise ValueError(f"LiT batches need {key!r} (keys: {sorted(batch_spec)}); "
                         "check config.input.pp")
    image = jax.numpy.zeros((1, *batch_spec["image"].shape[1:]), batch_spec["image"].dtype)
    text = jax.numpy.zeros((1, *batch_spec[TEXT_KEY].shape[1:]), batch_spec[TEXT_KEY].dtype)
    return model.init(rng, image, text)["params"]

  def loss_fn(params, batch, *, rng, flexi, consts):
    del consts
    if lock:  # Belt and braces with `frozen`: no gradient flows into the image tower.
      params = {**params, "img": jax.lax.stop_gradient(params["img"])}
    zimg, ztxt, out = model.apply(
        {"params": params}, batch["image"], batch[TEXT_KEY], train=True,
        train_img=not lock, rngs={"dropout": rng}, **flexi)
    loss, logits = two_tower.contrastive_loss(loss_kind, zimg, ztxt, out)
    aux = {"t": out["t"], "batch_acc": two_tower.batch_accuracy(logits)}
    if "b" in out:
      aux["b"] = out["b"]
    return loss, aux

  def predict_fn(variables, batch, **flexi):
    """{"img": [n, d]} and/or {"txt": [n, d]}, whichever inputs the batch has."""
    image, text = batch.get("image"), batch.get(TEXT_KEY)
    zimg, ztxt, out = model.apply({"params": variables["params"]}, image, text, **flexi)
    res = {"t": out["t"]}
    if zimg is not None:
      res["img"] = zimg
    if ztxt is not None:
      res["txt"] = ztxt
    return res

  def load_pretrained(params, cfg):
    return two_tower.load(params, _model_init(cfg), cfg.model_load)

  return train_loop.Trainer(init_params=init_params, loss_fn=loss_fn, predict_fn=predict_fn,
                            load_pretrained=load_pretrained,
                            frozen=["img/.*"] if lock else [], schema=schema())


def results_table(eval_metrics) -> str:
  """Markdown: one row per patch size, columns = retrieval recalls and zero-shot acc."""
  rows, cols = {}, []
  for key, value in eval_metrics.items():
    parts = key.split("/")
    if len(parts) != 3 or not parts[1].startswith(("patch_size=", "seqhw=")):
      continue
    col = f"{parts[0]} {parts[2]}"
    kind, v = parts[1].split("=")
    rows.setdefault((kind, int(v)), {})[col] = value
    if col not in cols:
      cols.append(col)
  if not rows:
    return ""
  kind = next(iter(rows))[0]
  lines = [f"| {kind} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for (_, v), vals in sorted(rows.items(), key=lambda kv: -kv[0][1]):
    lines.append(f"| {v} | " + " | ".join(
        f"{100 * vals[c]:.1f}" if c in vals else "" for c in cols) + " |")
  return "\n".join(lines)


def main(argv=None):
  result = cli.main(make_trainer, sys.argv[1:] if argv is None else argv, schema=schema())
  table = results_table(result.eval_metrics)
  if table and jax.process_index() == 0:
    print(table)
  return result


if __name__ == "__main__":
  host.reexec_with_hugepages()  # Before any step runs (flexi/host.py).
  main()
