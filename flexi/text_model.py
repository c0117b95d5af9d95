"""A small text Transformer for the text tower of flexi-LiT.

Parameter names follow big_vision's `models/proj/image_text/text_transformer.py`
(`Embed_0/embedding`, `pos_embedding`, `Encoder_0/encoderblock_{i}/...`,
`Encoder_0/encoder_norm`, `head`), so its text towers load unchanged. The encoder
blocks are `flexi.vit.Encoder` (pre-LN, bidirectional attention, as big_vision).

    model = text_model.Model(num_classes=768, variant="B", vocab_size=32_000)
    emb, out = model.apply({"params": p}, tokens)   # tokens: int32 [batch, max_len]
"""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from flexi import fused_ops, vit

POOL_TYPES = ("last", "first", "gap", "mean", "max", "gmp", "map")


class _Model(nn.Module):
  """Token ids -> (embedding, outputs). `num_classes` is the projection size."""
  num_classes: Optional[int]
  width: int = 512
  depth: int = 12
  mlp_dim: Optional[int] = None
  num_heads: int = 8
  dropout: float = 0.0
  vocab_size: int = 32_000
  pool_type: str = "last"  # "last" expects sticky-eos tokens padded with eos (big_vision).
  remat: bool = False
  remat_policy: str = vit.DEFAULT_REMAT_POLICY  # What remat keeps (vit.REMAT_POLICIES).

  @nn.compact
  def __call__(self, text, *, train=False):
    if text.ndim != 2:
      raise ValueError(f"text tower expects int token ids [batch, len], got shape {text.shape}")
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"unknown text pool_type {self.pool_type!r}; known: {POOL_TYPES}")
    out = {}
    embed = nn.Embed(num_embeddings=self.vocab_size, features=self.width)
    x = out["embedded"] = embed(text)
    _, length, d = x.shape
    posemb = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(d)),
                        (1, length, d), jnp.float32)
    x = fused_ops.add_to_each_example(x, posemb.astype(x.dtype))  # See vit._Model.
    x = out["transformed"] = vit.Encoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout=self.dropout, remat=self.remat, remat_policy=self.remat_policy)(x, not train)
    if self.pool_type == "last":
      x = x[:, -1]
    elif self.pool_type == "first":
      x = x[:, 0]
    elif self.pool_type in ("gap", "mean"):
      x = jnp.mean(x, axis=1)
    elif self.pool_type in ("max", "gmp"):
      x = jnp.max(x, axis=1)
    else:
      x = vit.MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim)(x)
    out["pre_logits"] = x
    if self.num_classes:
      x = out["logits"] = nn.Dense(self.num_classes, name="head")(x)
    return x, out


_FIELDS = {"width", "depth", "mlp_dim", "num_heads", "dropout", "vocab_size", "pool_type",
           "remat", "remat_policy"}


def Model(num_classes=None, *, variant=None, **kw):  # pylint: disable=invalid-name
  """big_vision-style factory: `variant` ("mu", "S", "B", ...) then `kw` overrides."""
  unknown = set(kw) - _FIELDS
  if unknown:
    raise ValueError(f"unknown text model option(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
  cfg = {**vit.decode_variant(variant), **kw}
  cfg.pop("patch_size", None)
  vit.check_remat_options(cfg)
  return _Model(num_classes, **cfg)
