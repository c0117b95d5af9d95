"""Checkpoint conversion: npz <-> workdir, fixed-patch export, timm import."""
import importlib.util
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from flexi import checkpoint, vit
from flexi.tools import convert, timm

KW = dict(width=32, depth=1, mlp_dim=64, num_heads=2, head_zeroinit=False)


@pytest.fixture(scope="module")
def flexi_model():
  model = vit.Model(5, pool_type="tok", patch_size=(32, 32), posemb_size=(7, 7), **KW)
  params = model.init(jax.random.PRNGKey(1), np.zeros((1, 32, 32, 3), np.float32))["params"]
  params = jax.tree.map(np.asarray, params)
  rng = np.random.default_rng(0)  # Non-trivial cls/posemb so the checks can fail.
  params["cls"] = rng.normal(size=params["cls"].shape).astype(np.float32)
  params["pos_embedding"] = rng.normal(size=params["pos_embedding"].shape).astype(np.float32)
  return model, params


def _flat(tree):
  return checkpoint.flatten(tree)


def test_npz_workdir_npz_identical(flexi_model, tmp_path):
  _, params = flexi_model
  src, out = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
  checkpoint.save_params(params, src)
  assert convert.main(["to-workdir", src, str(tmp_path / "run"), "--step", "7"]) == 0
  assert convert.main(["to-npz", str(tmp_path / "run"), out]) == 0
  a, b = np.load(src), np.load(out)
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  # Refuses to overwrite an existing step, with a one-line error.
  assert convert.main(["to-workdir", src, str(tmp_path / "run"), "--step", "7"]) == 2


def test_to_workdir_with_config_is_resumable_layout(flexi_model, tmp_path):
  from flexi import ckpt_manager  # pylint: disable=import-outside-toplevel
  _, params = flexi_model
  cfg = tmp_path / "cfg.py"
  cfg.write_text("def get_config():\n  return dict(optax_name='scale_by_adam', lr=1e-3)\n")
  convert.npz_to_workdir(params, str(tmp_path / "run"), 3, str(cfg))
  mngr = ckpt_manager.CheckpointManager(str(tmp_path / "run"))
  assert mngr.latest_step() == 3
  mngr.close()


@pytest.mark.parametrize("patch,image", [((8, 8), (32, 32)), ((16, 8), (32, 32)),
                                         ((48, 48), (96, 96))])
def test_fixed_patch_export_same_logits(flexi_model, patch, image):
  model, params = flexi_model
  x = np.random.default_rng(2).normal(size=(2, *image, 3)).astype(np.float32)
  want = model.apply({"params": params}, x, patch_size=patch)[0]
  fixed_params, grid = convert.export_fixed(params, patch, image)
  assert fixed_params["embedding"]["kernel"].shape[:2] == patch
  assert fixed_params["pos_embedding"].shape[1] == grid[0] * grid[1]
  plain = vit.Model(5, pool_type="tok", patch_size=patch, posemb_size=grid, **KW)
  got = plain.apply({"params": fixed_params}, x)[0]  # Nothing resized at run time.
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  assert np.abs(np.asarray(want)).max() > 1e-2


def test_fixed_export_cli_and_errors(flexi_model, tmp_path, capsys):
  _, params = flexi_model
  src = str(tmp_path / "a.npz")
  checkpoint.save_params(params, src)
  assert convert.main(["fixed", src, str(tmp_path / "f.npz"), "--patch", "16x8",
                       "--image_size", "32"]) == 0
  assert checkpoint.load_params(str(tmp_path / "f.npz"))["embedding"]["kernel"].shape[:2] == (
      16, 8)
  assert "posemb_size=(2, 4)" in capsys.readouterr().out
  assert convert.main(["fixed", src, str(tmp_path / "g.npz"), "--patch", "5",
                       "--image_size", "32"]) == 2
  assert "does not tile" in capsys.readouterr().err
  assert convert.main(["fixed", src, str(tmp_path / "g.npz"), "--patch", "a",
                       "--image_size", "32"]) == 2
  assert "--patch must look like" in capsys.readouterr().err
  assert convert.main(["to-npz", str(tmp_path / "nothing.npz"), str(tmp_path / "x.npz")]) == 2
  assert "not found" in capsys.readouterr().err
  assert convert.main(["to-npz", src + ":cls", str(tmp_path / "x.npz")]) == 2
  assert "a.npz:cls names a single array, not a parameter tree" in capsys.readouterr().err
  assert convert.main(["to-npz", src, str(tmp_path)]) == 2  # The output is a folder.
  assert f"{tmp_path} is a directory; give the .npz file" in capsys.readouterr().err
  assert convert.main(["timm", src, str(tmp_path / "t.npz")]) == 2
  assert "the timm command reads .safetensors" in capsys.readouterr().err


def test_fixed_export_of_a_sincos_model_same_logits(tmp_path, capsys):
  """sincos2d: the flexible model resizes its 7x7 table, so the export carries that
  resized table as a learned posemb (a plain sincos model at the grid would differ)."""
  model = vit.Model(5, pool_type="tok", patch_size=(32, 32), posemb="sincos2d", **KW)
  params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(1),
                                               np.zeros((1, 32, 32, 3), np.float32))["params"])
  x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
  want = model.apply({"params": params}, x, patch_size=(8, 8))[0]
  src = str(tmp_path / "s.npz")
  checkpoint.save_params(params, src)
  assert convert.main(["fixed", src, str(tmp_path / "f.npz"), "--patch", "8",
                       "--image_size", "32"]) == 0
  assert "posemb_size=(4, 4), posemb=learn)" in capsys.readouterr().out
  plain = vit.Model(5, pool_type="tok", patch_size=(8, 8), posemb_size=(4, 4), **KW)
  got = plain.apply({"params": checkpoint.load_params(str(tmp_path / "f.npz"))}, x)[0]
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  at_grid = vit.Model(5, pool_type="tok", patch_size=(32, 32), posemb="sincos2d",
                      posemb_size=(4, 4), **KW)  # sincos computed at the 4x4 grid.
  naive = at_grid.apply({"params": params}, x, patch_size=(8, 8))[0]
  assert np.abs(np.asarray(naive) - np.asarray(want)).max() > 1e-3  # Why the table is kept.


# --- timm import ------------------------------------------------------------------

D, HEADS, MLP, P, GRID, C, NCLS = 32, 2, 64, 8, 4, 3, 5


def _timm_state_dict(rng, embed_class=True):
  """A tiny timm ViT state_dict in torch layouts (OIHW conv, (out, in) linears)."""
  r = lambda *s: rng.normal(size=s).astype(np.float32) * 0.3
  tokens = GRID * GRID + (1 if embed_class else 0)
  sd = {"patch_embed.proj.weight": r(D, C, P, P), "patch_embed.proj.bias": r(D),
        "cls_token": r(1, 1, D), "pos_embed": r(1, tokens, D),
        "norm.weight": 1 + r(D), "norm.bias": r(D), "head.weight": r(NCLS, D),
        "head.bias": r(NCLS)}
  b = "blocks.0."
  sd.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D),
             b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D),
             b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
             b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D),
             b + "mlp.fc1.weight": r(MLP, D), b + "mlp.fc1.bias": r(MLP),
             b + "mlp.fc2.weight": r(D, MLP), b + "mlp.fc2.bias": r(D)})
  return sd


def _np_timm_forward(sd, x_nhwc, embed_class=True):
  """timm's ViT forward in NumPy, torch conventions (gelu tanh-approximated as flax)."""
  ln = lambda x, w, b: (x - x.mean(-1, keepdims=True)) / np.sqrt(
      x.var(-1, keepdims=True) + 1e-6) * w + b
  lin = lambda x, name: x @ sd[name + ".weight"].T + sd[name + ".bias"]
  gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  n = x_nhwc.shape[0]
  x = x_nhwc.transpose(0, 3, 1, 2)  # NCHW, as torch.
  patches = x.reshape(n, C, GRID, P, GRID, P)
  tok = np.einsum("nchiwj,dcij->nhwd", patches, sd["patch_embed.proj.weight"])
  tok = tok.reshape(n, GRID * GRID, D) + sd["patch_embed.proj.bias"]
  cls = np.broadcast_to(sd["cls_token"], (n, 1, D))
  if embed_class:
    x = np.concatenate([cls, tok], 1) + sd["pos_embed"]
  else:
    x = np.concatenate([cls, tok + sd["pos_embed"]], 1)
  b = "blocks.0."
  y = ln(x, sd[b + "norm1.weight"], sd[b + "norm1.bias"])
  q, k, v = np.split(lin(y, b + "attn.qkv"), 3, axis=-1)
  split = lambda t: t.reshape(n, -1, HEADS, D // HEADS).transpose(0, 2, 1, 3)
  q, k, v = split(q), split(k), split(v)
  att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D // HEADS)
  att = np.exp(att - att.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  y = (att @ v).transpose(0, 2, 1, 3).reshape(n, -1, D)
  x = x + lin(y, b + "attn.proj")
  y = ln(x, sd[b + "norm2.weight"], sd[b + "norm2.bias"])
  x = x + lin(gelu(lin(y, b + "mlp.fc1")), b + "mlp.fc2")
  x = ln(x, sd["norm.weight"], sd["norm.bias"])
  return tok, lin(x[:, 0], "head")


@pytest.mark.parametrize("embed_class", [True, False])
def test_timm_safetensors_import_matches_numpy_reference(tmp_path, embed_class):
  sd = _timm_state_dict(np.random.default_rng(3), embed_class)
  path = str(tmp_path / "vit.safetensors")
  save_file(sd, path)
  params = convert.load_any(path)
  kw = timm.model_kwargs(params)
  assert kw == dict(patch_size=(P, P), width=D, depth=1, mlp_dim=MLP, num_heads=HEADS,
                    posemb_size=(GRID, GRID), pool_type="tok")
  model = vit.Model(NCLS, **kw)
  init = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
  want_shapes = {k: v.shape for k, v in _flat(init).items()}
  assert {k: v.shape for k, v in _flat(params).items()} == want_shapes
  x = np.random.default_rng(4).normal(size=(2, 32, 32, 3)).astype(np.float32)
  logits, out = model.apply({"params": params}, x)
  ref_tok, ref_logits = _np_timm_forward(sd, x.astype(np.float64), embed_class)
  np.testing.assert_allclose(np.asarray(out["stem"]).reshape(2, -1, D), ref_tok,
                             atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(logits, ref_logits, atol=2e-4, rtol=1e-4)


def test_timm_cli_and_bad_inputs(tmp_path, capsys):
  sd = _timm_state_dict(np.random.default_rng(5))
  save_file(sd, str(tmp_path / "m.safetensors"))
  assert convert.main(["timm", str(tmp_path / "m.safetensors"), str(tmp_path / "m.npz")]) == 0
  assert checkpoint.load_params(str(tmp_path / "m.npz"))["embedding"]["kernel"].shape == (
      P, P, C, D)
  with pytest.raises(ValueError, match="cannot infer the number of heads for width 33"):
    timm.timm_to_params({"patch_embed.proj.weight": np.zeros((33, 3, 8, 8), np.float32)})
  bad = dict(sd)
  del bad["blocks.0.mlp.fc1.bias"]
  save_file(bad, str(tmp_path / "bad.safetensors"))
  assert convert.main(["timm", str(tmp_path / "bad.safetensors"), str(tmp_path / "x.npz")]) == 2
  assert "lacks 'blocks.0.mlp.fc1.bias'" in capsys.readouterr().err
  (tmp_path / "junk.safetensors").write_bytes(b"not a file")
  assert convert.main(["timm", str(tmp_path / "junk.safetensors"), str(tmp_path / "y.npz")]) == 2
  assert "not a valid .safetensors" in capsys.readouterr().err
  save_file(dict(sd, **{"fc_norm.weight": np.ones(D, np.float32)}),
            str(tmp_path / "gap.safetensors"))
  assert convert.main(["timm", str(tmp_path / "gap.safetensors"), str(tmp_path / "z.npz")]) == 2
  assert "fc_norm" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch installed")
def test_timm_pth_needs_torch(tmp_path, capsys):
  (tmp_path / "m.pth").write_bytes(b"x")
  assert convert.main(["timm", str(tmp_path / "m.pth"), str(tmp_path / "m.npz")]) == 2
  assert "needs torch" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_timm_pth_matches_safetensors(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  sd = _timm_state_dict(np.random.default_rng(6))
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, str(tmp_path / "m.pth"))
  save_file(sd, str(tmp_path / "m.safetensors"))
  a = _flat(convert.load_any(str(tmp_path / "m.pth")))
  b = _flat(convert.load_any(str(tmp_path / "m.safetensors")))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# --- scripts/resize_comparison.py (paper Figure 4) ----------------------------------

def _load_script():
  path = os.path.join(os.path.dirname(__file__), "..", "scripts", "resize_comparison.py")
  spec = importlib.util.spec_from_file_location("resize_comparison", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_resize_comparison_pi_resize_exact_on_patchwise_upsampled_images(tmp_path,
                                                                          monkeypatch):
  from flexi import resize  # pylint: disable=import-outside-toplevel
  script = _load_script()
  model_kw = dict(pool_type="gap", patch_size=(8, 8), posemb_size=(4, 4), **KW)
  model = vit.Model(5, **model_kw)
  base = np.random.default_rng(7).normal(size=(24, 32, 32, 3)).astype(np.float32)
  params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(3), base[:1])["params"])
  labels = np.eye(5, dtype=np.float32)[np.asarray(model.apply({"params": params}, base)[0])
                                       .argmax(-1)]  # Base accuracy is exactly 1.

  def upsample_patchwise(images, p):
    # Each 8x8 patch resized on its own with tf.image.resize's bilinear matrix.
    m = resize.resize_matrix(8, p).astype(np.float32)
    patches = images.reshape(-1, 4, 8, 4, 8, 3)
    up = np.einsum("ia,jb,nhawbc->nhiwjc", m, m, patches)
    return up.reshape(len(images), 4 * p, 4 * p, 3)

  def fake_batches(data, res, num_classes, batch_size):
    del data, num_classes, batch_size
    yield upsample_patchwise(base, res // 4), labels, np.ones(len(base), bool)

  monkeypatch.setattr(script, "batches", fake_batches)
  out = script.compare(params, model_kw, 5, {}, base_patch=8, patches=[8, 16, 24], grid=4)
  for p in (8, 16, 24):
    assert out[p]["pi"] == 1.0  # Upsampling: every token is unchanged.
  assert out[8]["bilinear"] == 1.0
  for m in ("bilinear", "area", "norm"):  # The heuristics change the tokens.
    assert out[16][m] < 0.8 and out[24][m] < 0.8, m
  base_path = script.write_outputs(out, str(tmp_path), base_patch=8, grid=4, source="test")
  assert "| 16 (64px) | 100.0 |" in open(base_path + ".md").read()
  assert os.path.getsize(base_path + ".png") > 5_000
