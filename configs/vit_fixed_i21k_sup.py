r"""Fixed-patch ViT baseline with exactly the FlexiViT i21k supervised recipe.

Same data, optimizer, schedule, mixup, loss as configs/flexivit_i21k_sup.py; only the
patch size is fixed (default 16 -> ViT-B/16 at 240px, 15x15 tokens), with the kernel
and posemb stored at their native size so nothing is resized. Compare with the
flexible model evaluated at the same patch size.

    python -m trainers.train --config configs/vit_fixed_i21k_sup.py:patch=30 --workdir ...
    python -m trainers.train --config configs/vit_fixed_i21k_sup.py:runlocal --workdir /tmp/x
"""
import importlib.util
import os

from flexi import config as config_lib


def _flexi_config_module():
  path = os.path.join(os.path.dirname(__file__), "flexivit_i21k_sup.py")
  spec = importlib.util.spec_from_file_location("flexivit_i21k_sup", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  a = config_lib.parse_arg(arg, runlocal=False, variant="B", res=240, patch=16)
  patch = a.patch if not a.runlocal else 8
  args = f"variant={a.variant},res={a.res},fixed={patch}" + (",runlocal" if a.runlocal else "")
  c = _flexi_config_module().get_config(args)
  c.arg = a.to_dict()
  return c
