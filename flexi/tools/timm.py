"""Import a timm ViT / FlexiViT `state_dict` into the big_vision parameter tree.

timm layout (torch, OI / OIHW):        big_vision layout (HWIO / in-out):
  patch_embed.proj.weight (D,C,ph,pw)  embedding/kernel (ph,pw,C,D)
  pos_embed (1, [1+]N, D)              pos_embedding (1, N, D)  (cls position folded
  cls_token (1, 1, D)                  cls (1, 1, D)             into cls, as big_vision)
  blocks.i.norm1.{weight,bias}         Transformer/encoderblock_i/LayerNorm_0/{scale,bias}
  blocks.i.attn.qkv.{weight,bias}      .../MultiHeadDotProductAttention_0/{query,key,value}
  blocks.i.attn.proj.{weight,bias}     .../MultiHeadDotProductAttention_0/out
  blocks.i.norm2 / mlp.fc1 / mlp.fc2   .../LayerNorm_1, MlpBlock_0/Dense_0, Dense_1
  norm.{weight,bias}                   Transformer/encoder_norm/{scale,bias}
  head.{weight,bias}                   head/{kernel,bias}

timm computes PyTorch's exact (erf) GELU, this ViT big_vision's tanh approximation by
default. For weights that were trained in PyTorch (DeiT, timm-native ViTs) build the
model with `gelu="erf"`; JAX-trained ones (FlexiViT, AugReg) were trained with tanh.

.safetensors is read with `safetensors.numpy` (no torch); .pth needs torch and is
loaded with `weights_only=True` (no pickled code runs).
"""
import os
import re

import numpy as np

from flexi import vit


TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SUFFIXES = (".safetensors", *TORCH_SUFFIXES)  # The files read_state_dict reads.


def read_state_dict(path):
  """{name: float32 numpy array} from a .safetensors or .pth/.pt/.bin file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"timm checkpoint not found: {path}")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    try:
      sd = load_file(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path} is not a valid .safetensors file ({e})") from None
  elif path.endswith(TORCH_SUFFIXES):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ImportError(f"reading {path} needs torch (pip install torch), or convert it "
                        "to .safetensors") from None
    try:
      sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path}: torch.load(weights_only=True) refused it ({e}); "
                       "untrusted pickles are not loaded") from None
    sd = sd.get("state_dict", sd.get("model", sd)) if isinstance(sd, dict) else sd
    sd = {k: v.float().numpy() for k, v in sd.items() if hasattr(v, "numpy")}
  else:
    raise ValueError(f"unknown timm checkpoint type {path!r}: use .safetensors or .pth")
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def _num_heads(width, num_heads):
  if num_heads:
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads={num_heads}")
    return int(num_heads)
  heads = {w: h for w, _, _, h in vit._VARIANTS.values()}  # pylint: disable=protected-access
  if width not in heads:
    raise ValueError(f"cannot infer the number of heads for width {width}: pass num_heads")
  return heads[width]


def _square(n):
  side = int(round(np.sqrt(n)))
  return side if side * side == n else None


def _ln(sd, prefix):
  return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}


def _dense(sd, prefix):
  return {"kernel": sd[prefix + ".weight"].T, "bias": sd[prefix + ".bias"]}


def _attention(sd, prefix, heads):
  qkv_w, qkv_b = sd[prefix + ".qkv.weight"], sd[prefix + ".qkv.bias"]
  width = qkv_w.shape[1]
  out = {}
  for i, name in enumerate(("query", "key", "value")):
    w = qkv_w[i * width:(i + 1) * width]          # (D_out, D_in), rows = head-major.
    out[name] = {"kernel": w.T.reshape(width, heads, width // heads),
                 "bias": qkv_b[i * width:(i + 1) * width].reshape(heads, width // heads)}
  out["out"] = {"kernel": sd[prefix + ".proj.weight"].T.reshape(heads, width // heads, width),
                "bias": sd[prefix + ".proj.bias"]}
  return out


def timm_to_params(sd, num_heads=None):
  """timm state_dict -> nested big_vision params (see module docstring)."""
  sd = {re.sub(r"^(module\.|model\.)", "", k): v for k, v in sd.items()}
  if "patch_embed.proj.weight" not in sd:
    raise ValueError("not a timm ViT state_dict: no 'patch_embed.proj.weight' "
                     f"(keys start with {sorted(sd)[:5]})")
  width = sd["patch_embed.proj.weight"].shape[0]
  heads = _num_heads(width, num_heads)
  params = {"embedding": {"kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
                          "bias": sd["patch_embed.proj.bias"]}}
  pe = sd["pos_embed"]
  if "cls_token" in sd:
    params["cls"] = sd["cls_token"]
    if _square(pe.shape[1]) is None and _square(pe.shape[1] - 1) is not None:
      params["cls"] = params["cls"] + pe[:, :1]  # big_vision adds no posemb to [cls].
      pe = pe[:, 1:]
  params["pos_embedding"] = pe
  depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
  blocks = {}
  for i in range(depth):
    p = f"blocks.{i}."
    blocks[f"encoderblock_{i}"] = {
        "LayerNorm_0": _ln(sd, p + "norm1"),
        "MultiHeadDotProductAttention_0": _attention(sd, p + "attn", heads),
        "LayerNorm_1": _ln(sd, p + "norm2"),
        "MlpBlock_0": {"Dense_0": _dense(sd, p + "mlp.fc1"),
                       "Dense_1": _dense(sd, p + "mlp.fc2")}}
  blocks["encoder_norm"] = _ln(sd, "norm")
  params["Transformer"] = blocks
  if "head.weight" in sd:
    params["head"] = _dense(sd, "head")
  # fc_norm: timm's avg-pool models normalise AFTER pooling, big_vision before.
  unused = [k for k in sd if k.startswith(("attn_pool", "norm_pre", "reg_token", "fc_norm"))
            or ".ls1" in k or ".ls2" in k or ".q_norm" in k]
  if unused:
    raise ValueError(f"timm model features this codebase's ViT lacks: {unused[:4]}")
  return params


def model_kwargs(params):
  """flexi.vit.Model kwargs matching imported params (pool 'tok' if there is a cls)."""
  kernel, pe = params["embedding"]["kernel"], params["pos_embedding"]
  side = _square(pe.shape[1])
  blocks = params["Transformer"]
  mha = blocks["encoderblock_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
  return dict(patch_size=tuple(kernel.shape[:2]), width=int(kernel.shape[-1]),
              depth=sum(k.startswith("encoderblock_") for k in blocks),
              mlp_dim=int(blocks["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"].shape[1]),
              num_heads=int(mha.shape[1]), posemb_size=(side, side) if side else None,
              pool_type="tok" if "cls" in params else "gap")
