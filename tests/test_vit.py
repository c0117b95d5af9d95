"""The flexible ViT: big_vision param names, forward at every patch size, errors."""
import contextlib
import io
import re

import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from flexi import checkpoint, resize, vit

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=2)

# big_vision's models/proj/flexi/vit.py tree for this config (names and shapes).
GOLDEN_TOK = {
    "cls": (1, 1, 32),
    "embedding/bias": (32,),
    "embedding/kernel": (32, 32, 3, 32),
    "head/bias": (10,),
    "head/kernel": (32, 10),
    "pos_embedding": (1, 49, 32),
    "Transformer/encoder_norm/bias": (32,),
    "Transformer/encoder_norm/scale": (32,),
}
for _i in range(2):
  _b = f"Transformer/encoderblock_{_i}/"
  GOLDEN_TOK.update({
      _b + "LayerNorm_0/bias": (32,), _b + "LayerNorm_0/scale": (32,),
      _b + "LayerNorm_1/bias": (32,), _b + "LayerNorm_1/scale": (32,),
      _b + "MlpBlock_0/Dense_0/kernel": (32, 64), _b + "MlpBlock_0/Dense_0/bias": (64,),
      _b + "MlpBlock_0/Dense_1/kernel": (64, 32), _b + "MlpBlock_0/Dense_1/bias": (32,),
      **{_b + f"MultiHeadDotProductAttention_0/{n}/kernel": (32, 2, 16)
         for n in ("query", "key", "value")},
      **{_b + f"MultiHeadDotProductAttention_0/{n}/bias": (2, 16)
         for n in ("query", "key", "value")},
      _b + "MultiHeadDotProductAttention_0/out/kernel": (2, 16, 32),
      _b + "MultiHeadDotProductAttention_0/out/bias": (32,),
  })


def _shapes(params):
  return {k: tuple(v.shape) for k, v in checkpoint.flatten(params).items()}


@pytest.fixture(scope="module")
def tok_model():
  model = vit.Model(10, pool_type="tok", **TINY)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 240, 240, 3)))["params"]
  # Zero-init head gives zero logits; randomise it so outputs are informative.
  params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), (32, 10))
  return model, params


def test_golden_param_names_tok(tok_model):
  assert _shapes(tok_model[1]) == GOLDEN_TOK


def test_golden_param_names_map_pool():
  model = vit.Model(10, pool_type="map", **TINY)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
  names = set(_shapes(params))
  expected_map = {"MAPHead_0/probe", "MAPHead_0/LayerNorm_0/scale",
                  "MAPHead_0/MlpBlock_0/Dense_0/kernel",
                  "MAPHead_0/MultiHeadDotProductAttention_0/query/kernel"}
  assert expected_map <= names
  assert "cls" not in names


def test_forward_at_every_patch_size(tok_model):
  model, params = tok_model
  images = jax.random.normal(jax.random.PRNGKey(2), (2, 240, 240, 3))
  apply = jax.jit(model.apply, static_argnames=("patch_size", "seqhw"))
  prev = None
  for p in (8, 10, 12, 15, 16, 20, 24, 30, 40, 48):
    logits, out = apply({"params": params}, images, patch_size=p)
    grid = 240 // p
    assert logits.shape == (2, 10)
    assert out["encoded"].shape == (2, grid * grid + 1, 32)
    assert out["logits_2d"].shape == (2, grid, grid, 10)
    assert out["pre_logits"].shape == (2, 32)
    assert np.all(np.isfinite(logits))
    if prev is not None:
      assert not np.allclose(prev, logits)  # The patch size really changes the model.
    prev = logits
  # seqhw is the same call expressed as a token grid.
  by_grid, _ = apply({"params": params}, images, seqhw=15)
  by_patch, _ = apply({"params": params}, images, patch_size=16)
  np.testing.assert_allclose(by_grid, by_patch, rtol=1e-6)


def test_embedding_equals_strided_conv_with_pi_resized_kernel(tok_model):
  """Reference formulation: conv_general_dilated on the PI-resized kernel."""
  model, params = tok_model
  images = jax.random.normal(jax.random.PRNGKey(3), (2, 240, 240, 3))
  _, out = model.apply({"params": params}, images, patch_size=(16, 24))
  kernel = resize.pi_resize_patchemb(params["embedding"]["kernel"], (16, 24))
  conv = jax.lax.conv_general_dilated(images, kernel, (16, 24), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(out["stem"], conv + params["embedding"]["bias"],
                             rtol=1e-4, atol=1e-4)
  # The posemb is added before [cls] is prepended, resized with jax.image.resize.
  pe = jax.image.resize(params["pos_embedding"].reshape(1, 7, 7, 32), (1, 15, 10, 32),
                        "linear").reshape(1, 150, 32)
  np.testing.assert_allclose(out["with_posemb"], out["stem"].reshape(2, 150, 32) + pe,
                             rtol=1e-5, atol=1e-5)


def test_plain_vit_teacher_resizes_nothing():
  model = vit.Model(5, variant="mu/8", posemb_size=(8, 8), pool_type="gap")
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
  assert params["embedding"]["kernel"].shape == (8, 8, 3, 32)
  assert params["pos_embedding"].shape == (1, 64, 32)
  images = jax.random.normal(jax.random.PRNGKey(1), (1, 64, 64, 3))
  _, out = model.apply({"params": params}, images)
  manual = jax.lax.conv_general_dilated(images, params["embedding"]["kernel"], (8, 8),
                                        "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  manual = manual.reshape(1, 64, 32) + params["embedding"]["bias"] + params["pos_embedding"]
  np.testing.assert_allclose(out["with_posemb"], manual, rtol=1e-5, atol=1e-5)


def test_variants():
  assert vit.decode_variant("B/8") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12,
                                           patch_size=(8, 8))
  assert vit.decode_variant("So400m")["width"] == 1152
  with pytest.raises(ValueError, match="unknown ViT variant 'X'"):
    vit.decode_variant("X")
  with pytest.raises(ValueError, match=r"unknown ViT model option\(s\) \['widht'\]"):
    vit.Model(10, widht=3)


def test_bad_patch_sizes_are_clear_errors(tok_model):
  model, params = tok_model
  images = jnp.zeros((1, 240, 240, 3))
  with pytest.raises(ValueError, match=r"patch size \(7, 7\) does not tile image size "
                                       r"\(240, 240\)"):
    model.apply({"params": params}, images, patch_size=7)
  with pytest.raises(ValueError, match=r"patch size \(16, 7\) does not tile image size "
                                       r"\(240, 240\)"):
    model.apply({"params": params}, images, patch_size=(16, 7))
  with pytest.raises(ValueError, match=r"token grid \(7, 7\) does not tile image size"):
    model.apply({"params": params}, images, seqhw=7)
  with pytest.raises(ValueError, match="not both"):
    model.apply({"params": params}, images, seqhw=15, patch_size=16)


def test_gradient_reaches_stored_kernel(tok_model):
  model, params = tok_model
  images = jax.random.normal(jax.random.PRNGKey(4), (2, 240, 240, 3))

  def loss(p):
    return jnp.sum(model.apply({"params": p}, images, patch_size=12)[0] ** 2)

  grads = jax.grad(loss)(params)
  assert grads["embedding"]["kernel"].shape == (32, 32, 3, 32)
  assert float(jnp.abs(grads["embedding"]["kernel"]).sum()) > 0
  assert float(jnp.abs(grads["pos_embedding"]).sum()) > 0


class _PlainLoopEncoder(vit.Encoder):
  share_block_trace = staticmethod(lambda block_cls: block_cls)


class _PlainLoopModel(vit._Model):  # pylint: disable=protected-access
  encoder_cls = _PlainLoopEncoder


def test_blocks_share_one_trace_with_plain_loop_numerics():
  cfg = dict(width=32, depth=3, mlp_dim=64, num_heads=2, pool_type="tok",
             head_zeroinit=False, patch_size=(8, 8))
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  shared, plain = vit.Model(10, **cfg), _PlainLoopModel(10, **cfg)
  params = shared.init(jax.random.PRNGKey(0), images)["params"]
  # Init runs the plain loop: the same params as flax's per-layer RNG streams.
  jax.tree.map(np.testing.assert_array_equal, params,
               plain.init(jax.random.PRNGKey(0), images)["params"])
  np.testing.assert_allclose(shared.apply({"params": params}, images)[0],
                             plain.apply({"params": params}, images)[0], rtol=1e-5, atol=1e-5)
  # One trace: every block is a call of the same jaxpr, not `depth` separate traces.
  jaxpr = jax.make_jaxpr(lambda p: shared.apply({"params": p}, images))(params).jaxpr
  calls = [e.params["jaxpr"] for e in jaxpr.eqns if e.primitive.name in ("pjit", "jit")]
  assert len(calls) == cfg["depth"] and all(c is calls[0] for c in calls), calls


def test_fused_layer_norm_and_gelu_equal_flax_values_and_gradients():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from flexi import fused_ops  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 37, 48)) * 3 + 1
  w = jax.random.normal(jax.random.PRNGKey(3), x.shape)
  ln_flax, ln_ours = nn.LayerNorm(), fused_ops.LayerNorm()
  v = ln_flax.init(jax.random.PRNGKey(1), x)
  v = jax.tree.map(lambda a: a + jax.random.normal(jax.random.PRNGKey(2), a.shape), v)
  assert jax.tree.structure(v) == jax.tree.structure(ln_ours.init(jax.random.PRNGKey(1), x))
  for ours, ref in ((lambda v, x: ln_ours.apply(v, x), lambda v, x: ln_flax.apply(v, x)),
                    (lambda v, x: fused_ops.gelu(x), lambda v, x: nn.gelu(x))):
    np.testing.assert_allclose(ours(v, x), ref(v, x), rtol=1e-5, atol=1e-5)
    g_ours = jax.jit(jax.grad(lambda v, x: (ours(v, x) * w).sum(), (0, 1)))(v, x)
    g_ref = jax.grad(lambda v, x: (ref(v, x) * w).sum(), (0, 1))(v, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max())), g_ours, g_ref)
  bf16 = x.astype(jnp.bfloat16)
  assert (ln_ours.apply(v, bf16).dtype == ln_flax.apply(v, bf16).dtype
          and fused_ops.LayerNorm(dtype=jnp.bfloat16).apply(v, x).dtype == jnp.bfloat16)


def test_posemb_add_gradient_is_autodiffs_batch_sum():
  from flexi import fused_ops  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 13, 24))
  pe = jax.random.normal(jax.random.PRNGKey(1), (1, 13, 24))
  w = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)):
    xs, pes = x.astype(dtype), pe.astype(dtype)
    np.testing.assert_array_equal(fused_ops.add_to_each_example(xs, pes), xs + pes)
    loss = lambda add: lambda x, pe: (add(x, pe).astype(jnp.float32) * w).sum()  # noqa: E731
    gx, gpe = jax.jit(jax.grad(loss(fused_ops.add_to_each_example), (0, 1)))(xs, pes)
    rx, rpe = jax.grad(loss(jnp.add), (0, 1))(xs, pes)
    assert gx.dtype == rx.dtype == dtype and gpe.dtype == rpe.dtype == dtype
    assert gpe.shape == pe.shape
    np.testing.assert_array_equal(gx, rx)
    np.testing.assert_allclose(np.asarray(gpe, np.float32), np.asarray(rpe, np.float32),
                               rtol=tol, atol=tol * float(np.abs(w.sum(0)).max()))
    # Not a dead gradient: the sum over the 5 examples, not one of them.
    assert float(np.abs(np.asarray(gpe, np.float32) - np.asarray(w[:1], np.float32)).max()) > 1
  with pytest.raises(ValueError, match=r"\(1, \.\.\.\).*got \(13, 24\)"):
    fused_ops.add_to_each_example(x, pe[0])


def test_matmul_attention_equals_flax_module_params_values_and_gradients():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 17, 48))
  w = jax.random.normal(jax.random.PRNGKey(3), x.shape)
  flax_mha = nn.MultiHeadDotProductAttention(num_heads=3,
                                             kernel_init=nn.initializers.xavier_uniform())
  ours_init = vit.MultiHeadAttention(num_heads=3).init(jax.random.PRNGKey(1), x)
  v = flax_mha.init(jax.random.PRNGKey(1), x, x)
  # Same names, shapes and init draws as flax's (so checkpoints and seeds carry over).
  jax.tree.map(np.testing.assert_array_equal, ours_init, v)
  v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(2), a.shape), v)
  for name in ("flax", "blocked"):
    ours = vit.MultiHeadAttention(num_heads=3, attention=name)
    ref = nn.MultiHeadDotProductAttention(num_heads=3, attention_fn=vit.attention_fn(name))
    np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x, x), rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(lambda v, x: (ours.apply(v, x) * w).sum(), (0, 1))(v, x)
    g_ref = jax.grad(lambda v, x: (ref.apply(v, x, x) * w).sum(), (0, 1))(v, x)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g_ref))  # The key bias's
    jax.tree.map(lambda a, b: np.testing.assert_allclose(  # gradient is 0 up to rounding.
        a, b, rtol=1e-5, atol=1e-6 * scale), g_ours, g_ref)
  assert vit.MultiHeadAttention(num_heads=3, dtype=jnp.bfloat16).apply(v, x).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="width 48 is not divisible by num_heads=5"):
    vit.MultiHeadAttention(num_heads=5).init(jax.random.PRNGKey(1), x)


def _saved_activation_floats_per_token(module, variables, x):
  """Floats the backward pass keeps per token (what nn.scan stacks per layer), read
  from jax.ad_checkpoint.print_saved_residuals; weights and scalars, whose sizes do not
  scale with the tokens, are left out."""
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    ad_checkpoint.print_saved_residuals(lambda v, x: module.apply(v, x).sum(), variables, x)
  tokens = x.shape[0] * x.shape[1]
  floats = 0
  for line in text.getvalue().splitlines():
    shape = re.match(r"f32\[([\d,]*)\]", line)
    assert shape, line
    size = int(np.prod([int(s) for s in shape.group(1).split(",") if s]))
    if size % tokens == 0:  # Activations scale with tokens; weights here do not.
      floats += size
  return floats / tokens


def test_block_saves_each_activation_once():
  """Activations one block keeps for its backward, per token (width d, MLP 4d): its
  input, the LN1 output (once, shared by the q/k/v projections), the attention output
  (the out projection's input), the residual sum and the LN2 output (5d), the MLP
  hidden before and after GELU (8d), LayerNorm statistics (4); blocked attention adds
  q, k, v and its output heads-first (4d) and one log-sum-exp per head, flax's adds
  k, v, the scaled q (3d) and the probabilities twice (2 * heads * tokens) plus two
  per-row values per head. nn.scan stacks exactly these per layer."""
  d, heads, n = 48, 3, 65
  x = jax.random.normal(jax.random.PRNGKey(0), (2, n, d))
  expected = {"blocked": 17 * d + 4 + heads,
              "flax": 16 * d + 4 + 2 * heads * n + 2 * heads}
  for attention, floats in expected.items():
    block = vit.Encoder1DBlock(mlp_dim=4 * d, num_heads=heads, attention=attention)
    variables = block.init(jax.random.PRNGKey(1), x)
    assert _saved_activation_floats_per_token(block, variables, x) == floats, attention


def test_exact_gelu_option_for_pytorch_trained_weights():
  """gelu="erf" is PyTorch's exact GELU, 0.5 x (1 + erf(x / sqrt 2)), in every MLP
  (blocks and the MAP head); the default stays big_vision's tanh approximation."""
  import math  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8)) * 2
  block = vit.MlpBlock(mlp_dim=16, gelu="erf")
  v = block.init(jax.random.PRNGKey(1), x)
  p = jax.tree.map(np.asarray, v["params"])
  h = np.asarray(x, np.float64) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  exact = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
  want = exact @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
  np.testing.assert_allclose(block.apply(v, x), want, rtol=1e-5, atol=1e-6)
  tanh_out = vit.MlpBlock(mlp_dim=16).apply(v, x)
  assert np.abs(tanh_out - want).max() > 1e-4  # The two GELUs really differ here.

  image = jnp.zeros((1, 64, 64, 3))
  for gelu, has, lacks in (("erf", "erfc", "tanh"), ("tanh", "tanh", "erfc")):
    model = vit.Model(10, pool_type="map", gelu=gelu, **TINY)
    params = model.init(jax.random.PRNGKey(0), image)["params"]
    jaxpr = str(jax.make_jaxpr(lambda p, m=model: m.apply({"params": p}, image,
                                                          patch_size=16))(params))
    ops = re.findall(r"= (\w+) ", jaxpr)
    assert has in ops and lacks not in ops, gelu  # Blocks and MAP head alike.
  with pytest.raises(ValueError, match="unknown gelu 'exact'"):
    vit.Model(10, gelu="exact", **TINY).init(jax.random.PRNGKey(0), image)
