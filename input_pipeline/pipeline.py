"""Training and evaluation input: tf.data pipelines and sharded global batches.

Train: host shard -> (cache) -> repeat -> shuffle -> pp -> batch -> prefetch, a
deterministic function of `seed` (each example gets its own stateless `_rng`).
Eval: one pass; the last batch is padded and `_mask` marks real examples, and
every process yields the same number of batches. `global_batches` turns
process-local numpy batches into global `jax.Array`s sharded over a mesh.
"""
import collections
import difflib
import logging
import math
import re

import jax
import numpy as np
import tensorflow as tf

from input_pipeline import datasets, preprocess
from input_pipeline.pp_base import DECODE_OK_KEY, ID_KEY, RNG_KEY, is_internal

TRAIN_DEFAULTS = dict(
    data=None,                 # dict(name=..., split="train", data_dir=None).
    pp=None,                   # Preprocessing op string.
    batch_size=None,           # GLOBAL batch size (split evenly across processes).
    shuffle_buffer_size=50_000,
    cache_raw=False,           # Cache the raw (encoded) host shard in memory.
    skip_decode_errors=False,  # Drop and count undecodable images instead of failing.
    seed=0,                    # Shuffle order and augmentation randomness.
    prefetch=2,                # Batches prefetched by tf.data.
)
_IGNORED = ("num_examples",)  # Handled by callers (epoch length override).

# Records dropped by `skip_decode_errors`, per "dataset:split"; read it for logs.
DECODE_ERRORS = collections.Counter()


def decode_error_counts():
  """{"name:split": number of undecodable records skipped so far in this process}."""
  return dict(DECODE_ERRORS)


def _train_config(input_cfg):
  cfg = dict(input_cfg.to_dict() if hasattr(input_cfg, "to_dict") else input_cfg)
  for k in cfg:
    if k not in TRAIN_DEFAULTS and k not in _IGNORED:
      close = difflib.get_close_matches(k, TRAIN_DEFAULTS, n=1)
      raise ValueError(f"Unknown input config key {k!r}"
                       + (f"; did you mean {close[0]!r}?" if close else "")
                       + f" (known: {sorted(TRAIN_DEFAULTS)})")
  cfg = {**TRAIN_DEFAULTS, **{k: v for k, v in cfg.items() if k not in _IGNORED}}
  for k in ("data", "pp", "batch_size"):
    if cfg[k] is None:
      raise ValueError(f"input config needs {k!r}")
  return cfg


def _processes(process_index, process_count):
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def _local_batch(batch_size, process_count):
  if batch_size % process_count:
    raise ValueError(f"Global batch size {batch_size} is not divisible by the number "
                     f"of processes {process_count}")
  return batch_size // process_count


def _last_line(e):
  """The op's own message from tf.data's multi-line "in user code: ..." wrapper."""
  lines = [line.strip() for line in str(e).strip().strip("'\"").splitlines() if line.strip()]
  return re.sub(r"^\w+(Error|Exception): ", "", lines[-1]) if lines else str(e)


def _preprocess(ds, pp_string, *, seed, process_index, skip, tag, first_index=0):
  """Adds per-example seeds, runs pp, drops/counts bad records, strips "_" keys."""
  pp_fn = preprocess.get_preprocess_fn(pp_string)
  base = tf.constant(seed * 1_000_003 + process_index, tf.int64)

  def run(i, ex):
    ex = dict(ex, **{RNG_KEY: tf.stack([base, i])})
    if skip:
      ex[DECODE_OK_KEY] = tf.constant(True)
    return pp_fn(ex)

  try:
    ds = ds.enumerate(start=first_index).map(run, num_parallel_calls=tf.data.AUTOTUNE)
  except (ValueError, KeyError, TypeError) as e:  # Raised by an op while tf.data traces:
    raise type(e)(f"{tag}: {_last_line(e)}") from None  # our line, not TF's trace.
  if skip:
    def count(record):
      DECODE_ERRORS[tag] += 1
      logging.warning("Skipped undecodable image in record %s (%s so far in %s)",
                      record.numpy().decode(), DECODE_ERRORS[tag], tag)
      return False

    def keep(ex):  # The Python side effect runs only for bad records.
      return tf.cond(ex[DECODE_OK_KEY], lambda: True,
                     lambda: tf.py_function(count, [ex.get(ID_KEY, "?")], tf.bool))
    ds = ds.filter(keep)
  return ds.map(lambda ex: {k: v for k, v in ex.items() if not is_internal(k)})


def build_train_dataset(input_cfg, *, process_index=None, process_count=None,
                        start_batch=0):
  """(endless process-local dataset of batches of batch_size/process_count,
  number of examples in the (whole) training split).

  `start_batch` resumes the stream: the same batches as an uninterrupted run from
  that point on, with the skipped records dropped BEFORE decoding and augmentation
  (their per-example seeds are indices in the shuffled stream), so resuming a long
  run costs a read of the raw records, not a re-run of the preprocessing. (With
  `skip_decode_errors`, dropped records shift later batches.)
  """
  cfg = _train_config(input_cfg)
  pi, pc = _processes(process_index, process_count)
  local_bs = _local_batch(cfg["batch_size"], pc)
  data = dict(cfg["data"])
  split = data.get("split", "train")
  source = datasets.get_source(data)
  ds = source.read(split, process_index=pi, process_count=pc, shuffle_files=True,
                   seed=cfg["seed"])
  if cfg["cache_raw"]:
    ds = ds.cache()
  ds = ds.repeat().shuffle(cfg["shuffle_buffer_size"], seed=cfg["seed"])
  start = start_batch * local_bs
  tag = f"{data['name']}:{split}"
  ds = _preprocess(ds.skip(start), cfg["pp"], seed=cfg["seed"], process_index=pi,
                   skip=cfg["skip_decode_errors"], tag=tag, first_index=start)
  ds = ds.batch(local_bs, drop_remainder=True).prefetch(cfg["prefetch"])
  ds.flexi_source = tag  # Named in errors by numpy_batches.
  return ds, source.num_examples(split)


def _zeros_like_spec(spec, key):
  if not spec.shape.is_fully_defined():
    raise ValueError(f"Eval pp must give fixed shapes to pad the last batch; {key!r} has "
                     f"shape {spec.shape} (add a resize/crop; first_n(k) for lists of captions)")
  return tf.zeros(spec.shape, spec.dtype)


def build_eval_dataset(data_cfg, pp, batch_size, *, process_index=None, process_count=None,
                       skip_decode_errors=False, prefetch=2):
  """(one pass of process-local batches with a bool `_mask`, examples in the split).

  The final batch is zero-padded with `_mask` False, so every example is seen
  exactly once; all processes yield ceil(largest shard / local batch) batches.
  """
  pi, pc = _processes(process_index, process_count)
  local_bs = _local_batch(batch_size, pc)
  data = dict(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else data_cfg)
  split = data.get("split", "test")
  source = datasets.get_source(data)
  sizes = source.shard_sizes(split, pc)
  num_batches = math.ceil(max(sizes) / local_bs)
  ds = source.read(split, process_index=pi, process_count=pc)
  tag = f"{data['name']}:{split}"
  ds = _preprocess(ds, pp, seed=0, process_index=pi, skip=skip_decode_errors, tag=tag)
  ds = ds.map(lambda ex: dict(ex, _mask=tf.constant(True)))
  pad = {k: _zeros_like_spec(s, k) for k, s in ds.element_spec.items()}
  pad["_mask"] = tf.constant(False)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
  ds = ds.take(num_batches * local_bs).batch(local_bs).prefetch(prefetch)
  ds.flexi_source = tag  # Named in errors by numpy_batches.
  return ds, sum(sizes)


_DECODER_FAILURE = re.compile(r"(jpeg::Uncompress failed[^\[\n]*|Invalid PNG data[^\[\n]*|"
                              r"Error in decoding[^\[\n]*)")


def _named_error(e, source=None):
  """A one-line ValueError for a record that failed to decode, or None.

  Our in-graph check names the record (bad container: not an image, truncated). A
  file whose container is fine but whose inside is corrupt fails in TF's decoder,
  which cannot name the record; the error then says what failed.
  """
  msg = e.message if hasattr(e, "message") else str(e)
  m = re.search(r"Undecodable or truncated image in record['\]]?\s*(?:\[|b')?([^\]'\n]+)", msg)
  if m:
    return ValueError(f"Undecodable or truncated image in record {m.group(1).strip()} "
                      "(set skip_decode_errors=True to skip and count such records)")
  m = _DECODER_FAILURE.search(msg)
  if m:
    return ValueError(f"Corrupt image data in {source or 'the input'} (TF's decoder: "
                      f"{m.group(1).strip()}): a file with a valid image header and end "
                      "marker is damaged inside; TF's decoder cannot name it or skip it "
                      "in-graph, so remove or re-encode it")
  return None


def numpy_batches(dataset):
  """`dataset.as_numpy_iterator()`, with a record that fails to decode raised as one
  line naming it (`_named_error`) instead of TF's multi-line op error."""
  source = getattr(dataset, "flexi_source", None)
  it = dataset.as_numpy_iterator()
  while True:
    try:
      batch = next(it)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      named = _named_error(e, source)
      if named is None:
        raise
      raise named from None
    yield batch


def global_batches(local_batches, mesh, batch_axes=("data",), prefetch=2):
  """Yields dicts of global jax.Arrays, batch dim sharded over `batch_axes` of `mesh`.

  `local_batches`: a tf.data.Dataset or iterable of dicts of process-local arrays.
  Keeps `prefetch` batches in flight on the devices. String-valued keys stay
  process-local numpy arrays.
  """
  batch_axes = tuple(batch_axes)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes))
  n_dev = math.prod(mesh.shape[a] for a in batch_axes)
  if hasattr(local_batches, "as_numpy_iterator"):
    local_batches = numpy_batches(local_batches)
  it = iter(local_batches)

  def to_global(batch):
    out = {}
    for k, v in batch.items():
      v = np.asarray(v)
      if v.dtype.kind in "OSU":
        out[k] = v
        continue
      global_bs = v.shape[0] * jax.process_count()
      if global_bs % n_dev:
        raise ValueError(f"Global batch size {global_bs} (key {k!r}) is not divisible by "
                         f"the {n_dev} devices along mesh axes {batch_axes}")
      out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out

  queue = collections.deque()
  while True:
    while len(queue) < max(prefetch, 1):
      try:
        queue.append(to_global(next(it)))
      except StopIteration:
        break
    if not queue:
      return
    yield queue.popleft()
