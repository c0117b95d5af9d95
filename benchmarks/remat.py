r"""Step time and activation memory of the scan / remat / remat-policy settings.

  python -m benchmarks.remat                         # Ti and S at patches 16 and 8
  python -m benchmarks.remat --variants Ti --patches 16 --reps 9

For each size, the gradient program of our model (`attention="auto"`, batch 8, 240px)
in each setting, in one process, timed interleaved (min and median of --reps):
  unrolled            the default: blocks unrolled, no remat;
  scan                nn.scan over blocks, no remat;
  scan+remat          nn.scan, each block recomputed in the backward pass
                      (remat_policy="nothing_saveable", big_vision's);
  scan+remat(dots+attn)  nn.scan, remat keeping the matmul outputs and the attention
                      core's residuals (remat_policy="dots_and_attention_saveable").
Memory is XLA's temporaries for the program (`memory_analysis()`); on XLA:CPU remat
only lowers it inside nn.scan (docs/benchmarks.md). Gradients of all settings agree
(tests/test_perf_numerics.py). Whole train steps of the same settings in training order
(a random patch size per step, interleaved): `python -m benchmarks.perf --sections remat`.
"""

import jax
import numpy as np

from benchmarks import perf, reference
from flexi import host, vit


def _program(variant, p, params, images, labels, **kw):
  """The compiled gradient program of our model in one layout, and its params."""
  model = vit.Model(1000, variant=variant, pool_type="tok", **perf.OURS, **kw)
  params = vit.layers_to_scan(params) if kw.get("scan") else params
  grad = jax.jit(jax.grad(lambda params: reference.xent_loss(
      model, params, images, labels, (p, p))))
  return grad.lower(params).compile(), params


def measure(variant, p, batch, reps):
  images, labels = perf.synthetic_batch(batch)
  params = perf.init_params(variant)  # The same weights in every layout.
  programs = {name: _program(variant, p, params, images, labels, **kw)
              for name, kw in perf.REMAT_SETTINGS.items()}
  calls = {name: (lambda c=c, params=params: c(params)) for name, (c, params) in programs.items()}
  for call in calls.values():
    jax.block_until_ready(call())  # Warm up.
  secs = {name: [] for name in calls}
  for _ in range(reps):  # Interleaved: the machine's speed drifts.
    for name, call in calls.items():
      secs[name].append(perf.best_of(call, 1))
  settings = {}
  for name, (compiled, _) in programs.items():
    temp = compiled.memory_analysis().temp_size_in_bytes
    settings[name] = dict(temp_bytes=temp, min_s=min(secs[name]),
                          median_s=float(np.median(secs[name])))
    perf.log(f"{variant}/{p} {name}: {settings[name]['min_s'] * 1e3:.0f} ms (median "
             f"{settings[name]['median_s'] * 1e3:.0f}), temporaries {temp / 2 ** 20:.0f} MiB")
  return dict(variant=variant, patch=p, batch=batch, settings=settings)


def parse_args(argv=None):
  return perf.parse_sizes_args(__doc__, argv)


def _table_row(r):
  base = r["settings"]["unrolled"]["min_s"]
  cells = [f"{s['min_s'] / base:.2f}x, {s['temp_bytes'] / 2 ** 20:.0f} MiB"
           for s in r["settings"].values()]
  return f"| {r['variant']}/{r['patch']} | " + " | ".join(cells) + " |"


def main(argv=None):
  names = list(perf.REMAT_SETTINGS)
  header = ("| step (time relative to unrolled, min of --reps; XLA's temporaries) | "
            + " | ".join(names) + " |\n|---|" + "---|" * len(names))
  return perf.run_per_size(parse_args(argv), measure, header, _table_row)


if __name__ == "__main__":
  host.reexec_with_hugepages()  # As the trainers and benchmarks.perf run (flexi/host.py).
  main()
