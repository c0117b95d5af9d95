"""LayerNorm, GELU and the position-embedding add with hand-written backward passes.

On a bandwidth-bound host these elementwise layers cost as much as a matmul: the
autodiff of flax's LayerNorm and of the tanh GELU reads and writes each (tokens x
width) activation several times and keeps extra residuals. Here each forward saves
only its input (plus two scalars per row for LayerNorm) and each backward recomputes
what it needs; an optimization barrier stops XLA from merging the recomputation
with the forward (which would store it again). Parameter names, initialisers and the
forward formulas are flax's (`nn.LayerNorm` with fast variance, `nn.gelu` with the
tanh approximation), so checkpoints and outputs are unchanged; tests/test_vit.py
compares values and gradients with flax's. The position-embedding add only changes how
its gradient is summed over the batch (`add_to_each_example`).
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_GELU_C = np.float32(np.sqrt(2.0 / np.pi))
_GELU_A = np.float32(0.044715)


def _gelu_tanh(x):
  return jnp.tanh(_GELU_C * (x + _GELU_A * x ** 3))


@jax.custom_vjp
def gelu(x):
  """tanh-approximate GELU, as `flax.linen.gelu(x, approximate=True)`."""
  return 0.5 * x * (1 + _gelu_tanh(x))


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, dy):
  x = jax.lax.optimization_barrier(x)  # Recompute here, do not store from the forward.
  t = _gelu_tanh(x)
  dt = (1 - t * t) * _GELU_C * (1 + 3 * _GELU_A * x * x)
  return (dy * (0.5 * (1 + t) + 0.5 * x * dt),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def _moments(x):
  """Per-row mean and variance in float32, var = E[x^2] - E[x]^2 (as flax)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.maximum(jnp.mean(x * x, -1, keepdims=True) - mean * mean, 0.0)
  return mean, var


def _normalised(x, mean, rstd):
  return (x.astype(jnp.float32) - mean) * rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps):
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  mean, var = _moments(x)
  rstd = jax.lax.rsqrt(var + eps)
  return _normalised(x, mean, rstd) * scale + bias, (x, mean, rstd, scale)


def _layer_norm_bwd(eps, res, dy):
  del eps
  x, mean, rstd, scale = jax.lax.optimization_barrier(res)
  xhat = _normalised(x, mean, rstd)
  g = dy * scale
  rows = tuple(range(x.ndim - 1))
  dx = rstd * (g - jnp.mean(g, -1, keepdims=True)
               - xhat * jnp.mean(g * xhat, -1, keepdims=True))
  return dx.astype(x.dtype), jnp.sum(dy * xhat, rows), jnp.sum(dy, rows)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """Drop-in for `nn.LayerNorm()` over the last axis (params `scale`, `bias`)."""
  epsilon: float = 1e-6
  dtype: Any = None  # Output dtype (default: as flax); statistics are float32.

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    y = _layer_norm(x, scale, bias, self.epsilon)  # float32
    return y.astype(self.dtype or jnp.result_type(x, jnp.float32))


@jax.custom_vjp
def add_to_each_example(x, shared):
  """x + shared, with `shared` (1, ...) broadcast over x's leading (batch) axis.

  Autodiff would sum the cotangent over the batch with a reduction over the outermost
  axis, which XLA:CPU (jaxlib 0.10.2) runs ~40x slower than the same sum as a dot
  with a ones vector: 6.7 ms of a FlexiViT-Ti/16 gradient program for a (8, 225, 192)
  sum, vs ~0.1 ms (docs/benchmarks.md). Same sum, so gradients equal autodiff's to
  float rounding.
  """
  return _add_to_each_fwd(x, shared)[0]


def _add_to_each_fwd(x, shared):
  if shared.ndim != x.ndim or shared.shape[0] != 1:
    raise ValueError(f"add_to_each_example: `shared` must be (1, ...) like x {x.shape} "
                     f"without its batch axis, got {shared.shape}")
  return x + shared, shared


def _add_to_each_bwd(shared, dy):
  ones = jnp.ones(dy.shape[:1], dy.dtype)
  total = jnp.tensordot(ones, dy, axes=1, preferred_element_type=jnp.float32)
  return dy, total[None].astype(shared.dtype)


add_to_each_example.defvjp(_add_to_each_fwd, _add_to_each_bwd)
