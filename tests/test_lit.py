"""Flexi-LiT: contrastive losses (NumPy and 8-device mesh), locked image tower,
retrieval recall, tokenizer round trips, bad inputs."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flexi import checkpoint, data_source, train_loop, tree_utils, two_tower
from flexi import config as config_lib
import evaluators as evaluators_lib
from evaluators import retrieval
from trainers import lit

IMG, LEN, VOCAB, BATCH = 32, 8, 50, 16


def _raw_config(**over):
  raw = dict(
      model=dict(image=dict(variant="mu", patch_size=(16, 16), posemb_size=(2, 2)),
                 text=dict(variant="mu", vocab_size=VOCAB), out_dim=(None, 32),
                 temperature_init=10.0),
      total_steps=2, log_training_steps=1, ckpt_steps=None, compilation_cache_dir=None,
      input=dict(batch_size=BATCH), flexi=dict(patch_size=dict(v=[8, 16])), lr=0.1,
      lit=dict(loss="softmax", lock_img=True))
  for k, v in over.items():
    raw[k] = v
  return raw


def _config(**over):
  return config_lib.build(_raw_config(**over), schema=lit.schema())


def _batch(seed=0, n=BATCH):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, IMG, IMG, 3)).astype(np.float32),
          "labels": rng.integers(1, VOCAB, size=(n, LEN)).astype(np.int32)}


def _source():
  return data_source.DataSource(lambda start: (_batch(1000 + i) for i in range(start, 10**6)),
                                num_examples=1000)


@pytest.fixture(scope="module")
def setup():
  config = _config()
  trainer = lit.make_trainer(config)
  batch = _batch()
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  params = jax.jit(lambda r: trainer.init_params(r, spec))(jax.random.PRNGKey(0))
  return config, trainer, params, batch


# ------------------------------------------------------------------- losses.

def _np_log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _unit(rng, n, d):
  z = rng.normal(size=(n, d))
  return z / np.linalg.norm(z, axis=1, keepdims=True)


def test_softmax_loss_matches_numpy():
  rng = np.random.default_rng(0)
  zi, zt, t = _unit(rng, 6, 5), _unit(rng, 6, 5), 7.5
  logits = zi @ zt.T * t
  expected = np.mean([-0.5 * (_np_log_softmax(logits, 1)[i, i] + _np_log_softmax(logits, 0)[i, i])
                      for i in range(6)])
  loss, _ = two_tower.softmax_contrastive(jnp.asarray(zi), jnp.asarray(zt), t)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_sigmoid_loss_matches_numpy():
  rng = np.random.default_rng(1)
  zi, zt, t, b = _unit(rng, 5, 4), _unit(rng, 5, 4), 10.0, -3.0
  logits = zi @ zt.T * t + b
  labels = 2 * np.eye(5) - 1
  expected = np.sum(np.log1p(np.exp(-labels * logits))) / 5
  loss, _ = two_tower.sigmoid_contrastive(jnp.asarray(zi), jnp.asarray(zt), t, b)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_loss_on_8_device_mesh_equals_single_device(kind):
  """Sharded embeddings: the loss is over the global batch, not averaged per device."""
  assert jax.device_count() == 8
  rng = np.random.default_rng(2)
  zi, zt = _unit(rng, 16, 8).astype(np.float32), _unit(rng, 16, 8).astype(np.float32)
  out = {"t": jnp.float32(5.0), "b": jnp.float32(-2.0)}
  fn = jax.jit(lambda a, b: two_tower.contrastive_loss(kind, a, b, out)[0])
  single = float(fn(jax.device_put(zi, jax.devices()[0]), jax.device_put(zt, jax.devices()[0])))
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  sh = NamedSharding(mesh, P("data"))
  zi_s, zt_s = jax.device_put(zi, sh), jax.device_put(zt, sh)
  assert len(zi_s.addressable_shards) == 8
  np.testing.assert_allclose(float(fn(zi_s, zt_s)), single, rtol=1e-6)
  per_device = np.mean([float(fn(zi[i:i + 2], zt[i:i + 2])) for i in range(0, 16, 2)])
  assert abs(per_device - single) > 1e-2  # A per-device loss would differ.


def test_trainer_loss_on_mesh_equals_single_device(setup):
  """The trainer's full loss (both towers + loss), batch sharded over 8 devices."""
  _, trainer, params, batch = setup
  fn = jax.jit(lambda p, b: trainer.loss_fn(p, b, rng=jax.random.PRNGKey(0),
                                            flexi={"patch_size": 8}, consts=None)[0])
  dev0 = jax.devices()[0]
  single = float(fn(jax.device_put(params, dev0), jax.device_put(batch, dev0)))
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  rep, sh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  sharded = float(fn(jax.device_put(params, rep), jax.device_put(batch, sh)))
  np.testing.assert_allclose(sharded, single, rtol=1e-5)


def test_contrastive_loss_bad_inputs():
  z = jnp.ones((4, 8))
  with pytest.raises(ValueError, match="out_dim"):
    two_tower.contrastive_loss("softmax", z, jnp.ones((4, 6)), {"t": 1.0})
  with pytest.raises(ValueError, match="bias_init"):
    two_tower.contrastive_loss("sigmoid", z, z, {"t": 1.0})
  with pytest.raises(ValueError, match="unknown contrastive loss 'clip'"):
    two_tower.contrastive_loss("clip", z, z, {"t": 1.0})


# --------------------------------------------------------- model and trainer.

def test_param_names_big_vision(setup):
  _, _, params, _ = setup
  names = dict(tree_utils.named_leaves(params))
  for name in ("t", "img/embedding/kernel", "img/pos_embedding", "txt/Embed_0/embedding",
               "txt/pos_embedding", "txt/Encoder_0/encoderblock_0/LayerNorm_0/scale",
               "txt/Encoder_0/encoder_norm/scale", "txt/head/kernel"):
    assert name in names, name
  assert "b" not in names and "img/head/kernel" not in names
  assert names["txt/pos_embedding"].shape == (1, LEN, 32)


def test_embeddings_normalised_any_patch_size(setup):
  config, _, params, batch = setup
  model = lit.make_model(config)
  for kw in ({"patch_size": 8}, {"seqhw": 2}):
    zi, zt, out = jax.jit(lambda p, i, t, kw=kw: model.apply({"params": p}, i, t, **kw))(
        params, batch["image"][:2], batch["labels"][:2])
    np.testing.assert_allclose(np.linalg.norm(zi, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(zt, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(out["t"]), 10.0, rtol=1e-6)


def _train(tmp_path, name, **over):
  config = _config(**over)
  trainer = lit.make_trainer(config)
  return train_loop.train_and_evaluate(config, str(tmp_path / name), trainer, data=_source())


def test_locked_image_tower_does_not_change(tmp_path, setup):
  _, _, params, _ = setup
  # The image tower comes from a checkpoint (a big_vision .npz of a ViT).
  img = jax.tree.map(lambda x: np.asarray(x) + 0.01, params["img"])
  path = str(tmp_path / "img.npz")
  checkpoint.save_params(img, path)
  result = _train(tmp_path, "locked", model_init=dict(img=path))
  after = jax.device_get(result.params)
  for (n, a), (_, b) in zip(tree_utils.named_leaves(img), tree_utils.named_leaves(after["img"])):
    np.testing.assert_array_equal(a, b, err_msg=n)
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
      jax.tree.leaves(params["txt"]), jax.tree.leaves(after["txt"]))]
  assert max(moved) > 1e-3  # The text tower did train.
  # No optimizer state for the locked tower.
  opt_names = [n for n, _ in tree_utils.named_leaves(result.opt_state)]
  assert not any("/img/" in f"/{n}/" and ("mu" in n or "nu" in n) for n in opt_names)
  assert any("txt" in n for n in opt_names)


def test_unlocked_image_tower_trains(tmp_path, setup):
  _, _, params, _ = setup
  result = _train(tmp_path, "unlocked", lit=dict(loss="sigmoid", lock_img=False),
                  flexi=dict(patch_size=dict(v=[16])),
                  model=dict(_raw_config()["model"], bias_init=-10.0))
  after = jax.device_get(result.params)
  moved = max(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
      jax.tree.leaves(params["img"]), jax.tree.leaves(after["img"])))
  assert moved > 1e-4
  assert np.isfinite(result.metrics["train/loss"]) and "train/b" in result.metrics


def test_trainer_bad_config():
  with pytest.raises(ValueError, match="unknown config.model key.*'img_size'"):
    lit.make_trainer(_config(model=dict(_raw_config()["model"], img_size=3)))
  with pytest.raises(ValueError, match="bias_init"):
    lit.make_trainer(_config(lit=dict(loss="sigmoid")))
  with pytest.raises(ValueError, match="config.lit.loss 'clip'"):
    lit.make_trainer(_config(lit=dict(loss="clip")))
  with pytest.raises(config_lib.ConfigError, match="lit.lock_im"):
    _config(lit=dict(lock_im=False))


def test_bad_batches_and_eval_configs(setup):
  _, trainer, _, batch = setup
  spec = {"image": jax.ShapeDtypeStruct(batch["image"].shape, np.float32)}
  with pytest.raises(ValueError, match="LiT batches need 'labels'"):
    trainer.init_params(jax.random.PRNGKey(0), spec)
  from flexi import text_model  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"token ids \[batch, len\], got shape \(2, 3, 4\)"):
    text_model.Model(8, variant="mu").init(jax.random.PRNGKey(0), jnp.zeros((2, 3, 4), jnp.int32))
  with pytest.raises(ValueError, match="unknown text model option.*'widht'"):
    text_model.Model(8, widht=3)
  with pytest.raises(ValueError, match="unknown remat_policy 'dot'"):
    text_model.Model(8, remat=True, remat_policy="dot")
  with pytest.raises(ValueError, match="'dots_saveable' has no effect without remat=True"):
    text_model.Model(8, remat_policy="dots_saveable")
  # A known policy builds and runs (the text tower is unrolled: its effect is on memory).
  text = text_model.Model(8, variant="mu", remat=True, remat_policy="dots_and_attention_saveable")
  variables = text.init(jax.random.PRNGKey(0), jnp.zeros((2, 5), jnp.int32))
  plain = text_model.Model(8, variant="mu")
  tokens = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
  np.testing.assert_allclose(text.apply(variables, tokens)[0], plain.apply(variables, tokens)[0],
                             rtol=1e-6, atol=1e-6)
  fns = {"predict": None, "predict_patch_size=8": None}
  with pytest.raises(ValueError, match=r"config.evals.zs \(zeroshot\) needs 'pp_txt'"):
    retrieval.ZeroShotEvaluator.validate("zs", {"data": {}, "pp_fn": ""}, fns)
  with pytest.raises(ValueError, match="unknown predict fn 'predict_patch_size=9'"):
    retrieval.RetrievalEvaluator.validate(
        "r", {"data": {}, "pp_fn": "", "preds": ["predict_patch_size=9"]}, fns)


def test_load_errors(tmp_path, setup):
  _, _, params, _ = setup
  with pytest.raises(ValueError, match=r"unknown model_init key\(s\) \['imgg'\]"):
    two_tower.load(params, {"imgg": "x.npz"})
  hint = "python -m trainers.train --config configs/demo.py --workdir nowhere"
  with pytest.raises(FileNotFoundError, match="img init.*trainers.train"):
    two_tower.load(params, {"img": str(tmp_path / "nowhere")}, {"missing_hint": hint})
  (tmp_path / "empty_workdir").mkdir()
  with pytest.raises(FileNotFoundError, match="no checkpoint.*trainers.train"):
    two_tower.load(params, {"img": str(tmp_path / "empty_workdir")}, {"missing_hint": hint})


def test_runlocal_config_missing_image_tower_names_command(tmp_path):
  config = config_lib.load(f"configs/flexilit_b.py:smoke,img_workdir={tmp_path}/demo",
                           schema=lit.schema())
  trainer = lit.make_trainer(config)
  params = {"img": {}, "txt": {}, "t": np.zeros(1)}
  with pytest.raises(FileNotFoundError, match="python -m trainers.train --config "
                     r"configs/demo.py:data=shape_captions/64 --workdir .*demo"):
    trainer.load_pretrained(params, config)


def test_realistic_config_builds():
  config = config_lib.load("configs/flexilit_b.py", schema=lit.schema())
  model = lit.make_model(config)
  assert config.model_init.img == "FlexiViT-B i21k 300ep" and config.lit.lock_img
  assert model.image["variant"] == "B" and len(config.flexi.patch_size.v) == 10
  fixed = config_lib.load("configs/flexilit_b.py:fixed=30", schema=lit.schema())
  assert list(fixed.flexi.patch_size.v) == [30]
  from input_pipeline import preprocess  # pylint: disable=import-outside-toplevel
  for pp in (config.input.pp, config.evals.coco.pp_fn, config.evals.cifar100.pp_txt):
    for op, _, _ in preprocess.parse(pp):  # Every op exists (building needs the .model).
      assert op in preprocess.OPS, op


# --------------------------------------------------------------- evaluators.

def test_recall_hand_made():
  # 3 images; texts 0,1 belong to image 0, text 2 to image 1, text 3 to image 2.
  sim = np.array([[0.9, 0.1, 0.5, 0.8],    # img0: best text 0 (own) -> rank 0.
                  [0.7, 0.2, 0.3, 0.6],    # img1: own text 2 (0.3) beaten by 0.7, 0.6 -> rank 2.
                  [0.1, 0.95, 0.2, 0.4]])  # img2: own text 3 (0.4) beaten by 0.95 -> rank 1.
  owner = np.array([0, 0, 1, 2])
  r = retrieval.recall_at_k(sim, owner, ks=(1, 2, 3))
  assert r["i2t@1"] == pytest.approx(1 / 3) and r["i2t@2"] == pytest.approx(2 / 3)
  assert r["i2t@3"] == 1.0
  # Rank of each text's image: t0 -> 0; t1 (0.1 < 0.2, 0.95) -> 2; t2 (0.3 < 0.5) -> 1;
  # t3 (0.4 < 0.8, 0.6) -> 2.
  assert r["t2i@1"] == pytest.approx(1 / 4) and r["t2i@2"] == pytest.approx(2 / 4)
  assert r["t2i@3"] == 1.0
  with pytest.raises(ValueError, match="txt_to_img"):
    retrieval.recall_at_k(sim, np.array([0, 1, 5, 2]))


def test_recall_of_a_collapsed_or_diverged_model_is_not_perfect():
  """Equal similarities (a collapsed tower) or NaN ones must not read as perfect
  recall: ties count against the query, NaN is a miss."""
  owner = np.arange(8) % 4  # 4 images, 2 texts each.
  for sim in (np.ones((4, 8)), np.full((4, 8), np.nan)):
    r = retrieval.recall_at_k(sim, owner, ks=(1, 6, 7))
    assert r["i2t@1"] == r["t2i@1"] == 0.0 and r["i2t@6"] == 0.0 and r["i2t@7"] == 1.0
  # An image's two texts tie with each other: still rank 0 (both are its own).
  sim = np.where(owner[None, :] == np.arange(4)[:, None], 0.9, 0.1)
  r = retrieval.recall_at_k(sim, owner, ks=(1,))
  assert r == {"i2t@1": 1.0, "t2i@1": 1.0}


def test_class_prompts():
  assert retrieval.class_prompts(["cat", "dog"], ["a {}", "the {}."]) == [
      (0, "a cat"), (0, "the cat."), (1, "a dog"), (1, "the dog.")]
  with pytest.raises(ValueError, match="template 'a photo'"):
    retrieval.class_prompts(["cat"], ["a photo"])


# ---------------------------------------------------------------- tokenizer.

def _pp_tokens(pp, text):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from input_pipeline import preprocess  # pylint: disable=import-outside-toplevel
  return np.asarray(preprocess.get_preprocess_fn(pp)({"texts": tf.constant(text)})["labels"])


def test_byte_tokenizer_round_trip():
  from input_pipeline import text  # pylint: disable=import-outside-toplevel
  tok = text.get_tokenizer("bytes")
  caption = "a red circle above a blue square, ünïcode"
  ids = _pp_tokens('tokenize(max_len=64, eos="sticky", pad_value=1, inkey="texts")', caption)
  assert ids.shape == (64,) and ids[-1] == tok.eos_id
  assert tok.decode(ids) == caption.lower()
  cut = _pp_tokens('tokenize(max_len=8, eos="sticky", pad_value=1, inkey="texts")', caption)
  assert cut[-1] == tok.eos_id and tok.decode(cut) == caption[:7]


def test_sentencepiece_round_trip(tmp_path):
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  from input_pipeline import draw  # pylint: disable=import-outside-toplevel
  from input_pipeline import text  # pylint: disable=import-outside-toplevel
  corpus = tmp_path / "captions.txt"
  lines = []
  for i in range(200):
    _, caps, _ = draw.shape_captions_example(np.random.SeedSequence([7, i]), 32)
    lines += caps
  corpus.write_text("\n".join(lines))
  prefix = str(tmp_path / "spm")
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=prefix, vocab_size=32,
                                 pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 minloglevel=2)
  tok = text.get_tokenizer(prefix + ".model")
  caption = "a yellow triangle left of a green circle"
  ids = _pp_tokens(f'tokenize(max_len=32, model="{prefix}.model", eos="sticky", '
                   'pad_value=1, inkey="texts")', caption)
  assert ids[-1] == 1 and tok.decode(ids) == caption


# ------------------------------------------------------------------ end to end.

def test_cli_smoke_end_to_end(tmp_path, capsys):
  """`python -m trainers.lit` on the offline captions, image tower from a workdir."""
  from flexi import ckpt_manager, vit  # pylint: disable=import-outside-toplevel
  config = config_lib.load("configs/flexilit_b.py:smoke", schema=lit.schema())
  img_model = vit.Model(10, **config.model.image.to_dict())
  img = jax.jit(img_model.init)(jax.random.PRNGKey(3), jnp.zeros((1, 96, 96, 3)))["params"]
  mngr = ckpt_manager.CheckpointManager(str(tmp_path / "demo"), async_save=False)
  mngr.save(5, img, {"count": np.zeros(1)}, {"step": 5})
  mngr.close()
  preds = '["predict_patch_size=48", "predict_patch_size=32"]'
  result = lit.main([
      "--config", f"configs/flexilit_b.py:smoke,img_workdir={tmp_path}/demo,steps=2",
      "--workdir", str(tmp_path / "lit"), "--config.flexi.patch_size.v=[48]",
      f"--config.evals.retrieval.preds={preds}", f"--config.evals.zeroshot.preds={preds}",
      "--config.compilation_cache_dir="])
  np.testing.assert_array_equal(  # Locked image tower: still the workdir's weights.
      np.asarray(result.params["img"]["embedding"]["kernel"]), img["embedding"]["kernel"])
  for size in (48, 32):
    for metric in ("retrieval/patch_size={}/i2t@1", "retrieval/patch_size={}/t2i@10",
                   "zeroshot/patch_size={}/acc"):
      assert 0.0 <= result.eval_metrics[metric.format(size)] <= 1.0
  out = capsys.readouterr().out
  assert "| patch_size | retrieval i2t@1" in out and "| 32 |" in out


def test_zeroshot_classnames_of_a_folder_dataset(tmp_path):
  """Without classnames=[...], a folder dataset's class folders name the classes."""
  from evaluators import retrieval  # pylint: disable=import-outside-toplevel
  for cls in ("golden_retriever", "tabby_cat"):
    os.makedirs(tmp_path / "val" / cls)
  names = retrieval._dataset_classnames(dict(name=f"dir:{tmp_path}"), "label")  # pylint: disable=protected-access
  assert names == ["golden retriever", "tabby cat"]


def test_retrieval_scores_every_real_caption_of_variable_counts():
  """COCO's protocol: all captions of each image, whose numbers differ. `first_n` pads
  them to a fixed count with a mask (so tf.data batches them); the evaluator scores
  exactly the real ones. Image i embeds as e_i, a caption as e_(its first letter), an
  empty (padded) caption as 0: scored, a padded caption would be a text->image miss."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from flexi import sharding  # pylint: disable=import-outside-toplevel
  from input_pipeline import get_preprocess_fn  # pylint: disable=import-outside-toplevel
  counts = [1, 2, 5, 4, 1, 3]  # first_n(3) keeps <= 3 of them.
  captions = [[f"{chr(97 + i)} photo {j}" for j in range(c)] for i, c in enumerate(counts)]
  pp = get_preprocess_fn('first_n(3)|tokenize(16, eos="sticky", sample_if_multi=False)|'
                         'keep("labels", "texts_mask")')
  ds = tf.data.Dataset.from_generator(
      lambda: ({"texts": c} for c in captions),
      output_signature={"texts": tf.TensorSpec([None], tf.string)}).map(pp).batch(4)
  batches = [{k: v.numpy() for k, v in b.items()} for b in ds]
  assert batches[0]["labels"].shape == (4, 3, 16)
  real = np.concatenate([b["texts_mask"] for b in batches])
  np.testing.assert_array_equal(real.sum(1), np.minimum(counts, 3))

  n_img = len(counts)

  def predict(variables, batch, **flexi):
    del variables, flexi
    out = {}
    if "image" in batch:
      out["img"] = jax.nn.one_hot(batch["image"][:, 0].astype(jnp.int32), n_img)
    if "labels" in batch:
      out["txt"] = jax.nn.one_hot(batch["labels"][:, 0] - (97 + 3), n_img)  # Byte ids.
    return out
  mesh = sharding.make_mesh([("data", -1)])
  ctx = evaluators_lib.EvalContext(mesh, ("data",), 8, None)
  fns = train_loop.PredictFns(predict, "patch_size", (8,))
  ev = retrieval.RetrievalEvaluator(fns, ctx, data={}, pp_fn="", preds=["predict_patch_size=8"],
                                    batch_size=8, ks=(1,))
  global_batch = {"image": np.arange(8, dtype=np.float32)[:, None],
                  "labels": np.concatenate([b["labels"] for b in batches] + [
                      np.zeros((2, 3, 16), np.int32)]),
                  "texts_mask": np.concatenate([real, np.zeros((2, 3), bool)]),
                  "_mask": np.arange(8) < n_img}
  ev._batches = lambda: iter([(global_batch["_mask"], sharding.to_global(  # pylint: disable=protected-access
      {k: v for k, v in global_batch.items() if k != "_mask"}, mesh))])
  metrics = dict(ev.run({}))
  assert metrics == {"patch_size=8/i2t@1": 1.0, "patch_size=8/t2i@1": 1.0}
  ev.text_mask_key = "no such key"  # Every slot scored: the 5 padded ones miss.
  assert dict(ev.run({}))["patch_size=8/t2i@1"] == pytest.approx(13 / 18)
  global_batch["texts_mask"] = global_batch["texts_mask"][:, :2]
  ev.text_mask_key = "texts_mask"
  with pytest.raises(ValueError, match=r"'texts_mask' has shape \(8, 2\), the captions \(8, 3\)"):
    dict(ev.run({}))
