"""big_vision `.npz` parameter files: load, save, and merge into a model's params.

A big_vision checkpoint is an `.npz` whose keys are '/'-joined parameter paths
(optionally under `params/`). `path.npz:sub/tree` loads only that subtree. Files are
read with `allow_pickle=False`: checkpoints travel between people, and a file that
needs pickle to load is refused.
"""
import dataclasses
import io
import logging
import os
import re
import tempfile
import zipfile

from flax.training import checkpoints as flax_checkpoints
import numpy as np

from flexi import resize
from flexi import vit

log = logging.getLogger(__name__)

_URL = "https://storage.googleapis.com/big_vision/flexivit/"
_FLEXI_PP = "decode|resize(274)|central_crop(240)|value_range(-1, 1)"


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A released checkpoint and what it needs to be used correctly."""
  file: str
  model: dict  # kwargs of flexi.vit.Model
  num_classes: int
  res: int = 240  # FlexiViT inputs are 240px, not 224px.
  pp_eval: str = _FLEXI_PP  # big_vision's eval preprocessing (crop 240 of 274).
  crop_pct: float = 0.875  # timm lists 0.95 for its ports; big_vision evaluates at 0.875.

  @property
  def url(self):
    return _URL + self.file


def _flexi(variant):
  return dict(variant=variant, pool_type="tok", patch_size=(32, 32), posemb_size=(7, 7))


PRETRAINED = {
    "FlexiViT-L i1k": Pretrained("flexivit_l_i1k.npz", _flexi("L"), 1000),
    "FlexiViT-B i1k": Pretrained("flexivit_b_i1k.npz", _flexi("B"), 1000),
    "FlexiViT-S i1k": Pretrained("flexivit_s_i1k.npz", _flexi("S"), 1000),
    "FlexiViT-B i21k 90ep": Pretrained("flexivit_b_i21k_90ep.npz", _flexi("B"), 21843),
    "FlexiViT-B i21k 300ep": Pretrained("flexivit_b_i21k_300ep.npz", _flexi("B"), 21843),
    "FlexiViT-B i21k 1000ep": Pretrained("flexivit_b_i21k_1000ep.npz", _flexi("B"),
                                         21843),
    "ViT-B/16 i21k": Pretrained("vit_b16_i21k_300ep.npz",
                                dict(variant="B", pool_type="tok", patch_size=(16, 16),
                                     posemb_size=(15, 15)), 21843),
    "ViT-B/30 i21k": Pretrained("vit_b30_i21k_300ep.npz",
                                dict(variant="B", pool_type="tok", patch_size=(30, 30),
                                     posemb_size=(8, 8)), 21843),
}


def checkpoint_dir():
  """Where released checkpoints are looked up ($FLEXI_CHECKPOINT_DIR)."""
  return os.environ.get("FLEXI_CHECKPOINT_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache", "flexivit"))


def resolve_path(path_or_name):
  """A released name -> local file path; anything else is returned unchanged."""
  if path_or_name not in PRETRAINED:
    return path_or_name
  entry = PRETRAINED[path_or_name]
  local = os.path.join(checkpoint_dir(), entry.file)
  if not os.path.exists(local):
    raise FileNotFoundError(
        f"released checkpoint {path_or_name!r} is not in {checkpoint_dir()}: download "
        f"{entry.url} there (or set FLEXI_CHECKPOINT_DIR)")
  return local


def flatten(tree, prefix=""):
  """Nested dict -> {'a/b/c': leaf}."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) or hasattr(value, "items"):
      flat.update(flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat


def unflatten(flat):
  """{'a/b/c': leaf} -> nested dict."""
  tree = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _split_subtree(path):
  # "gs://b/x.npz:params/img" -> ("gs://b/x.npz", "params/img"); keep "C:\\" alone.
  match = re.match(r"^(.*?\.npz):(.+)$", path)
  return (match.group(1), match.group(2)) if match else (path, "")


def _read_npz(path):
  source = path
  if "://" in path:  # gs:// and friends: read through TF's filesystem layer.
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    with tf.io.gfile.GFile(path, "rb") as f:
      source = io.BytesIO(f.read())
  elif not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if not zipfile.is_zipfile(source):
    raise ValueError(f"checkpoint {path} is corrupt or not an .npz file")
  try:
    with np.load(source, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except ValueError as e:
    if "pickle" in str(e):
      raise ValueError(f"checkpoint {path} needs pickle to load; refusing an untrusted "
                       "pickle (re-save it as plain arrays)") from None
    raise ValueError(f"checkpoint {path} is not a valid .npz file: {e}") from None
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise ValueError(f"checkpoint {path} is corrupt or not an .npz file ({e})") from None


def load_params(path):
  """Loads a big_vision `.npz` (or a released name) into a nested dict of arrays (or
  the one array that `path.npz:name` names)."""
  file_path, subtree = _split_subtree(str(path))
  flat = _read_npz(resolve_path(file_path))
  for prefix in ("params/", "opt/target/"):  # A whole big_vision train state: its params.
    if any(k.startswith(prefix) for k in flat):
      flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
      break
  if subtree and subtree.strip("/") in flat:  # A single array, e.g. two towers' "t".
    return flat[subtree.strip("/")]
  if subtree:
    subtree = subtree.strip("/") + "/"
    flat = {k[len(subtree):]: v for k, v in flat.items() if k.startswith(subtree)}
    if not flat:
      raise KeyError(f"no parameters under {subtree!r} in {file_path}")
  return unflatten(flat)


def save_params(params, path):
  """Writes params as a big_vision `.npz` ('/'-joined keys), atomically.

  Scanned encoders (`vit.Model(scan=True)`) are written with big_vision's per-layer
  names, so every file this code writes loads in big_vision and vice versa.
  """
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path} is a directory; give the .npz file to write")
  flat = {k: np.asarray(v) for k, v in flatten(vit.scan_to_layers(params)).items()}
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **flat)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def fix_old_layouts(flat, posemb_tokens=None):
  """Moves parameters of older ViT checkpoints to today's names (as big_vision).

  Files written before flax's Linen (the original ViT and AugReg releases, e.g. the
  i21k B/8 teacher) number submodules across types (`LayerNorm_0`,
  `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`): flax's
  `convert_pre_linen` renumbers them per type, and leaves Linen names unchanged.
  A ViT with a class token whose posemb has k^2 + 1 tokens stored the class token's
  position first (unless `posemb_tokens`, the model's count, says that is its grid).
  """
  flat = flatten(flax_checkpoints.convert_pre_linen(unflatten(dict(flat))))
  for old in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
    if old in flat:
      flat["pos_embedding"] = flat.pop(old)
  for tower in ("", "txt/"):  # Older LiT text towers added a second posemb (big_vision).
    extra = flat.pop(f"{tower}Encoder_0/pos_embedding", None)
    if extra is not None and f"{tower}pos_embedding" in flat:
      flat[f"{tower}pos_embedding"] = flat[f"{tower}pos_embedding"] + extra
  pe = flat.get("pos_embedding")
  if pe is not None and "cls" in flat and pe.shape[1] != posemb_tokens:
    side = int(np.sqrt(pe.shape[1] - 1))
    if side * side + 1 == pe.shape[1]:  # [cls] posemb was stored first: fold it in.
      flat["pos_embedding"] = pe[:, 1:]
      flat["cls"] = flat["cls"] + pe[:, :1]
  return flat


def _resize_to(name, value, target_shape, posemb_hw):
  """Resizes a loaded kernel/posemb to the model's shape, or None if not resizable.
  (Also the image tower's, when two towers load from one file.)"""
  name = name[len("img/"):] if name.startswith("img/") else name
  if name == "embedding/kernel" and value.ndim == 4 and value.shape[2:] == target_shape[2:]:
    log.info("PI-resizing %s from %s to %s", name, value.shape, target_shape)
    return np.asarray(resize.pi_resize_patchemb(np.asarray(value, np.float32),
                                                target_shape[:2]))
  if name == "pos_embedding" and value.ndim == 3 and value.shape[2] == target_shape[2]:
    log.info("Resizing %s from %s to %s", name, value.shape, target_shape)
    return resize.resize_posemb_for_load(value, posemb_hw or _square(target_shape[1]))
  return None


def _square(n):
  side = int(round(np.sqrt(n)))
  if side * side != n:
    raise ValueError(f"cannot infer the grid of a {n}-token position embedding; "
                     "pass posemb_hw")
  return (side, side)


def load_into(init_params, loaded, dont_load=(), posemb_hw=None):
  """Merges `loaded` into the model's `init_params`.

  Keeps init values for names matching a `dont_load` regex; PI-resizes
  `embedding/kernel` and resizes `pos_embedding` when sizes differ. Raises a
  ValueError naming missing or mis-shaped parameters, and, as big_vision's
  `merge_params`, checkpoint parameters the model lacks (a different pool_type or
  head: the loaded model would silently compute something else) unless `dont_load`
  matches them.
  """
  init_flat = flatten(vit.scan_to_layers(init_params))
  posemb = init_flat.get("pos_embedding")
  loaded_flat = fix_old_layouts(flatten(vit.scan_to_layers(loaded)),
                                posemb_tokens=None if posemb is None else posemb.shape[1])
  skip = [re.compile(p) for p in dont_load]
  merged, missing, bad_shape = {}, [], []
  for name, init_value in init_flat.items():
    if any(p.fullmatch(name) for p in skip):
      merged[name] = init_value
      continue
    if name not in loaded_flat:
      missing.append(name)
      continue
    value = loaded_flat[name]
    if tuple(value.shape) != tuple(init_value.shape):
      value = _resize_to(name, value, tuple(init_value.shape), posemb_hw)
      if value is None:
        bad_shape.append(f"{name} {tuple(loaded_flat[name].shape)} vs model "
                         f"{tuple(init_value.shape)}")
        continue
    merged[name] = np.asarray(value, dtype=init_value.dtype)
  if bad_shape:
    raise ValueError("checkpoint shape mismatch (use dont_load to re-init): "
                     + "; ".join(bad_shape))
  if missing:
    raise ValueError(f"checkpoint lacks parameter(s) {missing} (use dont_load to re-init)")
  unexpected = sorted(n for n in set(loaded_flat) - set(init_flat)
                      if not any(p.fullmatch(n) for p in skip))
  if unexpected:
    more = f" and {len(unexpected) - 6} more" if len(unexpected) > 6 else ""
    raise ValueError(f"checkpoint has parameter(s) the model lacks: {unexpected[:6]}{more} "
                     "(a different model config, e.g. pool_type or head? dont_load skips "
                     "them)")
  return vit.match_layout(unflatten(merged), init_params)
