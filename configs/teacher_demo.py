r"""The FunMatch teacher for `configs/flexivit_b.py:runlocal`: a small PLAIN ViT.

    python -m trainers.train --config configs/teacher_demo.py --workdir workdirs/teacher
    python -m trainers.distill --config configs/flexivit_b.py:runlocal --workdir workdirs/distill

A fixed-patch ViT (patch 8 at 64px, an 8x8 token grid, kernel and posemb stored at
exactly that size, so nothing is ever resized: the runlocal analogue of the paper's
ViT-B/8 at 224px) trained supervised on the offline `fine_shapes/64` data. The
distillation config loads it from its workdir; it is also the fixed-patch baseline
evaluated away from its native patch size there.
Args: res=64, patch=8, width=64, depth=2, steps=..., batch=64, runlocal (a few steps,
for tests).
"""
import ml_collections

from flexi import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, runlocal=False, res=64, patch=8, width=64, depth=2,
                           steps=1200, batch=64)
  if a.res % a.patch:
    raise config_lib.ConfigError(f"config args: patch={a.patch} does not tile res={a.res}")
  c = ml_collections.ConfigDict()
  c.arg = a.to_dict()
  c.seed = 0
  c.num_classes = 10
  c.loss = "softmax_xent"
  c.total_steps = a.steps if not a.runlocal else 4

  data = "fine_shapes/64"
  c.input = dict(data=dict(name=data, split="train"), batch_size=a.batch,
                 shuffle_buffer_size=3000, cache_raw=True, prefetch=4)
  pp_tail = (f'|value_range(-1, 1)|onehot({c.num_classes}, key="label", key_result="labels")'
             '|keep("image", "labels")')
  # No flip_lr: fine_shapes' labels are mark positions (left/right would swap).
  c.input.pp = f"decode|resize({a.res})" + pp_tail
  pp_eval = f"decode|resize({a.res})" + pp_tail

  c.log_training_steps = 50 if not a.runlocal else 1
  c.ckpt_steps = 400 if not a.runlocal else 2

  grid = a.res // a.patch
  c.model = dict(width=a.width, depth=a.depth, mlp_dim=4 * a.width, num_heads=4,
                 pool_type="tok", patch_size=(a.patch, a.patch), posemb_size=(grid, grid))
  c.flexi = dict(patch_size=dict(v=[a.patch]))  # Fixed: one patch size, never resized.

  c.optax_name = "scale_by_adam"
  c.grad_clip_norm = 1.0
  c.lr = 2e-3
  c.wd = 1e-4
  c.schedule = dict(warmup_steps=100 if not a.runlocal else 1, decay_type="cosine")
  c.mixup = dict(p=0.0, fold_in=None)

  split = "test" if not a.runlocal else "test[:32]"
  c.evals = dict(test=dict(type="classification", data=dict(name=data, split=split),
                           pp_fn=pp_eval, preds=[f"predict_patch_size={a.patch}"],
                           batch_size=128 if not a.runlocal else 16,
                           log_steps=c.total_steps))
  return c
