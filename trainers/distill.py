r"""FunMatch distillation of a fixed-patch ViT teacher into a FlexiViT student.

    python -m trainers.distill --config configs/flexivit_b.py --workdir gs://...
    python -m trainers.train --config configs/teacher_demo.py --workdir workdirs/teacher
    python -m trainers.distill --config configs/flexivit_b.py:runlocal --workdir workdirs/distill

Paper section 3.4 / big_vision's trainers/proj/flexi/distill.py: every step the
student sees the batch at a random patch size and minimises
`distance(student(image), teacher(prof))` (default t^2 KL(teacher || student)); the
student's and the teachers' copies of each image come from one augmented view (pp
`copy` after the crop and flip, mixup applied to all of them with one draw).
Teachers are loaded once, frozen, passed to the step as constants (not donated, not
optimised, not checkpointed). `model_init` may name a teacher: the student then
starts from its weights (kernel PI-resized to the stored size, posemb resized,
everything else copied). Only the model, loss and predict functions live here; the
loop is `flexi.train_loop.train_and_evaluate`.

Config keys on top of the base schema:
    teachers = {"prof": dict(model=dict(variant="B/8", posemb_size=(28, 28), pool_type="tok"),
                             init="path.npz | workdir | released name",
                             input_key="prof",           # batch key it reads (default: name)
                             dont_load=[],               # regexes kept from random init
                             made_by="command that produces init")}  # for the error message
    distance = "kl"; distance_kw = dict(t=1.0)
"""
import dataclasses
import os
import re
import sys
from typing import Optional

import jax
import jax.numpy as jnp

import evaluators.distance as dd  # Registers the "distance" evaluator.
from flexi import checkpoint, ckpt_manager, cli, host, losses, train_loop, vit
from flexi import config as config_lib

SCHEMA = config_lib.base_schema().extend(
    dict(
        teachers={},      # (open) {name: dict(model, init, input_key, dont_load, made_by)}.
        distance="kl",    # Per-example distance of evaluators/distance.py (kl, agree, ...).
        distance_kw={},   # (open) its kwargs, e.g. t=1.0 (temperature of both softmaxes).
    ),
    open_paths=("teachers", "distance_kw"))

_TEACHER_KEYS = ("model", "init", "input_key", "dont_load", "made_by")


@dataclasses.dataclass
class Teacher:
  name: str
  model: object
  init: str
  input_key: str
  dont_load: tuple = ()
  made_by: Optional[str] = None


def parse_teachers(config):
  """config.teachers -> [Teacher]; an empty or malformed section is an error."""
  raw = config.teachers.to_dict() if hasattr(config.teachers, "to_dict") else config.teachers
  if not raw:
    raise ValueError("config.teachers is empty: distillation needs at least one teacher, "
                     "e.g. teachers={'prof': dict(model=..., init=...)}")
  out = []
  for name, spec in raw.items():
    unknown = set(spec) - set(_TEACHER_KEYS)
    if unknown:
      raise ValueError(f"config.teachers.{name}: unknown key(s) {sorted(unknown)}; "
                       f"known: {', '.join(_TEACHER_KEYS)}")
    if not spec.get("init"):
      raise ValueError(f"config.teachers.{name} needs 'init' (checkpoint path, workdir or "
                       "released name): a random teacher teaches nothing")
    out.append(Teacher(name, vit.Model(config.num_classes, **dict(spec.get("model", {}))),
                       spec["init"], spec.get("input_key", name),
                       tuple(spec.get("dont_load", ())), spec.get("made_by")))
  return out


def _missing(teacher, path, why):
  hint = f"; produce it with: {teacher.made_by}" if teacher.made_by else ""
  return FileNotFoundError(f"teacher {teacher.name!r}: {why} ({path}){hint}")


def _read_teacher(teacher):
  """Host numpy params of the teacher's checkpoint (workdir, .npz or released name)."""
  path = os.path.expanduser(str(teacher.init))
  if os.path.isdir(path):
    if not os.path.isdir(os.path.join(path, "ckpt")):
      raise _missing(teacher, path, "the workdir has no checkpoint")
    try:
      return ckpt_manager.restore_params_from_workdir(path)
    except FileNotFoundError:
      raise _missing(teacher, path, "the workdir has no checkpoint") from None
  local = path.split(".npz:")[0] + ".npz" if ".npz:" in path else path
  if "://" not in path and path not in checkpoint.PRETRAINED and not os.path.exists(local):
    raise _missing(teacher, path, "checkpoint not found")
  try:
    return checkpoint.load_params(path)
  except FileNotFoundError as e:
    raise _missing(teacher, path, str(e)) from None
  except Exception as e:  # pylint: disable=broad-except
    if "://" in path and "NotFound" in type(e).__name__:  # tf.io.gfile on gs:// etc.
      raise _missing(teacher, path, "checkpoint not found") from None
    raise


def _native_image(model):
  """A 1-image dummy input on which the model runs at its stored patch size."""
  ph, pw = model.patch_size
  gh, gw = model.posemb_size
  return jnp.zeros((1, ph * gh, pw * gw, 3), jnp.float32)


def load_teacher(teacher):
  """Teacher params (host numpy) in the teacher model's own tree, shapes checked."""
  loaded = _read_teacher(teacher)  # First: a missing file fails before any compile.
  init = jax.device_get(jax.jit(teacher.model.init)(
      jax.random.PRNGKey(0), _native_image(teacher.model))["params"])
  # A teacher runs exactly as stored: no silent PI-/posemb-resize of its weights.
  want = checkpoint.flatten(init)
  got = checkpoint.fix_old_layouts(checkpoint.flatten(loaded))
  skip = [re.compile(p) for p in teacher.dont_load]
  bad = [f"{k} {tuple(got[k].shape)} vs model {tuple(v.shape)}" for k, v in want.items()
         if k in got and tuple(got[k].shape) != tuple(v.shape)
         and not any(p.fullmatch(k) for p in skip)]
  try:
    if bad:
      raise ValueError("shapes differ: " + "; ".join(bad))
    return checkpoint.load_into(init, loaded, dont_load=teacher.dont_load)
  except ValueError as e:
    raise ValueError(f"teacher {teacher.name!r} ({teacher.init}) does not fit "
                     f"config.teachers.{teacher.name}.model: {e}") from None


def mixup(rng, batch, *, p, keys, fold_in=None):
  """One mixup draw (coefficient and permutation) for every key in `keys` and labels."""
  import input_pipeline  # pylint: disable=import-outside-toplevel
  if "labels" in batch:
    return input_pipeline.mixup(rng, batch, p=p, keys=keys, fold_in=fold_in)
  # Unlabelled distillation data: same maths, the first image key stands in for labels.
  return input_pipeline.mixup(rng, batch, p=p, keys=keys[1:], label_key=keys[0],
                              fold_in=fold_in)


def make_trainer(config) -> train_loop.Trainer:
  """The distillation trainer for `config` (schema: SCHEMA)."""
  student = vit.Model(config.num_classes, **config.model)
  teachers = parse_teachers(config)
  names = {t.name for t in teachers}
  distance, distance_kw = config.distance, dict(config.distance_kw)
  dd.check_distance({"kind": distance, **distance_kw}, where="config.distance")
  mix_p = float(config.mixup.get("p") or 0.0)
  mix_fold_in = config.mixup.get("fold_in")
  mix_keys = ("image", *(t.input_key for t in teachers))
  cache = {}

  def loaded_teachers():  # Read once, shared by the student init and the consts.
    if not cache:
      cache.update({t.name: load_teacher(t) for t in teachers})
    return cache

  def init_params(rng, batch_spec):
    del batch_spec  # Param shapes do not depend on the input size; init at the stored one.
    params = student.init(rng, _native_image(student))["params"]
    if config.init_head_bias is not None:
      params["head"]["bias"] = jnp.full_like(params["head"]["bias"], config.init_head_bias)
    return params

  def load_pretrained(params, config):
    if config.model_init not in names:
      return train_loop.default_load_pretrained(params, config)
    dont_load = list(config.model_load.get("dont_load", ()))
    return checkpoint.load_into(jax.device_get(params), loaded_teachers()[config.model_init],
                                dont_load=dont_load)

  def make_consts(config):
    del config
    return dict(loaded_teachers())

  def teacher_logits(consts, batch):
    return {t.name: jax.lax.stop_gradient(t.model.apply(
        {"params": consts[t.name]}, batch[t.input_key], train=False)[0]) for t in teachers}

  def loss_fn(params, batch, *, rng, flexi, consts):
    rng_mix, rng_drop = jax.random.split(rng)
    if mix_p:
      batch = mixup(rng_mix, batch, p=mix_p, keys=mix_keys, fold_in=mix_fold_in)
    logits, _ = student.apply({"params": params}, batch["image"], train=True,
                              rngs={"dropout": rng_drop}, **flexi)
    logits = logits.astype(jnp.float32)
    aux, total = {}, 0.0
    for name, t_logits in teacher_logits(consts, batch).items():
      loss = jnp.mean(dd.dist(logits, t_logits, distance, **distance_kw))
      aux[f"distill_loss_{name}"] = loss
      aux[f"agree_top1_{name}"] = jnp.mean(dd.dist(logits, t_logits, "agree", k=1))
      total = total + loss
    aux["entropy_student"] = jnp.mean(-jnp.sum(
        jax.nn.softmax(logits) * jax.nn.log_softmax(logits), axis=-1))
    if "labels" in batch:
      aux["task_loss_student"] = losses.softmax_xent(logits, batch["labels"])
    return total, aux

  def predict_fn(variables, batch, **flexi):
    logits, out = vit.apply_with_blocks(student, {"params": variables["params"]},
                                        batch["image"], train=False, **flexi)
    return {"logits": logits, "pre_logits": out["pre_logits"], "blocks": out["blocks"]}

  return train_loop.Trainer(init_params=init_params, loss_fn=loss_fn, predict_fn=predict_fn,
                            load_pretrained=load_pretrained, make_consts=make_consts,
                            extra_predict_fns=teacher_predict_fns(teachers, config),
                            schema=SCHEMA)


def teacher_predict_fns(teachers, config):
  """"predict_<name>": a teacher on its own input; "predict_<name>_<kind>=<v>": on the
  student's "image" at the student's patch sizes (a fixed-patch baseline off its size)."""
  fns = {}
  flexi = config.flexi.to_dict()
  kind = "seqhw" if flexi.get("seqhw") else "patch_size"
  values = (flexi.get(kind) or {}).get("v", ())
  for t in teachers:
    def native(variables, batch, t=t):
      logits, out = t.model.apply({"params": variables[t.name]}, batch[t.input_key])
      return {"logits": logits, "pre_logits": out["pre_logits"]}
    fns[f"predict_{t.name}"] = native
    for v in values:
      def resized(variables, batch, t=t, v=v):
        logits, _ = t.model.apply({"params": variables[t.name]}, batch["image"], **{kind: v})
        return {"logits": logits}
      fns[f"predict_{t.name}_{kind}={v}"] = resized
  return fns


def train_and_evaluate(config, workdir, **kw):
  """Importable entry point (tests): builds the trainer and runs the shared loop."""
  return train_loop.train_and_evaluate(config, workdir, make_trainer(config), **kw)


def main(argv=None):
  return cli.main(make_trainer, sys.argv[1:] if argv is None else argv, schema=SCHEMA)


if __name__ == "__main__":
  host.reexec_with_hugepages()  # Before any step runs (flexi/host.py).
  main()
