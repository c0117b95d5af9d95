"""Command line shared by all trainers: --config path[:arg], --config.key=value, --workdir.

Multi-process: --coordinator host:port --num_processes N --process_id i (or the
environment: SLURM, Open MPI, TPU pods, JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/
JAX_PROCESS_ID).
"""
import argparse
import time

from flexi import config as config_lib
from flexi import distributed, logging_utils


def parse(argv):
  path, overrides, rest = config_lib.parse_cli(argv)
  p = argparse.ArgumentParser(description="FlexiViT trainer")
  p.add_argument("--workdir", required=True, help="Checkpoints, metrics.jsonl, tb/.")
  p.add_argument("--coordinator", default=None, help="host:port of process 0.")
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  args = p.parse_args(rest)
  if path is None:
    p.error("--config configs/<file>.py[:arg] is required")
  return path, overrides, args


def summary_table(config, metrics):
  """The final eval table (or one metric per line), minus sweep evaluators: they
  print their own, richer table."""
  own_table = {name for name, ev in config.evals.items()
               if ev.get("type") == "sweep" and ev.get("verbose", True)}
  rest = {k: v for k, v in metrics.items() if k.split("/")[0] not in own_table}
  return logging_utils.eval_table(rest) or "\n".join(
      f"{k}: {float(v):.4f}" for k, v in sorted(rest.items()))


def main(make_trainer, argv, schema=None):
  """Parses argv, initialises multi-host, trains, prints the eval table."""
  from flexi import train_loop  # pylint: disable=import-outside-toplevel
  path, overrides, args = parse(argv)
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  config = config_lib.load(path, overrides, schema=schema)
  t0 = time.perf_counter()
  result = train_loop.train_and_evaluate(config, args.workdir, make_trainer(config))
  table = summary_table(config, result.eval_metrics)
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    if table:
      print(table)
    print(f"done: {result.step} steps in {time.perf_counter() - t0:.1f}s; workdir {args.workdir}")
  return result
