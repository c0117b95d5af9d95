"""Attention implementations with flax's `attention_fn` signature (same math).

`flexi.vit` picks one by name (`Model(attention=...)`); none of them owns params, so
big_vision parameter names are unchanged whichever is used.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from flexi import native_attention as native


def xla_attention(query, key, value, mask=None, dtype=None):
  """`jax.nn.dot_product_attention` with flax's `attention_fn` signature.

  Same math as flax's default (softmax(q k^T / sqrt(d)) v); lets XLA pick a fused
  kernel (cuDNN flash attention on GPU). Params are untouched, so names are kept.
  """
  if dtype is not None:
    query, key, value = (t.astype(dtype) for t in (query, key, value))
  return jax.nn.dot_product_attention(query, key, value, mask=mask)


_BLOCK_BYTES = 3 << 20  # Scores per lax.map step; 2-3 MB measured best here (2 MB L2 per core).
_MAX_SLICES = 8  # More slices per step do not help (8-48 at 226 tokens: within noise).


def _slices_per_block(n_q, n_k, itemsize, total):
  """How many (example, head) score slices fit in one _BLOCK_BYTES block (1.._MAX_SLICES)."""
  return int(max(1, min(_MAX_SLICES, total, _BLOCK_BYTES // max(1, n_q * n_k * itemsize))))


def _slice_forward(q, k, v):
  """One (example, head) slice: the output and the rows' log-sum-exp for the backward."""
  scores = q @ k.T
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  unnormalised = jnp.exp(scores - row_max)
  row_sum = jnp.sum(unnormalised, axis=-1, keepdims=True)
  return (unnormalised @ v) / row_sum, (row_max + jnp.log(row_sum))[:, 0]


def _slice_backward(q, k, v, out, lse, d_out):
  """Gradients of one slice from recomputed probabilities (flash attention's backward).

  With P = softmax(q k^T): dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)),
  dQ = dS K, dK = dS^T Q; rowsum(dO * O) equals rowsum(P * dP) at N*d cost, not N^2.
  """
  probs = jnp.exp(q @ k.T - lse[:, None])
  d_scores = probs * (d_out @ v.T - jnp.sum(d_out * out, axis=-1, keepdims=True))
  return d_scores @ k, d_scores.T @ q, probs.T @ d_out


def _sliced_attention(per_block):
  """softmax(q k^T) v on (slices, N, d) inputs, `per_block` slices per loop step.

  The custom VJP keeps only the output and one log-sum-exp per row; the backward
  recomputes each block's probabilities while they are in cache instead of reading
  all of them back from memory.
  """
  @jax.custom_vjp
  def attend(q, k, v):
    return forward(q, k, v)[0]

  def forward(q, k, v):
    out, lse = jax.lax.map(lambda x: _slice_forward(*x), (q, k, v), batch_size=per_block)
    out, lse = checkpoint_name((out, lse), native.RESIDUALS_NAME)
    return out, (q, k, v, out, lse)

  def backward(residuals, d_out):
    return jax.lax.map(lambda x: _slice_backward(*x), (*residuals, d_out),
                       batch_size=per_block)

  attend.defvjp(forward, backward)
  return attend


def blocked_attention(query, key, value, mask=None, dtype=None):
  """Attention a few (example, head) slices at a time, with a flash-style backward.

  Same math as flax's default. On CPU the full (batch, heads, N, N) score tensor
  does not fit in cache (78 MB for Ti/8 at batch 8) and the step becomes memory
  bound; a block of slices that fits in L2 does, and recomputing it in the backward
  pass (instead of storing all probabilities) is ~2x faster than flax's at 900
  tokens and uses less memory. Serialises small matmuls, so prefer "flax"/"xla" on
  GPU/TPU ("auto" does that).
  """
  if mask is not None:
    return nn.dot_product_attention(query, key, value, mask=mask, dtype=dtype)
  if dtype is not None:
    query, key, value = (t.astype(dtype) for t in (query, key, value))
  b, n, h, d = query.shape
  query = query / jnp.sqrt(d).astype(query.dtype)

  def heads_first(t):
    return jnp.transpose(t, (0, 2, 1, 3)).reshape(b * h, t.shape[1], d)

  per_block = _slices_per_block(n, key.shape[1], query.dtype.itemsize, b * h)
  out = _sliced_attention(per_block)(heads_first(query), heads_first(key), heads_first(value))
  return jnp.transpose(out.reshape(b, h, n, d), (0, 2, 1, 3))


_BLOCKED_MIN_SCORES = 192 * 192  # Below this many scores per head flax's is faster (145
# tokens: 4.1 vs 5.0 ms per Ti layer, fwd+bwd; 226 tokens: 10.5 vs 8-9 ms).


def _native_fits(query, mask, dtype):
  """The fused CPU kernel serves this call: unmasked float32 on one CPU device, and it
  builds here. On a mesh it runs per shard (flexi/native_attention.py), but jaxlib
  0.10.2 cannot serialise such programs, so neither JAX's persistent cache nor the
  executable cache would keep them: "auto" leaves meshes to XLA's attention."""
  compute = jnp.dtype(dtype or query.dtype)
  return (mask is None and compute == jnp.float32 and query.ndim == 4
          and jax.device_count() == 1 and native.available())


def auto_attention(query, key, value, mask=None, dtype=None):
  """The fastest of the above for the backend and length, chosen at trace time.

  CPU, measured per Ti/S size (fwd+bwd, batch 8, 26-901 tokens): the fused kernel is
  1.2-3.4x faster than the best XLA formulation at every length."""
  if jax.default_backend() != "cpu":
    fn = xla_attention
  elif _native_fits(query, mask, dtype):
    fn = native.native_attention
  elif query.shape[1] * key.shape[1] >= _BLOCKED_MIN_SCORES:
    fn = blocked_attention
  else:
    fn = nn.dot_product_attention
  return fn(query, key, value, mask=mask, dtype=dtype)


_ATTENTION = {"flax": nn.dot_product_attention, "xla": xla_attention,
              "blocked": blocked_attention, "native": native.native_attention,
              "auto": auto_attention}


def attention_fn(name):
  """'flax' (default, big_vision's), 'xla', 'blocked', 'native' (fused CPU kernel) or
  'auto'; all the same math.

  A callable with flax's `attention_fn` signature is returned as it is (benchmarks
  swap in stand-ins; params never depend on it)."""
  if callable(name):
    return name
  if name not in _ATTENTION:
    raise ValueError(f"unknown attention {name!r}; choose one of {sorted(_ATTENTION)}")
  return _ATTENTION[name]
