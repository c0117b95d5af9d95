"""Two-tower image-text model for flexi-LiT, its contrastive losses and its loading.

Param tree (big_vision `models/proj/image_text/two_towers.py`): `img/...` a
`flexi.vit.Model` (its `head` is the projection, or absent to use pre-logits),
`txt/...` a `flexi.text_model.Model` (`head` projects to the shared size), `t` the
log-temperature, `b` the SigLIP bias (only when `bias_init` is set). Both embeddings
are L2-normalised. The image tower takes `patch_size` / `seqhw` at every call.

    model = two_tower.Model(image=dict(variant="B", pool_type="tok"),
                            text=dict(variant="B", vocab_size=32_000), out_dim=(None, 768))
    zimg, ztxt, out = model.apply({"params": p}, images, tokens, seqhw=15)

The losses are written as computations over the GLOBAL batch: under `jax.jit` with
batch-sharded inputs XLA gathers the other devices' embeddings for the similarity
matrix, so the negatives are all examples of the global batch (tests/test_lit.py checks
8 devices against 1).
"""
import os
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexi import text_model, vit

TOWERS = ("img", "txt", "t", "b")


def _out_dims(out_dim):
  if out_dim is None or isinstance(out_dim, int):
    return (out_dim, out_dim)
  if len(out_dim) != 2:
    raise ValueError(f"out_dim must be an int or (img_dim, txt_dim), got {out_dim!r}")
  return tuple(out_dim)


def _normalize(z):
  norm = jnp.linalg.norm(z, axis=-1, keepdims=True)
  return z / (norm + 1e-8), norm


class Model(nn.Module):
  """Image tower `img`, text tower `txt`, temperature `t` (log), optional bias `b`."""
  image: Optional[Mapping[str, Any]] = None   # kwargs of flexi.vit.Model.
  text: Optional[Mapping[str, Any]] = None    # kwargs of flexi.text_model.Model.
  out_dim: Any = 128                          # int or (img, txt); None = no projection.
  temperature_init: float = 1.0               # exp(t) at init (SigLIP: 10).
  bias_init: Optional[float] = None           # SigLIP: -10; None = no `b` param.

  def setup(self):
    img_dim, txt_dim = _out_dims(self.out_dim)
    img_kw = dict(self.image or {})
    if img_dim:  # A zero-initialised projection would give zero embeddings.
      img_kw.setdefault("head_zeroinit", False)
    self.img = vit.Model(img_dim, **img_kw)
    self.txt = text_model.Model(txt_dim, **dict(self.text or {}))
    t0 = float(np.log(self.temperature_init))
    self.t = self.param("t", lambda _, s: jnp.full(s, t0, jnp.float32), (1,))
    if self.bias_init is not None:
      b0 = float(self.bias_init)
      self.b = self.param("b", lambda _, s: jnp.full(s, b0, jnp.float32), (1,))

  def embed_image(self, image, *, patch_size=None, seqhw=None, train=False):
    z, out = self.img(image, patch_size=patch_size, seqhw=seqhw, train=train)
    z, norm = _normalize(z)
    return z, {**{f"img/{k}": v for k, v in out.items()}, "img/norm": norm}

  def embed_text(self, text, *, train=False):
    z, out = self.txt(text, train=train)
    z, norm = _normalize(z)
    return z, {**{f"txt/{k}": v for k, v in out.items()}, "txt/norm": norm}

  def __call__(self, image, text=None, *, patch_size=None, seqhw=None, train=False,
               train_img=None):
    """Returns (zimg | None, ztxt | None, out) with out["t"] = exp(t), out["b"].

    `train_img` (default: `train`) lets a locked image tower run in eval mode while
    the text tower trains.
    """
    zimg = ztxt = None
    out = {}
    if image is not None:
      train_img = train if train_img is None else train_img
      zimg, o = self.embed_image(image, patch_size=patch_size, seqhw=seqhw, train=train_img)
      out.update(o)
    if text is not None:
      ztxt, o = self.embed_text(text, train=train)
      out.update(o)
    out["t"] = jnp.exp(self.t[0])
    if self.bias_init is not None:
      out["b"] = self.b[0]
    return zimg, ztxt, out


# ------------------------------------------------------------------------ losses.

def similarity(zimg, ztxt):
  """[n_img, n_txt] cosine similarities (float32) of normalised embeddings."""
  return jnp.einsum("id,td->it", zimg.astype(jnp.float32), ztxt.astype(jnp.float32))


def softmax_contrastive(zimg, ztxt, temperature):
  """CLIP/LiT loss: mean of image->text and text->image cross-entropies, diagonal
  positives, over the whole (global) batch. Returns (loss, logits)."""
  logits = similarity(zimg, ztxt) * temperature
  i2t = -jnp.diagonal(jax.nn.log_softmax(logits, axis=1))
  t2i = -jnp.diagonal(jax.nn.log_softmax(logits, axis=0))
  return jnp.mean(0.5 * (i2t + t2i)), logits


def sigmoid_contrastive(zimg, ztxt, temperature, bias):
  """SigLIP loss: every (image, text) pair is a binary problem; +1 on the diagonal.
  Normalised by the batch size (as SigLIP). Returns (loss, logits)."""
  logits = similarity(zimg, ztxt) * temperature + bias
  n = logits.shape[0]
  signs = 2.0 * jnp.eye(n, dtype=logits.dtype) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / n, logits


def contrastive_loss(kind, zimg, ztxt, out):
  """`kind` "softmax" (CLIP/LiT) or "sigmoid" (SigLIP; needs the model's `b`)."""
  if zimg.shape != ztxt.shape:
    raise ValueError(f"image and text embeddings differ in shape: {zimg.shape} vs "
                     f"{ztxt.shape}; set model.out_dim so both towers output the same size")
  if kind == "softmax":
    return softmax_contrastive(zimg, ztxt, out["t"])
  if kind == "sigmoid":
    if "b" not in out:
      raise ValueError("sigmoid (SigLIP) loss needs a bias: set model.bias_init (e.g. -10)")
    return sigmoid_contrastive(zimg, ztxt, out["t"], out["b"])
  raise ValueError(f"unknown contrastive loss {kind!r}; known: softmax, sigmoid")


def batch_accuracy(logits):
  """Fraction of images whose best text in the batch is their own."""
  return jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0]))


# ------------------------------------------------------------------------ loading.

def _read_any(path, what, hint=""):
  """A workdir (its latest checkpoint) or a big_vision .npz / released name."""
  from flexi import checkpoint, ckpt_manager  # pylint: disable=import-outside-toplevel
  local = os.path.expanduser(str(path))
  if os.path.isdir(local):
    if not os.path.isdir(os.path.join(local, "ckpt")):
      raise FileNotFoundError(f"{what} init {path!r}: workdir has no checkpoint{hint}")
    try:
      return ckpt_manager.restore_params_from_workdir(local)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{what} init {path!r}: {e}{hint}") from None
  try:
    return checkpoint.load_params(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{what} init {path!r}: {e}{hint}") from None


def load(init_params, model_init, model_load: Optional[Mapping] = None):
  """Merges pretrained weights into `init_params` (host arrays).

  model_init: a two-tower checkpoint (str: workdir / .npz), or a dict
      {"img": path, "txt": path, "t": path, "b": path} (None entries are skipped;
      "image"/"text" also accepted) where each path holds that tower alone.
  model_load: dont_load=[regex on full names], img_dont_load=[...] (default
      ["head/.*"]: a classifier head is never the projection), txt_dont_load=[...],
      missing_hint="..." appended to a missing-checkpoint error.
  """
  from flexi import checkpoint  # pylint: disable=import-outside-toplevel
  model_load = dict(model_load or {})
  hint = model_load.get("missing_hint")
  hint = f"; {hint}" if hint else ""
  init_params = jax.device_get(init_params)
  if isinstance(model_init, str):
    loaded = _read_any(model_init, "two-tower", hint)
    return checkpoint.load_into(init_params, loaded,
                                dont_load=list(model_load.get("dont_load", ())))
  files = dict(model_init)
  for long, short in (("image", "img"), ("text", "txt"), ("temperature", "t"), ("bias", "b")):
    if long in files:
      files[short] = files.pop(long)
  unknown = sorted(set(files) - set(TOWERS))
  if unknown:
    raise ValueError(f"unknown model_init key(s) {unknown}; use {list(TOWERS)}")
  out = dict(init_params)
  dont = {"img": model_load.get("img_dont_load", ["head/.*"]),
          "txt": model_load.get("txt_dont_load", [])}
  for name, path in files.items():
    if not path:
      continue
    if name not in init_params:
      raise ValueError(f"model_init.{name} given but the model has no {name!r} "
                       "(set model.bias_init for 'b')")
    loaded = _read_any(path, name, hint)
    if name in ("t", "b"):
      value = loaded.get(name, loaded) if isinstance(loaded, dict) else loaded
      out[name] = np.asarray(value, np.float32).reshape(init_params[name].shape)
    else:
      out[name] = checkpoint.load_into(init_params[name], loaded, dont_load=list(dont[name]))
  return out
