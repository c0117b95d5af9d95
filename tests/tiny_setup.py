"""Shared tiny setup for the training tests (also imported by the 2-process worker)."""
import jax
import numpy as np

from flexi import config as config_lib
from flexi import data_source

NUM_CLASSES = 4
RES = 32


def tiny_config(**overrides):
  raw = dict(
      seed=3, total_steps=6, num_classes=NUM_CLASSES,
      model=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=(8, 8),
                 posemb_size=(4, 4), dropout=0.1, pool_type="tok"),
      flexi=dict(patch_size=dict(v=[8, 16])),
      input=dict(batch_size=16), log_training_steps=1, ckpt_steps=3,
      xla_compiler_options={"xla_backend_optimization_level": 0},  # 2-3x faster compiles.
      grad_clip_norm=1.0, lr=3e-3,
      # 'constant' keeps total_steps out of the compiled program, so runs of different
      # lengths share the persistent compilation cache (test speed).
      schedule=dict(warmup_steps=2, decay_type="constant"),
  )
  for key, value in overrides.items():
    node = raw
    *parents, last = key.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return config_lib.build(raw)


def arrays(n=64, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, n)
  images = rng.normal(size=(n, RES, RES, 3)).astype(np.float32)
  images[:, :8, :8, :] += labels[:, None, None, None]  # Learnable signal.
  return images, labels


def data(batch_size=16, **kw):
  images, labels = arrays(**kw)
  return data_source.in_memory(images, labels, batch_size=batch_size,
                               num_classes=NUM_CLASSES)


def cka_of(config, params):
  """The cka evaluator on 2 global batches of 16 images, each process feeding its rows
  (the 2-process test compares it with one process)."""
  import evaluators  # pylint: disable=import-outside-toplevel
  from evaluators import representations  # pylint: disable=import-outside-toplevel
  from flexi import sharding, train_loop  # pylint: disable=import-outside-toplevel
  from trainers import train  # pylint: disable=import-outside-toplevel
  images, _ = arrays(n=32)
  rows = 16 // jax.process_count()
  own = np.concatenate([np.arange(lo, lo + rows) + rows * jax.process_index()
                        for lo in (0, 16)])

  def local_batches():
    for lo in range(0, len(own), rows):
      yield {"image": images[own[lo:lo + rows]], "_mask": np.ones(rows, bool)}
  fns = train_loop.PredictFns(train.make_trainer(config).predict_fn, "patch_size", [8, 16])
  ctx = evaluators.EvalContext(sharding.make_mesh([("data", -1)]), ("data",), 16, None)
  ev = representations.Evaluator(fns, ctx, patch_sizes=[8, 16], batch_size=16, plot=False,
                                 batches=local_batches)
  return dict(ev.run({"params": params}))
