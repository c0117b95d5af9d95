r"""FlexiViT by FunMatch distillation (paper section 3.4; big_vision's
configs/proj/flexivit/i21k_distill.py and i1k_deit3_distill.py).

    python -m trainers.distill --config configs/flexivit_b.py --workdir gs://...  # i21k, B
    python -m trainers.distill --config configs/flexivit_b.py:data=i1k,variant=S --workdir ...
    python -m trainers.train --config configs/teacher_demo.py --workdir workdirs/teacher
    python -m trainers.distill --config configs/flexivit_b.py:runlocal --workdir workdirs/distill

i21k (default): student FlexiViT-{variant} (pool tok, stored kernel 32x32, posemb 7x7)
at 240px, token grids 5..30 (patch sizes 48..8) sampled uniformly; teacher "prof" =
plain ViT-B/8 at 224px (big_vision's howto-i21k-B/8), student initialised from it
(kernel PI-resized to 32x32, posemb resized to 7x7); KL(teacher || student) with
t=1; scale_by_adam with a bf16 first moment, lr 1e-4, wd 1e-5, 5k warmup, cosine,
clip 1.0, mixup p=1.0 on student and teacher images alike, batch 4096, 90 epochs.
i1k (`data=i1k`): ImageNet-1k train[:99%], teacher DeiT III {variant}/16 at 384px,
batch 1024 (as big_vision's i1k_deit3_distill.py).

Args: data=i21k|i1k, variant=S|B|L, res=240, teacher=<path> (override the teacher
checkpoint), runlocal (tiny student and teacher on the offline `fine_shapes/64`
data; the teacher is the checkpoint of configs/teacher_demo.py, by default in
workdirs/teacher), steps=<n> (runlocal length, default 40000: 35 min here; 2500 for a
3-minute check). Its results:
docs/results_distill.md.

Differences to big_vision: the teacher copy is resized with `key="prof"` (big_vision's
i21k config has `resize(224, outkey="prof")`, which reads the already value-ranged
student image and value-ranges it twice); the i21k variant's ImageNet-1k evals need
a label-mapped classifier that does not exist here yet, so i21k evaluates on i21k
splits and measures student-teacher distances there. The student stores a 32x32
kernel (paper section 3.4, released checkpoints); big_vision's i21k config writes
patch_size=(8, 8) for it, its i1k config patch_size=(16, 16). Eval preprocessing is
big_vision's: `resize` (square) + central crop, `resize_small` for the i21k distances.
"""
import ml_collections

from flexi import config as config_lib

SEQHW = (5, 6, 8, 10, 12, 15, 16, 20, 24, 30)  # Patch 48, 40, 30, 24, 20, 16, 15, 12, 10, 8.
DISTANCES = ({"kind": "kl"}, {"kind": "logsoftmax_euclidean"},
             {"kind": "agree", "k": 1}, {"kind": "agree", "k": 5})
_AUGREG = "gs://vit_models/augreg/"
I21K_TEACHER = _AUGREG + "B_8-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0.npz"
DEIT3 = {"S": "small", "B": "base", "L": "large"}
TEACHER_DEMO_CMD = ("python -m trainers.train --config configs/teacher_demo.py "
                    "--workdir workdirs/teacher")


def _pp_train(res, t_res, label_pp):
  # Crop and flip BEFORE the copy, so student and teacher see the same view.
  return (f'decode|inception_crop|flip_lr|copy("image", "prof")'
          f'|resize({res})|value_range(-1, 1)'
          f'|resize({t_res}, key="prof")|value_range(-1, 1, key="prof")' + label_pp)


def _pp_eval(res, key="image", resize="resize"):
  # As big_vision's flexivit configs: a square `resize` to 8/7 of the crop for the
  # classification evals (it distorts the aspect ratio), `resize_small` for i21k distances.
  return (f'{resize}({res // 7 * 8}, key="{key}")|central_crop({res}, key="{key}")'
          f'|value_range(-1, 1, key="{key}")')


def _paper(c, a):
  """i21k / i1k at full scale."""
  i1k = a.data == "i1k"
  c.total_epochs = 90
  c.num_classes = 1000 if i1k else 21843
  c.init_head_bias = None if i1k else -10.0
  c.loss = "softmax_xent" if i1k else "sigmoid_xent"
  if i1k:
    c.input = dict(data=dict(name="imagenet2012", split="train[:99%]"), batch_size=1024,
                   shuffle_buffer_size=250_000, prefetch=8)
    t_res, t_model = 384, dict(variant=f"{a.variant}/16", posemb_size=(24, 24),
                               pool_type="tok")
    t_init = f"gs://big_vision/zoo/deit3/bv_deit_3_{DEIT3[a.variant]}_384_1k.npz"
    made_by = f"download {t_init} (big_vision's deit3_{a.variant}_384_1k)"
  else:
    c.input = dict(data=dict(name="imagenet21k", split="full[51200:]"), batch_size=4096,
                   shuffle_buffer_size=250_000, prefetch=8)
    t_res, t_model = 224, dict(variant="B/8", posemb_size=(28, 28), pool_type="tok")
    t_init = I21K_TEACHER
    made_by = f"download {t_init} (big_vision's howto-i21k-B/8)"
  key = "label" if i1k else "labels"  # big_vision's i21k examples carry "labels".
  label = (f'|onehot({c.num_classes}, key="{key}", key_result="labels")'
           '|keep("image", "prof", "labels")')
  c.input.pp = _pp_train(a.res, t_res, label)
  c.teachers = dict(prof=dict(model=t_model, init=a.teacher or t_init, input_key="prof",
                              made_by=made_by))
  c.model = dict(variant=a.variant, pool_type="tok", patch_size=(32, 32), posemb_size=(7, 7))
  # Student init from the teacher needs the same width/depth (i21k's teacher is a B).
  c.model_init = "prof" if (i1k or a.variant == "B") else None
  c.flexi = dict(seqhw=dict(v=SEQHW, p=[1] * len(SEQHW)))
  c.evals = _paper_evals(a, c, t_res)


def _paper_evals(a, c, t_res):
  """Student at every patch size, teacher, and distances, per split."""
  i1k = a.data == "i1k"
  n = c.num_classes
  lbl = lambda k, keep: (f'|onehot({n}, key="{k}", key_result="labels")'
                         f'|keep("{keep}", "labels")')
  student_pp = "decode|" + _pp_eval(a.res)
  teacher_pp = 'decode|copy("image", "prof")|' + _pp_eval(t_res, "prof")
  both = "resize" if i1k else "resize_small"
  both_pp = ('decode|copy("image", "prof")|' + _pp_eval(a.res, resize=both) + "|"
             + _pp_eval(t_res, "prof", resize=both) + '|keep("image", "prof")')
  common = dict(loss_name=c.loss, log_percent=0.05, batch_size=1024)
  if i1k:
    splits = dict(minitrain=("imagenet2012", "train[:2%]", "label"),
                  minival=("imagenet2012", "train[99%:]", "label"),
                  val=("imagenet2012", "validation", "label"),
                  v2=("imagenet_v2", "test", "label"),
                  real=("imagenet2012_real", "validation", "real_label"))
    dist_splits = ("minitrain", "val")
  else:
    splits = dict(test=("imagenet21k", "full[:25_600]", "labels"),
                  val=("imagenet21k", "full[25_600:51_200]", "labels"),
                  minitrain=("imagenet21k", "full[51_200:76_800]", "labels"))
    dist_splits = ("minitrain", "val")
  evals = {}
  for name, (ds, split, key) in splits.items():
    data = dict(name=ds, split=split)
    evals[f"student_{name}"] = dict(type="classification", data=data,
                                    pp_fn=student_pp + lbl(key, "image"), **common)
    evals[f"teacher_{name}"] = dict(type="classification", data=data, pred="predict_prof",
                                    pp_fn=teacher_pp + lbl(key, "prof"),
                                    **{**common, "log_percent": 0.5})
  for name in dist_splits:
    ds, split, _ = splits[name]
    evals[f"dist_{name}"] = dict(type="distance", data=dict(name=ds, split=split),
                                 pp_fn=both_pp, teacher_pred="predict_prof",
                                 distances=DISTANCES, log_percent=0.05, batch_size=1024)
  return evals


def _runlocal(c, a):
  """Tiny student and teacher on fine_shapes/64: minutes on a laptop CPU."""
  # As in the paper (student 240px > teacher 224px), the student sees the images
  # slightly upsampled: at a lower resolution the 2-pixel textures would alias.
  res, t_res, t_patch = 72, 64, 8      # Student 72px, teacher a plain ViT/8 at 64px.
  seqhw = (3, 4, 6, 8, 9)               # Patch sizes 24, 18, 12, 9, 8 at 72px.
  c.total_steps = a.steps
  c.num_classes = 10
  c.loss = "softmax_xent"
  c.input = dict(data=dict(name="fine_shapes/64", split="train"), batch_size=64,
                 shuffle_buffer_size=3000, cache_raw=True, prefetch=4)
  label = (f'|onehot({c.num_classes}, key="label", key_result="labels")'
           '|keep("image", "prof", "labels")')
  c.input.pp = _pp_train(res, t_res, label).replace("inception_crop",
                                                     "inception_crop(area_min=60)")
  width = 64
  c.teachers = dict(prof=dict(
      model=dict(width=width, depth=2, mlp_dim=4 * width, num_heads=4, pool_type="tok",
                 patch_size=(t_patch, t_patch), posemb_size=(t_res // t_patch,) * 2),
      init=a.teacher or "workdirs/teacher", input_key="prof", made_by=TEACHER_DEMO_CMD))
  c.model = dict(width=width, depth=2, mlp_dim=4 * width, num_heads=4, pool_type="tok",
                 patch_size=(32, 32), posemb_size=(7, 7))
  c.model_init = "prof"
  c.flexi = dict(seqhw=dict(v=seqhw))
  c.lr, c.wd = 1e-3, 1e-5
  c.schedule = dict(warmup_steps=min(50, a.steps // 10), decay_type="cosine")
  c.log_training_steps, c.ckpt_steps = 25, 250

  data = dict(name="fine_shapes/64", split="test")
  lbl = lambda *keys: (f'|onehot({c.num_classes}, key="label", key_result="labels")'
                       f'|keep({", ".join(map(repr, keys))})')
  student_pp = f"decode|resize({res})|value_range(-1, 1)" + lbl("image", "labels")
  teacher_pp = (f'decode|copy("image", "prof")|resize({t_res}, key="prof")'
                f'|value_range(-1, 1, key="prof")' + lbl("prof", "labels"))
  both_pp = (f'decode|copy("image", "prof")|resize({res})|value_range(-1, 1)'
             f'|resize({t_res}, key="prof")|value_range(-1, 1, key="prof")'
             + lbl("image", "prof", "labels"))
  every = dict(log_steps=a.steps, batch_size=128)
  c.evals = dict(
      student_test=dict(type="classification", data=data, pp_fn=student_pp, **every),
      teacher_test=dict(type="classification", data=data, pred="predict_prof",
                        pp_fn=teacher_pp, **every),
      # The teacher (a fixed-patch ViT/8) at the student's patch sizes: the baseline.
      baseline_test=dict(type="classification", data=data, pp_fn=student_pp,
                         preds=[f"predict_prof_seqhw={s}" for s in seqhw], **every),
      dist_test=dict(type="distance", data=data, pp_fn=both_pp, teacher_pred="predict_prof",
                     distances=DISTANCES, **every))


def get_config(arg=None):
  a = config_lib.parse_arg(arg, runlocal=False, data="i21k", variant="B", res=240,
                           teacher="", steps=40000)
  if a.data not in ("i21k", "i1k"):
    raise config_lib.ConfigError(f"config arg data={a.data!r}: choose i21k or i1k")
  if a.variant not in DEIT3:
    raise config_lib.ConfigError(f"config arg variant={a.variant!r}: choose S, B or L")
  c = ml_collections.ConfigDict()
  c.arg = a.to_dict()
  c.seed = 0
  c.distance = "kl"
  c.distance_kw = dict(t=1.0)
  c.optax_name = "scale_by_adam"
  c.optax = dict(mu_dtype="bfloat16")
  c.grad_clip_norm = 1.0
  c.lr = 1e-4
  c.wd = 1e-5
  c.schedule = dict(warmup_steps=5000, decay_type="cosine")
  c.mixup = dict(p=1.0, fold_in=None)
  c.log_training_steps = 50
  c.ckpt_steps = 1000
  if a.runlocal:
    _runlocal(c, a)
  else:
    _paper(c, a)
  return c
