"""The shared training loop: every trainer (supervised, distill, LiT) runs through here.

A trainer only defines a `Trainer` (its params init, loss, predict function, consts
and frozen params); `train_and_evaluate(config, workdir, trainer)` does the rest:
mesh + shardings, init or resume, one AOT-compiled step per patch size, the loop,
NaN checks, checkpoints, logging and evaluators.
"""
import dataclasses
import hashlib
import itertools
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

import evaluators as evaluators_lib
from flexi import ckpt_manager, data_source, durations, logging_utils, optim
from flexi import exec_cache, host, patch_sampler, sharding, steps
from flexi import config as config_lib


@dataclasses.dataclass
class Trainer:
  """What differs between trainers.

  init_params(rng, batch_spec) -> params           pure; batch_spec: global ShapeDtypeStructs.
  loss_fn(params, batch, *, rng, flexi, consts) -> (loss, {name: scalar})   inside jit;
      flexi is e.g. {"seqhw": 15}; consts is the pytree from `make_consts` (or None).
  predict_fn(variables, batch, **flexi) -> {"logits": ...}   variables = {"params", **consts}.
  load_pretrained(params, config) -> params        host-side, for config.model_init
      (default: flexi.checkpoint / another workdir, with config.model_load.dont_load).
  make_consts(config) -> pytree of host arrays     e.g. a frozen teacher; sharded by the
      same rules, not optimised, not checkpointed.
  frozen: regexes of param names with zero updates and no optimizer state.
  schema: the config schema (base + trainer-specific keys).
  extra_predict_fns: {name: fn(variables, batch)} added to the evaluators' predict fns
      (e.g. a distillation teacher's "predict_teacher").
  """
  init_params: Callable
  loss_fn: Callable
  predict_fn: Optional[Callable] = None
  load_pretrained: Optional[Callable] = None
  make_consts: Optional[Callable] = None
  frozen: Sequence[str] = ()
  schema: config_lib.Schema = dataclasses.field(default_factory=config_lib.base_schema)
  extra_predict_fns: Mapping[str, Callable] = dataclasses.field(default_factory=dict)


class PredictFns(dict):
  """{"predict_<kind>=<v>": fn} for the configured values; other values on demand."""

  def __init__(self, predict_fn, kind, values):
    super().__init__()
    self._fn, self._kind = predict_fn, kind
    self["predict"] = predict_fn
    self.flexi_names = [f"predict_{kind}={v}" for v in values]
    for name in self.flexi_names:
      self[name] = self[name]

  def __missing__(self, name):
    for kind in ("seqhw", "patch_size"):
      prefix = f"predict_{kind}="
      if name.startswith(prefix) and name[len(prefix):].isdigit():
        value = int(name[len(prefix):])
        fn = lambda variables, batch, kind=kind, value=value: self._fn(
            variables, batch, **{kind: value})
        self[name] = fn
        return fn
    raise KeyError(name)

  def __contains__(self, name):
    try:
      self[name]  # pylint: disable=pointless-statement
      return True
    except KeyError:
      return False


def make_predict_fns(trainer: Trainer, sampler) -> dict:
  """The evaluators' predict fns: one per configured value, plus the trainer's extras."""
  fns = PredictFns(trainer.predict_fn, sampler.kind, sampler.values) \
      if trainer.predict_fn else {}
  fns.update(trainer.extra_predict_fns or {})
  return fns


@dataclasses.dataclass
class TrainResult:
  params: Any
  opt_state: Any
  step: int
  metrics: dict               # Last logged train metrics.
  eval_metrics: dict          # Last value of every evaluator metric.
  compile_seconds: dict


def jax_cache_dir(cache_dir: str) -> str:
  """Where JAX's persistent cache goes under `cache_dir`: on CPU a subdirectory per CPU
  type. JAX's key does not hold the host's features, which XLA:CPU compiles for; in a
  home directory shared by an AVX-512 and an AVX2 machine each would reject the other's
  entries (with a warning) and overwrite them with its own at every start."""
  cache_dir = os.path.expanduser(cache_dir)
  # (Starts JAX's backends: the CLI has already initialised jax.distributed by now.)
  if jax.default_backend() != "cpu":
    return cache_dir
  cpu = hashlib.sha256(host.cpu_signature().encode()).hexdigest()[:12]
  return os.path.join(cache_dir, f"cpu-{cpu}")


def setup_compilation_cache(cache_dir: Optional[str]):
  """JAX persistent cache, small CPU programs included (thresholds lowered)."""
  if not cache_dir:
    return
  cache_dir = jax_cache_dir(cache_dir)
  os.makedirs(cache_dir, exist_ok=True)
  if jax.config.jax_compilation_cache_dir != cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
    compilation_cache.reset_cache()
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _executable_cache(config):
  """Compiled steps on disk next to JAX's cache (config.executable_cache)."""
  if not (config.compilation_cache_dir and config.executable_cache):
    return None
  if not config.executable_cache_max_gb > 0:
    raise ValueError("config.executable_cache_max_gb must be > 0 (GiB kept on disk), got "
                     f"{config.executable_cache_max_gb}")
  return exec_cache.ExecutableCache(
      os.path.join(os.path.expanduser(config.compilation_cache_dir), "executables"),
      max_bytes=int(config.executable_cache_max_gb * 2 ** 30))


def _program_context(config, trainer, dur):
  """What decides the step program besides its arguments: config, trainer, schedule."""
  loss = getattr(trainer.loss_fn, "func", trainer.loss_fn)  # Unwrap a functools.partial.
  name = f"{getattr(loss, '__module__', '')}.{getattr(loss, '__qualname__', repr(loss))}"
  program = config.copy_and_resolve_references()
  with program.unlocked():
    for where in ("compilation_cache_dir", "executable_cache", "executable_cache_max_gb"):
      del program[where]  # Where and how long, not what.
  code = exec_cache.code_fingerprint(trainer.loss_fn, trainer.init_params,
                                     trainer.make_consts)
  return json.dumps(dict(config=program.to_json_best_effort(sort_keys=True), durations=dur,
                         trainer=name, trainer_code=code),
                    sort_keys=True, default=str)


def default_load_pretrained(params, config):
  """config.model_init: .npz / released name, or another workdir's checkpoint."""
  from flexi import checkpoint  # pylint: disable=import-outside-toplevel
  path = config.model_init
  if os.path.isdir(os.path.join(os.path.expanduser(path), "ckpt")):
    loaded = ckpt_manager.restore_params_from_workdir(os.path.expanduser(path))
  else:
    loaded = checkpoint.load_params(path)
  dont_load = list(config.model_load.get("dont_load", ()))
  return checkpoint.load_into(jax.device_get(params), loaded, dont_load=dont_load)


def _durations(config, num_examples):
  bs = config.input.batch_size
  total = durations.to_steps(config, "total", batch_size=bs, num_examples=num_examples)
  kw = dict(batch_size=bs, num_examples=num_examples, total_steps=total)
  return dict(
      total=total,
      warmup=durations.to_steps(config.schedule, "warmup", default=0, **kw),
      log=durations.to_steps(config, "log_training", default=None, **kw),
      ckpt=durations.to_steps(config, "ckpt", default=None, **kw))


def _due(step, every, total):
  return step == total or (bool(every) and step % every == 0)


class _FiniteGuard:
  """Collects per-step (loss, grad_norm) device scalars; checks them in one transfer."""

  def __init__(self):
    self.pending = []

  def add(self, step, metrics):
    self.pending.append((step, metrics["train/loss"], metrics["train/grad_norm"]))

  def check(self):
    values = jax.device_get([(l, g) for _, l, g in self.pending])
    for (step, _, _), (loss, gnorm) in zip(self.pending, values):
      if not (np.isfinite(loss) and np.isfinite(gnorm)):
        raise FloatingPointError(
            f"non-finite loss at step {step}: loss={float(loss)}, grad_norm={float(gnorm)}; "
            "stopping, the last good checkpoint is kept")
    self.pending = []


def _run_evals(evals, step, params, consts, writer, eval_metrics) -> bool:
  """Runs `evals` on the params of `step`, logs their results; True if any ran."""
  variables = None
  for ev in evals:
    variables = variables or {"params": params, **(consts or {})}
    t0 = time.perf_counter()
    results = dict(ev.run(variables))
    results[f"{ev.name}/eval_sec"] = time.perf_counter() - t0
    writer.write(step, results)
    eval_metrics.update(results)
  return variables is not None


def _unfinished_evals(evals, step, total, writer):
  """Evals due at `step` (a resumed checkpoint's) that logged no result there: a crash
  came after the checkpoint and before or during them. All processes agree (process 0
  holds the log)."""
  if step == 0 or not evals:
    return []
  logged = set()
  for row in writer.rows():
    if row.get("step") == step:
      logged.update(row)
  todo = np.array([ev.due(step, total) and f"{ev.name}/eval_sec" not in logged
                   for ev in evals])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    todo = np.asarray(multihost_utils.broadcast_one_to_all(todo))
  return [ev for ev, t in zip(evals, todo) if t]


class _Preemption:
  """A SIGTERM (preempted VM, a scheduler's stop) ends the run after the current step
  with a checkpoint. Multi-process runs use JAX's preemption sync point (the
  coordination service catches the signal and picks one step for every process)."""

  def __enter__(self):
    self._multi = jax.process_count() > 1  # (Only with jax.distributed initialised.)
    self.requested, self._old = False, None
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def _on_signal(self, signum, frame):
    del signum, frame
    self.requested = True

  def due(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _init_state(trainer, config, tx, batch_spec, shard, ckpt, writer):
  """Resume from the workdir, or init (and maybe load model_init). Returns state+step."""
  rng = jax.random.PRNGKey(config.seed)
  params_shape = jax.eval_shape(trainer.init_params, rng, batch_spec)
  p_sh = shard(params_shape)
  opt_shape = jax.eval_shape(tx.init, params_shape)
  o_sh = sharding.opt_state_shardings(opt_shape, params_shape, p_sh, shard)
  latest = ckpt.latest_step()
  if latest is not None:
    params, opt_state, meta = ckpt.restore(latest, params_shape, opt_shape, p_sh, o_sh)
    if "seed" in meta and int(meta["seed"]) != int(config.seed):
      raise ValueError(f"{ckpt.directory}/{latest} was trained with seed {meta['seed']}, "
                       f"config.seed is {config.seed}: data order, patch sizes and RNG would "
                       "change mid-run; resume with the same seed or use a new workdir")
    writer.drop_after(int(meta["step"]))  # The steps after it are run (and logged) again.
    writer.info(f"resumed from {ckpt.directory} at step {latest}")
    return params, opt_state, int(meta["step"]), p_sh, o_sh
  params = jax.jit(lambda r: trainer.init_params(r, batch_spec), out_shardings=p_sh)(rng)
  if config.model_init:
    load = trainer.load_pretrained or default_load_pretrained
    params = jax.device_put(load(params, config), p_sh)
    writer.info(f"initialised params from {config.model_init}")
  opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
  return params, opt_state, 0, p_sh, o_sh


def train_and_evaluate(config, workdir: str, trainer: Trainer, *,
                       data: Optional[data_source.DataSource] = None,
                       writer: Optional[logging_utils.MetricWriter] = None) -> TrainResult:
  """Trains (resuming from `workdir` if it has a checkpoint), evaluates, checkpoints."""
  setup_compilation_cache(config.compilation_cache_dir)
  writer = writer or logging_utils.MetricWriter(workdir)
  mesh = sharding.make_mesh(config.mesh.axes)
  batch_axes = tuple(config.sharding.batch_axes)
  sharding.check_batch_size(config.input.batch_size, mesh, batch_axes)
  data = data or data_source.from_input_config(config)
  dur = _durations(config, data.num_examples)
  sampler = patch_sampler.from_config(config.flexi, total_steps=dur["total"], seed=config.seed)
  shard = lambda tree: sharding.tree_shardings(tree, mesh, config.sharding)
  ckpt = ckpt_manager.CheckpointManager(workdir, keep=config.keep_ckpts)
  try:
    return _run(config, workdir, trainer, data, dur, sampler, mesh, batch_axes, shard,
                ckpt, writer)
  finally:
    ckpt.close()


def _run(config, workdir, trainer, data, dur, sampler, mesh, batch_axes, shard, ckpt, writer):
  exe_cache = _executable_cache(config)
  # Until the steps are compiled, keep JAX's persistent cache out if we may store them
  # (exec_cache's jaxlib note: a process that loaded executables stores broken ones).
  with exec_cache.fresh_compiles(exe_cache is not None):
    state = _prepare(config, trainer, data, dur, sampler, mesh, batch_axes, shard, ckpt,
                     writer, exe_cache)
  return _loop(config, workdir, trainer, data, dur, sampler, mesh, batch_axes, ckpt,
               writer, **state)


def _prepare(config, trainer, data, dur, sampler, mesh, batch_axes, shard, ckpt, writer,
             exe_cache):
  """Data iterator, optimizer, params (init or resume) and the compiled steps."""
  total = dur["total"]
  # The data iterator starts where the checkpoint (if any) left off; its first batch
  # gives the shapes and is then put back in front.
  local_iter = data.make_iter(ckpt.latest_step() or 0)
  first = next(local_iter)
  batch_spec = data_source.global_spec(first, mesh, batch_axes)
  if batch_spec[next(iter(batch_spec))].shape[0] != config.input.batch_size:
    raise ValueError(f"data gives global batches of {batch_spec[next(iter(batch_spec))].shape[0]}"
                     f", config.input.batch_size is {config.input.batch_size}")
  params_shape = jax.eval_shape(trainer.init_params, jax.random.PRNGKey(0), batch_spec)
  tx, lr_fn = optim.make_optimizer(config, params_shape, total_steps=total,
                                   warmup_steps=dur["warmup"], frozen=trainer.frozen)
  params, opt_state, start, p_sh, o_sh = _init_state(
      trainer, config, tx, batch_spec, shard, ckpt, writer)
  consts = None
  if trainer.make_consts:
    host_consts = trainer.make_consts(config)
    consts = jax.device_put(host_consts, shard(host_consts))
  writer.info(f"{optim.count_params(params):,} params; mesh {dict(mesh.shape)}; "
              f"{total} steps from {start}; {sampler.kind} in {sampler.values}")
  step_fn = steps.make_train_step(
      trainer, tx, lr_fn, seed=config.seed,
      frozen=optim.frozen_mask(config, params_shape, trainer.frozen))
  t0 = time.perf_counter()
  compiled, compile_secs, loaded = steps.compile_all(
      step_fn, sampler if start < total else None, params, opt_state, consts, batch_spec,
      mesh, p_sh, o_sh, dict(config.xla_compiler_options), cache=exe_cache,
      cache_context=_program_context(config, trainer, dur))
  names = {v: v if v == steps.OPTIMIZER_UPDATE else f"{sampler.kind}={v}"
           for v in compile_secs}
  for v, sec in compile_secs.items():
    how = "loaded from the executable cache" if v in loaded else "compiled"
    writer.info(f"{how} {names[v]} in {sec:.2f}s")
  if compile_secs:
    writer.info(f"all {len(compile_secs)} programs ready in "
                f"{time.perf_counter() - t0:.1f}s ({len(loaded)} loaded, "
                f"{len(compile_secs) - len(loaded)} compiled in parallel)")
  if compile_secs:
    writer.write(start, {f"compile_sec/{names[v]}": s for v, s in compile_secs.items()})
  return dict(first=first, local_iter=local_iter, batch_spec=batch_spec, params=params,
              opt_state=opt_state, start=start, consts=consts, compiled=compiled,
              compile_secs=compile_secs)


def _loop(config, workdir, trainer, data, dur, sampler, mesh, batch_axes, ckpt, writer, *,
          first, local_iter, batch_spec, params, opt_state, start, consts, compiled,
          compile_secs):
  """Steps, logging, checkpoints and evaluations until `total`."""
  total = dur["total"]
  predict_fns = make_predict_fns(trainer, sampler)
  ctx = evaluators_lib.EvalContext(mesh, batch_axes, config.input.batch_size, workdir)
  evals = evaluators_lib.build_evaluators(
      config.evals, predict_fns, ctx, batch_size=config.input.batch_size,
      num_train_examples=data.num_examples, total_steps=total)

  guard, progress = _FiniteGuard(), logging_utils.Progress(total, config.input.batch_size, start)
  image_hw = batch_spec["image"].shape[1:3] if "image" in batch_spec else None
  batches = data_source.global_iter(itertools.chain([first], local_iter), mesh, batch_axes)
  last_metrics, eval_metrics = {}, {}
  # A crash between the checkpoint at `start` and the end of that step's evals lost
  # them: run them now.
  _run_evals(_unfinished_evals(evals, start, total, writer), start, params, consts, writer,
             eval_metrics)
  with _Preemption() as preemption:
    for step in range(start, total):
      value = sampler.sample(step)
      params, opt_state, metrics = compiled[value](params, opt_state, consts, next(batches),
                                                   np.int32(step))
      guard.add(step, metrics)
      done = step + 1
      if config.debug.check_finite_every and done % config.debug.check_finite_every == 0:
        guard.check()
      if _due(done, dur["log"], total):
        guard.check()
        last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last_metrics[f"train/{sampler.kind}"] = value
        if image_hw is not None:
          last_metrics["train/patch_size"] = patch_sampler.patch_size_of(sampler.kind, value,
                                                                         image_hw)
        last_metrics.update(progress.tick(done))
        writer.write(done, last_metrics)
        writer.info(logging_utils.progress_line(done, total, last_metrics))
      stop = preemption.due(done)  # (Once per step: a sync point on multi-process runs.)
      if _due(done, dur["ckpt"], total) or stop:
        guard.check()
        ckpt.save(done, params, opt_state, {"step": done, "seed": int(config.seed)},
                  force=stop)
      if stop:
        ckpt.wait()
        writer.info(f"stopping after step {done} (SIGTERM): checkpoint saved, the same "
                    "command resumes from it")
        raise SystemExit(143)
      ran = _run_evals([ev for ev in evals if ev.due(done, total)], done, params, consts,
                       writer, eval_metrics)
      if ran or _due(done, dur["ckpt"], total):
        progress.reset(done)
  guard.check()
  ckpt.wait()
  return TrainResult(params, opt_state, max(total, start), last_metrics, eval_metrics,
                     compile_secs)
