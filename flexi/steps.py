"""The jitted train step (one per patch size) and its ahead-of-time compilation."""
import concurrent.futures
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flexi import exec_cache, optim, sharding


OPTIMIZER_UPDATE = "optimizer_update"  # compile_or_load's name for the shared update.


class StepBuild(NamedTuple):
  """make_train_step's result: the two program bodies and which params are frozen."""
  grad_step: Callable
  apply_step: Callable
  frozen: Any = None  # Bool tree like the params, or None: everything is trained.

  def grads_like(self, tree):
    """`tree` (params-shaped) with None where a param is frozen: the gradients' tree."""
    return _drop_frozen(tree, self.frozen)


def _drop_frozen(tree, frozen):
  if frozen is None:
    return tree
  return jax.tree.map(lambda x, f: None if f else x, tree, frozen)


def _is_none(x):
  return x is None


def make_train_step(trainer, tx, lr_fn, *, seed: int, frozen=None) -> StepBuild:
  """The train step as two programs, so that patch sizes share the optimizer's compile.

  `frozen` (a bool tree like the params, True = not trained, e.g. LiT's locked image
  tower) leaves those params out of the differentiation: the gradient program returns
  None for them instead of a full-size buffer of zeros, and the update program puts
  constant zeros in their place (which XLA folds away). For flexi-LiT's locked B image
  tower that is 333 MiB less handed from one program to the other, and each program's
  peak is 12-21% lower (docs/benchmarks.md, Memory).

  Returns StepBuild(grad_step, apply_step, frozen):
    grad_step(flexi_kw) -> fn(params, consts, batch, step) -> (grads, metrics): forward
      and backward at one patch size, compiled once per size;
    apply_step: fn(params, opt_state, grads, step) -> (params, opt_state, metrics): the
      optimizer update, the same program for every size, compiled once. Fused into
      every size's step it was 20% (SGD) to 30% (Adam) of each compile; the split
      costs one dispatch per step (timings in docs/benchmarks.md).
  """
  def grad_step(flexi_kw):
    def grad_fn(params, consts, batch, step):
      rng = jax.random.fold_in(jax.random.PRNGKey(seed), step)

      def loss_of(trained):
        p = jax.tree.map(lambda t, full: full if t is None else t, trained, params,
                         is_leaf=_is_none)
        return trainer.loss_fn(p, batch, rng=rng, flexi=flexi_kw, consts=consts)

      (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(
          _drop_frozen(params, frozen))
      return grads, {"train/loss": loss, **{f"train/{k}": v for k, v in aux.items()}}
    return grad_fn

  def apply_step(params, opt_state, grads, step):
    # The gradient norm lives here, not in grad_step: one reduction kernel per param
    # shape, compiled once instead of once per size (-14% to -27% of a size's compile).
    grads = jax.tree.map(lambda g, p: jnp.zeros_like(p) if g is None else g, grads, params,
                         is_leaf=_is_none)
    metrics = {"train/lr": lr_fn(step), "train/grad_norm": optim.global_norm(grads)}
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics
  return StepBuild(grad_step, apply_step, frozen)


class TrainStep:
  """fn(params, opt_state, consts, batch, step) -> (params, opt_state, metrics): one
  value's gradient executable followed by the shared optimizer-update executable."""

  def __init__(self, grads, update):
    self.grads, self.update = grads, update

  def __call__(self, params, opt_state, consts, batch, step):
    grads, metrics = self.grads(params, consts, batch, step)
    params, opt_state, update_metrics = self.update(params, opt_state, grads, step)
    return params, opt_state, {**metrics, **update_metrics}


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def jit_grad_step(grad_fn, mesh, p_sh, consts):
  """Gradients come out sharded like the params they belong to (p_sh is a prefix of
  their tree: a frozen param's None gradient takes no sharding)."""
  rep = sharding.replicated(mesh)
  c_sh = jax.tree.map(lambda x: x.sharding, consts) if consts is not None else None
  return jax.jit(grad_fn, in_shardings=(p_sh, c_sh, None, rep), out_shardings=(p_sh, rep))


def jit_apply_step(apply_fn, mesh, p_sh, o_sh):
  """Params and optimizer state are updated in place (donated)."""
  rep = sharding.replicated(mesh)
  return jax.jit(apply_fn, in_shardings=(p_sh, o_sh, p_sh, rep),
                 out_shardings=(p_sh, o_sh, rep), donate_argnums=(0, 1))


def compile_or_load(values, lower, *, cache=None, key=None, compiler_options=None,
                    workers=None):
  """Compiled executables for `values`: loaded from `cache` where present, else
  `lower(v)` (serially: tracing holds the GIL) and compiled on a thread pool while
  the next value is being lowered (XLA releases the GIL), then stored in `cache`.

  `key(v)` names v's executable in `cache` (see exec_cache.step_key).
  Returns ({v: compiled}, {v: seconds}, {values loaded from the cache}).
  """
  compiled, secs = {}, {}
  keys = {v: key(v) for v in values} if cache is not None else {}
  # All or nothing: a process that loaded executables cannot store new ones
  # (exec_cache), so a partial hit would recompile the missing ones on every start.
  if keys and all(cache.contains(k) for k in keys.values()):
    hits = cache.get_many(keys.values())
    for v, k in keys.items():
      if hits[k][0] is not None:
        compiled[v], secs[v] = hits[k]
  loaded = set(compiled)

  def timed_compile(lowered):
    t0 = time.perf_counter()
    if cache is not None:  # What is stored must be a complete, freshly compiled program.
      out = exec_cache.compile_for_cache(lowered, compiler_options)
    else:
      out = lowered.compile(compiler_options=compiler_options or None)
    return out, time.perf_counter() - t0

  todo = [v for v in values if v not in compiled]
  workers = workers or max(1, min(len(todo), os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = {}
    for v in todo:
      t0 = time.perf_counter()
      lowered = lower(v)
      secs[v] = time.perf_counter() - t0
      futures[v] = pool.submit(timed_compile, lowered)
    for v, future in futures.items():
      compiled[v], sec = future.result()
      secs[v] += sec
      if cache is not None:
        cache.put(keys[v], compiled[v])
  return {v: compiled[v] for v in values}, {v: secs[v] for v in values}, loaded


def compile_all(build, sampler, params, opt_state, consts, batch_spec, mesh, p_sh, o_sh,
                compiler_options=None, cache=None, cache_context="", workers=None):
  """AOT-compiles (or loads) the gradient program of every configured value and the one
  optimizer update (`build` is make_train_step's StepBuild): `compile_or_load`.

  With `cache` (an `exec_cache.ExecutableCache`) a program whose executable is on disk
  is loaded without tracing; `cache_context` is everything else that decides the
  program (the config, the schedule lengths) as text.
  Returns ({value: TrainStep}, {value or OPTIMIZER_UPDATE: seconds}, {loaded ones}).
  """
  if sampler is None:
    return {}, {}, set()
  grad_step, apply_step = build.grad_step, build.apply_step
  step_spec = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
  a_params = _abstract(params, p_sh)
  a_consts = None if consts is None else _abstract(
      consts, jax.tree.map(lambda x: x.sharding, consts))
  args = {OPTIMIZER_UPDATE: (a_params, _abstract(opt_state, o_sh), build.grads_like(a_params),
                             step_spec)}
  args.update({v: (a_params, a_consts, batch_spec, step_spec) for v in sampler.values})

  def lower(value):
    if value == OPTIMIZER_UPDATE:
      return jit_apply_step(apply_step, mesh, p_sh, o_sh).lower(*args[value])
    return jit_grad_step(grad_step(sampler.kwargs(value)), mesh, p_sh, consts).lower(
        *args[value])

  # Which params are frozen changes the gradient program's outputs, and may be set by
  # the trainer in code rather than in the config.
  grads_tree = str(jax.tree.structure(build.grads_like(a_params)))

  def key(value):
    return exec_cache.step_key(config_json=cache_context, value=(value, grads_tree),
                               abstract_args=args[value], compiler_options=compiler_options)
  compiled, secs, loaded = compile_or_load(list(args), lower, cache=cache, key=key,
                                           compiler_options=compiler_options, workers=workers)
  update = compiled.pop(OPTIMIZER_UPDATE)
  return {v: TrainStep(compiled[v], update) for v in sampler.values}, secs, loaded
