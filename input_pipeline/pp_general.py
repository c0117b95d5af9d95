"""Ops on the example dict as a whole: labels and key bookkeeping (big_vision names)."""
import tensorflow as tf

from input_pipeline import pp_base
from input_pipeline.pp_base import in_key_out_key


def _missing(op, key, data):
  visible = sorted(k for k in data if not pp_base.is_internal(k))
  return ValueError(f"pp op '{op}': key {key!r} not in the example (keys: {visible})")


def get_onehot(depth, key="labels", key_result=None, multi=True, on=1.0, off=0.0):
  """One-hot (or multi-hot for a vector of labels, if `multi`) float32 labels."""
  def _onehot(data):
    if key not in data:
      raise _missing("onehot", key, data)
    labels = data[key]
    if labels.shape.rank and labels.shape.rank > 0 and multi:
      x = tf.scatter_nd(tf.cast(labels[:, None], tf.int64),
                        tf.ones(tf.shape(labels)[0]), (depth,))
      x = tf.clip_by_value(x, 0, 1) * (on - off) + off
    else:
      x = tf.one_hot(labels, depth, on_value=on, off_value=off)
    data[key_result or key] = x
    return data
  return _onehot


def get_keep(*keys):
  """Keeps only `keys` (and pipeline-internal "_" keys)."""
  def _keep(data):
    for k in keys:
      if k not in data:
        raise _missing("keep", k, data)
    return {k: v for k, v in data.items() if k in keys or pp_base.is_internal(k)}
  return _keep


def get_drop(*keys):
  """Removes `keys`."""
  def _drop(data):
    for k in keys:
      if k not in data:
        raise _missing("drop", k, data)
    return {k: v for k, v in data.items() if k not in keys}
  return _drop


def get_copy(inkey, outkey):
  """data[outkey] = data[inkey]; a copy made after random ops shares them."""
  def _copy(data):
    if inkey not in data:
      raise _missing("copy", inkey, data)
    data[outkey] = data[inkey]
    return data
  return _copy


def get_rename(**pairs):
  """rename(new="old", ...): renames keys."""
  def _rename(data):
    for new, old in pairs.items():
      if old not in data:
        raise _missing("rename", old, data)
      data[new] = data.pop(old)
    return data
  return _rename


def get_flatten(sep="/"):
  """Nested feature dicts -> flat keys: {"captions": {"text": t}} -> {"captions/text": t}.

  TFDS datasets such as coco_captions nest features; flat keys let every other op
  (which takes a single key) reach them.
  """
  def _flatten(data, prefix=""):
    out = {}
    for key, value in data.items():
      if isinstance(value, dict):
        out.update(_flatten(value, f"{prefix}{key}{sep}"))
      else:
        out[f"{prefix}{key}"] = value
    return out
  return _flatten


def get_first_n(n, inkey="texts", outkey="texts", mask_key=None):
  """The first `n` elements of a 1-D tensor (an image's captions), padded with empty
  values to exactly `n`, so that examples with different counts batch together.

  `mask_key` (default "<outkey>_mask") gets bool[n]: True for the real elements. The
  retrieval evaluator reads it to score every caption of an image (COCO's standard
  protocol, 5 per image) instead of one.
  """
  n = int(n)
  if n < 1:
    raise ValueError(f"pp op 'first_n': n must be >= 1, got {n}")
  mask_key = mask_key or f"{outkey}_mask"

  def _first_n(data):
    if inkey not in data:
      raise _missing("first_n", inkey, data)
    x = data[inkey]
    if x.shape.rank != 1:
      raise ValueError(f"pp op 'first_n': {inkey!r} must be 1-D (a list of values), "
                       f"got shape {x.shape}")
    x = x[:n]
    count = tf.shape(x)[0]
    data[outkey] = tf.ensure_shape(tf.concat([x, tf.zeros([n - count], x.dtype)], 0), [n])
    data[mask_key] = tf.range(n) < count
    return data
  return _first_n


@in_key_out_key(indefault="texts", outdefault="texts", random=True)
def get_choice(mode="random"):
  """Picks one element of a 1-D tensor (e.g. one caption of several).

  mode="random" (training) draws uniformly; mode="first" (evaluation) takes the
  first, so eval is deterministic.
  """
  if mode not in ("random", "first"):
    raise ValueError(f"mode must be 'random' or 'first', got {mode!r}")

  def _choice(x, seed):
    if mode == "first":
      return x[0]
    i = tf.random.stateless_uniform([], seed, maxval=tf.shape(x)[0], dtype=tf.int32)
    return x[i]
  return _choice
