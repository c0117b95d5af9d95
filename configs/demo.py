r"""Quickstart: a tiny FlexiViT on the offline `fine_shapes` set, ~5 minutes on 2 CPU cores.

    python -m trainers.train --config configs/demo.py --workdir /tmp/demo

Trains one set of weights with the patch size sampled per step from 48..8 at 96px
(token grids 2x2..12x12) and ends with test accuracy at every patch size as a table.
Args: runlocal (a few steps, for tests), res=96, steps=..., width/depth/heads, fixed=0
(a patch size > 0 trains a plain fixed-patch ViT for comparison), curriculum=1 (0:
uniform over the patch sizes from the first step), data=fine_shapes/96.
"""
import ml_collections

from flexi import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, runlocal=False, res=96, steps=3000, batch=64, fixed=0,
                           width=64, depth=2, heads=4, pool="gap", lr=2e-3,
                           data="fine_shapes/96", curriculum=1)
  c = ml_collections.ConfigDict()
  c.arg = a.to_dict()
  res = a.res if not a.runlocal else 32
  data = a.data if not a.runlocal else "fine_shapes/tiny"  # 32px, 160 train / 50 test.
  c.seed = 0
  # fine_shapes: 10 texture classes; shape_captions: 12 colour-shape classes (its
  # tower then serves flexi-LiT's :runlocal, which needs colour/shape features).
  c.num_classes = 12 if data.startswith("shape_captions") else 10
  c.loss = "softmax_xent"
  c.total_steps = a.steps if not a.runlocal else 4

  c.input = dict(data=dict(name=data, split="train"), batch_size=a.batch,
                 shuffle_buffer_size=2_000, cache_raw=True, prefetch=4)
  pp_common = (f'|value_range(-1, 1)|onehot({c.num_classes}, key="label", key_result="labels")'
               '|keep("image", "labels")')
  # fine_shapes classes are invariant to a left-right flip (a mirrored diagonal is
  # still "diagonal"), so flip_lr is a free augmentation.
  c.input.pp = f"decode|flip_lr|resize({res})" + pp_common
  pp_eval = f"decode|resize({res})" + pp_common

  c.log_training_steps = 50 if not a.runlocal else 1
  c.ckpt_steps = 500 if not a.runlocal else 2

  c.model = dict(width=a.width, depth=a.depth, mlp_dim=4 * a.width, num_heads=a.heads,
                 pool_type=a.pool, posemb="learn", patch_size=(32, 32), posemb_size=(7, 7))
  sizes = [p for p in (48, 32, 24, 16, 12, 8) if res % p == 0] if not a.runlocal else [16, 8]
  if a.fixed:
    c.model.patch_size = (a.fixed, a.fixed)
    c.model.posemb_size = (res // a.fixed, res // a.fixed)
    c.flexi = dict(patch_size=dict(v=[a.fixed]))
  else:
    c.flexi = dict(patch_size=dict(v=sizes))  # Uniform...
    if a.curriculum and not a.runlocal:
      # ...after a warm start on the three smallest sizes for the first 30% of steps:
      # fine patterns are learned first, then every size (paper section 3's curricula).
      small = [1 if p <= sorted(sizes)[2] else 0 for p in sizes]
      c.flexi.curriculum = dict(stages=[(0.3, small), (1.0, [1] * len(sizes))])

  c.optax_name = "scale_by_adam"
  c.grad_clip_norm = 1.0
  c.lr = a.lr
  c.wd = 1e-4
  c.schedule = dict(warmup_steps=100 if not a.runlocal else 1, decay_type="cosine")

  split = "test" if not a.runlocal else "test[:32]"
  # At the end: every patch size in one pass over the test split (fixed-patch runs too),
  # with GFLOPs/image; writes WORKDIR/test_sweep.json and test_sweep.png.
  c.evals = dict(test=dict(type="sweep", data=dict(name=data, split=split), pp_fn=pp_eval,
                           patch_sizes=sizes, batch_size=200 if not a.runlocal else 16,
                           out_name="test_sweep", plot=not a.runlocal))
  return c
