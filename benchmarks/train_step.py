r"""Train-step throughput per patch size and compile time (cold / persistent cache).

    python -m benchmarks.train_step                 # demo model and ViT-S at 240px
    python -m benchmarks.train_step --setups demo --steps 5 --batch 16

For each setup: compile seconds per patch size with an empty persistent cache
(cold) and again in a fresh subprocess reading that cache (warm); images/s of the
compiled supervised train step per patch size; and the images/s averaged over the
sampled patch-size distribution (time-weighted: batch / sum_p p * t_step(p)).
All numbers of a table come from one run on the same machine.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from flexi import config as config_lib
from flexi import host, optim, patch_sampler, sharding, steps, train_loop
from trainers import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUPS = {
    # name: (config file, overrides)
    "demo": ("configs/demo.py", []),
    "vit_s240": ("configs/flexivit_i21k_sup.py:variant=S",
                 ["num_classes=1000", "optax={}"]),  # fp32 Adam moments on CPU.
}


def load_setup(name, batch):
  path, overrides = SETUPS[name]
  config = config_lib.load(os.path.join(ROOT, path), overrides + [
      f"input.batch_size={batch}", "total_steps=1000", "total_epochs=None",
      "mesh.axes=[('data', -1)]"])
  return config


def build(config, cache_dir):
  """Everything but the loop: params, opt state, compiled steps (timed)."""
  train_loop.setup_compilation_cache(cache_dir)
  mesh = sharding.make_mesh(config.mesh.axes)
  res = _res(config)
  rep = sharding.batch_sharding(mesh)
  batch_spec = {
      "image": jax.ShapeDtypeStruct((config.input.batch_size, res, res, 3), np.float32,
                                    sharding=rep),
      "labels": jax.ShapeDtypeStruct((config.input.batch_size, config.num_classes),
                                     np.float32, sharding=rep)}
  trainer = train.make_trainer(config)
  sampler = patch_sampler.from_config(config.flexi, total_steps=config.total_steps, seed=0)
  params_shape = jax.eval_shape(trainer.init_params, jax.random.PRNGKey(0), batch_spec)
  tx, lr_fn = optim.make_optimizer(config, params_shape, total_steps=config.total_steps,
                                   warmup_steps=10)
  shard = lambda t: sharding.tree_shardings(t, mesh, config.sharding)
  p_sh, o_sh = shard(params_shape), shard(jax.eval_shape(tx.init, params_shape))
  params = jax.jit(lambda r: trainer.init_params(r, batch_spec), out_shardings=p_sh)(
      jax.random.PRNGKey(0))
  opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
  build_fn = steps.make_train_step(trainer, tx, lr_fn, seed=0)
  compiled, secs, _ = steps.compile_all(build_fn, sampler, params, opt_state, None, batch_spec,
                                     mesh, p_sh, o_sh, dict(config.xla_compiler_options))
  return dict(mesh=mesh, sampler=sampler, params=params, opt_state=opt_state,
              compiled=compiled, compile_secs=secs, res=res)


def _res(config):
  return config.arg.get("res", 96) if not config.arg.get("runlocal") else 32


def time_steps(state, config, n_steps):
  """Seconds per step for every value (after one warm-up step)."""
  rng = np.random.default_rng(0)
  b, res = config.input.batch_size, state["res"]
  batch = sharding.to_global({
      "image": rng.normal(size=(b, res, res, 3)).astype(np.float32),
      "labels": np.eye(config.num_classes, dtype=np.float32)[rng.integers(0, config.num_classes,
                                                                          b)]},
      state["mesh"])
  params, opt_state, out = state["params"], state["opt_state"], {}
  for value, fn in state["compiled"].items():
    params, opt_state, m = fn(params, opt_state, None, batch, np.int32(0))
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(n_steps):
      params, opt_state, m = fn(params, opt_state, None, batch, np.int32(i))
    jax.block_until_ready((params, m))
    out[value] = (time.perf_counter() - t0) / n_steps
  return out


def warm_compile(setup, batch, cache_dir):
  """Compile seconds per value in a FRESH process reading `cache_dir`."""
  cmd = [sys.executable, "-m", "benchmarks.train_step", "--compile_only", "--setups", setup,
         "--batch", str(batch), "--cache_dir", cache_dir]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
  return {(int(k) if k.isdigit() else k): v
          for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def run_setup(name, batch, n_steps):
  config = load_setup(name, batch)
  cache_dir = tempfile.mkdtemp(prefix=f"flexi_bench_{name}_")
  state = build(config, cache_dir)
  per_step = time_steps(state, config, n_steps)
  warm = warm_compile(name, batch, cache_dir)
  sampler = state["sampler"]
  probs = dict(zip(sampler.values, sampler.mean_probs()))
  mean_t = sum(probs[v] * per_step[v] for v in sampler.values)
  rows = []
  for v in sampler.values:
    ps = patch_sampler.patch_size_of(sampler.kind, v, (state["res"],) * 2)
    rows.append(dict(patch=ps, tokens=(state["res"] // ps) ** 2, img_s=batch / per_step[v],
                     cold=state["compile_secs"][v], warm=warm[v]))
  update = steps.OPTIMIZER_UPDATE  # One program shared by every patch size.
  return dict(name=name, batch=batch, res=state["res"], rows=rows,
              update=dict(cold=state["compile_secs"][update], warm=warm[update]),
              mean_img_s=batch / mean_t, devices=len(jax.devices()))


def print_table(r):
  print(f"\n{r['name']}: {r['res']}px, batch {r['batch']}, {r['devices']} device(s), "
        f"{jax.devices()[0].platform}")
  print("| patch | tokens | img/s | compile cold s | compile warm s |")
  print("|---|---|---|---|---|")
  for row in r["rows"]:
    print(f"| {row['patch']} | {row['tokens']} | {row['img_s']:.1f} | {row['cold']:.2f} | "
          f"{row['warm']:.2f} |")
  print(f"| optimizer update (shared) | | | {r['update']['cold']:.2f} | "
        f"{r['update']['warm']:.2f} |")
  rows = r["rows"] + [r["update"]]
  print(f"| sampled mix | | {r['mean_img_s']:.1f} | "
        f"{sum(x['cold'] for x in rows):.1f} (sum) | {sum(x['warm'] for x in rows):.1f} (sum) |")


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--setups", default="demo,vit_s240")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--compile_only", action="store_true")
  p.add_argument("--cache_dir", default=None)
  a = p.parse_args(argv)
  if a.compile_only:
    state = build(load_setup(a.setups, a.batch), a.cache_dir)
    print(json.dumps({str(k): v for k, v in state["compile_secs"].items()}))
    return
  for name in a.setups.split(","):
    print_table(run_setup(name, a.batch, a.steps))


if __name__ == "__main__":
  host.reexec_with_hugepages()  # Before any step runs (flexi/host.py).
  main()
