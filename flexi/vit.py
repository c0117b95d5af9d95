"""FlexiViT: a ViT whose patch size (token grid) is chosen at every call.

The model stores ONE patch-embedding kernel (default 32x32) and ONE position-embedding
grid (default 7x7); each call PI-resizes the kernel to the requested patch size and
resizes the position embedding to the token grid. Parameter names and shapes are
big_vision's (`models/proj/flexi/vit.py` and `models/vit.py`), so released `.npz`
checkpoints load unchanged. With `patch_size=(8, 8)` and `posemb_size=(28, 28)` on
224px input nothing is resized: it is a plain ViT-B/8 (the FunMatch teacher).
"""
import functools
from typing import Any, Callable, Optional, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexi import fused_ops, native_attention, resize
from flexi.attention import (attention_fn, auto_attention, blocked_attention,  # noqa: F401
                             xla_attention)

_VARIANTS = {  # name: (width, depth, mlp_dim, num_heads); Table 2 of arXiv:2106.04560.
    "mu": (32, 1, 128, 2),  # Tiny test variant (not in big_vision).
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}


def decode_variant(variant: Optional[str]) -> dict:
  """"B" or "B/8" -> dict(width, depth, mlp_dim, num_heads[, patch_size])."""
  if variant is None:
    return {}
  name, _, patch = variant.partition("/")
  if name not in _VARIANTS:
    raise ValueError(f"unknown ViT variant {variant!r}; known: {', '.join(_VARIANTS)}")
  width, depth, mlp_dim, heads = _VARIANTS[name]
  out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)
  if patch:
    out["patch_size"] = (int(patch), int(patch))
  return out


def _pair(x):
  return (int(x), int(x)) if np.isscalar(x) else tuple(int(v) for v in x)


def patch_size_for(image_hw, seqhw):
  """Patch size that turns an image of `image_hw` into a `seqhw` token grid."""
  image_hw, seqhw = _pair(image_hw), _pair(seqhw)
  if image_hw[0] % seqhw[0] or image_hw[1] % seqhw[1]:
    raise ValueError(f"token grid {seqhw} does not tile image size {image_hw}")
  return (image_hw[0] // seqhw[0], image_hw[1] // seqhw[1])


def posemb_sincos_2d(h, w, width, temperature=10_000., dtype=jnp.float32):
  """MoCo-v3 style fixed 2-D sin-cos embedding, (1, h*w, width)."""
  if width % 4:
    raise ValueError(f"sincos2d position embedding needs width % 4 == 0, got {width}")
  y, x = np.mgrid[:h, :w]
  omega = np.arange(width // 4) / (width // 4 - 1)
  omega = 1. / (temperature ** omega)
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe, dtype)[None]


class Patchify(nn.Module):
  """Patch embedding with a stored kernel that is PI-resized to the patch size used.

  Implemented as reshape + matmul (identical to a VALID strided conv) because the
  patches do not overlap; this is faster than `conv_general_dilated` on every backend
  we measured (see benchmarks/).
  """
  patch_size: Sequence[int] = (32, 32)
  width: int = 768
  dtype: Any = None  # Compute dtype (params stay float32).

  @nn.compact
  def __call__(self, image, patch_size):
    c = image.shape[-1]
    kernel = self.param("kernel", nn.initializers.normal(stddev=1 / np.sqrt(self.width)),
                        (*self.patch_size, c, self.width), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.width,), jnp.float32)
    kernel = resize.pi_resize_patchemb(kernel, patch_size)
    ph, pw = patch_size
    patches = einops.rearrange(image, "n (h ph) (w pw) c -> n h w (ph pw c)", ph=ph, pw=pw)
    dtype = self.dtype or patches.dtype
    flat_kernel = jnp.reshape(kernel, (ph * pw * c, self.width))
    out = jnp.einsum("nhwk,kd->nhwd", patches.astype(dtype), flat_kernel.astype(dtype))
    return out + bias.astype(dtype)


GELUS = ("tanh", "erf")

_policies = jax.checkpoint_policies
DEFAULT_REMAT_POLICY = "nothing_saveable"  # big_vision's: recompute the whole block.
# What a rematerialised block (`remat=True`) keeps from its forward pass; the rest is
# recomputed in the backward pass. big_vision's names (attributes of
# jax.checkpoint_policies; "nothing_saveable" is its default), plus
# "dots_and_attention_saveable": the projections' and MLP's matmul outputs and the
# attention core's output and log-sum-exp ("native"/"blocked"), so only LayerNorm,
# GELU and the adds are recomputed. With scan=True on CPU it keeps ~38% fewer
# temporaries than scan without remat, at about the same step time; "nothing_saveable"
# keeps ~82% fewer but recomputes the whole block (docs/benchmarks.md).
REMAT_POLICIES = {
    "nothing_saveable": _policies.nothing_saveable,
    "everything_saveable": _policies.everything_saveable,
    "dots_saveable": _policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": _policies.dots_with_no_batch_dims_saveable,
    "dots_and_attention_saveable": _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable,
        _policies.save_only_these_names(native_attention.RESIDUALS_NAME)),
}


def remat_policy(name):
  """The jax.checkpoint policy called `name` (see REMAT_POLICIES)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {name!r}; choose one of {sorted(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]


def check_remat_options(cfg):
  """A model config's `remat_policy` is known and has `remat=True` to act on."""
  policy = cfg.get("remat_policy", DEFAULT_REMAT_POLICY)
  remat_policy(policy)
  if policy != DEFAULT_REMAT_POLICY and not cfg.get("remat"):
    raise ValueError(f"remat_policy={policy!r} has no effect without remat=True")


class MlpBlock(nn.Module):
  """Transformer feed-forward block (big_vision init).

  gelu="tanh" is big_vision's (flax's default, approximate) GELU, what every JAX-trained
  checkpoint used; "erf" is the exact one that PyTorch's nn.GELU computes, for weights
  trained in timm/DeiT (they differ by up to ~5e-4 per activation).
  """
  mlp_dim: Optional[int] = None
  dropout: float = 0.0
  dtype: Any = None
  gelu: str = "tanh"
  activation = staticmethod(fused_ops.gelu)  # = nn.gelu; reference.py uses flax's.

  @nn.compact
  def __call__(self, x, deterministic=True):
    inits = dict(kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6), dtype=self.dtype)
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim or 4 * d, **inits)(x)
    if self.gelu == "tanh":
      x = self.activation(x)
    elif self.gelu == "erf":
      x = nn.gelu(x, approximate=False)
    else:
      raise ValueError(f"unknown gelu {self.gelu!r}; choose one of {GELUS}")
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    return nn.Dense(d, **inits)(x)


class MatmulDenseGeneral(nn.Module):
  """`nn.DenseGeneral`'s params and init (kernel `shape`, bias over its output dims),
  applied as one 2-D matmul over the flattened dims: the same numbers, but XLA:CPU
  needs no transposed copies of 3-D kernels and activations for the gradients (a Ti
  program: 40% fewer layout copies, 12-15% faster compiles and loads; docs/benchmarks.md).
  """
  shape: Sequence[int]  # Kernel shape, contracted (input) dims first.
  n_in: int  # How many leading kernel dims contract with the input's trailing dims.
  dtype: Any = None
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    shape = tuple(self.shape)
    k_in, k_out = int(np.prod(shape[:self.n_in])), int(np.prod(shape[self.n_in:]))
    # Drawn as flax draws DenseGeneral's: on the flattened shape, then reshaped.
    kernel = self.param("kernel", lambda rng, s: self.kernel_init(rng, (k_in, k_out)).reshape(s),
                        shape)
    bias = self.param("bias", lambda rng, s: self.bias_init(rng, (k_out,)).reshape(s),
                      shape[self.n_in:])
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    lead = x.shape[:x.ndim - self.n_in]
    y = x.reshape(-1, k_in) @ kernel.reshape(k_in, k_out) + bias.reshape(k_out)
    return y.reshape(*lead, *shape[self.n_in:])


class MultiHeadAttention(nn.Module):
  """Self-attention with `nn.MultiHeadDotProductAttention`'s params, names and init
  (query/key/value/out), so big_vision checkpoints load; projections as 2-D matmuls."""
  num_heads: int
  dtype: Any = None
  attention: str = "flax"  # See flexi.attention.

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
    heads = (self.num_heads, d // self.num_heads)
    rows = x.reshape(-1, d)  # Once: the three projections then share one saved input.
    q, k, v = (MatmulDenseGeneral((d, *heads), 1, dtype=self.dtype, name=name)(rows)
               .reshape(*x.shape[:-1], *heads) for name in ("query", "key", "value"))
    out = attention_fn(self.attention)(q, k, v, dtype=self.dtype)
    return MatmulDenseGeneral((*heads, d), 2, dtype=self.dtype, name="out")(out)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""
  mlp_dim: Optional[int] = None
  num_heads: int = 12
  dropout: float = 0.0
  dtype: Any = None
  attention: str = "flax"
  gelu: str = "tanh"
  scan_carry: bool = False  # Return (x, None), the carry/output pair nn.scan wants.
  # = nn.LayerNorm, MlpBlock with nn.gelu and nn.MultiHeadDotProductAttention, with
  # cheaper passes (fused_ops, MatmulDenseGeneral); benchmarks/reference.py swaps in flax's.
  norm_cls = fused_ops.LayerNorm
  mlp_cls = MlpBlock
  attention_cls = MultiHeadAttention

  @nn.compact
  def __call__(self, x, deterministic=True):
    y = self.norm_cls(dtype=self.dtype)(x)
    y = self.attention_cls(num_heads=self.num_heads, dtype=self.dtype,
                           attention=self.attention, name="MultiHeadDotProductAttention_0")(y)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = x + y
    y = self.norm_cls(dtype=self.dtype)(x)
    y = self.mlp_cls(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype=self.dtype,
                     gelu=self.gelu, name="MlpBlock_0")(y, deterministic)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = x + y
    return (x, None) if self.scan_carry else x


class Encoder(nn.Module):
  """Stack of blocks named `encoderblock_{i}` plus `encoder_norm`, as big_vision.

  Unrolled (default), the blocks are traced once and called `depth` times
  (`share_block_trace`), and XLA shares their kernels: a 12-block program compiles
  about as fast as one block. With `scan=True` the blocks are one `nn.scan` (params
  stacked on a leading depth axis under `encoderblock`): smaller programs, so a
  restart loads them ~5x faster and remat really lowers memory, but on CPU the
  stacked residuals cost 0-12% step time (docs/benchmarks.md); with
  `remat=True, remat_policy="dots_and_attention_saveable"` fewer are stacked: ~38%
  fewer temporaries than scan alone, at about its step time. `scan_to_layers` /
  `layers_to_scan` convert between the two layouts; checkpoints are always saved
  with per-layer names.
  """
  depth: int
  mlp_dim: Optional[int] = None
  num_heads: int = 12
  dropout: float = 0.0
  remat: bool = False
  remat_policy: str = DEFAULT_REMAT_POLICY  # What remat keeps: see REMAT_POLICIES.
  scan: bool = False
  dtype: Any = None
  attention: str = "flax"
  gelu: str = "tanh"

  # nn.jit: the identical blocks share one trace (and its AD and lowering) instead of
  # tracing `depth` times: 4x faster lowering. XLA inlines the calls, so the compiled
  # program is the same (profiler op names then say encoderblock_0 for every block).
  # Init runs the plain loop, so params equal flax's per-layer RNG streams; dropout
  # masks come from nn.jit's own per-layer streams (independent, but not flax's).
  # benchmarks/reference.py swaps in big_vision's plain loop.
  share_block_trace = staticmethod(functools.partial(nn.jit, static_argnums=(2,)))
  block_cls = Encoder1DBlock

  @nn.compact
  def __call__(self, x, deterministic=True):
    kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
              dtype=self.dtype, attention=self.attention, gelu=self.gelu)
    block_cls = self.block_cls
    if self.remat:  # Recompute activations in the backward pass: less peak memory.
      block_cls = nn.remat(block_cls, static_argnums=(2,), prevent_cse=not self.scan,
                           policy=remat_policy(self.remat_policy))
    if self.scan:
      stack = nn.scan(block_cls, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=nn.broadcast, length=self.depth)
      x, _ = stack(scan_carry=True, name="encoderblock", **kw)(x, deterministic)
    else:
      if not self.is_initializing():  # (Init keeps flax's per-layer param RNG streams.)
        block_cls = self.share_block_trace(block_cls)
      for i in range(self.depth):
        x = block_cls(name=f"encoderblock_{i}", **kw)(x, deterministic)
        # Each block's output, collected only when "intermediates" is mutable
        # (representation analyses: evaluators/representations.py).
        self.sow("intermediates", "blocks", x)
    return self.block_cls.norm_cls(name="encoder_norm", dtype=self.dtype)(x)


class MAPHead(nn.Module):
  """Multihead attention pooling with a learned probe."""
  mlp_dim: Optional[int] = None
  num_heads: int = 12
  gelu: str = "tanh"

  @nn.compact
  def __call__(self, x):
    n, _, d = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), x.dtype)
    probe = jnp.tile(probe, [n, 1, 1])
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform())(probe, x)
    y = nn.LayerNorm()(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim, gelu=self.gelu)(y)
    return x[:, 0]


class _Model(nn.Module):
  """FlexiViT classifier (see module docstring)."""
  num_classes: Optional[int]
  patch_size: Sequence[int] = (32, 32)
  posemb_size: Sequence[int] = (7, 7)
  width: int = 768
  depth: int = 12
  mlp_dim: Optional[int] = None
  num_heads: int = 12
  posemb: str = "learn"
  pool_type: str = "gap"
  head_zeroinit: bool = True
  dropout: float = 0.0
  # Rematerialise each block in the backward pass. On XLA:CPU this lowers peak memory
  # only together with scan=True (the unrolled recomputation gets hoisted); measured
  # in docs/benchmarks.md.
  remat: bool = False
  remat_policy: str = DEFAULT_REMAT_POLICY  # What remat keeps (REMAT_POLICIES).
  scan: bool = False  # nn.scan over blocks (fast restarts, remat that works; see Encoder).
  dtype: Optional[str] = None  # Compute dtype, e.g. "bfloat16"; params stay float32.
  attention: str = "flax"  # "flax" (big_vision's), "xla", "blocked" or "auto" (fastest).
  gelu: str = "tanh"  # big_vision's; "erf" for weights trained in PyTorch (see MlpBlock).

  # The stem module; benchmarks/reference.py swaps in big_vision's conv formulation.
  embedding_cls = Patchify
  encoder_cls = Encoder
  posemb_resize = staticmethod(resize.resample_posemb)  # (posemb, new_hw, old_hw=)
  add_posemb = staticmethod(fused_ops.add_to_each_example)  # x + pe; reference: jnp.add.

  def resolve_patch_size(self, image_hw, patch_size=None, seqhw=None):
    """The patch size of a call: given directly, from a token grid, or the stored one."""
    if patch_size is not None and seqhw is not None:
      raise ValueError(f"pass patch_size or seqhw, not both (got {patch_size}, {seqhw})")
    if seqhw is not None:
      return patch_size_for(image_hw, seqhw)
    patch = _pair(patch_size) if patch_size is not None else _pair(self.patch_size)
    if image_hw[0] % patch[0] or image_hw[1] % patch[1]:
      raise ValueError(f"patch size {patch} does not tile image size {tuple(image_hw)}")
    return patch

  def _posemb(self, grid_hw, width):
    if self.posemb == "learn":
      pe = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(width)),
                      (1, int(np.prod(self.posemb_size)), width), jnp.float32)
    elif self.posemb == "sincos2d":
      pe = posemb_sincos_2d(*self.posemb_size, width)
    else:
      raise ValueError(f"unknown posemb {self.posemb!r}; choose 'learn' or 'sincos2d'")
    return self.posemb_resize(pe, grid_hw, old_hw=self.posemb_size)

  @nn.compact
  def __call__(self, image, *, patch_size=None, seqhw=None, train=False):
    out = {}
    if patch_size is None and seqhw is None and self.is_initializing():
      # Param shapes do not depend on the grid: init at the stored patch size on the
      # largest tiled crop, so `model.init(rng, images_240px)` works like big_vision.
      ph, pw = _pair(self.patch_size)
      image = image[:, :max(ph, image.shape[1] // ph * ph), :max(pw, image.shape[2] // pw * pw)]
    patch = self.resolve_patch_size(image.shape[1:3], patch_size, seqhw)
    dtype = jnp.dtype(self.dtype) if self.dtype else None
    x = out["stem"] = self.embedding_cls(_pair(self.patch_size), self.width, dtype=dtype,
                                         name="embedding")(image, patch)
    n, h, w, c = x.shape
    x = jnp.reshape(x, (n, h * w, c))
    # Position embedding is added BEFORE the [cls] token is prepended (big_vision).
    x = out["with_posemb"] = self.add_posemb(x, self._posemb((h, w), c).astype(x.dtype))
    if self.pool_type == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), [n, 1, 1]), x], axis=1)
    x = nn.Dropout(rate=self.dropout)(x, not train)
    x = self.encoder_cls(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout=self.dropout, remat=self.remat, remat_policy=self.remat_policy,
        scan=self.scan, dtype=dtype,
        attention=self.attention, gelu=self.gelu, name="Transformer")(x, not train)
    x = encoded = out["encoded"] = x.astype(jnp.float32)  # Pooling and head in float32.
    if self.pool_type == "map":
      x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim, gelu=self.gelu)(x)
    elif self.pool_type == "gap":
      x = jnp.mean(x, axis=1)
    elif self.pool_type == "tok":
      x, encoded = x[:, 0], encoded[:, 1:]
    else:
      raise ValueError(f"unknown pool_type {self.pool_type!r}; choose 'tok', 'gap' or 'map'")
    out["head_input"] = out["pre_logits"] = x
    x_2d = out["pre_logits_2d"] = jnp.reshape(encoded, (n, h, w, -1))
    if self.num_classes:
      kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
      head = nn.Dense(self.num_classes, name="head", **kw)
      out["logits_2d"] = head(x_2d)
      x = out["logits"] = head(x)
    return x, out


def apply_with_blocks(model, variables, image, **kwargs):
  """`model.apply` that also returns every encoder block's output, as out["blocks"]
  (a tuple of [n, tokens, width]; empty for scan=True models). Inside a jit, outputs
  nobody reads cost nothing."""
  (logits, out), state = model.apply(variables, image, mutable=["intermediates"], **kwargs)
  blocks = state.get("intermediates", {}).get("Transformer", {}).get("blocks", ())
  return logits, {**out, "blocks": tuple(blocks)}


_FIELDS = {"patch_size", "posemb_size", "width", "depth", "mlp_dim", "num_heads", "posemb",
           "pool_type", "head_zeroinit", "dropout", "remat", "remat_policy", "scan", "dtype",
           "attention", "gelu"}


def Model(num_classes=None, *, variant=None, **kw):  # pylint: disable=invalid-name
  """big_vision-style factory: `variant` ("B", "B/8", ...) then `kw` overrides."""
  unknown = set(kw) - _FIELDS
  if unknown:
    raise ValueError(f"unknown ViT model option(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
  cfg = {**decode_variant(variant), **kw}
  for key in ("patch_size", "posemb_size"):
    if key in cfg:
      cfg[key] = _pair(cfg[key])
  attention_fn(cfg.get("attention", "flax"))  # Fail early on a bad name.
  if cfg.get("gelu", "tanh") not in GELUS:
    raise ValueError(f"unknown gelu {cfg['gelu']!r}; choose one of {GELUS}")
  check_remat_options(cfg)
  if cfg.get("dtype") is not None:
    try:
      jnp.dtype(cfg["dtype"])
    except TypeError:
      raise ValueError(f"unknown ViT dtype {cfg['dtype']!r}; e.g. 'bfloat16'") from None
  return _Model(num_classes, **cfg)


# --- Scanned <-> per-layer parameter layouts. -------------------------------------
# `scan=True` stores blocks as `Transformer/encoderblock/...` with a leading depth
# axis; big_vision checkpoints name them `Transformer/encoderblock_{i}/...`. These
# convert anywhere in a tree (also nested, e.g. a two-tower's `img/Transformer`).

_SCANNED = "encoderblock"


def _is_map(x):
  return hasattr(x, "items") and hasattr(x, "keys")


def _layer_keys(node):
  keys = [k for k in node if k.startswith(_SCANNED + "_") and k[len(_SCANNED) + 1:].isdigit()]
  return sorted(keys, key=lambda k: int(k[len(_SCANNED) + 1:]))


def is_scanned(params) -> bool:
  """True if any encoder in `params` is in the scanned (stacked) layout."""
  if not _is_map(params):
    return False
  return _SCANNED in params or any(is_scanned(v) for v in params.values())


def scan_to_layers(params):
  """Scanned layout -> big_vision per-layer names (no-op for per-layer trees)."""
  if not _is_map(params):
    return params
  out = {}
  for key, value in params.items():
    if key == _SCANNED and _is_map(value):
      if _layer_keys(params):
        raise ValueError("params have both 'encoderblock' and 'encoderblock_{i}' entries")
      depth = {x.shape[0] for x in jax.tree.leaves(value)}
      if len(depth) != 1:
        raise ValueError(f"scanned encoderblock leaves disagree on depth: {sorted(depth)}")
      for i in range(depth.pop()):
        out[f"{_SCANNED}_{i}"] = jax.tree.map(lambda x, i=i: x[i], dict(value))
    else:
      out[key] = scan_to_layers(value)
  return out


def layers_to_scan(params):
  """big_vision per-layer names -> scanned layout (no-op for scanned trees)."""
  if not _is_map(params):
    return params
  layers = _layer_keys(params)
  if layers and [int(k[len(_SCANNED) + 1:]) for k in layers] != list(range(len(layers))):
    raise ValueError(f"encoder blocks are not numbered 0..{len(layers) - 1}: {layers}")
  out = {k: layers_to_scan(v) for k, v in params.items() if k not in layers}
  if layers:
    blocks = [params[k] for k in layers]
    xp = np if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(blocks)) else jnp
    out[_SCANNED] = jax.tree.map(lambda *xs: xp.stack(xs), *[dict(b) for b in blocks])
  return out


def match_layout(params, like):
  """Converts `params` to the layout (scanned or per-layer) of `like`."""
  return layers_to_scan(params) if is_scanned(like) else scan_to_layers(params)
