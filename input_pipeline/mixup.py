"""Mixup inside the (jitted) train step, identical for every image copy.

FunMatch needs the teacher and the student to see exactly the same mixed
images, so ONE coefficient and ONE batch roll are applied to every listed image
key (e.g. "image" and "prof") and to the labels.
"""
import jax
import jax.numpy as jnp


def mixup(rng, batch, *, p=1.0, keys=("image",), label_key="labels", n=2, fold_in=None):
  """Returns a new batch: x <- sum_i w_i * roll(x, i) for each key in keys+labels.

  n=2 (big_vision): a ~ Beta(p, p), a = max(a, 1 - a), x*a + roll(x, 1)*(1 - a).
  n>2: weights ~ Dirichlet(p), sorted so the unrolled batch dominates.
  p=0 disables mixup. Other keys are untouched. `fold_in` (an int, as big_vision's
  config.mixup.fold_in) is folded into rng first.
  """
  if not p:
    return dict(batch)
  if fold_in is not None:
    rng = jax.random.fold_in(rng, fold_in)
  if n < 2:
    raise ValueError(f"mixup needs n >= 2 examples to mix, got n={n}")
  for k in (*keys, label_key):
    if k not in batch:
      raise ValueError(f"mixup: key {k!r} not in the batch (keys: {sorted(batch)})")
    if not jnp.issubdtype(batch[k].dtype, jnp.floating):  # Weights would round to 0.
      raise ValueError(f"mixup: key {k!r} is {batch[k].dtype}, mixup needs floats "
                       "(one-hot labels, value_range'd images)")
  if n == 2:
    a = jax.random.beta(rng, p, p)
    a = jnp.maximum(a, 1.0 - a)
    weights = jnp.stack([a, 1.0 - a])
  else:
    weights = -jnp.sort(-jax.random.dirichlet(rng, jnp.full((n,), p)))

  def mix(x):
    w = weights.astype(x.dtype)
    return sum(w[i] * jnp.roll(x, i, axis=0) for i in range(n))

  out = dict(batch)
  for k in (*keys, label_key):
    out[k] = mix(batch[k])
  return out
