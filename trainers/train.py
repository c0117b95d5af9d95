"""Supervised FlexiViT training (paper section 3; big_vision's flexi i21k_sup).

    python -m trainers.train --config configs/demo.py --workdir /tmp/demo
    python -m trainers.train --config configs/flexivit_i21k_sup.py:runlocal \
        --config.lr=1e-3 --workdir /tmp/sup

Defines only the model, the loss and the predict function; the loop is
`flexi.train_loop.train_and_evaluate`.
"""
import sys

import jax
import jax.numpy as jnp

from flexi import cli, host, losses, train_loop, vit


def make_model(config):
  return vit.Model(config.num_classes, **config.model)


def make_trainer(config) -> train_loop.Trainer:
  """The supervised trainer for `config` (schema: the base one)."""
  model = make_model(config)
  loss_name = config.loss
  mixup_cfg = dict(config.mixup)

  def init_params(rng, batch_spec):
    image = jnp.zeros((1, *batch_spec["image"].shape[1:]), batch_spec["image"].dtype)
    params = model.init(rng, image)["params"]
    if config.init_head_bias is not None:
      params["head"]["bias"] = jnp.full_like(params["head"]["bias"], config.init_head_bias)
    return params

  def loss_fn(params, batch, *, rng, flexi, consts):
    del consts
    rng_mix, rng_drop = jax.random.split(rng)
    if mixup_cfg.get("p"):
      import input_pipeline  # pylint: disable=import-outside-toplevel
      batch = input_pipeline.mixup(rng_mix, batch, p=mixup_cfg["p"],
                                   fold_in=mixup_cfg.get("fold_in"))
    logits, _ = model.apply({"params": params}, batch["image"], train=True,
                            rngs={"dropout": rng_drop}, **flexi)
    loss = losses.get(loss_name)(logits.astype(jnp.float32), batch["labels"])
    return loss, {}

  def predict_fn(variables, batch, **flexi):
    logits, out = vit.apply_with_blocks(model, {"params": variables["params"]}, batch["image"],
                                        train=False, **flexi)
    return {"logits": logits, "pre_logits": out["pre_logits"], "blocks": out["blocks"]}

  return train_loop.Trainer(init_params=init_params, loss_fn=loss_fn, predict_fn=predict_fn)


def main(argv=None):
  return cli.main(make_trainer, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  host.reexec_with_hugepages()  # Before any step runs (flexi/host.py).
  main()
