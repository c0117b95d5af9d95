"""Eval-only runs: load a checkpoint, run the config's evaluators, no training.

    python -m evaluators.run --config configs/demo.py --workdir /tmp/demo
    python -m evaluators.run --config configs/demo.py --checkpoint model.npz --out /tmp/ev
    python -m evaluators.run --config configs/flexivit_b.py --trainer distill \
        --checkpoint "FlexiViT-B i1k" --image_size 240 --evals sweep

--workdir alone: the latest (or --step) orbax checkpoint of that training run.
--checkpoint: a big_vision .npz (`file.npz:sub/tree`, a released name) or another
workdir; it is merged into the model's params with `flexi.checkpoint.load_into`
(kernel PI-resized, posemb resized, shapes checked). Results: a table on the console
and OUT/eval_results.json (OUT = --out or --workdir); evaluators such as the sweep
write their own files there too.
"""
import argparse
import importlib
import json
import os
import sys
import time

import jax
import numpy as np

import evaluators as evaluators_lib
from flexi import checkpoint, ckpt_manager, cli, distributed, host, patch_sampler
from flexi import sharding, train_loop
from flexi import config as config_lib


def trainer_module(name):
  """"train" / "distill" / "lit" / a dotted module with make_trainer(config)."""
  full = name if "." in name else f"trainers.{name}"
  try:
    module = importlib.import_module(full)
  except ModuleNotFoundError as e:
    if e.name is None or not full.startswith(e.name):  # A missing import inside it.
      raise
    raise ValueError(f"no trainer module {full!r}; use train, distill, lit or a dotted "
                     "module with make_trainer(config)") from None
  if not hasattr(module, "make_trainer"):
    raise ValueError(f"trainer module {module.__name__} has no make_trainer(config)")
  return module


def _schema(module):
  if hasattr(module, "SCHEMA"):
    return module.SCHEMA
  return module.schema() if hasattr(module, "schema") else None


def batch_spec(config, mesh, image_size=None):
  """Global batch shapes for `init_params`: from --image_size, else the train input."""
  bs = config.input.batch_size
  rep = sharding.batch_sharding(mesh, tuple(config.sharding.batch_axes))
  if image_size:
    return {"image": jax.ShapeDtypeStruct((bs, image_size, image_size, 3), np.float32,
                                          sharding=rep)}
  import input_pipeline  # pylint: disable=import-outside-toplevel
  input_cfg = dict(config.input.to_dict(), seed=config.seed)
  input_cfg.pop("num_examples", None)
  try:
    ds, _ = input_pipeline.build_train_dataset(input_cfg, process_index=jax.process_index(),
                                               process_count=jax.process_count())
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"cannot infer the model's input shape from config.input ({e}); "
                     "pass --image_size") from None
  return {k: jax.ShapeDtypeStruct((bs, *s.shape[1:]), s.dtype.as_numpy_dtype, sharding=rep)
          for k, s in ds.element_spec.items()}


def load_params(config, trainer, mesh, *, workdir=None, checkpoint_path=None, step=None,
                image_size=None):
  """Host params: a workdir's own checkpoint as saved, anything else via load_into."""
  if checkpoint_path is None and not os.path.isdir(os.path.join(workdir, "ckpt")):
    raise FileNotFoundError(f"no checkpoint folder {os.path.join(workdir, 'ckpt')}; "
                            "pass --checkpoint or train first")
  init = jax.eval_shape(trainer.init_params, jax.random.PRNGKey(0),
                        batch_spec(config, mesh, image_size))
  if checkpoint_path is None:
    params = ckpt_manager.restore_params_from_workdir(workdir, step)
    where = f"{workdir} step {step if step is not None else 'latest'}"
    # Its own run's params, as saved; a config that builds another model is one line.
    ckpt_manager.check_shapes(f"checkpoint {where}", params, init)
    return params, where
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init)
  path = os.path.expanduser(checkpoint_path)
  if os.path.isdir(os.path.join(path, "ckpt")):
    loaded = ckpt_manager.restore_params_from_workdir(path, step)
  else:
    loaded = checkpoint.load_params(checkpoint_path)
  dont_load = list(config.model_load.get("dont_load", ()))
  return checkpoint.load_into(init, loaded, dont_load=dont_load), checkpoint_path


def _predict_fns(trainer, sampler):
  """The loop's predict fns (per configured patch size, plus a trainer's extras)."""
  if hasattr(train_loop, "make_predict_fns"):
    return train_loop.make_predict_fns(trainer, sampler)
  fns = train_loop.PredictFns(trainer.predict_fn, sampler.kind, sampler.values)
  fns.update(getattr(trainer, "extra_predict_fns", None) or {})
  return fns


def select_evals(evals_cfg, names):
  """config.evals restricted to `names` (all if None), cadence keys dropped."""
  evals_cfg = dict(evals_cfg or {})
  if names:
    unknown = [n for n in names if n not in evals_cfg]
    if unknown:
      raise ValueError(f"unknown eval(s) {unknown}; config.evals has {sorted(evals_cfg)}")
    evals_cfg = {n: evals_cfg[n] for n in names}
  if not evals_cfg:
    raise ValueError("config.evals is empty: nothing to evaluate")
  return {n: {k: v for k, v in dict(c).items() if not k.startswith("log_")}
          for n, c in evals_cfg.items()}


def evaluate(config, trainer_mod, *, workdir=None, checkpoint_path=None, step=None,
             out=None, eval_names=None, image_size=None):
  """Runs the selected evaluators once; returns {"<eval>/<metric>": value}."""
  if workdir is None and checkpoint_path is None:
    raise ValueError("pass --workdir (its latest checkpoint) or --checkpoint")
  evals_cfg = select_evals(config.evals, eval_names)
  mesh = sharding.make_mesh(config.mesh.axes)
  batch_axes = tuple(config.sharding.batch_axes)
  trainer = trainer_mod.make_trainer(config)
  if trainer.predict_fn is None:
    raise ValueError(f"{trainer_mod.__name__} has no predict_fn: nothing to evaluate")
  params, source = load_params(config, trainer, mesh, workdir=workdir,
                               checkpoint_path=checkpoint_path, step=step,
                               image_size=image_size)
  params = jax.device_put(params, sharding.tree_shardings(params, mesh, config.sharding))
  consts = None
  if trainer.make_consts:
    host = trainer.make_consts(config)
    consts = jax.device_put(host, sharding.tree_shardings(host, mesh, config.sharding))
  sampler = patch_sampler.from_config(config.flexi, total_steps=1, seed=config.seed)
  out = out or workdir
  ctx = evaluators_lib.EvalContext(mesh, batch_axes, config.input.batch_size, out)
  predict_fns = _predict_fns(trainer, sampler)
  evals = evaluators_lib.build_evaluators(evals_cfg, predict_fns, ctx,
                                          batch_size=config.input.batch_size)
  variables = {"params": params, **(consts or {})}
  results = {}
  for ev in evals:
    t0 = time.perf_counter()
    results.update(ev.run(variables))
    results[f"{ev.name}/eval_sec"] = time.perf_counter() - t0
  if out and jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "eval_results.json"), "w") as f:
      json.dump({"checkpoint": str(source),
                 "metrics": {k: float(v) for k, v in results.items()}}, f, indent=1)
  return results


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  path, overrides, rest = config_lib.parse_cli(argv)
  p = argparse.ArgumentParser(prog="python -m evaluators.run", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default=None, help="Training run to evaluate (latest ckpt).")
  p.add_argument("--checkpoint", default=None, help=".npz / released name / workdir.")
  p.add_argument("--step", type=int, default=None, help="Checkpoint step (default latest).")
  p.add_argument("--out", default=None, help="Where results go (default --workdir).")
  p.add_argument("--trainer", default="train", help="train | distill | lit | module.")
  p.add_argument("--evals", default=None, help="Comma-separated names in config.evals.")
  p.add_argument("--image_size", type=int, default=None,
                 help="Model input size, if config.input cannot be read here.")
  p.add_argument("--coordinator", default=None)
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  args = p.parse_args(rest)
  if path is None:
    p.error("--config configs/<file>.py[:arg] is required")
  try:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    module = trainer_module(args.trainer)
    config = config_lib.load(path, overrides, schema=_schema(module))
    results = evaluate(config, module, workdir=args.workdir, checkpoint_path=args.checkpoint,
                       step=args.step, out=args.out,
                       eval_names=args.evals.split(",") if args.evals else None,
                       image_size=args.image_size)
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    table = cli.summary_table(config, results)
    if table:
      print(table)
  return 0


if __name__ == "__main__":
  host.reexec_with_hugepages()  # Before any step runs (flexi/host.py).
  sys.exit(main())
