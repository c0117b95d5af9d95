"""Optimizer and learning-rate schedule from config (optax).

update = -mult(t) * (lr * base_update + wd * w_mult * param), where mult(t) is the
schedule multiplier (warmup then decay), i.e. weight decay is decoupled from lr but
follows the schedule (big_vision / AdamW). Frozen params get zero updates and no
optimizer state.
"""
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flexi import tree_utils

_DECAYS = ("cosine", "linear", "rsqrt", "constant")


def make_schedule(sched_cfg, *, total_steps: int, warmup_steps: int):
  """Multiplier in [0, 1]: linear warmup, then the configured decay (big_vision's).

  One difference: the warmup is (count + 1) / warmup, so the first update already
  moves the weights; big_vision's count / warmup makes update 0 a no-op. Ours reaches
  the peak one update earlier (count = warmup - 1); from count = warmup on they agree.
  """
  decay = sched_cfg.get("decay_type", "cosine")
  if decay not in _DECAYS:
    raise ValueError(f"unknown schedule.decay_type {decay!r}; known: {_DECAYS}")
  linear_end = float(sched_cfg.get("linear_end", 0.0))
  timescale = float(sched_cfg.get("timescale", 10_000))
  warmup = max(int(warmup_steps), 0)
  span = max(total_steps - warmup, 1)

  def fn(count):
    count = jnp.asarray(count, jnp.float32)
    frac = jnp.clip((count - warmup) / span, 0.0, 1.0)
    if decay == "cosine":
      mult = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    elif decay == "linear":
      mult = 1.0 + (linear_end - 1.0) * frac
    elif decay == "rsqrt":
      # 1 during warmup, then 1 / sqrt(1 + (count - warmup) / timescale) (big_vision).
      mult = jax.lax.rsqrt(1.0 + jnp.maximum(count - warmup, 0.0) / timescale)
    else:
      mult = jnp.ones_like(count)
    if warmup:
      mult = mult * jnp.minimum(1.0, (count + 1) / warmup)
    return mult
  return fn


def _base_transform(name: str, kw: dict):
  kw = dict(kw)
  if name in ("scale_by_adam", "adam", "adamw"):
    return optax.scale_by_adam(**kw), None
  if name == "sgd":
    return optax.identity(), None
  if name == "momentum":
    return optax.trace(decay=kw.pop("momentum", 0.9), nesterov=kw.pop("nesterov", False)), None
  if name == "lamb":
    return optax.scale_by_adam(**kw), optax.scale_by_trust_ratio()
  if name == "lars":
    return optax.identity(), optax.chain(optax.scale_by_trust_ratio(),
                                         optax.trace(decay=kw.pop("momentum", 0.9)))
  raise ValueError(f"unknown optax_name {name!r}; known: scale_by_adam, adam, adamw, "
                   "sgd, momentum, lamb, lars")


def _wd_transforms(wd: float, wd_mults: Sequence):
  """One add_decayed_weights per multiplier; each leaf uses its FIRST matching regex."""
  if not wd:
    return []
  rules = [(re.compile(p), float(m)) for p, m in wd_mults]

  def mult_of(name):
    for c, m in rules:
      if c.fullmatch(name):
        return m
    return 0.0

  out = []
  for mult in sorted({m for _, m in rules if m}):
    mask = lambda tree, mult=mult: jax.tree.map(
        lambda n: mult_of(n) == mult, tree_utils.tree_paths(tree))
    out.append(optax.add_decayed_weights(wd * mult, mask=mask))
  return out


def make_optimizer(config, params, *, total_steps: int, warmup_steps: int,
                   frozen: Sequence[str] = ()):
  """Returns (optax transform, lr_fn(step) -> current learning rate)."""
  mult_fn = make_schedule(config.schedule, total_steps=total_steps, warmup_steps=warmup_steps)
  lr = float(config.lr)
  base, post_wd = _base_transform(config.optax_name, dict(config.optax))
  wd_mults = config.wd_mults if config.wd_mults is not None else [(".*/kernel$", 1.0)]
  chain = []
  if config.grad_clip_norm:
    chain.append(clip_by_global_norm(float(config.grad_clip_norm)))
  chain.append(base)
  if post_wd is None:  # Plain: lr scales the update only, wd is added after.
    chain += [optax.scale(lr), *_wd_transforms(float(config.wd), wd_mults)]
  else:  # LAMB/LARS: wd goes into the trust ratio.
    chain += [*_wd_transforms(float(config.wd), wd_mults), post_wd, optax.scale(lr)]
  chain.append(optax.scale_by_schedule(lambda c: -mult_fn(c)))
  tx = optax.chain(*chain)
  mask = frozen_mask(config, params, frozen)
  if mask is not None:
    labels = jax.tree.map(lambda m: "frozen" if m else "train", mask)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, lambda step: lr * mult_fn(step)


def frozen_mask(config, params, frozen: Sequence[str] = ()):
  """Bool tree, True for params matched by config.frozen or the trainer's `frozen`
  regexes (not trained: no gradient, no optimizer state); None if nothing is frozen."""
  patterns = list(config.frozen) + list(frozen)
  if not patterns:
    return None
  return tree_utils.regex_mask(params, patterns, what="config.frozen pattern")


def global_norm(tree, small: int = 1 << 14):
  """optax.tree.norm (the L2 norm of all leaves), with the squares of the small leaves
  (<= `small` elements: biases, LayerNorm params) summed from one concatenated vector.

  XLA:CPU gives each leaf its own square and reduction kernels: a ViT-Ti's 126 small
  leaves made ~370 of the update program's 845 kernels, paid in compile and load time
  at every (re)start (docs/benchmarks.md). Same value to float rounding.
  """
  leaves = jax.tree.leaves(tree)
  small_leaves = [jnp.ravel(x) for x in leaves if x.size <= small]
  grouped = [x for x in leaves if x.size > small]
  if small_leaves:
    grouped.append(jnp.concatenate(small_leaves))
  return optax.tree.norm(grouped)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm (same formula, same empty state) on `global_norm`, so
  that XLA computes the norm once for the clip and the train/grad_norm metric."""
  def update_fn(updates, state, params=None):
    del params
    norm = global_norm(updates)
    clip = lambda t: jax.lax.select(  # noqa: E731
        norm < max_norm, t, (t / norm.astype(t.dtype)) * max_norm)
    return jax.tree.map(clip, updates), state
  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
