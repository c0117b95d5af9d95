r"""Flexi-LiT (paper section 5.2): a text tower aligned to a locked FlexiViT at every patch size.

    # Realistic: FlexiViT-B i21k image tower, COCO captions, a SentencePiece vocabulary.
    python -m trainers.lit --config configs/flexilit_b.py:spm=/path/to/vocab.model \
        --workdir workdirs/flexilit_b
    # Offline, on this machine: first the image tower (the supervised demo on the
    # captions' images, 12 colour-shape classes), then LiT.
    python -m trainers.train --config configs/demo.py:data=shape_captions/64 \
        --workdir workdirs/demo_captions
    python -m trainers.lit --config configs/flexilit_b.py:runlocal --workdir workdirs/lit
    python -m trainers.lit --config configs/flexilit_b.py:runlocal,fixed=16 --workdir workdirs/lit16

Args: runlocal (offline shape_captions + the demo FlexiViT), img_workdir=workdirs/demo_captions
(the demo run to take the image tower from; a tower trained on fine_shapes textures is
blind to colour and shape, and locked LiT on captions then stays at chance), fixed=0 (a patch size > 0: train the text
tower at that one size only, the fixed-patch LiT baseline; evaluation still covers every
size), steps, batch, loss=softmax|sigmoid, train_img (unlock: train the image tower too), smoke
(a few steps on tiny splits, for tests).
"""
import os

import ml_collections

from flexi import config as config_lib

_HERE = os.path.dirname(os.path.abspath(__file__))
B_SIZES = (48, 40, 30, 24, 20, 16, 15, 12, 10, 8)  # At 240px: token grids 5..30.


def _demo_image_tower():
  """The demo FlexiViT's model kwargs and resolution, read from configs/demo.py."""
  demo = config_lib.load(os.path.join(_HERE, "demo.py"))
  return demo.model.to_dict(), int(demo.arg.res)


def _common(c, a):
  c.seed = 0
  c.lit = dict(loss=a.loss, lock_img=not a.train_img)
  if a.loss == "sigmoid":  # SigLIP init.
    c.model.temperature_init, c.model.bias_init = 10.0, -10.0
  else:
    c.model.temperature_init = 10.0
  c.optax_name = "scale_by_adam"
  c.grad_clip_norm = 1.0
  c.wd_mults = [("txt/.*/kernel$", 1.0), ("img/.*/kernel$", 1.0)]


def _realistic(c, a):
  res = 240
  spm = a.spm or "c4_en.model"  # A SentencePiece model file (e.g. big_vision's c4_en, 32k).
  tok = f'tokenize(max_len=16, model="{spm}", eos="sticky", pad_value=1, inkey="texts")'
  c.model = dict(
      image=dict(variant="B", pool_type="tok", patch_size=(32, 32), posemb_size=(7, 7)),
      text=dict(variant="B", vocab_size=32_000, pool_type="last"),
      out_dim=(None, 768))
  c.model_init = dict(img="FlexiViT-B i21k 300ep")  # flexi.checkpoint.PRETRAINED name.
  c.model_load = dict(img_dont_load=["head/.*"])
  c.input = dict(data=dict(name="coco_captions", split="train"), batch_size=a.batch or 4096,
                 shuffle_buffer_size=50_000)
  # coco_captions nests captions under captions/text; `flatten` exposes that key.
  c.input.pp = (f'decode|resize({res})|value_range(-1, 1)|flatten|'
                f'choice(inkey="captions/text", outkey="texts")|{tok}|keep("image", "labels")')
  c.total_steps = a.steps or 20_000
  c.lr, c.wd = 1e-3, 1e-4
  c.schedule = dict(decay_type="cosine", warmup_steps=1_000)
  c.log_training_steps, c.ckpt_steps = 50, 1_000
  sizes = [p for p in B_SIZES if res % p == 0]
  c.flexi = dict(patch_size=dict(v=[a.fixed] if a.fixed else sizes))
  preds = [f"predict_patch_size={p}" for p in sizes]
  # Retrieval scores all captions of an image (COCO's protocol: the first 5, most images
  # have exactly 5); first_n pads the few with fewer and masks them out.
  tok_all = tok[:-1] + ", sample_if_multi=False)"
  pp_eval = (f'decode|resize({res})|value_range(-1, 1)|flatten|'
             f'first_n(5, inkey="captions/text", outkey="texts")|{tok_all}|'
             'keep("image", "labels", "texts_mask")')
  c.evals = dict(
      coco=dict(type="retrieval", data=dict(name="coco_captions", split="val"),
                pp_fn=pp_eval, preds=preds, batch_size=512, log_steps=2_000),
      cifar100=dict(type="zeroshot", data=dict(name="cifar100", split="test"),
                    pp_fn=f'decode|resize({res})|value_range(-1, 1)|keep("image", "label")',
                    pp_txt=tok, templates=["a photo of a {}.", "a blurry photo of a {}.",
                                           "a photo of the small {}.", "itap of a {}."],
                    preds=preds, batch_size=512, log_steps=2_000))


def _runlocal(c, a):
  image, res = _demo_image_tower()
  max_len = 64  # Bytes: the longest shape_captions caption is ~50 characters.
  tok = f'tokenize(max_len={max_len}, eos="sticky", pad_value=1, inkey="texts")'
  c.model = dict(image=image,
                 text=dict(width=64, depth=2, mlp_dim=256, num_heads=4, vocab_size=259,
                           pool_type="last"),
                 out_dim=(None, image["width"]))
  hint = ("train the image tower first: python -m trainers.train --config "
          f"configs/demo.py:data=shape_captions/64 --workdir {a.img_workdir}")
  c.model_init = dict(img=a.img_workdir)
  c.model_load = dict(img_dont_load=["head/.*"], missing_hint=hint)
  data = "shape_captions/64" if not a.smoke else "shape_captions/tiny"
  c.input = dict(data=dict(name=data, split="train"), batch_size=a.batch or 64,
                 shuffle_buffer_size=4_000, cache_raw=True, prefetch=4)
  c.input.pp = (f'decode|resize({res})|flip_lr|value_range(-1, 1)|{tok}|'
                'keep("image", "labels")')
  c.total_steps = a.steps or (600 if not a.smoke else 3)
  c.lr, c.wd = 3e-3, 1e-4
  c.schedule = dict(decay_type="cosine", warmup_steps=50 if not a.smoke else 1)
  c.log_training_steps = 50 if not a.smoke else 1
  c.ckpt_steps = 1_000 if not a.smoke else 2
  sizes = [p for p in (48, 32, 24, 16, 12, 8) if res % p == 0]
  c.flexi = dict(patch_size=dict(v=[a.fixed] if a.fixed else sizes))
  preds = [f"predict_patch_size={p}" for p in sizes]
  split = "test" if not a.smoke else "test[:16]"
  eval_img = f"decode|resize({res})|value_range(-1, 1)"
  bs = 100 if not a.smoke else 8
  c.evals = dict(
      # All three captions of each image: 500 images, 1500 texts (first_n gives the
      # caption list its static length, which tf.data needs to pad the last batch).
      retrieval=dict(type="retrieval", data=dict(name=data, split=split),
                     pp_fn=f'{eval_img}|first_n(3)|{tok[:-1]}, sample_if_multi=False)|'
                           'keep("image", "labels")',
                     preds=preds, batch_size=bs, log_percent=100),
      zeroshot=dict(type="zeroshot", data=dict(name=data, split=split),
                    pp_fn=f'{eval_img}|keep("image", "label")', pp_txt=tok,
                    templates=["a {}", "a picture of a {}"], preds=preds,
                    batch_size=bs, log_percent=100))


def get_config(arg=None):
  a = config_lib.parse_arg(arg, runlocal=False, smoke=False,
                           img_workdir="workdirs/demo_captions", fixed=0, steps=0, batch=0,
                           loss="softmax", train_img=False, spm="")
  if a.loss not in ("softmax", "sigmoid"):
    raise config_lib.ConfigError(f"config arg loss={a.loss!r}: use softmax or sigmoid")
  c = ml_collections.ConfigDict()
  c.arg = a.to_dict()
  c.model = {}
  if a.runlocal or a.smoke:
    _runlocal(c, a)
  else:
    _realistic(c, a)
  _common(c, a)
  return c
