r"""How close the train step can get to the matmul peak with the kernels it runs.

  python -m benchmarks.ceiling                      # Ti and S at patches 16 and 8
  python -m benchmarks.ceiling --variants Ti --patches 16 --reps 3

The FLOP/s targets of issue 8 compare a whole step with a large matmul. This script
times the step's gradient program in parts, in one process, interleaved (min of
--reps each):
  whole   our model as the trainers run it (`attention="auto"`);
  rest    the same with the attention core replaced by a FLOP-free stand-in
          (q + k + v, so every projection keeps its work and gradient): projections,
          MLP, LayerNorm, embedding, head and loss;
  core    the attention core alone at the model's shapes (fwd + bwd, incl. its
          layout changes; on one CPU device the fused kernel of flexi/native), times
          the depth.
FLOPs come from XLA's cost analysis: `whole` counted on the flax-attention program
(loops are counted once, so not on the blocked one), `rest` on its own program, and the
core as their difference. If the parts ran back to back at their measured rates, the
step would reach F(whole) / (t(rest) + t(core)) of the peak: the ceiling those kernels
set, before any overlap between them. The optimizer update (a separate program shared
by all sizes, ~5% of a Ti/16 step) is not included.
"""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import perf, reference
from flexi import attention, host, vit


def no_core(query, key, value, mask=None, dtype=None):
  """Stand-in for softmax(q k^T) v with no contraction: keeps q, k and v alive."""
  del mask, dtype
  return query + key + value


def _grad_fn(variant, attention_name):
  model = vit.Model(1000, variant=variant, pool_type="tok", attention=attention_name)
  return jax.jit(jax.grad(lambda params, images, labels, p: reference.xent_loss(
      model, params, images, labels, (p, p))), static_argnums=(3,))


def _core_fn(batch, tokens, heads, head_dim):
  """The model's attention ("auto") fwd+bwd on (batch, tokens, heads, head_dim)."""
  ks = jax.random.split(jax.random.PRNGKey(2), 4)
  q, k, v, w = (jax.random.normal(key, (batch, tokens, heads, head_dim)) for key in ks)
  grad = jax.jit(jax.grad(lambda q, k, v: (attention.auto_attention(q, k, v) * w).sum(),
                          (0, 1, 2)))
  return lambda: grad(q, k, v)


def measure(variant, p, batch, reps):
  params = perf.init_params(variant)
  images, labels = perf.synthetic_batch(batch)
  cfg = vit.decode_variant(variant)
  tokens = (perf.RES // p) ** 2 + 1  # + the class token.
  fns = {"whole": _grad_fn(variant, "auto"), "rest": _grad_fn(variant, no_core)}
  flops = {"whole": _grad_fn(variant, "flax").lower(params, images, labels, p)
           .cost_analysis()["flops"],
           "rest": fns["rest"].lower(params, images, labels, p).cost_analysis()["flops"]}
  flops["core"] = flops["whole"] - flops["rest"]
  calls = {name: (lambda f=f: f(params, images, labels, p)) for name, f in fns.items()}
  calls["core"] = _core_fn(batch, tokens, cfg["num_heads"], cfg["width"] // cfg["num_heads"])
  for call in calls.values():
    jax.block_until_ready(call())  # Compile and warm up.
  peaks, secs = [perf.matmul_peak(jnp.float32)], {name: [] for name in calls}
  for _ in range(reps):  # Interleaved: the machine's speed drifts.
    for name, call in calls.items():
      secs[name].append(perf.best_of(call, 1))
    peaks.append(perf.matmul_peak(jnp.float32))
  t = {name: min(v) for name, v in secs.items()}
  t["core"] *= cfg["depth"]
  peak = max(peaks)
  row = dict(variant=variant, patch=p, tokens=tokens, batch=batch, peak=peak, flops=flops,
             seconds=t,
             frac_whole=flops["whole"] / t["whole"] / peak,
             frac_rest=flops["rest"] / t["rest"] / peak,
             frac_core=flops["core"] / t["core"] / peak,
             core_share_of_flops=flops["core"] / flops["whole"],
             ceiling=flops["whole"] / (t["rest"] + t["core"]) / peak)
  perf.log(f"{variant}/{p}: whole {t['whole'] * 1e3:.0f} ms = {row['frac_whole']:.0%} of the "
           f"peak ({peak / 1e9:.0f} GFLOP/s); rest {t['rest'] * 1e3:.0f} ms at "
           f"{row['frac_rest']:.0%}; attention core {t['core'] * 1e3:.0f} ms at "
           f"{row['frac_core']:.0%} for {row['core_share_of_flops']:.0%} of the FLOPs; "
           f"ceiling (rest + core) {row['ceiling']:.0%}")
  return row


def parse_args(argv=None):
  return perf.parse_sizes_args(__doc__, argv)


def _table_row(r):
  return (f"| {r['variant']}/{r['patch']} | {r['frac_whole']:.0%} | {r['frac_rest']:.0%} | "
          f"{r['frac_core']:.0%} ({r['core_share_of_flops']:.0%}) | {r['ceiling']:.0%} |")


def main(argv=None):
  header = ("| step | whole: FLOP/s / peak | rest (no attention core) | attention core "
            "(share of FLOPs) | ceiling: rest + core |\n|---|---|---|---|---|")
  return perf.run_per_size(parse_args(argv), measure, header, _table_row)


if __name__ == "__main__":
  host.reexec_with_hugepages()  # As the trainers and benchmarks.perf run (flexi/host.py).
  main()
