"""The reference formulation (big_vision's FlexiViT), kept as the speed baseline.

Not part of the library. It differs from `flexi.vit` only where big_vision does:
- patchify is a strided `conv_general_dilated` on the PI-resized kernel;
- the PI-resize matrix is built densely every time a step is traced: one
  `tf.image.resize` per basis vector of the 32x32 kernel (1024 calls), then a dense
  `np.linalg.pinv` of the (p*p, 1024) matrix, applied with vmapped matmuls;
- the position embedding is resized with `jax.image.resize` inside the step;
- blocks are a plain Python loop (each traced on its own) of flax's LayerNorm, gelu
  and default attention, float32;
- the train step is one `jax.jit` with the patch size static, compiled lazily the
  first time a patch size is sampled.
Numerics equal `flexi.vit` (tests/test_perf_numerics.py checks the logits).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flexi import losses, vit


def _tf_resize(x, new_hw):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.image.resize(tf.constant(x)[None, ..., None], new_hw, method="bilinear")[
      0, ..., 0].numpy()


def dense_resize_matrix(old_hw, new_hw, resize_fn=_tf_resize):
  """(new_h*new_w, old_h*old_w) matrix: one bilinear resize per basis vector."""
  cols = []
  for i in range(int(np.prod(old_hw))):
    basis = np.zeros(old_hw, np.float32)
    basis[np.unravel_index(i, old_hw)] = 1.0
    cols.append(np.asarray(resize_fn(basis, new_hw)).reshape(-1))
  return np.stack(cols).T


def dense_pi_matrix(old_hw, new_hw, resize_fn=_tf_resize):
  """pinv(B^T), dense, (new_h*new_w, old_h*old_w): the reference's setup cost."""
  return np.linalg.pinv(dense_resize_matrix(old_hw, new_hw, resize_fn).T)


def dense_pi_resize(kernel, new_hw, resize_fn=_tf_resize):
  """big_vision's `resample_patchemb`: dense matrix, vmapped over (c_in, c_out)."""
  old_hw = tuple(kernel.shape[:2])
  new_hw = tuple(new_hw)
  if old_hw == new_hw:
    return kernel
  mat = jnp.asarray(dense_pi_matrix(old_hw, new_hw, resize_fn), jnp.float32)

  def one(k):  # k: (old_h, old_w)
    return (mat @ k.reshape(-1)).reshape(new_hw)
  return jax.vmap(jax.vmap(one, 2, 2), 3, 3)(kernel)


class ConvPatchify(nn.Module):
  """big_vision's stem: dense PI-resize at trace time, then a strided conv."""
  patch_size: tuple = (32, 32)
  width: int = 768
  dtype: object = None

  @nn.compact
  def __call__(self, image, patch_size):
    c = image.shape[-1]
    kernel = self.param("kernel", nn.initializers.normal(stddev=1 / np.sqrt(self.width)),
                        (*self.patch_size, c, self.width), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.width,), jnp.float32)
    kernel = dense_pi_resize(kernel, patch_size)
    out = jax.lax.conv_general_dilated(image, kernel, tuple(patch_size), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return out + bias


def image_resize_posemb(posemb, new_hw, old_hw):
  """big_vision's run-time posemb resize: `jax.image.resize(..., "linear")` in the graph."""
  if tuple(old_hw) == tuple(new_hw):
    return posemb
  width = posemb.shape[-1]
  grid = jax.image.resize(jnp.reshape(posemb, (1, *old_hw, width)), (1, *new_hw, width),
                          "linear")
  return jnp.reshape(grid, (1, -1, width))


class _RefMlpBlock(vit.MlpBlock):
  activation = staticmethod(nn.gelu)


class _RefAttention(nn.MultiHeadDotProductAttention):
  """flax's module (DenseGeneral projections), called as vit.MultiHeadAttention."""
  kernel_init: Any = nn.initializers.xavier_uniform()
  attention: str = "flax"  # The reference has only flax's attention.

  def __call__(self, x):  # pylint: disable=arguments-differ
    return super().__call__(x, x)


class _RefBlock(vit.Encoder1DBlock):
  norm_cls = nn.LayerNorm
  mlp_cls = _RefMlpBlock
  attention_cls = _RefAttention


class _RefEncoder(vit.Encoder):
  share_block_trace = staticmethod(lambda block_cls: block_cls)  # Traced per layer.
  block_cls = _RefBlock


class _RefModel(vit._Model):  # pylint: disable=protected-access
  embedding_cls = ConvPatchify
  encoder_cls = _RefEncoder
  add_posemb = staticmethod(jnp.add)
  posemb_resize = staticmethod(image_resize_posemb)


def Model(num_classes=None, *, variant=None, **kw):  # pylint: disable=invalid-name
  """Same factory and param tree as flexi.vit.Model, reference formulation."""
  for key in ("scan", "dtype", "attention"):
    if kw.get(key):
      raise ValueError(f"the reference formulation has no {key!r} option")
  cfg = {**vit.decode_variant(variant), **kw}
  for key in ("patch_size", "posemb_size"):
    if key in cfg:
      cfg[key] = vit._pair(cfg[key])  # pylint: disable=protected-access
  return _RefModel(num_classes, **cfg)


def xent_loss(model, params, images, labels, patch):
  """The benchmark's loss, shared with ours: big_vision's softmax cross-entropy on
  one-hot labels (`flexi.losses.softmax_xent`, what the trainers use)."""
  logits, _ = model.apply({"params": params}, images, patch_size=patch, train=True)
  return losses.softmax_xent(logits, labels)


def make_step(model, tx):
  """fn(params, opt_state, images, labels, patch) -> (params, opt_state, loss)."""
  def step(params, opt_state, images, labels, patch):
    loss, grads = jax.value_and_grad(
        lambda p: xent_loss(model, p, images, labels, patch))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def lazy_train_step(model, tx):
  """big_vision's trainer: ONE jit, patch size static, compiled on first use."""
  return jax.jit(make_step(model, tx), static_argnums=(4,), donate_argnums=(0, 1))
