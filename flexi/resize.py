"""Resizing the patch-embedding kernel (PI-resize) and the position embedding.

PI-resize (FlexiViT paper, section 3.3): bilinearly resizing a p x p patch is a
linear map x -> B x. Using the kernel w' = pinv(B^T) w for the resized patch keeps
every token <x, w> == <B x, w'> exactly when upsampling. Because bilinear resizing
is separable, B = kron(B_h, B_w) and pinv(B^T) = kron(pinv(B_h^T), pinv(B_w^T)), so
we only ever build two small 1-D matrices (in NumPy, cached) and apply them with one
einsum. That works on traced arrays inside `jax.jit` and lets gradients flow into the
stored kernel, which is how FlexiViT trains one 32x32 kernel for all patch sizes.

The 1-D matrices reproduce `tf.image.resize(..., "bilinear")` (half-pixel centres, no
antialiasing, also when shrinking), the operator big_vision defines PI-resize with.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage


def _pair(x):
  return (int(x), int(x)) if np.isscalar(x) else tuple(int(v) for v in x)


@functools.lru_cache(maxsize=None)
def _resize_matrix_cached(old: int, new: int) -> np.ndarray:
  # Half-pixel centres: output index i samples input coordinate (i + .5) * old/new - .5
  # with TF's clamping of the two neighbours (no antialias, also when shrinking).
  # The coordinate is computed in float32 exactly as TF's kernel does, so the matrix
  # matches tf.image.resize bit for bit, not just to 1e-6.
  scale = np.float32(old) / np.float32(new)
  src = ((np.arange(new, dtype=np.float32) + np.float32(0.5)) * scale
         - np.float32(0.5)).astype(np.float64)
  lo = np.floor(src)
  frac = src - lo
  lo_idx = np.clip(lo, 0, old - 1).astype(int)
  hi_idx = np.clip(np.ceil(src), 0, old - 1).astype(int)
  mat = np.zeros((new, old), np.float64)
  np.add.at(mat, (np.arange(new), lo_idx), 1.0 - frac)
  np.add.at(mat, (np.arange(new), hi_idx), frac)
  mat.setflags(write=False)
  return mat


def resize_matrix(old: int, new: int) -> np.ndarray:
  """(new, old) float64 matrix M with M @ x == tf.image.resize of 1-D signal x."""
  if old < 1 or new < 1:
    raise ValueError(f"resize_matrix needs positive sizes, got old={old}, new={new}")
  return _resize_matrix_cached(int(old), int(new))


@functools.lru_cache(maxsize=None)
def _pinv_transpose(old: int, new: int) -> np.ndarray:
  """pinv(B^T) for the 1-D resize old -> new, shape (new, old), float32."""
  mat = np.linalg.pinv(resize_matrix(old, new).T).astype(np.float32)
  mat.setflags(write=False)
  return mat


def pi_resize_patchemb(kernel, new_hw):
  """PI-resizes an HWIO patch-embedding kernel to spatial size `new_hw`.

  Args:
    kernel: (h, w, c_in, c_out) array (NumPy or jax, traced is fine).
    new_hw: int or (new_h, new_w).
  Returns:
    (new_h, new_w, c_in, c_out) kernel; the input itself if the size matches.
  """
  new_h, new_w = _pair(new_hw)
  if kernel.ndim != 4:
    raise ValueError(f"pi_resize_patchemb expects an HWIO kernel, got shape {kernel.shape}")
  old_h, old_w = kernel.shape[:2]
  if (old_h, old_w) == (new_h, new_w):
    return kernel
  mat_h = _pinv_transpose(old_h, new_h)
  mat_w = _pinv_transpose(old_w, new_w)
  xp = np if isinstance(kernel, np.ndarray) else jnp
  out = xp.einsum("ih,jw,hwco->ijco", mat_h.astype(kernel.dtype),
                  mat_w.astype(kernel.dtype), kernel)
  return out


def _posemb_grid(posemb, old_hw):
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f"position embedding must be (1, tokens, width), got {posemb.shape}")
  n = posemb.shape[1]
  if old_hw is None:
    side = int(round(np.sqrt(n)))
    if side * side != n:
      raise ValueError(f"position embedding with {n} tokens is not a square grid: "
                       "pass old_hw")
    old_hw = (side, side)
  old_hw = _pair(old_hw)
  if old_hw[0] * old_hw[1] != n:
    raise ValueError(f"position embedding has {n} tokens, not the grid {old_hw}")
  return old_hw


@functools.lru_cache(maxsize=None)
def _linear_resize_matrix(old: int, new: int) -> np.ndarray:
  """(new, old) matrix of `jax.image.resize(..., "linear")` (antialias on) along one axis.

  The weights of jax's `scale_and_translate` in float32 numpy: a triangle kernel
  widened by old/new when shrinking, normalised per output. Computed on the host, so
  building a step traces and compiles nothing extra (tests compare with the operator).
  """
  scale = np.float32(new) / np.float32(old)
  inv_scale = np.float32(1) / scale
  kernel_scale = max(inv_scale, np.float32(1))
  sample = (np.arange(new, dtype=np.float32) + np.float32(0.5)) * inv_scale - np.float32(0.5)
  dist = np.abs(sample[None, :] - np.arange(old, dtype=np.float32)[:, None]) / kernel_scale
  weights = np.maximum(np.float32(0), np.float32(1) - dist)  # (old, new)
  total = weights.sum(axis=0, keepdims=True)
  weights = np.where(np.abs(total) > 1000 * np.finfo(np.float32).eps,
                     weights / np.where(total != 0, total, 1), 0).astype(np.float32)
  mat = np.ascontiguousarray(weights.T)
  mat.setflags(write=False)
  return mat


@functools.lru_cache(maxsize=None)
def _posemb_resize_matrix(old_hw, new_hw) -> np.ndarray:
  """(new_h * new_w, old_h * old_w) matrix of the 2-D linear resize of a token grid."""
  mat = np.kron(_linear_resize_matrix(old_hw[0], new_hw[0]),
                _linear_resize_matrix(old_hw[1], new_hw[1])).astype(np.float32)
  mat.setflags(write=False)
  return mat


def resample_posemb(posemb, new_hw, old_hw=None):
  """Run-time position-embedding resize with big_vision's numerics.

  big_vision's flexi ViT resizes with `jax.image.resize(..., "linear")`, which
  antialiases when shrinking (e.g. 7x7 -> 5x5). Released checkpoints were trained
  with exactly this operator; we apply it as one cached (new tokens, old tokens)
  matrix (the same to float rounding), which leaves XLA one small matmul to compile
  per patch size instead of the operator's weight computation and its gradient
  (measured: 29% less XLA compile time for a FlexiViT-Ti train step).
  """
  old_hw = _posemb_grid(posemb, old_hw)
  new_hw = _pair(new_hw)
  if old_hw == new_hw:
    return posemb
  # HIGHEST as jax.image.resize: TPUs (and TF32 GPUs) would round the default to bf16.
  return jnp.einsum("nN,bNc->bnc", _posemb_resize_matrix(old_hw, new_hw), posemb,
                    precision=jax.lax.Precision.HIGHEST)


def resize_posemb_for_load(posemb, new_hw, old_hw=None):
  """Load-time position-embedding resize, as big_vision's `vit.resample_posemb`.

  big_vision loads checkpoints with `scipy.ndimage.zoom(order=1)`; FunMatch's
  student-from-teacher init uses this path, so we keep it for parity.
  """
  old_hw = _posemb_grid(posemb, old_hw)
  new_hw = _pair(new_hw)
  if old_hw == new_hw:
    return posemb
  width = posemb.shape[-1]
  grid = np.asarray(posemb, np.float32).reshape(*old_hw, width)
  zoom = (new_hw[0] / old_hw[0], new_hw[1] / old_hw[1], 1)
  grid = scipy.ndimage.zoom(grid, zoom, order=1)
  return grid.reshape(1, new_hw[0] * new_hw[1], width)


# --- Heuristics the paper compares PI-resize against (its Figure 4). -------------

def _bilinear_kernel(kernel, new_hw):
  new_h, new_w = _pair(new_hw)
  mat_h = resize_matrix(kernel.shape[0], new_h).astype(np.float32)
  mat_w = resize_matrix(kernel.shape[1], new_w).astype(np.float32)
  return jnp.einsum("ih,jw,hwco->ijco", mat_h, mat_w, kernel)


def resize_patchemb(kernel, new_hw, method="pi"):
  """Resizes a patch-embedding kernel with one of the paper's methods.

  method: "pi" (PI-resize), "bilinear" (plain resize of the weights), "area"
  (bilinear, then scaled by old_area/new_area so token norms stay comparable),
  "norm" (bilinear, then rescaled to keep the kernel's Frobenius norm).
  """
  new_hw = _pair(new_hw)
  if method == "pi":
    return pi_resize_patchemb(kernel, new_hw)
  if tuple(kernel.shape[:2]) == new_hw:
    return kernel
  resized = _bilinear_kernel(kernel, new_hw)
  if method == "bilinear":
    return resized
  if method == "area":
    return resized * (kernel.shape[0] * kernel.shape[1]) / (new_hw[0] * new_hw[1])
  if method == "norm":
    return resized * jnp.linalg.norm(kernel) / jnp.linalg.norm(resized)
  raise ValueError(f"unknown patch-embedding resize method {method!r}; "
                   "choose one of 'pi', 'bilinear', 'area', 'norm'")
