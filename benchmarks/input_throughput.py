"""Input throughput of the 240px FlexiViT training pipeline on this machine.

Prints images/s of: raw TFDS reading, decode only, and the full distillation pp
(two copies: 240px student + 224px teacher), on the offline `fine_shapes/240`
data (built on first use), then, in the same run, the train-step images/s of
FlexiViT-S at 240px averaged over its 10 patch sizes (`--step_setup`, or pass
`--step_rate` measured elsewhere), and says which side bounds training. Timings
are printed, never asserted.

  python -m benchmarks.input_throughput [--data fine_shapes/240] [--batch 64]
"""
import argparse
import tempfile
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import input_pipeline as ip  # pylint: disable=wrong-import-position

TRAIN_PP = ('decode|inception_crop|flip_lr|copy("image", "prof")|resize(240)|'
            'value_range(-1, 1)|resize(224, key="prof")|value_range(-1, 1, key="prof")|'
            'onehot(10, key="label", key_result="labels")|keep("image", "prof", "labels")')
CASES = [
    ("read only", 'keep("label")'),
    ("decode", 'decode|keep("image")'),
    ("decode+inception_crop+resize(240)",
     'decode|inception_crop|flip_lr|resize(240)|value_range(-1, 1)|keep("image")'),
    ("distill train pp (240 + 224 copies)", TRAIN_PP),
]


def measure(data, pp, batch, seconds, data_dir):
  cfg = dict(data=dict(name=data, data_dir=data_dir), pp=pp, batch_size=batch,
             shuffle_buffer_size=1000)
  ds, _ = ip.build_train_dataset(cfg, process_index=0, process_count=1)
  it = iter(ds)
  for _ in range(3):  # Warm-up (tracing, buffers).
    next(it)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    next(it)
    n += batch
  return n / (time.perf_counter() - t0)


def measure_step_rate(setup, batch, n_steps=2):
  """Train-step images/s of a model, averaged over its patch-size distribution."""
  from benchmarks import train_step  # pylint: disable=import-outside-toplevel
  config = train_step.load_setup(setup, batch)
  state = train_step.build(config, tempfile.mkdtemp(prefix="flexi_input_bench_"))
  per_step = train_step.time_steps(state, config, n_steps)
  sampler = state["sampler"]
  mean_t = sum(p * per_step[v] for v, p in zip(sampler.values, sampler.mean_probs()))
  return batch / mean_t


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", default="fine_shapes/240")
  p.add_argument("--data_dir", default=None)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seconds", type=float, default=8.0)
  p.add_argument("--step_rate", type=float, default=None,
                 help="train-step images/s measured elsewhere, for comparison")
  p.add_argument("--step_setup", default="vit_s240",
                 help="benchmarks.train_step setup whose step rate (mean over its sampled "
                      "patch sizes) is measured in this run; '' to skip")
  p.add_argument("--step_batch", type=int, default=8)
  args = p.parse_args()
  ip.get_builder(args.data, args.data_dir)  # Build offline data before timing.
  print(f"data={args.data} batch={args.batch} cpus={os.cpu_count()}")
  print(f"{'pipeline':40s} {'images/s':>10s}")
  rates = {}
  for name, pp in CASES:
    rates[name] = measure(args.data, pp, args.batch, args.seconds, args.data_dir)
    print(f"{name:40s} {rates[name]:10.1f}")
  label = "train step (given)"
  if args.step_setup and not args.step_rate:
    args.step_rate = measure_step_rate(args.step_setup, args.step_batch)
    label = f"train step ({args.step_setup}, batch {args.step_batch})"
  if args.step_rate:
    full = rates[CASES[-1][0]]
    bound = "input" if full < args.step_rate else "compute"
    print(f"{label:40s} {args.step_rate:10.1f}   -> {bound}-bound "
          f"(input/step = {full / args.step_rate:.2f})")


if __name__ == "__main__":
  main()
