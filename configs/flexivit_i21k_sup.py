r"""FlexiViT-B supervised pre-training on ImageNet-21k (paper section 3).

Mirrors big_vision's `configs/proj/flexivit/i21k_sup.py`: B at 240px, token grids
5..30 sampled uniformly (patch sizes 48, 40, 30, 24, 20, 16, 15, 12, 10, 8), the
stored patch kernel 32x32 and posemb 7x7, scale_by_adam with a bf16 first moment,
sigmoid loss with head bias -10, mixup 0.2, 90 epochs.

    python -m trainers.train --config configs/flexivit_i21k_sup.py --workdir gs://...
    python -m trainers.train --config configs/flexivit_i21k_sup.py:runlocal --workdir /tmp/x

Args: runlocal (tiny model, offline `fine_shapes` data, a few steps), variant=B,
res=240, fixed=0 (a patch size > 0 trains a fixed-patch baseline with the same recipe;
see configs/vit_fixed_i21k_sup.py).
Differences to big_vision: no randaug op yet, and the ImageNet-1k label-mapped
evaluators are left out (no `classification_with_labelmap` evaluator yet).
"""
import ml_collections

from flexi import config as config_lib

SEQHW = (5, 6, 8, 10, 12, 15, 16, 20, 24, 30)


def get_config(arg=None):
  # 240px is divisible by 240, 120, 80, 60, 48, 40, 30, 24, 20, 16, 15, 12, 10, 8, ...
  a = config_lib.parse_arg(arg, runlocal=False, variant="B", res=240, fixed=0)
  c = ml_collections.ConfigDict()
  c.arg = a.to_dict()
  res = 32 if a.runlocal else a.res

  c.seed = 0
  c.total_epochs = 90
  c.num_classes = 21843 if not a.runlocal else 10
  c.init_head_bias = -10.0
  c.loss = "sigmoid_xent"

  if not a.runlocal:
    c.input = dict(data=dict(name="imagenet21k", split="full[51200:]"),
                   batch_size=4096, shuffle_buffer_size=250_000, prefetch=8)
    train_aug = f"decode_jpeg_and_inception_crop({res})|flip_lr"
  else:
    c.total_epochs = None
    c.total_steps = 4
    c.input = dict(data=dict(name="fine_shapes/tiny", split="train"), batch_size=8,
                   shuffle_buffer_size=25, prefetch=2)
    train_aug = f"decode|resize({res})|flip_lr"
  key = "label" if a.runlocal else "labels"  # big_vision's i21k examples carry "labels".
  pp_common = (f'|value_range(-1, 1)|onehot({c.num_classes}, key="{key}", key_result="labels")'
               '|keep("image", "labels")')
  c.input.pp = train_aug + pp_common
  pp_eval = f"decode|resize_small({res // 7 * 8})|central_crop({res})" + pp_common

  c.log_training_steps = 50 if not a.runlocal else 1
  c.ckpt_steps = 1000 if not a.runlocal else 2

  # Model: the stored kernel is 32x32 (PI-resized on the fly), posemb 7x7.
  c.model_name = "vit"
  variant = a.variant if not a.runlocal else "mu"
  c.model = dict(variant=variant, pool_type="tok", posemb="learn",
                 patch_size=(32, 32), posemb_size=(7, 7))
  if a.fixed:
    c.model.patch_size = (a.fixed, a.fixed)
    c.model.posemb_size = (res // a.fixed, res // a.fixed)
    c.flexi = dict(patch_size=dict(v=[a.fixed]))
  elif a.runlocal:
    c.flexi = dict(seqhw=dict(v=[2, 4]))  # Patch sizes 16, 8 at 32px.
  else:
    c.flexi = dict(seqhw=dict(v=SEQHW, p=[1] * len(SEQHW)))

  c.optax_name = "scale_by_adam"
  c.optax = dict(mu_dtype="bfloat16")
  c.grad_clip_norm = 1.0
  c.lr = 0.001
  c.wd = 0.0001
  c.schedule = dict(warmup_steps=10_000 if not a.runlocal else 1, decay_type="cosine")
  c.mixup = dict(p=0.2, fold_in=None)

  def ev(split):
    if a.runlocal:
      data = dict(name="fine_shapes/tiny", split="test[:16]")
    else:
      data = dict(name="imagenet21k", split=split)
    # One evaluator per split covering every trained patch size (preds=None = all).
    return dict(type="classification", data=data, pp_fn=pp_eval, loss_name=c.loss,
                log_steps=5000 if not a.runlocal else 4,
                batch_size=1024 if not a.runlocal else 8)

  c.evals = dict(test=ev("full[:25_600]"), val=ev("full[25_600:51_200]"),
                 train=ev("full[51_200:76_800]"))
  if a.runlocal:
    c.evals = dict(test=c.evals.test)
  c.compilation_cache_dir = "~/.cache/flexi/jax_cache"
  return c
