"""big_vision .npz files: round trip, subtrees, merging with resize, untrusted files."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexi import checkpoint, ckpt_manager, resize, vit

TINY = dict(width=32, depth=1, mlp_dim=64, num_heads=2, pool_type="tok")


def _init(model, res=64):
  return jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, res, res, 3)))["params"])


@pytest.fixture(scope="module")
def params():
  return _init(vit.Model(10, **TINY))


def test_save_load_round_trip_and_layout(params, tmp_path):
  path = str(tmp_path / "ckpt.npz")
  checkpoint.save_params(params, path)
  with np.load(path, allow_pickle=False) as data:
    assert "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel" in data.files
    assert "embedding/kernel" in data.files
  loaded = checkpoint.load_params(path)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_params_prefix_and_subtree(params, tmp_path):
  path = str(tmp_path / "two_towers.npz")
  flat = checkpoint.flatten({"params": {"img": params, "t": np.ones(())}})
  np.savez(path, **flat)
  img = checkpoint.load_params(path + ":img")
  np.testing.assert_array_equal(img["embedding"]["kernel"], params["embedding"]["kernel"])
  whole = checkpoint.load_params(path)
  assert set(whole) == {"img", "t"}
  with pytest.raises(KeyError, match="no parameters under 'txt/'"):
    checkpoint.load_params(path + ":txt")


def test_whole_train_states_and_single_arrays(params, tmp_path):
  """big_vision's load_params: `params/` of a saved train state, else `opt/target/`;
  `file.npz:t` names one array (two towers' temperature)."""
  for prefix in ("params", "opt/target"):
    path = str(tmp_path / f"{prefix.replace('/', '_')}.npz")
    flat = checkpoint.flatten({prefix: {"img": params, "t": np.full((1,), 2.0)}})
    flat["opt/state/mu/img/cls"] = np.zeros((1, 1, 32))  # Optimizer state: not params.
    np.savez(path, **flat)
    loaded = checkpoint.load_params(path)
    assert set(loaded) == {"img", "t"}
    jax.tree.map(np.testing.assert_array_equal, loaded["img"], params)
    np.testing.assert_array_equal(checkpoint.load_params(path + ":t"), [2.0])


def test_pre_linen_names_are_renumbered(params):
  """Original ViT / AugReg files (e.g. the i21k B/8 teacher) number a block's
  submodules across types; they load as flax's convert_pre_linen renames them."""
  old = {"LayerNorm_1": "LayerNorm_2", "MultiHeadDotProductAttention_0":
         "MultiHeadDotProductAttention_1", "MlpBlock_0": "MlpBlock_3"}
  flat = {}
  for k, v in checkpoint.flatten(params).items():
    parts = k.split("/")
    flat["/".join(old.get(p, p) if "encoderblock" in k else p for p in parts)] = v
  assert "Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel" in flat
  merged = checkpoint.load_into(params, checkpoint.unflatten(flat))
  jax.tree.map(np.testing.assert_array_equal, merged, params)


def test_load_into_resizes_kernel_and_posemb(params):
  teacher = vit.Model(10, patch_size=8, posemb_size=8, **TINY)  # A plain "B/8".
  loaded = _init(teacher)
  merged = checkpoint.load_into(params, loaded)
  np.testing.assert_allclose(
      merged["embedding"]["kernel"],
      resize.pi_resize_patchemb(loaded["embedding"]["kernel"], (32, 32)), rtol=1e-6)
  np.testing.assert_allclose(merged["pos_embedding"],
                             resize.resize_posemb_for_load(loaded["pos_embedding"], (7, 7)))
  np.testing.assert_array_equal(merged["Transformer"]["encoderblock_0"]["LayerNorm_0"]["scale"],
                                loaded["Transformer"]["encoderblock_0"]["LayerNorm_0"]["scale"])


def test_two_tower_file_layouts(params):
  """One file holding both towers resizes the image tower like a ViT file; an older
  LiT text tower's second posemb (`Encoder_0/pos_embedding`) is added in (big_vision)."""
  teacher = _init(vit.Model(10, patch_size=8, posemb_size=8, **TINY))
  merged = checkpoint.load_into({"img": params}, {"img": teacher})
  np.testing.assert_allclose(merged["img"]["pos_embedding"],
                             resize.resize_posemb_for_load(teacher["pos_embedding"], (7, 7)))
  text = {"pos_embedding": np.ones((1, 17, 4), np.float32)}  # 17 = 4^2 + 1, no class token.
  old = {"pos_embedding": np.full((1, 17, 4), 2.0),
         "Encoder_0": {"pos_embedding": np.ones((1, 17, 4))}}
  for tower in (text, {"txt": text}):
    got = checkpoint.load_into(tower, old if tower is text else {"txt": old})
    np.testing.assert_array_equal((got if tower is text else got["txt"])["pos_embedding"], 3.0)


def test_non_square_posemb_round_trip(tmp_path):
  """A 10x5 grid (50 = 7^2 + 1 tokens) with a class token is not an old cls-first posemb."""
  model = vit.Model(10, posemb_size=(10, 5), **TINY)
  params = _init(model)
  path = str(tmp_path / "wide.npz")
  checkpoint.save_params(params, path)
  merged = checkpoint.load_into(params, checkpoint.load_params(path))
  jax.tree.map(np.testing.assert_array_equal, merged, params)


def test_load_into_errors_name_the_parameter(params):
  other_head = _init(vit.Model(5, **TINY))
  with pytest.raises(ValueError, match=r"head/kernel \(32, 5\) vs model \(32, 10\)"):
    checkpoint.load_into(params, other_head)
  merged = checkpoint.load_into(params, other_head, dont_load=("head/.*",))
  np.testing.assert_array_equal(merged["head"]["kernel"], params["head"]["kernel"])
  partial = checkpoint.unflatten({k: v for k, v in checkpoint.flatten(params).items()
                                  if k != "cls"})
  with pytest.raises(ValueError, match=r"lacks parameter\(s\) \['cls'\]"):
    checkpoint.load_into(params, partial)
  # A MAP-pooled checkpoint loaded as a "tok" model (a config typo) would drop the head
  # that made its logits: an error, as big_vision's merge_params, unless dont_load says so.
  map_pooled = _init(vit.Model(10, **dict(TINY, pool_type="map")))
  map_pooled["cls"] = params["cls"]
  with pytest.raises(ValueError, match=r"parameter\(s\) the model lacks: \['MAPHead_0/"):
    checkpoint.load_into(params, map_pooled)
  merged = checkpoint.load_into(params, map_pooled, dont_load=("MAPHead_0/.*",))
  np.testing.assert_array_equal(merged["head"]["kernel"], map_pooled["head"]["kernel"])


def test_old_layout_with_cls_posemb_is_fixed(params):
  flat = checkpoint.flatten(params)
  pe = flat.pop("pos_embedding")
  cls_pe = np.full((1, 1, 32), 0.5, np.float32)
  flat["Transformer/posembed_input/pos_embedding"] = np.concatenate([cls_pe, pe], axis=1)
  merged = checkpoint.load_into(params, checkpoint.unflatten(flat))
  np.testing.assert_array_equal(merged["pos_embedding"], pe)
  np.testing.assert_array_equal(merged["cls"], params["cls"] + 0.5)


def test_untrusted_and_broken_files(tmp_path):
  pickled = str(tmp_path / "pickled.npz")
  np.savez(pickled, x=np.array([{"a": 1}], dtype=object))
  with pytest.raises(ValueError, match="needs pickle to load; refusing"):
    checkpoint.load_params(pickled)
  corrupt = tmp_path / "corrupt.npz"
  corrupt.write_bytes(b"this is not a zip file")
  with pytest.raises(ValueError, match="corrupt.npz is corrupt or not an .npz"):
    checkpoint.load_params(str(corrupt))
  with pytest.raises(FileNotFoundError, match="checkpoint not found: .*missing.npz"):
    checkpoint.load_params(str(tmp_path / "missing.npz"))


def test_released_names(monkeypatch, tmp_path, params):
  monkeypatch.setenv("FLEXI_CHECKPOINT_DIR", str(tmp_path))
  entry = checkpoint.PRETRAINED["FlexiViT-B i1k"]
  assert entry.res == 240 and entry.model["variant"] == "B"
  with pytest.raises(FileNotFoundError, match="flexivit_b_i1k.npz"):
    checkpoint.load_params("FlexiViT-B i1k")
  checkpoint.save_params(params, str(tmp_path / entry.file))
  assert "embedding" in checkpoint.load_params("FlexiViT-B i1k")


def test_scanned_model_saves_and_loads_big_vision_layer_names(tmp_path):
  scanned_model = vit.Model(10, scan=True, **{**TINY, "depth": 2})
  scanned = _init(scanned_model)
  path = str(tmp_path / "scanned.npz")
  checkpoint.save_params(scanned, path)
  with np.load(path, allow_pickle=False) as data:
    assert "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel" in data.files
    assert not any(k.startswith("Transformer/encoderblock/") for k in data.files)
  per_layer = _init(vit.Model(10, **{**TINY, "depth": 2}))
  merged = checkpoint.load_into(per_layer, checkpoint.load_params(path))
  np.testing.assert_array_equal(
      merged["Transformer"]["encoderblock_1"]["LayerNorm_0"]["scale"],
      scanned["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"][1])
  back = checkpoint.load_into(scanned, merged)  # Per-layer file into a scanned model.
  jax.tree.map(np.testing.assert_array_equal, back, scanned)


def test_params_from_a_workdir_round_trip_and_errors(tmp_path):
  """ckpt_manager.restore_params_from_workdir (teacher / image-tower init from another
  run): the saved params come back; no checkpoint and a truncated one are one-line
  errors that name the directory."""
  with pytest.raises(FileNotFoundError, match=f"no checkpoint found under {tmp_path}/ckpt$"):
    ckpt_manager.restore_params_from_workdir(str(tmp_path))
  params = {"dense": {"kernel": np.arange(6.0, dtype=np.float32).reshape(2, 3)}}
  mngr = ckpt_manager.CheckpointManager(str(tmp_path), async_save=False)
  mngr.save(3, params, {"count": np.zeros(1)}, {"step": 3})
  mngr.close()
  loaded = ckpt_manager.restore_params_from_workdir(str(tmp_path))
  np.testing.assert_array_equal(loaded["dense"]["kernel"], params["dense"]["kernel"])
  for f in (tmp_path / "ckpt" / "3" / "params").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:10])  # Truncated array data.
  with pytest.raises(ValueError, match=f"^checkpoint {tmp_path}/ckpt/3 is unreadable") as e:
    ckpt_manager.restore_params_from_workdir(str(tmp_path))
  assert "\n" not in str(e.value)
