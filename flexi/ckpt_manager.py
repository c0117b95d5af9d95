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
                                       item_names=("params", "opt_state", "meta"))

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
    out = self._mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params_like, param_shardings)),
        opt_state=ocp.args.StandardRestore(_abstract(opt_like, opt_shardings)),
        meta=ocp.args.JsonRestore()))
    return out["params"], out["opt_state"], out["meta"]

  def wait(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()


def restore_params_from_workdir(workdir: str, step: Optional[int] = None):
  """Params (host numpy arrays) of another run's checkpoint, for `model_init`."""
  directory = os.path.join(os.path.abspath(workdir), "ckpt")
  mngr = ocp.CheckpointManager(directory, item_names=("params", "opt_state", "meta"))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found under {directory}")
  out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
  mngr.close()
  return jax.tree.map(lambda x: jax.device_get(x), out["params"])
