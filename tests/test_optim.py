"""Optimizer, schedules, weight-decay masks, frozen params, losses."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flexi import config as config_lib
from flexi import losses, optim


def _params():
  return {"embedding": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
          "head": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}}


def _cfg(**kw):
  return config_lib.build(dict(kw))


def test_schedules():
  sched = lambda d, **kw: optim.make_schedule(dict(decay_type=d, **kw), total_steps=110,
                                              warmup_steps=10)
  cos = sched("cosine")
  np.testing.assert_allclose([cos(0), cos(4), cos(9), cos(10), cos(60), cos(110)],
                             [0.1, 0.5, 1.0, 1.0, 0.5, 0.0], atol=1e-6)
  lin = sched("linear", linear_end=0.2)
  np.testing.assert_allclose([lin(10), lin(60), lin(110)], [1.0, 0.6, 0.2], atol=1e-6)
  rs = sched("rsqrt", timescale=10)
  np.testing.assert_allclose([rs(10), rs(40)], [1.0, 0.5], atol=1e-6)
  # During warmup only the warmup ramp applies (big_vision), never above the peak.
  np.testing.assert_allclose([rs(0), rs(4), rs(9)], [0.1, 0.5, 1.0], atol=1e-6)
  long_warmup = optim.make_schedule(dict(decay_type="rsqrt", timescale=10), total_steps=110,
                                    warmup_steps=40)
  np.testing.assert_allclose([long_warmup(19), long_warmup(39), long_warmup(70)],
                             [0.5, 1.0, 0.5], atol=1e-6)
  np.testing.assert_allclose(sched("constant")(100), 1.0)
  with pytest.raises(ValueError, match="decay_type"):
    sched("cosin")


def test_decoupled_weight_decay_on_kernels_only():
  params = _params()
  tx, lr_fn = optim.make_optimizer(_cfg(optax_name="sgd", lr=0.1, wd=0.5), params,
                                   total_steps=10, warmup_steps=0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  # Zero gradient: kernels shrink by wd * mult(0) = 0.5, biases do not move.
  np.testing.assert_allclose(updates["embedding"]["kernel"], -0.5)
  np.testing.assert_allclose(updates["head"]["bias"], 0.0)
  np.testing.assert_allclose(lr_fn(0), 0.1)


def test_wd_mults_first_match_wins():
  params = _params()
  cfg = _cfg(optax_name="sgd", lr=0.1, wd=1.0,
             wd_mults=[("head/kernel", 0.1), (".*/kernel", 1.0)])
  tx, _ = optim.make_optimizer(cfg, params, total_steps=10, warmup_steps=0)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.1, rtol=1e-6)
  np.testing.assert_allclose(updates["embedding"]["kernel"], -1.0)


def test_frozen_and_clipping():
  params = _params()
  cfg = _cfg(lr=1.0, wd=0.0, frozen=["embedding/.*"], grad_clip_norm=1.0, optax_name="sgd")
  tx, _ = optim.make_optimizer(cfg, params, total_steps=10, warmup_steps=0)
  grads = jax.tree.map(lambda p: 10 * jnp.ones_like(p), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert not np.any(updates["embedding"]["kernel"])
  assert optax.tree.norm(updates["head"]) <= 1.0 + 1e-6  # Clipped over ALL grads.
  with pytest.raises(ValueError, match="matches no parameter"):
    optim.make_optimizer(_cfg(frozen=["nope/.*"]), params, total_steps=1, warmup_steps=0)


def test_global_norm_and_clip_equal_optax_with_small_leaves_grouped():
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 8))
  tree = {"big": jax.random.normal(next(keys), (130, 140)),
          "small": [jax.random.normal(next(keys), (7,)), jax.random.normal(next(keys), (3, 5)),
                    jnp.zeros((0,))],
          "bf16": jax.random.normal(next(keys), (40,)).astype(jnp.bfloat16)}
  want = float(optax.tree.norm(tree))
  for small in (0, 16, 1 << 14, 1 << 40):  # None grouped, some, all but the big one, all.
    np.testing.assert_allclose(float(jax.jit(lambda t, s=small: optim.global_norm(t, s))(tree)),
                               want, rtol=2e-6)
  assert float(optim.global_norm({})) == 0.0
  for max_norm in (0.5 * want, 2.0 * want):  # Clipped, then left alone.
    ours, theirs = optim.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    assert ours.init(tree) == theirs.init(tree)  # Empty: checkpoints keep their structure.
    got, _ = jax.jit(ours.update)(tree, ours.init(tree))
    ref, _ = theirs.update(tree, theirs.init(tree))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-7), got, ref)
    assert float(optax.tree.norm(got)) == pytest.approx(min(max_norm, want), rel=1e-5)


@pytest.mark.parametrize("name,kw", [("scale_by_adam", {"mu_dtype": "bfloat16"}),
                                     ("momentum", {"momentum": 0.9}), ("lamb", {}),
                                     ("lars", {}), ("sgd", {})])
def test_all_optimizers_step(name, kw):
  params = _params()
  tx, _ = optim.make_optimizer(_cfg(optax_name=name, optax=kw), params, total_steps=10,
                               warmup_steps=2)
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  if name == "scale_by_adam":
    assert state[0].mu["head"]["kernel"].dtype == jnp.bfloat16


def test_losses():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  onehot = jnp.array([[1.0, 0.0, 0.0]])
  np.testing.assert_allclose(losses.softmax_xent(logits, onehot),
                             -jax.nn.log_softmax(logits)[0, 0], rtol=1e-6)
  expected = -(np.log(1 / (1 + np.exp(-2.0))) + np.log(1 - 1 / (1 + np.exp(0.0)))
               + np.log(1 - 1 / (1 + np.exp(1.0))))
  np.testing.assert_allclose(losses.sigmoid_xent(logits, onehot), expected, rtol=1e-5)
  with pytest.raises(ValueError, match="softmax_xent"):
    losses.get("softmax")
