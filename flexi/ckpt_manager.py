"""Orbax checkpoints of the train state: atomic, keep last N, resumable.

Layout: WORKDIR/ckpt/<step>/{params,opt_state,meta}. `meta` is JSON (step, seed,
config) — with a deterministic data order, rng = fold_in(seed, step) and patch sizes
drawn from (seed, step), (params, opt_state, step) is all an exact resume needs.
All processes call save/restore together (orbax coordinates multi-host writes).
"""
import os
from typing import Optional

import jax
import orbax.checkpoint as ocp

from flexi import tree_utils


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class CheckpointManager:
  """Thin wrapper over `ocp.CheckpointManager` for (params, opt_state, meta)."""

  def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "ckpt")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_handlers=_handlers())

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self):
    return list(self._mngr.all_steps())

  def save(self, step: int, params, opt_state, meta: dict, *, force=False):
    self._mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, step, params_like, opt_like, param_shardings, opt_shardings):
    """Restores onto the given shapes/shardings (abstract or concrete trees)."""
    where = f"checkpoint {os.path.join(self.directory, str(step))}"
    stored = _read(where, lambda: self._mngr.item_metadata(step), _RESUME_HINT)
    check_shapes(where, stored["params"], params_like)
    _check_opt_state(where, stored, opt_like)
    out = _read(where, lambda: self._mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params_like, param_shardings)),
        opt_state=ocp.args.StandardRestore(_abstract(opt_like, opt_shardings)),
        meta=ocp.args.JsonRestore())), _RESUME_HINT)
    return out["params"], out["opt_state"], out["meta"]

  def wait(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()


def restore_params_from_workdir(workdir: str, step: Optional[int] = None):
  """Params (host numpy arrays) of another run's checkpoint, for `model_init`.

  Read onto this process's first device whatever mesh wrote them, so a teacher
  trained on a pod loads on one host (orbax otherwise insists on the writer's devices).
  """
  directory = os.path.join(os.path.abspath(workdir), "ckpt")
  mngr = ocp.CheckpointManager(directory, item_handlers=_handlers())
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint found under {directory}")
    where = f"checkpoint {os.path.join(directory, str(step))}"
    stored = _read(where, lambda: mngr.item_metadata(step))["params"]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          stored)
    out = _read(where, lambda: mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target))))
  finally:  # Also on a bad checkpoint: no orbax threads left behind.
    mngr.close()
  return jax.tree.map(jax.device_get, out["params"])


def _handlers():
  return {"params": ocp.StandardCheckpointHandler(),
          "opt_state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


_RESUME_HINT = "; move it away to resume from an earlier step"


def _read(where, fn, hint=""):
  """fn(), with orbax/TensorStore failures (missing items, truncated or corrupt files)
  turned into one line that names the checkpoint."""
  try:
    out = fn()
  except Exception as e:  # pylint: disable=broad-except
    detail = (str(e).strip().splitlines() or [""])[0].split(" See full")[0][:200]
    raise ValueError(f"{where} is unreadable ({type(e).__name__}: {detail}){hint}") from None
  try:
    params = None if out is None else out["params"]
  except KeyError:  # (orbax's Composite: an item missing on disk.)
    params = None
  if params is None:
    raise ValueError(f"{where} has no params{hint}")
  return out


def _check_opt_state(where, stored, opt_like):
  """One line when the stored optimizer state is laid out for another optimizer (orbax
  would call the checkpoint unreadable, and every earlier one too)."""
  try:
    have = stored["opt_state"]
  except KeyError:
    raise ValueError(f"{where} has no optimizer state{_RESUME_HINT}") from None
  shapes = lambda tree: sorted(tuple(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
  if have is not None and shapes(have) != shapes(opt_like):
    raise ValueError(f"{where}: its optimizer state ({len(jax.tree.leaves(have))} arrays) is "
                     f"not this config's ({len(jax.tree.leaves(opt_like))}): optax_name, "
                     "optax or frozen differ from the run that wrote it")


def check_shapes(where, stored, wanted):
  """One line naming the first param whose stored shape differs from the model's."""
  stored = dict(tree_utils.named_leaves(stored))
  for name, want in tree_utils.named_leaves(wanted):
    have = stored.get(name)
    if have is None:
      raise ValueError(f"{where}: param {name} is missing (the model has it, shape "
                       f"{tuple(want.shape)})")
    if tuple(have.shape) != tuple(want.shape):
      raise ValueError(f"{where}: param {name} has shape {tuple(have.shape)}, the model "
                       f"wants {tuple(want.shape)} (a different model config?)")
