"""Mixup: one coefficient and one roll for every image copy and the labels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from input_pipeline import mixup


def _batch():
  rng = np.random.default_rng(0)
  return {"image": jnp.asarray(rng.normal(size=(6, 4, 4, 3)), jnp.float32),
          "prof": jnp.asarray(rng.normal(size=(6, 3, 3, 3)), jnp.float32),
          "labels": jnp.asarray(np.eye(5)[rng.integers(0, 5, 6)], jnp.float32),
          "other": jnp.arange(6)}


def _coef(mixed, x):
  """Solves mixed = a*x + (1-a)*roll(x, 1) for a (least squares)."""
  d = (x - jnp.roll(x, 1, axis=0)).ravel()
  return float(jnp.dot((mixed - jnp.roll(x, 1, axis=0)).ravel(), d) / jnp.dot(d, d))


def test_same_coefficient_and_roll_for_all_keys_inside_jit():
  b = _batch()
  f = jax.jit(lambda r, b: mixup(r, b, p=0.4, keys=("image", "prof")))
  out = f(jax.random.key(3), b)
  a = _coef(out["image"], b["image"])
  assert 0.5 <= a <= 1.0
  for k in ("image", "prof", "labels"):
    np.testing.assert_allclose(out[k], a * b[k] + (1 - a) * jnp.roll(b[k], 1, axis=0),
                               atol=1e-5)
  np.testing.assert_array_equal(out["other"], b["other"])
  np.testing.assert_allclose(out["labels"].sum(-1), 1.0, atol=1e-6)


def test_beta_like_big_vision():
  b = _batch()
  rng = jax.random.key(7)
  a = jax.random.beta(rng, 0.4, 0.4)
  a = max(float(a), 1 - float(a))
  out = mixup(rng, b, p=0.4)
  np.testing.assert_allclose(out["image"], a * b["image"] + (1 - a) * jnp.roll(b["image"], 1, 0),
                             atol=1e-5)


def test_p0_is_identity_and_n3_mixes_three():
  b = _batch()
  out = mixup(jax.random.key(0), b, p=0.0)
  np.testing.assert_array_equal(out["image"], b["image"])
  out = mixup(jax.random.key(0), b, p=1.0, n=3)
  np.testing.assert_allclose(out["labels"].sum(-1), 1.0, atol=1e-6)


def test_missing_key_is_named():
  with pytest.raises(ValueError, match="'prof'"):
    mixup(jax.random.key(0), {"image": jnp.ones((2, 1)), "labels": jnp.ones((2, 1))},
          keys=("image", "prof"))


def test_integer_inputs_are_named_not_zeroed():
  batch = dict(_batch(), labels=jnp.arange(6))  # Class ids instead of one-hot rows.
  with pytest.raises(ValueError, match="'labels' is int32, mixup needs floats"):
    mixup(jax.random.key(0), batch, keys=("image",))
  uint8 = dict(_batch(), image=jnp.zeros((6, 4, 4, 3), jnp.uint8))
  with pytest.raises(ValueError, match="'image' is uint8"):
    mixup(jax.random.key(0), uint8, keys=("image",))


def test_fold_in_changes_the_draw_like_folding_the_rng():
  rng = jax.random.key(3)
  folded = mixup(rng, _batch(), p=1.0, fold_in=7)
  by_hand = mixup(jax.random.fold_in(rng, 7), _batch(), p=1.0)
  np.testing.assert_array_equal(folded["image"], by_hand["image"])
  np.testing.assert_array_equal(  # numpy ints as well (e.g. from a config or an array).
      mixup(rng, _batch(), p=1.0, fold_in=np.int64(7))["image"], by_hand["image"])
  assert not np.array_equal(folded["image"], mixup(rng, _batch(), p=1.0)["image"])


def _per_example_coef(mixed, x):
  """a_j from mixed[j] = a_j x[j] + (1 - a_j) x[j-1], per example (least squares)."""
  prev = jnp.roll(x, 1, axis=0)
  d, m = (x - prev).reshape(len(x), -1), (mixed - prev).reshape(len(x), -1)
  return np.asarray(jnp.sum(m * d, 1) / jnp.sum(d * d, 1))


@pytest.mark.parametrize("fold_in,groups", [("sample", 16), ("device", 8), ("host", 1)])
def test_fold_in_modes_like_big_vision(fold_in, groups):
  """big_vision's fold_in: one coefficient per example, per device (8 simulated) or per
  process (1 here), the same for the images and the labels of an example."""
  rng = np.random.default_rng(1)
  batch = {"image": jnp.asarray(rng.normal(size=(16, 2, 2, 3)), jnp.float32),
           "labels": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)}  # Any floats.
  out = jax.jit(lambda b: mixup(jax.random.key(0), b, p=1.0, fold_in=fold_in))(batch)
  a = _per_example_coef(out["image"], batch["image"])
  np.testing.assert_allclose(a, _per_example_coef(out["labels"], batch["labels"]), atol=1e-5)
  per_group = a.reshape(groups, -1)
  np.testing.assert_allclose(per_group, per_group[:, :1].repeat(16 // groups, 1), atol=1e-5)
  assert len(np.unique(per_group[:, 0].round(5))) == groups and np.all(a >= 0.5 - 1e-5)
  with pytest.raises(ValueError, match=r"mixup.fold_in must be one of .* got 'batch'"):
    mixup(jax.random.key(0), batch, p=1.0, fold_in="batch")
  with pytest.raises(ValueError, match=r"fold_in='device': batch 12 does not split into 8"):
    mixup(jax.random.key(0), jax.tree.map(lambda x: x[:12], batch), p=1.0, fold_in="device")
