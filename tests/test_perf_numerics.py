"""Speed options keep numerics: scan vs loop, attention implementations, remat, reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import reference
from flexi import checkpoint, vit

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=2, pool_type="tok")
RES = 48


def _randomise_head(params):
  params = jax.tree.map(lambda x: x, params)
  params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(7),
                                               params["head"]["kernel"].shape)
  return params


@pytest.fixture(scope="module")
def setup():
  model = vit.Model(10, **TINY)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, RES, RES, 3)))["params"]
  images = jax.random.normal(jax.random.PRNGKey(1), (2, RES, RES, 3))
  return _randomise_head(params), images


def _logits(params, images, patch=8, **kw):
  apply = jax.jit(vit.Model(10, **TINY, **kw).apply, static_argnames="patch_size")
  return apply({"params": params}, images, patch_size=patch)[0]


def test_scan_layout_round_trip_and_names(setup):
  params, _ = setup
  scanned = vit.layers_to_scan(params)
  assert vit.is_scanned(scanned) and not vit.is_scanned(params)
  flat = checkpoint.flatten(scanned)
  assert flat["Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"].shape == (2, 32, 64)
  assert not any("encoderblock_" in k for k in flat)
  # The scanned model's own init has exactly this tree.
  scan_init = jax.eval_shape(vit.Model(10, scan=True, **TINY).init,
                             jax.random.PRNGKey(0), jnp.zeros((1, RES, RES, 3)))["params"]
  assert ({k: v.shape for k, v in checkpoint.flatten(scan_init).items()}
          == {k: v.shape for k, v in flat.items()})
  back = vit.scan_to_layers(scanned)
  assert set(checkpoint.flatten(back)) == set(checkpoint.flatten(params))
  jax.tree.map(np.testing.assert_array_equal, back, params)
  assert vit.scan_to_layers(params) == params  # No-op on per-layer trees.
  # Nested trees (two towers) convert too; match_layout follows the target.
  nested = vit.match_layout({"img": params}, {"img": scanned})
  assert vit.is_scanned(nested["img"])


def test_scan_gives_same_logits(setup):
  params, images = setup
  for patch in (8, 16):
    want = _logits(params, images, patch)
    got = _logits(vit.layers_to_scan(params), images, patch, scan=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(want).max()) > 0.1  # Informative logits, not all zeros.


def test_scanned_checkpoint_saves_big_vision_names(setup, tmp_path):
  params, images = setup
  scanned = vit.layers_to_scan(params)
  path = str(tmp_path / "scan.npz")
  checkpoint.save_params(vit.scan_to_layers(scanned), path)
  with np.load(path) as data:
    assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel" in data
  loaded = vit.match_layout(checkpoint.load_params(path), scanned)
  np.testing.assert_allclose(_logits(loaded, images, scan=True), _logits(params, images),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["xla", "blocked", "native", "auto"])
def test_attention_impls_equal_default(setup, attention):
  params, images = setup
  np.testing.assert_allclose(_logits(params, images, attention=attention),
                             _logits(params, images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slices_per_block", [1, 4, 8])  # 4: 15 slices leave a remainder.
@pytest.mark.parametrize("n_q", [33, 2])  # Self-attention and a short query (MAP head).
def test_blocked_attention_equals_flax_with_gradients(monkeypatch, slices_per_block, n_q):
  """Forward and the custom (flash-style) backward against flax's autodiff, for q, k, v.

  Queries are scaled up so the softmax is peaked: the log-sum-exp must be stable.
  """
  from flexi import attention  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(attention, "_BLOCK_BYTES", slices_per_block * n_q * 33 * 4)
  assert attention._slices_per_block(n_q, 33, 4, 15) == slices_per_block  # pylint: disable=protected-access
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (5, n, 3, 8))
             for i, n in enumerate((n_q, 33, 33)))
  q = 6.0 * q
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  np.testing.assert_allclose(vit.blocked_attention(q, k, v), nn.dot_product_attention(q, k, v),
                             rtol=1e-5, atol=1e-6)
  weights = jax.random.normal(jax.random.PRNGKey(7), (5, n_q, 3, 8))
  loss = lambda f: lambda *qkv: jnp.sum(f(*qkv) * weights)  # noqa: E731
  ours = jax.grad(loss(vit.blocked_attention), argnums=(0, 1, 2))(q, k, v)
  flax_grads = jax.grad(loss(nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", ours, flax_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=f"d{name}")


def _grad_fn(images, **model_kw):
  model = vit.Model(10, **TINY, **model_kw)
  return jax.jit(jax.grad(lambda p: jnp.mean(jax.nn.log_softmax(model.apply(
      {"params": p}, images, patch_size=8, train=True)[0])[:, 0])))


def test_remat_same_gradients(setup):
  params, images = setup

  def grads(model_kw, p):
    return _grad_fn(images, **model_kw)(p)

  want = grads({}, params)
  # Remat and scan may reorder sums. atol is relative to the largest gradient: the key
  # bias's gradient is exactly zero in math (softmax ignores a per-query shift), so its
  # own scale is rounding noise.
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want))

  def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)
  jax.tree.map(close, grads({"remat": True}, params), want)
  for attention in ("flax", "native"):  # The fused kernel inside nn.scan + remat too.
    scanned = grads({"remat": True, "scan": True, "attention": attention},
                    vit.layers_to_scan(params))
    jax.tree.map(close, vit.scan_to_layers(scanned), want)
  # The policy that keeps matmul outputs and the attention's residuals, on both fused
  # attentions.
  for attention in ("native", "blocked"):
    scanned = grads({"remat": True, "remat_policy": "dots_and_attention_saveable",
                     "scan": True, "attention": attention}, vit.layers_to_scan(params))
    jax.tree.map(close, vit.scan_to_layers(scanned), want)


def test_remat_policy_decides_what_is_recomputed(setup):
  params, images = setup
  scanned = vit.layers_to_scan(params)

  def kernel_forwards(**kw):
    hlo = _grad_fn(images, scan=True, remat=True, attention="native", **kw).lower(
        scanned).compile().as_text()
    return hlo.count('custom_call_target="flexi_attention_forward"')
  # Full remat runs the attention kernel again in the backward loop; the policy that
  # saves its output and log-sum-exp does not (as without remat); a dots-only policy
  # does not save the kernel's outputs.
  assert kernel_forwards() == 2
  assert kernel_forwards(remat_policy="dots_and_attention_saveable") == 1
  assert kernel_forwards(remat_policy="dots_with_no_batch_dims_saveable") == 2
  with pytest.raises(ValueError, match="unknown remat_policy 'dots'"):
    vit.Model(10, **TINY, remat=True, remat_policy="dots")
  with pytest.raises(ValueError, match="'everything_saveable' has no effect without remat"):
    vit.Model(10, **TINY, remat_policy="everything_saveable")


def test_bf16_compute_keeps_fp32_params_and_is_close(setup):
  params, images = setup
  model = vit.Model(10, dtype="bfloat16", **TINY)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(
      jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]))
  got = jax.jit(model.apply, static_argnames="patch_size")(
      {"params": params}, images, patch_size=8)[0]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _logits(params, images), rtol=0.1, atol=0.1)


def test_reference_formulation_matches(setup):
  """benchmarks/reference.py (dense TF PI-resize + conv) computes the same model."""
  params, images = setup
  ref = jax.jit(reference.Model(10, **TINY).apply, static_argnames="patch_size")(
      {"params": params}, images, patch_size=(16, 12))[0]
  np.testing.assert_allclose(ref, _logits(params, images, (16, 12)), rtol=1e-4, atol=1e-4)


def test_bad_options_are_clear_errors(setup):
  params, _ = setup
  with pytest.raises(ValueError, match="unknown attention 'fast'"):
    vit.Model(10, attention="fast")
  with pytest.raises(ValueError, match="unknown ViT dtype 'bf17'"):
    vit.Model(10, dtype="bf17")
  bad = checkpoint.flatten(params)
  bad = {k.replace("encoderblock_1", "encoderblock_5"): v for k, v in bad.items()}
  with pytest.raises(ValueError, match=r"not numbered 0\.\.1"):
    vit.layers_to_scan(checkpoint.unflatten(bad))
  with pytest.raises(ValueError, match="has no 'scan' option"):
    reference.Model(10, scan=True)
