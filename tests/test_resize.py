"""PI-resize against its defining properties and against TensorFlow's bilinear resize."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from flexi import resize

SIZES = (5, 6, 8, 10, 12, 15, 16, 20, 24, 30, 32, 40, 48)


def _tf_resize_2d(x, new_hw):
  return tf.image.resize(x[None, ..., None], new_hw, method="bilinear").numpy()[0, ..., 0]


def _dense_resize_matrix(old_hw, new_hw):
  """big_vision's construction: resize every basis vector with TF, stack columns."""
  cols = []
  for i in range(old_hw[0] * old_hw[1]):
    basis = np.zeros(old_hw, np.float32)
    basis[np.unravel_index(i, old_hw)] = 1.0
    cols.append(_tf_resize_2d(basis, new_hw).reshape(-1))
  return np.stack(cols).T  # (new_h*new_w, old_h*old_w)


@pytest.mark.parametrize("old,new", [(8, 16), (16, 8), (32, 5), (5, 32), (7, 6), (6, 7),
                                     (30, 48), (48, 10), (3, 3), (1, 4), (4, 1)])
def test_resize_matrix_equals_tf_on_basis_vectors(old, new):
  mat = resize.resize_matrix(old, new)
  for i in range(old):
    basis = np.zeros((old, 1), np.float32)
    basis[i] = 1.0
    expected = _tf_resize_2d(basis, (new, 1))[:, 0]
    np.testing.assert_allclose(mat[:, i], expected, atol=1e-7)


def _token(patch, kernel):
  return np.einsum("hwc,hwcd->d", patch, kernel)


def _upsample_pairs():
  for p, q in itertools.product(SIZES, SIZES):
    if q >= p:
      yield p, q


def test_pi_resize_keeps_tokens_when_upsampling_all_square_pairs():
  rng = np.random.default_rng(0)
  worst = 0.0
  for p, q in _upsample_pairs():
    kernel = rng.normal(size=(p, p, 3, 4)).astype(np.float32)
    patch = rng.normal(size=(p, p, 3)).astype(np.float32)
    big_patch = np.stack([_tf_resize_2d(patch[..., c], (q, q)) for c in range(3)], -1)
    new_kernel = resize.pi_resize_patchemb(kernel, (q, q))
    assert new_kernel.shape == (q, q, 3, 4)
    ref = _token(patch, kernel)
    got = _token(big_patch, new_kernel)
    worst = max(worst, np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
  assert worst < 2e-4, worst


@pytest.mark.parametrize("old_hw,new_hw", [((8, 16), (16, 24)), ((5, 6), (20, 48)),
                                           ((12, 10), (12, 40)), ((32, 16), (48, 30))])
def test_pi_resize_keeps_tokens_when_upsampling_rectangular(old_hw, new_hw):
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(*old_hw, 2, 3)).astype(np.float32)
  patch = rng.normal(size=(*old_hw, 2)).astype(np.float32)
  big_patch = np.stack([_tf_resize_2d(patch[..., c], new_hw) for c in range(2)], -1)
  new_kernel = resize.pi_resize_patchemb(jnp.asarray(kernel), new_hw)
  np.testing.assert_allclose(_token(big_patch, np.asarray(new_kernel)),
                             _token(patch, kernel), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("old_hw,new_hw", [((32, 32), (8, 8)), ((16, 16), (10, 10)),
                                           ((12, 8), (5, 6)), ((8, 8), (6, 6))])
def test_separable_form_equals_dense_pinv(old_hw, new_hw):
  rng = np.random.default_rng(2)
  kernel = rng.normal(size=(*old_hw, 3, 2)).astype(np.float32)
  dense = np.linalg.pinv(_dense_resize_matrix(old_hw, new_hw).T)
  expected = np.einsum("nk,kco->nco", dense, kernel.reshape(-1, 3, 2)).reshape(
      *new_hw, 3, 2)
  got = resize.pi_resize_patchemb(kernel, new_hw)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_downsampling_is_the_least_squares_optimum():
  # For x ~ N(0, I) the expected squared token error E||<x,w> - <Bx,w'>||^2 equals
  # ||w - B^T w'||^2, minimised by w' = pinv(B^T) w. Check optimality directly.
  rng = np.random.default_rng(3)
  old, new = (16, 16), (10, 10)
  mat = np.kron(resize.resize_matrix(16, 10), resize.resize_matrix(16, 10))  # B
  w = rng.normal(size=(256,))
  w_pi = np.asarray(resize.pi_resize_patchemb(w.reshape(*old, 1, 1).astype(np.float32),
                                              new)).reshape(-1)
  err = lambda v: np.sum((w - mat.T @ v) ** 2)
  lstsq = np.linalg.lstsq(mat.T, w, rcond=None)[0]
  np.testing.assert_allclose(err(w_pi), err(lstsq), rtol=1e-4)
  for _ in range(5):  # Any perturbation is worse.
    assert err(w_pi + 1e-2 * rng.normal(size=w_pi.shape)) > err(w_pi)
  # Empirically, with random patches, PI-resize beats plain bilinear resizing.
  x = rng.normal(size=(2000, 256))
  tokens = x @ w
  pi_err = np.mean((tokens - (x @ mat.T) @ w_pi) ** 2)
  bil = np.asarray(resize.resize_patchemb(w.reshape(*old, 1, 1).astype(np.float32), new,
                                          "bilinear")).reshape(-1)
  assert pi_err < np.mean((tokens - (x @ mat.T) @ bil) ** 2)


def test_same_size_returns_input_and_works_under_jit_with_gradient():
  kernel = jnp.ones((32, 32, 3, 4))
  assert resize.pi_resize_patchemb(kernel, (32, 32)) is kernel

  def loss(k):
    return jnp.sum(jax.jit(resize.pi_resize_patchemb, static_argnums=1)(k, (8, 8)) ** 2)

  grad = jax.grad(loss)(jax.random.normal(jax.random.PRNGKey(0), (32, 32, 3, 4)))
  assert grad.shape == (32, 32, 3, 4)
  assert float(jnp.abs(grad).sum()) > 0


def test_area_heuristic_keeps_token_scale_roughly():
  # 2x upsampling: plain bilinear makes tokens ~4x larger; area rescaling undoes it.
  rng = np.random.default_rng(4)
  kernel = rng.normal(size=(8, 8, 1, 1)).astype(np.float32)
  smooth = np.ones((8, 8, 1), np.float32)
  big = np.ones((16, 16, 1), np.float32)
  ref = _token(smooth, kernel)
  bil = _token(big, np.asarray(resize.resize_patchemb(kernel, 16, "bilinear")))
  area = _token(big, np.asarray(resize.resize_patchemb(kernel, 16, "area")))
  np.testing.assert_allclose(bil, 4 * ref, rtol=1e-4)
  np.testing.assert_allclose(area, ref, rtol=1e-4)
  norm = np.asarray(resize.resize_patchemb(kernel, 16, "norm"))
  np.testing.assert_allclose(np.linalg.norm(norm), np.linalg.norm(kernel), rtol=1e-5)
  with pytest.raises(ValueError, match="unknown patch-embedding resize method 'cubic'"):
    resize.resize_patchemb(kernel, 16, "cubic")


@pytest.mark.parametrize("old", [1, 3, 7, 16])
def test_linear_resize_matrix_is_jax_image_resize(old):
  """The host-side weights equal the operator's (antialiased when shrinking)."""
  for new in (1, 2, 5, 7, 15, 30, 48):
    expected = jax.image.resize(jnp.eye(old, dtype=jnp.float32), (new, old), "linear")
    np.testing.assert_allclose(resize._linear_resize_matrix(old, new), expected,  # pylint: disable=protected-access
                               atol=1e-6, err_msg=f"{old} -> {new}")


def test_resample_posemb_matches_jax_image_resize_linear():
  pe = jax.random.normal(jax.random.PRNGKey(0), (1, 49, 8))
  for new in [(5, 5), (6, 6), (30, 30), (4, 9)]:
    expected = jax.image.resize(pe.reshape(1, 7, 7, 8), (1, *new, 8), "linear")
    got = resize.resample_posemb(pe, new)
    np.testing.assert_allclose(got, expected.reshape(1, -1, 8), atol=1e-6)
  assert resize.resample_posemb(pe, (7, 7)) is pe
  # At jax.image.resize's precision on every backend (TPU's default would be bf16).
  assert "HIGHEST" in str(jax.make_jaxpr(lambda p: resize.resample_posemb(p, (5, 5)))(pe))
  rect = jax.random.normal(jax.random.PRNGKey(1), (1, 12, 4))
  assert resize.resample_posemb(rect, (6, 8), old_hw=(3, 4)).shape == (1, 48, 4)
  with pytest.raises(ValueError, match="12 tokens is not a square grid"):
    resize.resample_posemb(rect, (6, 6))


def test_resize_posemb_for_load_is_scipy_zoom_order1():
  import scipy.ndimage
  pe = np.random.default_rng(0).normal(size=(1, 28 * 28, 4)).astype(np.float32)
  got = resize.resize_posemb_for_load(pe, (7, 7))
  expected = scipy.ndimage.zoom(pe.reshape(28, 28, 4), (0.25, 0.25, 1), order=1)
  np.testing.assert_allclose(got, expected.reshape(1, 49, 4), atol=1e-6)
