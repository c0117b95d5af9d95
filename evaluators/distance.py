"""Student-vs-teacher distances per patch size (FunMatch; big_vision proj/distill).

`dist(student, teacher, kind, ...)` is the per-example distance shared by the
distillation loss (trainers/distill.py) and this evaluator, with big_vision's kinds:
    kl                    t^2 * KL(softmax(teacher/t) || softmax(student/t))
    logsoftmax_euclidean  ||log_softmax(student) - log_softmax(teacher)||_2
    agree (k)             1 if the teacher's top-1 class is in the student's top-k
    euclidean, l2, hard   on raw outputs; hard = xent to the teacher's argmax (+ls)

Config (one evaluator covers every patch size; the teacher runs once per batch):
    dict(type="distance", data=..., pp_fn=... (makes "image" and "prof"),
         teacher_pred="predict_prof", preds=None (= every flexi size) or pred="...",
         distances=({"kind": "kl"}, {"kind": "agree", "k": 1}, ...))
Metrics: "<kind>=<v>/<distance name>" (mean over examples), e.g. "seqhw=8/agree_top1".
"""
import jax
import jax.numpy as jnp
import numpy as np

import evaluators
from evaluators import register
from flexi import sharding

KINDS = ("kl", "logsoftmax_euclidean", "agree", "euclidean", "l2", "hard")
DEFAULT_DISTANCES = ({"kind": "kl"}, {"kind": "logsoftmax_euclidean"},
                     {"kind": "agree", "k": 1}, {"kind": "agree", "k": 5})


def _kl(student, teacher, t):
  log_ps = jax.nn.log_softmax(student / t, axis=-1)
  log_pt = jax.nn.log_softmax(teacher / t, axis=-1)
  return t ** 2 * jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)


def _agree(student, teacher, k):
  k = min(int(k), student.shape[-1])
  top_s = jax.lax.top_k(student, k)[1]
  top_t = jnp.argmax(teacher, axis=-1)
  return jnp.any(top_s == top_t[:, None], axis=-1).astype(jnp.float32)


def _hard(student, teacher, ls):
  n = teacher.shape[-1]
  labels = jax.nn.one_hot(jnp.argmax(teacher, axis=-1), n)
  if ls:
    labels = (1.0 - ls) * labels + (ls / (n - 1)) * (1.0 - labels)
  log_ps = jax.nn.log_softmax(student, axis=-1)
  return jnp.sum(jax.scipy.special.xlogy(labels, labels) - labels * log_ps, axis=-1)


def dist(student, teacher, kind="kl", *, t=1.0, k=1, ls=0.0, epsilon=1e-12):
  """Per-example distance between (batch, classes) outputs; see the module doc."""
  student = student.astype(jnp.float32)
  teacher = teacher.astype(jnp.float32)
  if student.shape != teacher.shape:
    raise ValueError(f"student outputs {student.shape} and teacher outputs "
                     f"{teacher.shape} differ in shape")
  if kind == "kl":
    return _kl(student, teacher, float(t))
  if kind == "logsoftmax_euclidean":
    d = jax.nn.log_softmax(student, axis=-1) - jax.nn.log_softmax(teacher, axis=-1)
    return jnp.sqrt(jnp.sum(d * d, axis=-1) + epsilon)
  if kind == "agree":
    return _agree(student, teacher, k)
  if kind == "euclidean":
    d = student - teacher
    return jnp.sqrt(jnp.sum(d * d, axis=-1) + epsilon)
  if kind == "l2":
    d = student - teacher
    return jnp.sum(d * d, axis=-1)
  if kind == "hard":
    return _hard(student, teacher, float(ls))
  raise ValueError(f"unknown distance kind {kind!r}; known: {', '.join(KINDS)}")


def check_distance(spec, where="distance"):
  """Validates one {"kind": ..., **kw} spec now rather than at the first eval."""
  spec = dict(spec)
  kind = spec.pop("kind", None)
  if kind not in KINDS:
    raise ValueError(f"{where}: unknown distance kind {kind!r}; known: {', '.join(KINDS)}")
  unknown = set(spec) - {"t", "k", "ls", "epsilon"}
  if unknown:
    raise ValueError(f"{where}: unknown distance option(s) {sorted(unknown)} for {kind!r}; "
                     "known: t, k, ls, epsilon")
  return kind, spec


def distance_name(spec) -> str:
  """{"kind": "agree", "k": 5} -> "agree_top5"; {"kind": "kl", "t": 2} -> "kl_t=2"."""
  kind, kw = check_distance(spec)
  if kind == "agree":
    return f"agree_top{int(kw.get('k', 1))}"
  extra = "_".join(f"{key}={kw[key]}" for key in sorted(kw))
  return f"{kind}_{extra}" if extra else kind


def _suffix(name):
  return name[len("predict_"):] if name.startswith("predict_") else name


@register("distance")
class Evaluator:
  """Mean distances between each student predict fn and one teacher predict fn."""

  def __init__(self, predict_fns, ctx, *, data, pp_fn, teacher_pred="predict_prof",
               pred=None, preds=None, distances=DEFAULT_DISTANCES, batch_size=None,
               outputs_key="logits"):
    self.names = self.student_names(pred, preds, predict_fns)
    self.single = pred is not None
    self.data, self.pp_fn, self.ctx = dict(data), pp_fn, ctx
    self.batch_size = int(batch_size or ctx.default_batch_size)
    sharding.check_batch_size(self.batch_size, ctx.mesh, ctx.batch_axes)
    specs = [dict(d) for d in distances]
    self.dist_names = [distance_name(d) for d in specs]
    fns = [(lambda s, t, kind=check_distance(d)[0], kw=check_distance(d)[1]:
            dist(s, t, kind, **kw)) for d in specs]
    students = [predict_fns[n] for n in self.names]
    teacher = predict_fns[teacher_pred]

    def step(variables, batch):
      mask = batch["_mask"].astype(jnp.float32)
      t_out = teacher(variables, batch)[outputs_key]
      sums = []
      for s_fn in students:
        s_out = s_fn(variables, batch)[outputs_key]
        sums.append(jnp.stack([jnp.sum(f(s_out, t_out) * mask) for f in fns]))
      return jnp.stack(sums), jnp.sum(mask)
    self._step = jax.jit(step, out_shardings=sharding.replicated(ctx.mesh))

  @staticmethod
  def student_names(pred, preds, predict_fns):
    return evaluators.select_predict_fns(pred, preds, predict_fns, "distance")

  @classmethod
  def validate(cls, name, kwargs, predict_fns):
    evaluators.require_options(name, "distance", kwargs)
    teacher = kwargs.get("teacher_pred", "predict_prof")
    if teacher not in predict_fns:
      raise ValueError(f"config.evals.{name}: unknown teacher_pred {teacher!r}; "
                       f"known: {sorted(predict_fns)}")
    for d in kwargs.get("distances", DEFAULT_DISTANCES):
      check_distance(d, where=f"config.evals.{name}")
    cls.student_names(kwargs.get("pred"), kwargs.get("preds"), predict_fns)

  def _batches(self):
    return evaluators.global_eval_batches(self.data, self.pp_fn, self.batch_size, self.ctx)

  def run(self, variables):
    totals, count = np.zeros((len(self.names), len(self.dist_names))), 0.0
    for batch in self._batches():
      sums, n = jax.device_get(self._step(variables, batch))
      totals += np.asarray(sums, np.float64)
      count += float(n)
    for i, student in enumerate(self.names):
      prefix = "" if self.single else f"{_suffix(student)}/"
      for j, dname in enumerate(self.dist_names):
        yield f"{prefix}{dname}", totals[i, j] / max(count, 1.0)
