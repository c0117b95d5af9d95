"""The jitted train step (one per patch size) and its ahead-of-time compilation."""
import concurrent.futures
import os
import time

import jax
import jax.numpy as jnp
import optax

from flexi import exec_cache, sharding


def make_train_step(trainer, tx, lr_fn, *, seed: int):
  """Returns step(flexi_kw) -> fn(params, opt_state, consts, batch, step)."""

  def build(flexi_kw):
    def step_fn(params, opt_state, consts, batch, step):
      rng = jax.random.fold_in(jax.random.PRNGKey(seed), step)

      def loss_of(p):
        return trainer.loss_fn(p, batch, rng=rng, flexi=flexi_kw, consts=consts)

      (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      metrics = {"train/loss": loss, "train/grad_norm": optax.global_norm(grads),
                 "train/lr": lr_fn(step), **{f"train/{k}": v for k, v in aux.items()}}
      return params, opt_state, metrics
    return step_fn
  return build


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def jit_step(step_fn, mesh, p_sh, o_sh, consts):
  rep = sharding.replicated(mesh)
  c_sh = jax.tree.map(lambda x: x.sharding, consts) if consts is not None else None
  return jax.jit(step_fn, in_shardings=(p_sh, o_sh, c_sh, None, rep),
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
  if keys:
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
                compiler_options=None, cache=None, cache_context=""):
  """AOT-compiles (or loads) the step for every configured value: `compile_or_load`.

  With `cache` (an `exec_cache.ExecutableCache`) a value whose executable is on disk
  is loaded without tracing; `cache_context` is everything else that decides the
  program (the config, the schedule lengths) as text.
  """
  if sampler is None:
    return {}, {}, set()
  args = (_abstract(params, p_sh), _abstract(opt_state, o_sh),
          None if consts is None else _abstract(consts, jax.tree.map(lambda x: x.sharding,
                                                                       consts)),
          batch_spec, jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh)))

  def lower(value):
    return jit_step(build(sampler.kwargs(value)), mesh, p_sh, o_sh, consts).lower(*args)

  def key(value):
    return exec_cache.step_key(config_json=cache_context, value=value, abstract_args=args,
                               compiler_options=compiler_options)
  return compile_or_load(sampler.values, lower, cache=cache, key=key,
                         compiler_options=compiler_options)
