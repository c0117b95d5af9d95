"""Training data for the shared loop: process-local batches -> global sharded arrays.

A `DataSource` knows the split size and makes a process-local numpy iterator that
starts at a given step. The default one reads `config.input` through
`input_pipeline.build_train_dataset`; its order is a deterministic function of
`config.seed`, so resuming at step k starts the stream at batch k (skipping raw
records before decoding) and sees exactly the batches an uninterrupted run would. Tests and benchmarks pass an in-memory source instead.
"""
import dataclasses
import itertools
from typing import Callable, Iterator, Optional

import jax
import numpy as np

from flexi import sharding


@dataclasses.dataclass
class DataSource:
  make_iter: Callable[[int], Iterator[dict]]   # start_step -> process-local numpy batches.
  num_examples: Optional[int] = None            # For epoch-based durations.


def from_input_config(config) -> DataSource:
  """Default: `input_pipeline.build_train_dataset(config.input)`, resumable at any step."""
  import input_pipeline  # pylint: disable=import-outside-toplevel
  input_cfg = dict(config.input.to_dict(), seed=config.seed)
  input_cfg.pop("num_examples", None)

  def build(start_step):
    return input_pipeline.build_train_dataset(
        input_cfg, process_index=jax.process_index(), process_count=jax.process_count(),
        start_batch=start_step)

  _, n = build(0)
  if config.input.num_examples:
    n = config.input.num_examples
  return DataSource(lambda start: input_pipeline.numpy_batches(build(start)[0]), n)


def in_memory(images: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int = 0,
              num_classes: Optional[int] = None) -> DataSource:
  """Deterministic shuffled epochs over arrays (global batch -> this process's rows).

  Batch `i` depends only on (seed, i), so any start step is O(1) to reach.
  """
  n = len(images)
  steps_per_epoch = n // batch_size
  lo, hi = sharding.local_slice(batch_size)

  def batch(i):
    epoch, j = divmod(i, steps_per_epoch)
    order = np.random.default_rng((seed, epoch)).permutation(n)
    idx = order[j * batch_size:(j + 1) * batch_size][lo:hi]
    lab = labels[idx]
    if num_classes:
      lab = np.eye(num_classes, dtype=np.float32)[lab]
    return {"image": images[idx], "labels": lab}

  return DataSource(lambda start: (batch(i) for i in itertools.count(start)), n)


def global_iter(local_iter, mesh, batch_axes=("data",)):
  for b in local_iter:
    yield sharding.to_global(b, mesh, batch_axes)


def global_spec(local_batch: dict, mesh, batch_axes=("data",)) -> dict:
  """ShapeDtypeStructs of the global batch built from one process-local batch."""
  s = sharding.batch_sharding(mesh, batch_axes)
  return {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(), *v.shape[1:]),
                                  v.dtype, sharding=s)
          for k, v in local_batch.items()}
