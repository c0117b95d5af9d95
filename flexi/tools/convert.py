"""Checkpoint conversion: big_vision .npz <-> orbax workdirs, fixed-patch export, timm import.

    python -m flexi.tools.convert to-workdir flexivit_s_i1k.npz /tmp/run [--step 0]
        [--config configs/x.py]       # also write the config's optimizer state (resumable)
    python -m flexi.tools.convert to-npz /tmp/run out.npz [--step N]
    python -m flexi.tools.convert fixed SRC out_b16.npz --patch 16 --image_size 240
        # or --patch 16x12 --image_size 240x192: a plain ViT with that patch size
    python -m flexi.tools.convert timm model.safetensors out.npz [--num_heads 6]

SRC anywhere is a .npz (also `file.npz:sub/tree` or a released name), a workdir with
ckpt/, or a timm .safetensors/.pth. The fixed-patch export PI-resizes the kernel to
the patch size and resizes the position embedding to the token grid with the
run-time operator (`flexi.resize.resample_posemb`), so
`flexi.vit.Model(patch_size=p, posemb_size=grid)` gives the flexible model's logits
at patch size p.
"""
import argparse
import os
import sys

import jax
import numpy as np

from flexi import checkpoint, ckpt_manager, resize, vit
from flexi.tools import timm


def _hw(text, what):
  """'16' -> (16, 16); '16x12' -> (16, 12)."""
  try:
    parts = [int(v) for v in str(text).lower().split("x")]
  except ValueError:
    raise ValueError(f"{what} must look like 16 or 16x12, got {text!r}") from None
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2 or min(parts) < 1:
    raise ValueError(f"{what} must look like 16 or 16x12, got {text!r}")
  return tuple(parts)


def load_any(src, step=None, num_heads=None):
  """Nested numpy params from a .npz / released name, a workdir, or a timm file."""
  if os.path.isdir(os.path.join(os.path.expanduser(src), "ckpt")):
    return ckpt_manager.restore_params_from_workdir(os.path.expanduser(src), step)
  if os.path.isdir(src):
    raise FileNotFoundError(f"{src} is a directory without a ckpt/ checkpoint folder")
  if src.endswith(timm.SUFFIXES):
    sd = timm.read_state_dict(src)
    try:
      return timm.timm_to_params(sd, num_heads)
    except KeyError as e:
      raise ValueError(f"{src}: timm state_dict lacks {e}") from None
  loaded = checkpoint.load_params(src)
  if not isinstance(loaded, dict):
    raise ValueError(f"{src} names a single array, not a parameter tree")
  return jax.tree.map(np.asarray, loaded)


def _opt_state_for(params, config_path):
  """The config's optimizer state for `params` (so the workdir resumes training)."""
  from flexi import config as config_lib, optim  # pylint: disable=import-outside-toplevel
  config = config_lib.load(config_path)
  total = int(config.total_steps or 1)
  tx, _ = optim.make_optimizer(config, params, total_steps=total, warmup_steps=0,
                               frozen=list(config.frozen))
  return jax.device_get(tx.init(params))


def npz_to_workdir(params, workdir, step=0, config_path=None):
  """Writes params as an orbax checkpoint WORKDIR/ckpt/<step> (the core's layout).

  Without a config the optimizer state is a placeholder: the workdir is then for
  evaluation (`evaluators.run`) and `model_init`, not for resuming training.
  """
  if config_path:
    opt_state = _opt_state_for(params, config_path)
  else:
    opt_state = {"params_only": np.zeros((), np.int32)}
  mngr = ckpt_manager.CheckpointManager(workdir, keep=1_000_000, async_save=False)
  try:
    if step in mngr.all_steps():
      raise FileExistsError(f"{mngr.directory} already has step {step}; pick --step")
    mngr.save(step, params, opt_state, {"step": int(step), "converted": True,
                                        "params_only": not config_path}, force=True)
  finally:
    mngr.close()
  return os.path.join(mngr.directory, str(step))


def export_fixed(params, patch_hw, image_hw, posemb_hw=None):
  """Params of a plain ViT at one patch size: PI-resized kernel, posemb at its grid.

  A model without a learned `pos_embedding` is a sincos2d one: the flexible model
  resizes its posemb_size table (default 7x7) to the grid, which a plain sincos model
  at the grid does not reproduce, so that resized table is written as a learned
  `pos_embedding` (load the export with posemb="learn").
  """
  patch_hw, image_hw = tuple(patch_hw), tuple(image_hw)
  if image_hw[0] % patch_hw[0] or image_hw[1] % patch_hw[1]:
    raise ValueError(f"patch size {patch_hw} does not tile image size {image_hw}")
  grid = (image_hw[0] // patch_hw[0], image_hw[1] // patch_hw[1])
  out = jax.tree.map(lambda x: x, params)  # Shallow structural copy.
  kernel = np.asarray(params["embedding"]["kernel"], np.float32)
  out["embedding"] = dict(params["embedding"],
                          kernel=np.asarray(resize.pi_resize_patchemb(kernel, patch_hw)))
  if "pos_embedding" in params:
    pe = np.asarray(params["pos_embedding"], np.float32)
  else:
    posemb_hw = tuple(posemb_hw or (7, 7))
    pe = np.asarray(vit.posemb_sincos_2d(*posemb_hw, kernel.shape[-1]))
  out["pos_embedding"] = np.asarray(resize.resample_posemb(pe, grid, posemb_hw))
  return out, grid


def save_npz(params, path):
  checkpoint.save_params(params, path)
  return path


def _parser():
  p = argparse.ArgumentParser(prog="python -m flexi.tools.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  a = sub.add_parser("to-workdir", help=".npz (or timm) -> orbax workdir checkpoint")
  a.add_argument("src")
  a.add_argument("workdir")
  a.add_argument("--step", type=int, default=0)
  a.add_argument("--config", default=None, help="Also write this config's optimizer state.")
  a.add_argument("--num_heads", type=int, default=None)
  b = sub.add_parser("to-npz", help="workdir checkpoint (or timm) -> big_vision .npz")
  b.add_argument("src")
  b.add_argument("out")
  b.add_argument("--step", type=int, default=None)
  b.add_argument("--num_heads", type=int, default=None)
  c = sub.add_parser("fixed", help="fixed-patch export for a plain ViT")
  c.add_argument("src")
  c.add_argument("out")
  c.add_argument("--patch", required=True, help="16 or 16x12")
  c.add_argument("--image_size", required=True, help="240 or 240x192")
  c.add_argument("--posemb_size", default=None, help="Stored posemb grid if not square.")
  c.add_argument("--step", type=int, default=None)
  c.add_argument("--num_heads", type=int, default=None)
  d = sub.add_parser("timm", help="timm .safetensors/.pth -> big_vision .npz")
  d.add_argument("src")
  d.add_argument("out")
  d.add_argument("--num_heads", type=int, default=None)
  return p


def main(argv=None):
  args = _parser().parse_args(argv)
  try:
    if args.cmd == "timm" and not args.src.endswith(timm.SUFFIXES):
      raise ValueError(f"{args.src}: the timm command reads .safetensors/.pth/.pt/.bin files")
    params = load_any(args.src, getattr(args, "step", None), args.num_heads)
    if args.cmd == "to-workdir":
      where = npz_to_workdir(params, args.workdir, args.step, args.config)
    elif args.cmd == "fixed":
      posemb_hw = _hw(args.posemb_size, "--posemb_size") if args.posemb_size else None
      sincos = "pos_embedding" not in params
      params, grid = export_fixed(params, _hw(args.patch, "--patch"),
                                  _hw(args.image_size, "--image_size"), posemb_hw)
      where = save_npz(params, args.out) + f" (load with patch_size={_hw(args.patch, '')}, " \
          f"posemb_size={grid}{', posemb=learn' if sincos else ''})"
    else:
      where = save_npz(params, args.out)
  except (ValueError, OSError, KeyError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {where}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
