"""Mixup inside the (jitted) train step, identical for every image copy.

FunMatch needs the teacher and the student to see exactly the same mixed
images, so ONE coefficient and ONE batch roll are applied to every listed image
key (e.g. "image" and "prof") and to the labels.
"""
import numbers

import jax
import jax.numpy as jnp


FOLD_IN_MODES = (None, "host", "device", "sample")


def _is_int(x):
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _groups(fold_in, batch_size):
  """How many independent mixing coefficients big_vision's `fold_in` asks for: one
  (None, or an int folded into the rng), one per process, per device, or per example.
  The global batch is laid out process-major and device-major (flexi.sharding checks
  it), so group g is the g-th contiguous block of examples."""
  if fold_in is None or _is_int(fold_in):
    return 1
  counts = {"host": jax.process_count(), "device": jax.device_count(), "sample": batch_size}
  if fold_in not in counts:
    raise ValueError(f"mixup.fold_in must be one of {FOLD_IN_MODES} (big_vision) or an int, "
                     f"got {fold_in!r}")
  if batch_size % counts[fold_in]:
    raise ValueError(f"mixup.fold_in={fold_in!r}: batch {batch_size} does not split into "
                     f"{counts[fold_in]} equal groups")
  return counts[fold_in]


def mixup(rng, batch, *, p=1.0, keys=("image",), label_key="labels", n=2, fold_in=None):
  """Returns a new batch: x <- sum_i w_i * roll(x, i) for each key in keys+labels.

  n=2 (big_vision): a ~ Beta(p, p), a = max(a, 1 - a), x*a + roll(x, 1)*(1 - a).
  n>2: weights ~ Dirichlet(p), sorted so the unrolled batch dominates.
  p=0 disables mixup. Other keys are untouched. `fold_in` is big_vision's
  config.mixup.fold_in: None (one coefficient for the batch), "host", "device" or
  "sample" (one per process, device or example); an int is folded into rng.
  """
  if not p:
    return dict(batch)
  if n < 2:
    raise ValueError(f"mixup needs n >= 2 examples to mix, got n={n}")
  for k in (*keys, label_key):
    if k not in batch:
      raise ValueError(f"mixup: key {k!r} not in the batch (keys: {sorted(batch)})")
    if not jnp.issubdtype(batch[k].dtype, jnp.floating):  # Weights would round to 0.
      raise ValueError(f"mixup: key {k!r} is {batch[k].dtype}, mixup needs floats "
                       "(one-hot labels, value_range'd images)")
  size = batch[label_key].shape[0]
  groups = _groups(fold_in, size)
  if _is_int(fold_in):
    rng = jax.random.fold_in(rng, fold_in)
  shape = () if groups == 1 else (groups,)
  if n == 2:
    a = jax.random.beta(rng, p, p, shape)
    a = jnp.maximum(a, 1.0 - a)
    weights = jnp.stack([a, 1.0 - a], axis=-1)          # [(groups,) n]
  else:
    weights = -jnp.sort(-jax.random.dirichlet(rng, jnp.full((n,), p), shape), axis=-1)
  if groups > 1:  # One row of weights per example: its group's.
    weights = jnp.repeat(weights, size // groups, axis=0)

  def mix(x):
    w = weights.astype(x.dtype)
    if groups > 1:
      w = jnp.reshape(w, (size, n) + (1,) * (x.ndim - 1))
      return sum(w[:, i] * jnp.roll(x, i, axis=0) for i in range(n))
    return sum(w[i] * jnp.roll(x, i, axis=0) for i in range(n))

  out = dict(batch)
  for k in (*keys, label_key):
    out[k] = mix(batch[k])
  return out
