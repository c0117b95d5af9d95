"""Speed, compile-time and memory ratios: this codebase vs the reference formulation.

Every ratio is measured in ONE process (the cache restart in fresh subprocesses),
reference and ours interleaved, because the machine is shared and absolute times
drift. Run from the repo root:

  python -m benchmarks.perf                 # all sections (~20 min on 2 busy cores)
  python -m benchmarks.perf --quick         # batch 4, 2 timed steps, fewer sizes
  python -m benchmarks.perf --sections resize,memory --json /tmp/perf.json

Sections: resize (PI-resize setup), step (train-step img/s per patch size and over a
random-patch-size training sequence, FLOP/s vs matmul peak, time until all patch sizes
are compiled, one round), compile (reference lazy vs ours AOT,
loop and scan, best of --compile-reps rounds), cache (persistent
compilation cache restart), memory (ViT-B/8 teacher + FlexiViT-B distillation step).
Not run by default: remat (whole train steps in training order of our model with each
of REMAT_SETTINGS, interleaved: `--sections remat --variants S`).

Like the trainers, the script restarts itself with glibc's huge-page tunable
(flexi/host.py), so reference and ours both run without per-step page faults;
`FLEXI_HUGEPAGES=0 python -m benchmarks.perf ...` measures the default allocator.
"""
import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import memory, reference
from flexi import exec_cache, host, native_attention, resize, sharding, steps, vit

PATCHES = (48, 40, 30, 24, 20, 16, 15, 12, 10, 8)
RES = 240
FLOP_PATCHES = (16, 8)  # Where the FLOP/s targets are set (issue 8).
OURS = dict(attention="auto")  # The library options the speed numbers use.
REMAT_SETTINGS = {  # Block layouts compared by benchmarks.remat and the remat section.
    "unrolled": {},
    "scan": dict(scan=True),
    "scan+remat": dict(scan=True, remat=True),
    "scan+remat(dots+attn)": dict(scan=True, remat=True,
                                  remat_policy="dots_and_attention_saveable"),
}
RESULTS = {}  # name -> dict, collected for --json and the summary.


def log(*args):
  print(*args, flush=True)


def best_of(fn, reps):
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times)


def cpu_record(cpuinfo_path="/proc/cpuinfo"):
  """The first CPU's model name, family/model and widest vector ISA. A VM's model name
  can hide its generation ("AMD EPYC" was an AVX-512 Zen 4 and later an AVX2 Zen 3
  here), and the numbers depend on it."""
  fields = host.cpuinfo(cpuinfo_path)
  flags = set(fields.get("flags", "").split())
  return dict(cpu=fields.get("model name", platform.processor()),
              cpu_family_model=f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
              isa=next((name for name in ("avx512f", "avx2", "avx") if name in flags), None))


def machine():
  """What the numbers depend on."""
  return dict(nproc=os.cpu_count(), **cpu_record(), jax=jax.__version__,
              backend=jax.default_backend(), devices=jax.device_count(),
              load_avg=os.getloadavg()[0], thp_mode=host.thp_mode(),
              glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
              native_attention_blas=(native_attention.blas_core()
                                     if native_attention.available() else None))


def minor_faults():
  """Page faults so far (each step's fresh temporaries fault in page by page, see
  flexi/host.py)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def system_seconds():
  """Kernel CPU time so far (zero-filling fresh pages for a step's temporaries)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_stime


# --- Practical limit: a large matmul. ---------------------------------------------

def matmul_peak(dtype, n=2048, reps=5):
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  return 2 * n ** 3 / best_of(lambda: f(a), reps)


# --- PI-resize setup. -------------------------------------------------------------

def warm_tf():
  """Imports TF and runs one resize so its start-up is not billed to the reference."""
  reference.dense_resize_matrix((2, 2), (3, 3))


def section_resize(args):
  warm_tf()
  rows = []
  for p in args.patches:
    resize._pinv_transpose.cache_clear()  # pylint: disable=protected-access
    resize._resize_matrix_cached.cache_clear()  # pylint: disable=protected-access
    t0 = time.perf_counter()
    mh, mw = resize._pinv_transpose(32, p), resize._pinv_transpose(32, p)  # pylint: disable=protected-access
    ours_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    resize._pinv_transpose(32, p)  # pylint: disable=protected-access
    ours_cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense = reference.dense_pi_matrix((32, 32), (p, p))
    ref = time.perf_counter() - t0
    err = float(np.abs(np.kron(mh, mw) - dense).max())
    rows.append(dict(patch=p, ref_s=ref, ours_cold_s=ours_cold, ours_cached_s=ours_cached,
                     ratio=ref / ours_cold, max_abs_diff=err))
    log(f"resize p={p:2d}: dense {ref * 1e3:8.1f} ms  separable {ours_cold * 1e3:6.2f} ms "
        f"(cached {ours_cached * 1e6:5.1f} us)  ratio {ref / ours_cold:7.0f}x  "
        f"max|diff| {err:.1e}")
  RESULTS["resize"] = dict(rows=rows, min_ratio=min(r["ratio"] for r in rows))


# --- Train step. ------------------------------------------------------------------

def synthetic_batch(batch):
  """(images, one-hot labels) at 240px: what every timed step here trains on."""
  images = jax.random.normal(jax.random.PRNGKey(1), (batch, RES, RES, 3))
  return images, jax.nn.one_hot(jnp.arange(batch) % 1000, 1000)  # As the input pipeline.


def init_params(variant):
  """A FlexiViT-`variant` (1000 classes, class token) in big_vision's per-layer layout."""
  model = vit.Model(1000, variant=variant, pool_type="tok")
  return jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, RES, RES, 3)))["params"]


def _ours_trainer(model):
  """reference.xent_loss in the trainer interface that flexi.steps expects."""
  def loss_fn(params, batch, *, rng, flexi, consts):
    del rng, consts
    return reference.xent_loss(model, params, batch["image"], batch["labels"],
                               flexi["patch_size"]), {}
  return types.SimpleNamespace(loss_fn=loss_fn)


def compile_all(model, tx, params, opt_state, batch, patches, threads, cache=None,
                context=""):
  """Our steps for every patch size exactly as the training loop builds them
  (flexi.steps: per-size gradient programs + one optimizer update, lowered serially,
  XLA in threads; with `cache` loaded from disk). Returns ({p: step(params, opt_state,
  images, labels) -> (params, opt_state, metrics)}, seconds)."""
  mesh = sharding.make_mesh([("data", -1)])
  rep = sharding.replicated(mesh)
  p_sh, o_sh = (jax.tree.map(lambda _: rep, t) for t in (params, opt_state))
  spec = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)
          for k, x in zip(("image", "labels"), batch)}
  sampler = types.SimpleNamespace(values=list(patches),
                                  kwargs=lambda p: {"patch_size": (p, p)})
  build = steps.make_train_step(_ours_trainer(model), tx, lambda _: 0.1, seed=0)
  t0 = time.perf_counter()
  compiled, _, _ = steps.compile_all(build, sampler, params, opt_state, None, spec, mesh,
                                     p_sh, o_sh, cache=cache, cache_context=context,
                                     workers=max(1, threads))
  step0 = np.int32(0)
  calls = {p: (lambda params, opt_state, images, labels, c=c:
               c(params, opt_state, None, {"image": images, "labels": labels}, step0))
           for p, c in compiled.items()}
  return calls, time.perf_counter() - t0


def model_flops(variant, tx, params, opt_state, batch, p):
  """Model FLOPs of one train step: XLA cost analysis of the plain formulation.

  (Loops, as in scan or blocked attention, are counted once by the analysis, so the
  unrolled, flax-attention graph is the one to count.)
  """
  model = vit.Model(1000, variant=variant, pool_type="tok")
  step = jax.jit(reference.make_step(model, tx), static_argnums=(4,))
  return step.lower(params, opt_state, *batch, (p, p)).cost_analysis()["flops"]


def training_mix(args, updates_for, sides=("ours", "ref")):
  """Train img/s as a FlexiViT run sees it: a new random patch size at every step.

  Each round is one permutation of `args.patches` (uniform; seeded, so every side runs
  the same sequence), run by each side in turn, the order rotating from round to round.
  Unlike the per-size rows (the same program repeated), consecutive steps here are
  different programs, so a step does not get back the pages its own program just
  freed: fresh temporaries cost what they cost in training (docs/benchmarks.md,
  "Training order"). `updates_for(p)` -> {side: one step at patch size p}.
  """
  order = np.random.default_rng(0)
  rounds = []
  for i in range(args.mix_rounds):
    sequence = [int(p) for p in order.permutation(args.patches)]
    steps = {p: updates_for(p) for p in sequence}
    row = dict(sequence=sequence)
    k = i % len(sides)
    for side in sides[k:] + sides[:k]:
      times = []
      s0 = system_seconds()
      for p in sequence:
        t0 = time.perf_counter()
        steps[p][side]()
        times.append(time.perf_counter() - t0)
      row[f"{side}_s"], row[f"{side}_sys_s"] = times, system_seconds() - s0
    rounds.append(row)
  n = args.batch * len(args.patches) * args.mix_rounds
  out = dict(rounds=rounds)
  for side in sides:
    out[f"{side}_img_s"] = n / sum(sum(r[f"{side}_s"]) for r in rounds)
    out[f"{side}_sys_s"] = float(np.mean([r[f"{side}_sys_s"] for r in rounds]))
  return out


def section_step(args, variant):
  tx = optax.sgd(0.1, momentum=0.9)
  batch = synthetic_batch(args.batch)
  params = init_params(variant)
  ours_kw = dict(OURS, scan=args.scan)
  if args.remat_policy:
    ours_kw.update(remat=True, remat_policy=args.remat_policy)
  ours_model = vit.Model(1000, variant=variant, pool_type="tok", **ours_kw)
  ref_model = reference.Model(1000, variant=variant, pool_type="tok")
  ours_params = vit.layers_to_scan(params) if args.scan else params
  copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731  (donation eats buffers)
  ref_state = [copy(params), tx.init(params)]
  ours_state = [copy(ours_params), tx.init(ours_params)]

  warm_tf()
  peaks = [matmul_peak(jnp.float32)]
  compiled, ours_compile = compile_all(ours_model, tx, ours_state[0], ours_state[1], batch,
                                       args.patches, args.threads)
  log(f"{variant}: ours compiled {len(args.patches)} sizes in {ours_compile:.1f}s "
      f"({args.threads} threads, scan={args.scan}, remat_policy={args.remat_policy})")
  ref_step = reference.lazy_train_step(ref_model, tx)

  def updates_for(p):
    """One train step of each formulation at patch size p, updating its state."""
    def ref_update():
      ref_state[0], ref_state[1], _ = jax.block_until_ready(ref_step(*ref_state, *batch, (p, p)))

    def ours_update():
      ours_state[0], ours_state[1], _ = jax.block_until_ready(compiled[p](*ours_state, *batch))
    return {"ref": ref_update, "ours": ours_update}

  rows = []
  for p in args.patches:
    peak_near = []  # For FLOP_PATCHES: the peak measured just before each of our steps.
    t0 = time.perf_counter()
    ref_state[0], ref_state[1], loss = ref_step(*ref_state, *batch, (p, p))
    loss.block_until_ready()
    ref_first = time.perf_counter() - t0
    updates = updates_for(p)
    updates["ours"]()  # Warm-up (the reference's first call was its compile, above).
    secs, faults = {"ref": [], "ours": []}, {"ref": [], "ours": []}
    for i in range(args.steps):  # Interleaved, alternating order: same machine load.
      for side in (("ref", "ours") if i % 2 else ("ours", "ref")):
        if side == "ours" and p in FLOP_PATCHES:
          peak_near.append(matmul_peak(jnp.float32))
        f0, t0 = minor_faults(), time.perf_counter()
        updates[side]()
        secs[side].append(time.perf_counter() - t0)
        faults[side].append(minor_faults() - f0)
    ref_t, ours_t = secs["ref"], secs["ours"]
    row = dict(patch=p, ref_s=min(ref_t), ours_s=min(ours_t),
               ref_compile_s=max(0.0, ref_first - min(ref_t)),
               ref_faults=min(faults["ref"]), ours_faults=min(faults["ours"]))
    if peak_near:  # The limit in the same machine state as each step (it drifts +-30%).
      row.update(ours_all_s=ours_t, fp32_peak_near=peak_near)
      peaks.extend(peak_near)
    rows.append(row)
    log(f"{variant} p={p:2d}: ref {row['ref_s'] * 1e3:8.0f} ms  ours {row['ours_s'] * 1e3:8.0f} ms"
        f"  speedup {row['ref_s'] / row['ours_s']:.2f}x  (ref lazy compile "
        f"{row['ref_compile_s']:.1f}s; page faults/step ref {row['ref_faults']} ours "
        f"{row['ours_faults']})")
  mix = training_mix(args, updates_for)
  mix["speedup"] = mix["ours_img_s"] / mix["ref_img_s"]
  log(f"{variant}: training mix (random patch size per step, {args.mix_rounds} rounds of "
      f"{len(args.patches)}): ref {mix['ref_img_s']:.2f} img/s, ours {mix['ours_img_s']:.2f} "
      f"-> {mix['speedup']:.2f}x; system time per round ref {mix['ref_sys_s']:.1f}s, ours "
      f"{mix['ours_sys_s']:.1f}s")
  peaks.append(matmul_peak(jnp.float32))
  peak = max(peaks)
  n = args.batch * len(rows)
  ref_ips = n / sum(r["ref_s"] for r in rows)
  ours_ips = n / sum(r["ours_s"] for r in rows)
  out = dict(rows=rows, mix=mix, ref_img_s=ref_ips, ours_img_s=ours_ips,
             speedup=ours_ips / ref_ips,
             mean_img_s_speedup=float(np.mean([r["ref_s"] / r["ours_s"] for r in rows])),
             ours_compile_all_s=ours_compile,
             ref_compile_all_s=sum(r["ref_compile_s"] for r in rows), fp32_peak=peak,
             bf16_peak=matmul_peak(jnp.bfloat16))
  out["compile_ratio"] = out["ours_compile_all_s"] / out["ref_compile_all_s"]
  by_p = {r["patch"]: r for r in rows}
  for p in FLOP_PATCHES:
    if p in by_p:
      flops = model_flops(variant, tx, params, ref_state[1], batch, p)
      timed = by_p[p]
      out[f"flops_p{p}"] = flops
      out[f"flop_s_p{p}"] = flops / timed["ours_s"]
      out[f"frac_peak_p{p}"] = float(np.median(  # Each step against its own peak.
          [flops / t / pk for t, pk in zip(timed["ours_all_s"], timed["fp32_peak_near"])]))
      out[f"frac_max_peak_p{p}"] = flops / timed["ours_s"] / peak  # Fastest vs fastest.
      out[f"ref_frac_max_peak_p{p}"] = flops / timed["ref_s"] / peak
  log(f"{variant}: img/s uniform over {len(rows)} sizes: ref {ref_ips:.2f} ours {ours_ips:.2f}"
      f" -> {out['speedup']:.2f}x; compile-all ours {ours_compile:.1f}s vs ref lazy "
      f"{out['ref_compile_all_s']:.1f}s; matmul peak fp32 {peak / 1e9:.0f} (max of the run), "
      f"bf16 {out['bf16_peak'] / 1e9:.0f} GFLOP/s")
  RESULTS[f"step_{variant}"] = out


def section_remat(args, variant):
  """Whole train steps of our model in each REMAT_SETTINGS layout, in training order and
  interleaved (per-program times and memory: benchmarks.remat)."""
  tx = optax.sgd(0.1, momentum=0.9)
  batch = synthetic_batch(args.batch)
  params = init_params(variant)
  compiled, states, compile_s = {}, {}, {}
  for name, kw in REMAT_SETTINGS.items():
    model = vit.Model(1000, variant=variant, pool_type="tok", **OURS, **kw)
    own = jax.tree.map(jnp.array, vit.layers_to_scan(params) if kw.get("scan") else params)
    states[name] = [own, tx.init(own)]
    compiled[name], compile_s[name] = compile_all(model, tx, *states[name], batch,
                                                  args.patches, args.threads)
    log(f"{variant} {name}: {len(args.patches)} sizes compiled in {compile_s[name]:.1f}s")

  def updates_for(p):
    def update(name):
      state = states[name]
      state[0], state[1], _ = jax.block_until_ready(compiled[name][p](*state, *batch))
    return {name: functools.partial(update, name) for name in REMAT_SETTINGS}

  for p in args.patches:  # Every program runs once before the timed rounds.
    for update in updates_for(p).values():
      update()
  mix = training_mix(args, updates_for, sides=tuple(REMAT_SETTINGS))
  mix["compile_s"] = compile_s
  log(f"{variant}: training mix ({args.mix_rounds} rounds of {len(args.patches)} sizes), "
      "img/s: " + ", ".join(f"{name} {mix[f'{name}_img_s']:.2f}" for name in REMAT_SETTINGS))
  RESULTS[f"remat_{variant}"] = mix


# --- Compile time: reference lazy vs ours AOT (loop, scan). -----------------------

def _reference_compile_all(variant, tx, params, batch, patches):
  """What the reference's lazy compiles add up to: trace (incl. the dense PI matrix),
  lower and compile one jit per size, one after the other."""
  step = reference.lazy_train_step(reference.Model(1000, variant=variant, pool_type="tok"), tx)
  opt_state = tx.init(params)
  t0 = time.perf_counter()
  for p in patches:
    step.lower(params, opt_state, *batch, (p, p)).compile()
  return time.perf_counter() - t0


def section_compile(args):
  """Every way of compiling all sizes, `--compile-reps` rounds in alternation from cold
  in-memory caches; the minimum per way (compile times drift +-20% between rounds)."""
  tx = optax.sgd(0.1, momentum=0.9)
  batch = synthetic_batch(args.batch)
  params = init_params("Ti")
  warm_tf()
  ways = {"reference lazy": None}
  for scan, threads in ((False, 1), (False, args.threads), (True, args.threads)):
    ways[f"ours scan={scan},threads={threads}"] = (scan, threads)
  secs = {name: [] for name in ways}
  for _ in range(args.compile_reps):
    for name, way in ways.items():
      jax.clear_caches()
      if way is None:
        secs[name].append(_reference_compile_all("Ti", tx, params, batch,
                                                 args.compile_patches))
      else:
        scan, threads = way
        model = vit.Model(1000, variant="Ti", pool_type="tok", scan=scan, **OURS)
        p_ = vit.layers_to_scan(params) if scan else params
        secs[name].append(compile_all(model, tx, p_, tx.init(p_), batch,
                                      args.compile_patches, threads)[1])
      log(f"compile Ti, {len(args.compile_patches)} sizes, {name}: {secs[name][-1]:.1f}s")
  best = {name: min(v) for name, v in secs.items()}
  RESULTS["compile"] = dict(patches=list(args.compile_patches), seconds=best, all=secs,
                            ratios={name: best[name] / best["reference lazy"]
                                    for name in ways if ways[name] is not None})


# --- Persistent compilation cache: restart vs cold. --------------------------------

def cache_child(args):
  """Runs in a fresh process: compile all sizes with the persistent and executable caches."""
  jax.config.update("jax_compilation_cache_dir", args.cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  tx = optax.sgd(0.1, momentum=0.9)
  params = init_params(args.variants[0])
  if args.scan:
    params = vit.layers_to_scan(params)
  model = vit.Model(1000, variant=args.variants[0], pool_type="tok", scan=args.scan, **OURS)
  cache = exec_cache.ExecutableCache(os.path.join(args.cache_dir, "executables"))
  context = json.dumps(dict(variant=args.variants[0], scan=args.scan, ours=OURS))
  _, secs = compile_all(model, tx, params, tx.init(params), synthetic_batch(args.batch),
                        args.patches, args.threads, cache=cache, context=context)
  print(json.dumps(dict(compile_s=secs)))


def section_cache(args):
  out = {}
  with tempfile.TemporaryDirectory() as cache_dir:
    for run in ("cold", "warm"):
      cmd = [sys.executable, "-m", "benchmarks.perf", "--cache-child", "--cache-dir", cache_dir,
             "--variants", args.variants[0], "--batch", str(args.batch),
             "--threads", str(args.threads), "--patches", ",".join(map(str, args.patches))]
      if args.scan:
        cmd.append("--scan")
      t0 = time.perf_counter()
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
      wall = time.perf_counter() - t0
      if proc.returncode:
        raise RuntimeError(f"cache child failed: {proc.stderr[-2000:]}")
      child = json.loads(proc.stdout.strip().splitlines()[-1])
      out[run] = dict(compile_s=child["compile_s"], process_s=wall)
      log(f"cache {run}: compile all {child['compile_s']:.1f}s, process {wall:.1f}s")
  out["compile_ratio"] = out["warm"]["compile_s"] / out["cold"]["compile_s"]
  out["process_ratio"] = out["warm"]["process_s"] / out["cold"]["process_s"]
  RESULTS["cache"] = out


def section_memory(args):
  rows = {}
  configs = {"default": {}, "remat": dict(remat=True),
             "auto-attention": dict(attention="auto"),
             "remat+auto-attention": dict(remat=True, attention="auto")}
  if not args.quick:
    configs["scan+remat+auto-attention"] = dict(scan=True, remat=True, attention="auto")
    configs["scan+remat(dots+attn)+auto-attention"] = dict(
        scan=True, remat=True, remat_policy="dots_and_attention_saveable", attention="auto")
  for name, kw in configs.items():
    rows[name] = memory.distill_memory(args.mem_batch, 8, **kw)
    log(f"memory B/8 teacher + FlexiViT-B/8 student, batch {args.mem_batch}, {name}: "
        f"peak {rows[name]['peak_bytes'] / 2 ** 30:.2f} GiB "
        f"(temp {rows[name]['temp_bytes'] / 2 ** 30:.2f} GiB)")
  lit_rows = {}
  if not args.quick:  # flexi-LiT with its locked B image tower: zero gradients or none.
    for name, skip in (("zero-grads", False), ("frozen-skipped", True)):
      lit_rows[name] = memory.lit_locked_tower(args.mem_batch, 16, skip_frozen_grads=skip)
      log(f"flexi-LiT B/B, locked image tower, batch {args.mem_batch}, p=16, {name}: "
          f"gradients {lit_rows[name]['grads_bytes'] / 2 ** 20:.0f} MiB, peak grad program "
          f"{lit_rows[name]['grad_peak_bytes'] / 2 ** 20:.0f} MiB, update program "
          f"{lit_rows[name]['update_peak_bytes'] / 2 ** 20:.0f} MiB")
  RESULTS["memory"] = dict(batch=args.mem_batch, patch=8, rows=rows, lit=lit_rows,
                           remat_ratio=rows["remat"]["peak_bytes"]
                           / rows["default"]["peak_bytes"])


# --- Summary. ----------------------------------------------------------------------

def summary():
  lines = ["| metric | value | target |", "|---|---|---|"]
  for key, res in RESULTS.items():
    if key.startswith("step_"):
      v = key[5:]
      mix = res["mix"]
      lines.append(f"| {v}: train img/s, random patch size per step (uniform, "
                   f"{len(mix['rounds'])} rounds), ours / reference | {mix['speedup']:.2f}x "
                   f"({mix['ours_img_s']:.2f} vs {mix['ref_img_s']:.2f}; system time per "
                   f"round {mix['ours_sys_s']:.1f} vs {mix['ref_sys_s']:.1f} s) | >= 1.5x |")
      lines.append(f"| {v}: same, each size repeated (fastest step per size) | "
                   f"{res['speedup']:.2f}x ({res['ours_img_s']:.2f} vs {res['ref_img_s']:.2f})"
                   " | |")
      lines.append(f"| {v}: time until all sizes compiled, ours / reference lazy (one round) | "
                   f"{res['compile_ratio']:.2f} ({res['ours_compile_all_s']:.0f}s vs "
                   f"{res['ref_compile_all_s']:.0f}s) | <= 0.5 |")
      for p, target in zip(FLOP_PATCHES, (0.6, 0.5)):
        if f"frac_peak_p{p}" in res:
          lines.append(f"| {v}/{p}: train-step FLOP/s / fp32 matmul peak: fastest step / "
                       f"the run's max peak (reference); median of steps / the peak "
                       f"measured just before each | {res[f'frac_max_peak_p{p}']:.0%} "
                       f"({res[f'flop_s_p{p}'] / 1e9:.0f} of {res['fp32_peak'] / 1e9:.0f} "
                       f"GFLOP/s; ref {res[f'ref_frac_max_peak_p{p}']:.0%}); paired "
                       f"{res[f'frac_peak_p{p}']:.0%} | >= {target:.0%} |")
    if key.startswith("remat_"):
      base = res["unrolled_img_s"]
      for name in REMAT_SETTINGS:
        lines.append(f"| {key[6:]}: train img/s, random patch size per step "
                     f"({len(res['rounds'])} rounds), {name} / unrolled | "
                     f"{res[f'{name}_img_s'] / base:.2f}x ({res[f'{name}_img_s']:.2f} img/s; "
                     f"all sizes compiled in {res['compile_s'][name]:.0f}s) | |")
  if "compile" in RESULTS:
    c = RESULTS["compile"]
    ref = c["seconds"]["reference lazy"]
    for name, ratio in c["ratios"].items():
      lines.append(f"| Ti: all {len(c['patches'])} sizes compiled, {name} / reference lazy "
                   f"(best of {len(c['all'][name])}) | {ratio:.2f} ({c['seconds'][name]:.1f}s "
                   f"vs {ref:.1f}s) | <= 0.5 |")
  if "resize" in RESULTS:
    lines.append(f"| PI-resize setup per patch size, dense / ours (worst size) | "
                 f"{RESULTS['resize']['min_ratio']:.0f}x | >= 100x |")
  if "cache" in RESULTS:
    c = RESULTS["cache"]
    lines.append(f"| restart with persistent cache / cold: compile all sizes | "
                 f"{c['compile_ratio']:.0%} ({c['warm']['compile_s']:.1f}s vs "
                 f"{c['cold']['compile_s']:.1f}s) | <= 10% |")
    lines.append(f"| same, whole process incl. imports | {c['process_ratio']:.0%} | |")
  if "memory" in RESULTS:
    m = RESULTS["memory"]
    for name, row in m["rows"].items():
      lines.append(f"| distill step peak memory, B/8 teacher + FlexiViT-B/8, batch "
                   f"{m['batch']}, {name} | {row['peak_bytes'] / 2 ** 30:.2f} GiB | "
                   f"{'measured' if name == 'default' else 'lower than default'} |")
    for name, row in m.get("lit", {}).items():
      lines.append(f"| flexi-LiT B/B step, locked image tower, {name}: gradients / "
                   f"grad program peak / update program peak | "
                   f"{row['grads_bytes'] / 2 ** 20:.0f} / {row['grad_peak_bytes'] / 2 ** 20:.0f}"
                   f" / {row['update_peak_bytes'] / 2 ** 20:.0f} MiB | lower when skipped |")
  return "\n".join(lines)


def parse_args(argv=None):
  ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sections", default="resize,step,compile,cache,memory")
  parser.add_argument("--quick", action="store_true", help="batch 4, 2 timed steps")
  parser.add_argument("--variants", default="Ti,S", type=lambda s: s.split(","))
  parser.add_argument("--batch", type=int, default=None, help="train batch (default 8)")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per size")
  parser.add_argument("--patches", type=ints, default=PATCHES)
  parser.add_argument("--mix-rounds", type=int, default=None,
                      help="rounds of the random-patch-size training sequence (default 4)")
  parser.add_argument("--compile-patches", type=ints, default=None)
  parser.add_argument("--compile-reps", type=int, default=2,
                      help="rounds of the compile section (min is reported)")
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--scan", action="store_true", help="ours with nn.scan blocks")
  parser.add_argument("--remat-policy", default=None, choices=sorted(vit.REMAT_POLICIES),
                      help="step section: ours with remat=True and this policy")
  parser.add_argument("--mem-batch", type=int, default=8)
  parser.add_argument("--json", default=None, help="write all results here")
  parser.add_argument("--cache-child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.batch = args.batch or (4 if args.quick else 8)
  args.steps = args.steps or (2 if args.quick else 3)
  args.mix_rounds = args.mix_rounds or (2 if args.quick else 4)
  if args.compile_patches is None:
    args.compile_patches = (48, 16, 8) if args.quick else args.patches
  known = {"resize", "step", "remat", "compile", "cache", "memory"}
  args.sections = args.sections.split(",")
  bad = [s for s in args.sections if s not in known]
  if bad:
    parser.error(f"unknown section(s) {bad}; known: {sorted(known)}")
  check_args(parser, args, ("batch", "steps", "mix_rounds"),
             args.patches + args.compile_patches)
  return args


def parse_sizes_args(doc, argv=None):
  """The arguments of the per-size scripts (benchmarks.ceiling, benchmarks.remat)."""
  parser = argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variants", default="Ti,S", type=lambda s: s.split(","))
  parser.add_argument("--patches", default="16,8",
                      type=lambda s: tuple(int(v) for v in s.split(",")))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--reps", type=int, default=5, help="timed rounds")
  parser.add_argument("--json", default=None, help="write the rows here")
  args = parser.parse_args(argv)
  check_args(parser, args, ("batch", "reps"), args.patches)
  return args


def run_per_size(args, measure, header, table_row):
  """main() of the per-size scripts: `measure(variant, patch, batch, reps)` for each
  size, one table row per result, and every result in --json."""
  log("machine:", machine())
  rows = [measure(v, p, args.batch, args.reps) for v in args.variants for p in args.patches]
  log("\n" + header)
  for row in rows:
    log(table_row(row))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(machine=machine(), args=vars(args), rows=rows), f, indent=1)
  return rows


def check_args(parser, args, counts, patches):
  """One-line parser errors (shared with the per-size scripts): each of `counts` must be
  >= 1 and every patch size must tile the RES-px image."""
  for name in counts:
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  bad = sorted({p for p in patches if RES % p})
  if bad:
    parser.error(f"patch size(s) {bad} do not tile {RES}px")


def main(argv=None):
  args = parse_args(argv)
  if args.cache_child:
    return cache_child(args)
  RESULTS["machine"] = machine()
  log("machine:", RESULTS["machine"])
  if "resize" in args.sections:
    section_resize(args)
  if "step" in args.sections:
    for variant in args.variants:
      section_step(args, variant)
  if "remat" in args.sections:
    for variant in args.variants:
      section_remat(args, variant)
  if "compile" in args.sections:
    section_compile(args)
  if "cache" in args.sections:
    section_cache(args)
  if "memory" in args.sections:
    section_memory(args)
  RESULTS["args"] = {k: v for k, v in vars(args).items() if not k.startswith("cache")}
  log("\n" + summary())
  if args.json:
    with open(args.json, "w") as f:
      json.dump(RESULTS, f, indent=1, default=str)


if __name__ == "__main__":
  host.reexec_with_hugepages()  # Before any step runs (flexi/host.py).
  main()
