"""FlexiViT: a ViT whose patch size (token grid) is chosen at every call.

The model stores ONE patch-embedding kernel (default 32x32) and ONE position-embedding
grid (default 7x7); each call PI-resizes the kernel to the requested patch size and
resizes the position embedding to the token grid. Parameter names and shapes are
big_vision's (`models/proj/flexi/vit.py` and `models/vit.py`), so released `.npz`
checkpoints load unchanged. With `patch_size=(8, 8)` and `posemb_size=(28, 28)` on
224px input nothing is resized: it is a plain ViT-B/8 (the FunMatch teacher).
"""
from typing import Optional, Sequence

import einops
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from flexi import resize

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

  @nn.compact
  def __call__(self, image, patch_size):
    c = image.shape[-1]
    kernel = self.param("kernel", nn.initializers.normal(stddev=1 / np.sqrt(self.width)),
                        (*self.patch_size, c, self.width), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.width,), jnp.float32)
    kernel = resize.pi_resize_patchemb(kernel, patch_size)
    ph, pw = patch_size
    patches = einops.rearrange(image, "n (h ph) (w pw) c -> n h w (ph pw c)", ph=ph, pw=pw)
    flat_kernel = jnp.reshape(kernel, (ph * pw * c, self.width))
    return jnp.einsum("nhwk,kd->nhwd", patches, flat_kernel.astype(patches.dtype)) + bias


class MlpBlock(nn.Module):
  """Transformer feed-forward block (big_vision init)."""
  mlp_dim: Optional[int] = None
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic=True):
    inits = dict(kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6))
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim or 4 * d, **inits)(x)
    x = nn.gelu(x)
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    return nn.Dense(d, **inits)(x)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""
  mlp_dim: Optional[int] = None
  num_heads: int = 12
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic=True):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(),
        deterministic=deterministic)(y, y)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = x + y
    y = nn.LayerNorm()(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout)(y, deterministic)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    return x + y


class Encoder(nn.Module):
  """Stack of blocks named `encoderblock_{i}` plus `encoder_norm`, as big_vision."""
  depth: int
  mlp_dim: Optional[int] = None
  num_heads: int = 12
  dropout: float = 0.0
  remat: bool = False

  @nn.compact
  def __call__(self, x, deterministic=True):
    block_cls = nn.remat(Encoder1DBlock, static_argnums=(2,)) if self.remat else Encoder1DBlock
    for i in range(self.depth):
      x = block_cls(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
                    name=f"encoderblock_{i}")(x, deterministic)
    return nn.LayerNorm(name="encoder_norm")(x)


class MAPHead(nn.Module):
  """Multihead attention pooling with a learned probe."""
  mlp_dim: Optional[int] = None
  num_heads: int = 12

  @nn.compact
  def __call__(self, x):
    n, _, d = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), x.dtype)
    probe = jnp.tile(probe, [n, 1, 1])
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform())(probe, x)
    y = nn.LayerNorm()(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim)(y)
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
  remat: bool = False

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
    return resize.resample_posemb(pe, grid_hw, old_hw=self.posemb_size)

  @nn.compact
  def __call__(self, image, *, patch_size=None, seqhw=None, train=False):
    out = {}
    if patch_size is None and seqhw is None and self.is_initializing():
      # Param shapes do not depend on the grid: init at the stored patch size on the
      # largest tiled crop, so `model.init(rng, images_240px)` works like big_vision.
      ph, pw = _pair(self.patch_size)
      image = image[:, :max(ph, image.shape[1] // ph * ph), :max(pw, image.shape[2] // pw * pw)]
    patch = self.resolve_patch_size(image.shape[1:3], patch_size, seqhw)
    x = out["stem"] = Patchify(_pair(self.patch_size), self.width, name="embedding")(
        image, patch)
    n, h, w, c = x.shape
    x = jnp.reshape(x, (n, h * w, c))
    # Position embedding is added BEFORE the [cls] token is prepended (big_vision).
    x = out["with_posemb"] = x + self._posemb((h, w), c).astype(x.dtype)
    if self.pool_type == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), [n, 1, 1]), x], axis=1)
    x = nn.Dropout(rate=self.dropout)(x, not train)
    x = out["encoded"] = Encoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout=self.dropout, remat=self.remat, name="Transformer")(x, not train)
    encoded = x
    if self.pool_type == "map":
      x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim)(x)
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


_FIELDS = {"patch_size", "posemb_size", "width", "depth", "mlp_dim", "num_heads", "posemb",
           "pool_type", "head_zeroinit", "dropout", "remat"}


def Model(num_classes=None, *, variant=None, **kw):  # pylint: disable=invalid-name
  """big_vision-style factory: `variant` ("B", "B/8", ...) then `kw` overrides."""
  unknown = set(kw) - _FIELDS
  if unknown:
    raise ValueError(f"unknown ViT model option(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
  cfg = {**decode_variant(variant), **kw}
  for key in ("patch_size", "posemb_size"):
    if key in cfg:
      cfg[key] = _pair(cfg[key])
  return _Model(num_classes, **cfg)
