"""Evaluators declared in `config.evals`, built lazily from a dict of predict functions.

Contract (what a trainer gives, what an evaluator implements):

    config.evals = {
        "test": dict(type="classification",        # key of REGISTRY
                     data=dict(name="fine_shapes/64", split="test"),
                     pp_fn="decode|resize(64)|value_range(-1, 1)|onehot(10)|keep('image', 'labels')",
                     log_steps=100,                 # or log_epochs / log_examples / log_percent
                     pred="predict_seqhw=4",        # one predict fn, or
                     preds=None,                    # a list of names; None = every flexi one
                     batch_size=256,                # default: config.input.batch_size
                     ...type-specific keys...),
    }

- `predict_fns` maps names such as "predict", "predict_seqhw=15", "predict_patch_size=16"
  to `fn(variables, batch) -> dict of outputs` (e.g. "logits"); `variables` is
  {"params": params, **trainer consts}. `flexi.train_loop.PredictFns` also builds any
  "predict_<kind>=<v>" on demand.
- An evaluator class is registered with `@register("type")`; it is constructed as
  `cls(predict_fns, ctx, **cfg_without_common_keys)` on first use and its
  `run(variables)` yields `(metric_name, value)` pairs; the loop logs them as
  "<eval name>/<metric_name>".
"""
import dataclasses
import difflib
import inspect
import importlib
from typing import Any, Callable, Dict, Mapping, Optional

from flexi import durations

REGISTRY: Dict[str, Callable] = {}
COMMON_KEYS = ("type", "log_steps", "log_epochs", "log_examples", "log_percent",
               "run_at_end")


def register(name: str):
  def deco(cls):
    REGISTRY[name] = cls
    return cls
  return deco


@dataclasses.dataclass
class EvalContext:
  """What the loop tells evaluators about the run."""
  mesh: Any
  batch_axes: tuple = ("data",)
  default_batch_size: int = 256
  workdir: Optional[str] = None


def select_predict_fns(pred, preds, predict_fns, evaluator: str):
  """Names of the predict fns an evaluator runs: `pred`, `preds`, or every flexi one."""
  if pred is not None and preds is not None:
    raise ValueError(f"{evaluator} evaluator: set `pred` or `preds`, not both")
  names = [pred] if pred is not None else list(preds or getattr(
      predict_fns, "flexi_names", [n for n in predict_fns if n != "predict"]))
  for n in names:
    if n not in predict_fns:
      raise ValueError(f"{evaluator} evaluator: unknown predict fn {n!r}; "
                       f"known: {sorted(predict_fns)}")
  return names


def local_eval_batches(data, pp_fn, batch_size):
  """This process's share of one padded pass over an eval split, as numpy batches
  (`_mask` marks real rows; non-numeric features such as strings are dropped; a
  record that fails to decode is one line naming it, or skipped and counted with
  `skip_decode_errors=True` in `data`)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import input_pipeline  # pylint: disable=import-outside-toplevel
  data = dict(data)
  skip = bool(data.pop("skip_decode_errors", False))
  ds, _ = input_pipeline.build_eval_dataset(
      data, pp_fn, batch_size, skip_decode_errors=skip,
      process_index=jax.process_index(), process_count=jax.process_count())
  for b in input_pipeline.numpy_batches(ds):
    yield {k: np.asarray(v) for k, v in b.items() if np.asarray(v).dtype != object}


def global_eval_batches(data, pp_fn, batch_size, ctx: EvalContext):
  """One padded pass over an eval split as global sharded arrays (`_mask` marks real
  rows), assembled over the mesh from every process's `local_eval_batches`."""
  from flexi import sharding  # pylint: disable=import-outside-toplevel
  for b in local_eval_batches(data, pp_fn, batch_size):
    yield sharding.to_global(b, ctx.mesh, ctx.batch_axes)


def to_host(x):
  """A global array as one numpy array on every process (allgathered when the array
  spans other processes' devices, where device_get refuses)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def labelled_mask(mask, labels):
  """Rows that count: real (not padding) and with at least one label. As big_vision's
  classification evaluator, an example whose label row is all zero (an empty ReaL
  set) is left out of accuracy and loss instead of counting as a miss."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return mask.astype(jnp.float32) * (jnp.max(labels, axis=-1) > 0)


# Modules whose evaluators are registered on first lookup (add new ones here).
BUILTIN_MODULES = ["evaluators.classification", "evaluators.sweep", "evaluators.timing",
                   "evaluators.distance", "evaluators.retrieval", "evaluators.representations"]


def _lookup(name: str):
  for module in BUILTIN_MODULES:
    importlib.import_module(module)
  if name not in REGISTRY:
    raise ValueError(f"unknown evaluator type {name!r}; known: {sorted(REGISTRY)}")
  return REGISTRY[name]


@dataclasses.dataclass
class LazyEvaluator:
  """One configured evaluator: its cadence now, the object itself on first run."""
  name: str
  every: Optional[int]
  run_at_end: bool
  factory: Callable[[], Any]
  _obj: Any = None

  def due(self, step: int, total_steps: int) -> bool:
    if step == total_steps and self.run_at_end:
      return True
    return bool(self.every) and step % self.every == 0

  def run(self, variables):
    if self._obj is None:
      self._obj = self.factory()
    for metric, value in self._obj.run(variables):
      yield f"{self.name}/{metric}", value


def require_options(name, kind, kwargs, keys=("data", "pp_fn")):
  """Each evaluator's validate(): the options it cannot run without, named in the error."""
  for key in keys:
    if key not in kwargs:
      raise ValueError(f"config.evals.{name} ({kind}) needs {key!r}")


def _check_options(name, kind, cls, kwargs):
  """A misspelt option fails when the config is built, not at the first eval hours in."""
  params = inspect.signature(cls.__init__).parameters
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return
  known = sorted(set(params) - {"self", "predict_fns", "ctx"})
  unknown = sorted(set(kwargs) - set(known))
  if unknown:
    close = difflib.get_close_matches(unknown[0], known + sorted(COMMON_KEYS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"config.evals.{name} ({kind}): unknown option(s) {unknown}{hint}; "
                     f"known: {known + sorted(COMMON_KEYS)}")


def build_evaluators(evals_cfg: Mapping, predict_fns: Mapping, ctx: EvalContext, *,
                     batch_size: int, num_train_examples=None, total_steps=None):
  """Validates types and cadences now; constructs each evaluator on its first run."""
  out = []
  for name, cfg in (evals_cfg or {}).items():
    cfg = dict(cfg)
    if "type" not in cfg:
      raise ValueError(f"config.evals.{name} needs a 'type'; known: {sorted(REGISTRY)}")
    cls = _lookup(cfg["type"])
    every = durations.to_steps(cfg, "log", batch_size=batch_size, default=None,
                               num_examples=num_train_examples, total_steps=total_steps)
    kwargs = {k: v for k, v in cfg.items() if k not in COMMON_KEYS}
    _check_options(name, cfg["type"], cls, kwargs)
    if hasattr(cls, "validate"):
      cls.validate(name, kwargs, predict_fns)
    out.append(LazyEvaluator(name, every, cfg.get("run_at_end", True),
                             lambda cls=cls, kw=kwargs: cls(predict_fns, ctx, **kw)))
  return out
