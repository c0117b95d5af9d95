"""Device mesh and shardings described as data (config.mesh, config.sharding).

config.mesh.axes = [("data", -1)]                    # (name, size), -1 = the rest
config.sharding.rules = [(".*", "replicate")]        # data parallel (default)
config.sharding.rules = [(".*", "fsdp")]             # FSDP: largest divisible dim over fsdp_axis
config.sharding.rules = [("head/kernel", (None, "data")), (".*", "fsdp")]  # explicit spec

Rules apply to '/'-joined param names with `re.search`, first match wins; optimizer
state leaves ("1/0/mu/embedding/kernel") take their parameter's sharding
(`opt_state_shardings`).
"""
import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flexi import tree_utils


def make_mesh(axes: Sequence, devices=None) -> Mesh:
  """Mesh over all (global) devices; one axis size may be -1."""
  devices = list(devices if devices is not None else jax.devices())
  names = [str(a[0]) for a in axes]
  sizes = [int(a[1]) for a in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh.axes: at most one size may be -1, got {axes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh.axes {axes} do not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh.axes {axes} need {int(np.prod(sizes))} devices, have {len(devices)}")
  return Mesh(np.asarray(devices, dtype=object).reshape(sizes), names)


def fsdp_spec(shape, axis_size: int, axis: str) -> P:
  """Shards the largest dim divisible by `axis_size`; replicates if none is."""
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    if shape[i] >= axis_size and shape[i] % axis_size == 0:
      spec = [None] * len(shape)
      spec[i] = axis
      return P(*spec)
  return P()


def _spec_for(name, shape, rules, mesh, fsdp_axis):
  for pattern, rule in rules:
    if re.search(pattern, name):
      if rule == "replicate":
        return P()
      if rule == "fsdp":
        return fsdp_spec(shape, mesh.shape[fsdp_axis], fsdp_axis)
      spec = tuple(rule)
      if len(spec) != len(shape):
        raise ValueError(f"sharding rule {pattern!r} spec {spec} does not fit {name} {shape}")
      for dim, axes in zip(shape, spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        unknown = [a for a in axes if a not in mesh.shape]
        if unknown:
          raise ValueError(f"sharding rule {pattern!r}: {unknown[0]!r} is not a mesh axis "
                           f"{tuple(mesh.shape)}")
        size = int(np.prod([mesh.shape[a] for a in axes]))
        if dim % size:
          raise ValueError(f"sharding rule {pattern!r}: {name} {shape} has a dim of {dim}, "
                           f"not divisible by mesh axes {axes} ({size} devices); use 'fsdp' "
                           "(replicates what does not divide) or another spec")
      return P(*spec)
  return P()


def tree_shardings(tree, mesh: Mesh, sharding_cfg):
  """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  rules = [tuple(r) for r in sharding_cfg.get("rules", [(".*", "replicate")])]
  for _, rule in rules:
    if isinstance(rule, str) and rule not in ("replicate", "fsdp"):
      raise ValueError(f"unknown sharding rule {rule!r}; use 'replicate', 'fsdp' or a spec")
  fsdp_axis = sharding_cfg.get("fsdp_axis", "data")
  if any(r == "fsdp" for _, r in rules) and fsdp_axis not in mesh.shape:
    raise ValueError(f"sharding.fsdp_axis {fsdp_axis!r} is not a mesh axis {tuple(mesh.shape)}")
  return jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(
          mesh, _spec_for(tree_utils.path_str(p), np.shape(x), rules, mesh, fsdp_axis)),
      tree)


def opt_state_shardings(opt_tree, params, param_shardings, fallback):
  """Shardings for optimizer state: a leaf whose name ends with a param's name (e.g.
  "1/0/mu/txt/head/kernel") and has its shape gets that param's sharding, so anchored
  rules ("^txt/") reach Adam's moments too; other leaves (counts, ...) get
  `fallback(tree)`'s."""
  shapes = {name: np.shape(x) for name, x in tree_utils.named_leaves(params)}
  shardings = dict(tree_utils.named_leaves(param_shardings))

  def pick(path, leaf, default_sharding):
    parts = tree_utils.path_str(path).split("/")
    for name in ("/".join(parts[i:]) for i in range(len(parts))):  # Longest first.
      if shapes.get(name) == np.shape(leaf):
        return shardings[name]
    return default_sharding
  return jax.tree_util.tree_map_with_path(pick, opt_tree, fallback(opt_tree))


def batch_sharding(mesh: Mesh, batch_axes=("data",)) -> NamedSharding:
  return NamedSharding(mesh, P(tuple(batch_axes)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh, batch_axes=("data",)) -> None:
  n = int(np.prod([mesh.shape[a] for a in batch_axes]))
  if global_batch % n:
    raise ValueError(f"batch size {global_batch} is not divisible by the {n} devices of mesh "
                     f"axes {tuple(batch_axes)}; use a multiple of {n}")
  if global_batch % jax.process_count():
    raise ValueError(f"batch size {global_batch} is not divisible by the "
                     f"{jax.process_count()} processes")
  _check_process_blocks(global_batch, mesh, batch_axes)


def _check_process_blocks(global_batch, mesh, batch_axes):
  """Each process feeds rows `local_slice` of the global batch, so its devices must
  hold exactly those rows. A mesh whose batch axes repeat across processes (e.g.
  [("model", 2), ("data", -1)] with the model axis spanning hosts) would otherwise
  build a smaller batch from rows that disagree between processes."""
  if jax.process_count() == 1:
    return
  lo, hi = local_slice(global_batch)
  rows = set()
  for device, index in batch_sharding(mesh, batch_axes).devices_indices_map(
      (global_batch,)).items():
    if device.process_index == jax.process_index():
      rows.update(range(*index[0].indices(global_batch)))
  if rows != set(range(lo, hi)):
    raise ValueError(f"mesh {dict(mesh.shape)}: process {jax.process_index()}'s devices hold "
                     f"{len(rows)} batch rows, not its own {hi - lo} ({lo}..{hi - 1}); order "
                     f"config.mesh.axes so that the batch axes {tuple(batch_axes)} split "
                     "the processes (e.g. the data axis first)")


def to_global(local_batch: dict, mesh: Mesh, batch_axes=("data",)) -> dict:
  """Process-local numpy batch -> dict of global jax.Arrays sharded on the batch dim."""
  sharding = batch_sharding(mesh, batch_axes)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def local_slice(global_batch_size: int):
  """The [start, stop) rows of a global batch this process feeds."""
  n = global_batch_size // jax.process_count()
  return jax.process_index() * n, (jax.process_index() + 1) * n
