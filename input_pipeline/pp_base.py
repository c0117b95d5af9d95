"""Shared plumbing of the preprocessing ops: key handling and per-example seeds.

An op factory (e.g. `get_resize(size)`) returns a function on ONE tensor; the
`in_key_out_key` decorator turns it into a function on the example dict with
big_vision's `key` / `inkey` / `outkey` arguments (`key` sets both).

Randomness: random ops use stateless TF ops. When the example carries a `_rng`
seed (the pipeline adds one per example, derived from the config seed), each
random op splits it, so a run is reproducible; otherwise a fresh seed is drawn.
Keys starting with "_" are pipeline-internal: `keep`/`drop` never remove them and
the pipeline strips them before batching.
"""
import functools

import tensorflow as tf

RNG_KEY = "_rng"
ID_KEY = "_id"
DECODE_OK_KEY = "_decode_ok"


def is_internal(key):
  return key.startswith("_")


def maybe_repeat(x, n):
  """`224` -> (224, 224); a pair is returned as a tuple."""
  if isinstance(x, (list, tuple)):
    if len(x) != n:
      raise ValueError(f"expected {n} values, got {x!r}")
    return tuple(x)
  return (x,) * n


def next_seed(data):
  """A fresh [2] int32 stateless seed; advances `data[_rng]` when present."""
  if RNG_KEY in data:
    seeds = tf.random.experimental.stateless_split(data[RNG_KEY], num=2)
    data[RNG_KEY] = seeds[0]
    return seeds[1]
  return tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)


def in_key_out_key(indefault="image", outdefault="image", random=False, with_data=False):
  """Decorator giving an op factory big_vision's key/inkey/outkey arguments.

  The decorated factory's tensor function is called as `fn(x)`, plus `seed=` for
  random ops and `data=` for ops that need other keys (e.g. the record id).
  """
  def decorator(factory):
    @functools.wraps(factory)
    def get_op(*args, key=None, inkey=indefault, outkey=outdefault, **kw):
      fn = factory(*args, **kw)

      def op(data):
        extra = {}
        if random:
          extra["seed"] = next_seed(data)
        if with_data:
          extra["data"] = data
        src = key or inkey
        if src not in data:
          raise KeyError(src)
        data[key or outkey] = fn(data[src], **extra)
        return data
      return op
    return get_op
  return decorator
