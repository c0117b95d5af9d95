"""Sources, offline datasets, train/eval pipelines, host sharding, global batches."""
import io
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

import input_pipeline as ip
from input_pipeline import datasets, draw

TRAIN_PP = ('decode|inception_crop|flip_lr|copy("image", "prof")|resize(240)|'
            'value_range(-1, 1)|resize(224, key="prof")|value_range(-1, 1, key="prof")|'
            'onehot(10, key="label", key_result="labels")|keep("image", "prof", "labels")')
EVAL_PP = ('decode|resize_small(274)|central_crop(240)|value_range(-1, 1)|'
           'onehot(10, key="label", key_result="labels")|keep("image", "labels")')
TINY = "fine_shapes/tiny"  # 32px, 160 train / 50 test.


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  for name in (TINY, "shape_captions/tiny"):
    datasets.get_builder(name, d)  # Built on first use.
  return d


def _png(value):
  buf = io.BytesIO()
  Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(buf, "PNG")
  return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
  """root/{train,val}/{cat,dog}/: val image i has pixel value i (its identity)."""
  for split, n in (("train", 6), ("val", 23)):
    for i in range(n):
      cls = ("cat", "dog")[i % 2]
      os.makedirs(tmp_path / split / cls, exist_ok=True)
      (tmp_path / split / cls / f"{i:03d}.png").write_bytes(_png(i))
  return str(tmp_path)


def test_offline_builders_registered_and_described(data_dir):
  b = tfds.builder(TINY, data_dir=data_dir)
  assert b.is_prepared()
  assert b.info.splits["train"].num_examples == 160
  assert b.info.splits["test"].num_examples == 50
  assert b.info.features["label"].names == list(draw.FINE_CLASSES)
  assert b.info.features["image"].shape == (32, 32, 3)
  c = tfds.builder("shape_captions/tiny", data_dir=data_dir)
  ex = next(iter(c.as_dataset(split="train").take(1)))
  assert ex["texts"].shape[0] == 3 and ex["image"].shape == (32, 32, 3)
  assert {"240", "64"} <= {cfg.name for cfg in ip.FineShapes.BUILDER_CONFIGS}


def test_offline_generation_is_deterministic():
  a = draw.fine_shapes_example(np.random.SeedSequence([0, 0, 5, 64]), 64, 3)
  b = draw.fine_shapes_example(np.random.SeedSequence([0, 0, 5, 64]), 64, 3)
  c = draw.fine_shapes_example(np.random.SeedSequence([0, 0, 6, 64]), 64, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert draw.shape_captions_example(1, 32)[1] == draw.shape_captions_example(1, 32)[1]


def _train_cfg(data_dir, pp=TRAIN_PP, **kw):
  return dict(data=dict(name=TINY, data_dir=data_dir), pp=pp, batch_size=8,
              shuffle_buffer_size=64, **kw)


def test_flexivit_train_pp_end_to_end(data_dir):
  ds, n = ip.build_train_dataset(_train_cfg(data_dir), process_index=0, process_count=1)
  assert n == 160
  b = next(ds.as_numpy_iterator())
  assert b["image"].shape == (8, 240, 240, 3) and b["prof"].shape == (8, 224, 224, 3)
  assert b["labels"].shape == (8, 10) and set(b) == {"image", "prof", "labels"}
  assert -1 <= b["image"].min() and b["image"].max() <= 1


def test_train_deterministic_given_seed(data_dir):
  pp = 'decode|inception_crop(16)|flip_lr|keep("image", "label")'
  first = lambda seed: next(ip.build_train_dataset(
      _train_cfg(data_dir, pp, seed=seed), process_index=0, process_count=1)[0]
      .as_numpy_iterator())
  a, b, c = first(0), first(0), first(1)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(a["image"], c["image"])


def test_resumed_stream_equals_uninterrupted(data_dir):
  """start_batch=k gives batches k, k+1, ... of the uninterrupted run (crossing an epoch)."""
  pp = 'decode|inception_crop(16)|flip_lr|keep("image", "label")'
  cfg = _train_cfg(data_dir, pp, seed=3)
  full = list(ip.build_train_dataset(cfg, process_index=0, process_count=1)[0]
              .take(23).as_numpy_iterator())
  resumed = list(ip.build_train_dataset(cfg, process_index=0, process_count=1,
                                        start_batch=19)[0].take(4).as_numpy_iterator())
  for a, b in zip(full[19:], resumed):  # 160 examples / 8 = 20 batches per epoch.
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_pipeline_copies_share_crop_and_flip(data_dir):
  pp = ('decode|inception_crop(64)|flip_lr|copy("image", "prof")|resize(32, key="prof")|'
        'keep("image", "prof")')
  b = next(ip.build_train_dataset(_train_cfg(data_dir, pp), process_index=0,
                                  process_count=1)[0].as_numpy_iterator())
  expect = tf.cast(tf.clip_by_value(tf.image.resize(b["image"], (32, 32)), 0, 255), tf.uint8)
  np.testing.assert_array_equal(b["prof"], expect.numpy())


def test_flexivit_eval_pp_sees_every_example_once(data_dir):
  ds, n = ip.build_eval_dataset(dict(name=TINY, split="test", data_dir=data_dir), EVAL_PP, 16,
                                process_index=0, process_count=1)
  batches = list(ds.as_numpy_iterator())
  assert n == 50 and len(batches) == 4  # 16 + 16 + 16 + 2 real examples.
  assert [int(b["_mask"].sum()) for b in batches] == [16, 16, 16, 2]
  last = batches[-1]
  assert last["image"].shape == (16, 240, 240, 3)
  assert not last["image"][2:].any() and not last["labels"][2:].any()
  labels = np.concatenate([b["labels"][b["_mask"]] for b in batches]).argmax(-1)
  ref = [int(ex["label"]) for ex in tfds.builder(TINY, data_dir=data_dir).as_dataset(
      split="test")]
  assert sorted(labels.tolist()) == sorted(ref)


@pytest.mark.parametrize("count", [2, 4])
def test_host_shards_disjoint_and_complete(data_dir, count):
  src = datasets.get_source(dict(name=TINY, data_dir=data_dir))
  ids = [[x[ip.pipeline.ID_KEY].decode() for x in src.read(
      "train", process_index=i, process_count=count).as_numpy_iterator()]
         for i in range(count)]
  flat = [x for shard in ids for x in shard]
  assert len(flat) == len(set(flat)) == 160
  assert max(map(len, ids)) - min(map(len, ids)) <= 1
  assert sum(src.shard_sizes("train", count)) == 160


def test_tfds_split_smaller_than_the_process_count(data_dir):
  """train[99%:] is 2 examples: with 3 processes one reads nothing and pads."""
  seen = []
  for i in range(3):
    ds, n = ip.build_eval_dataset(dict(name=TINY, split="train[99%:]", data_dir=data_dir),
                                  'decode|resize(8)|keep("image", "label")', 3,
                                  process_index=i, process_count=3)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == 1
    seen.append(int(batches[0]["_mask"].sum()))
  assert n == 2 and seen == [1, 1, 0]


@pytest.mark.parametrize("count", [2, 4])
def test_eval_across_hosts_every_example_exactly_once(folder, count):
  seen, num_batches = [], set()
  for i in range(count):
    ds, n = ip.build_eval_dataset(dict(name=f"dir:{folder}", split="val"),
                                  'decode|resize(6)|keep("image", "label")', 8,
                                  process_index=i, process_count=count)
    batches = list(ds.as_numpy_iterator())
    num_batches.add(len(batches))
    for b in batches:
      assert b["image"].shape[0] == 8 // count
      seen += b["image"][b["_mask"]][:, 0, 0, 0].tolist()
  assert n == 23 and len(num_batches) == 1
  assert sorted(seen) == list(range(23))


def test_folder_source_labels_and_slicing(folder):
  src = datasets.get_source(dict(name=f"dir:{folder}"))
  assert src.classes == ["cat", "dog"]
  paths, labels = src._files("val")  # pylint: disable=protected-access
  assert all(("dog" in p) == bool(l) for p, l in zip(paths, labels))
  assert src.num_examples("val[:10]") == 10 and src.num_examples("val[50%:]") == 23 - src.num_examples("val[:50%]")
  with pytest.raises(ValueError, match="'vall'.*'val'"):
    src.num_examples("vall")


def test_global_batches_sharded_over_8_device_mesh(data_dir):
  mesh = jax.make_mesh((8,), ("data",))
  ds, _ = ip.build_train_dataset(dict(_train_cfg(data_dir), batch_size=16),
                                 process_index=0, process_count=1)
  local = next(ds.as_numpy_iterator())
  batches = ip.global_batches(iter([local, local, local]), mesh, prefetch=2)
  out = list(batches)
  assert len(out) == 3
  img = out[0]["image"]
  assert isinstance(img, jax.Array) and img.shape == (16, 240, 240, 3)
  assert img.sharding.spec == jax.sharding.PartitionSpec(("data",))
  shards = sorted(img.addressable_shards, key=lambda s: s.index[0].start)
  assert len(shards) == 8 and {s.device for s in shards} == set(jax.devices())
  for j, s in enumerate(shards):
    assert s.data.shape == (2, 240, 240, 3)
    np.testing.assert_array_equal(np.asarray(s.data), local["image"][2 * j:2 * j + 2])


def test_global_batches_2d_mesh_and_indivisible_error():
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  out = next(ip.global_batches(iter([{"x": np.zeros((4, 3))}]), mesh))
  assert out["x"].sharding.spec == jax.sharding.PartitionSpec(("data",))
  assert len({s.index[0].start for s in out["x"].addressable_shards}) == 4
  mesh8 = jax.make_mesh((8,), ("data",))
  with pytest.raises(ValueError, match=r"Global batch size 12 .* 8 devices"):
    next(ip.global_batches(iter([{"x": np.zeros((12, 3))}]), mesh8))


def _corrupt_folder(root):
  good = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), 99, np.uint8)).save(good, "JPEG")
  good = good.getvalue()
  for i in range(5):
    os.makedirs(os.path.join(root, "val", "a"), exist_ok=True)
    data = {1: good[:len(good) // 2], 3: b"\x00garbage"}.get(i, good)
    with open(os.path.join(root, "val", "a", f"img{i}.jpg"), "wb") as f:
      f.write(data)


def test_corrupt_jpeg_error_names_the_file(tmp_path):
  _corrupt_folder(str(tmp_path))
  ds, _ = ip.build_eval_dataset(dict(name=f"dir:{tmp_path}", split="val"),
                                'decode|resize(4)|keep("image")', 2, process_index=0,
                                process_count=1)
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  with pytest.raises(ValueError, match=r"Undecodable or truncated image in record .*img1\.jpg"):
    list(ip.global_batches(ds, mesh))
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"img1\.jpg"):
    list(ds.as_numpy_iterator())


def test_training_and_eval_readers_name_a_corrupt_file(tmp_path):
  """The train loop's data source and the evaluators' reader give the same one-line
  error as global_batches (not TF's multi-line op error); an eval may skip instead."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  import evaluators  # pylint: disable=import-outside-toplevel
  from flexi import data_source  # pylint: disable=import-outside-toplevel
  _corrupt_folder(str(tmp_path))
  data, pp = dict(name=f"dir:{tmp_path}", split="val"), 'decode|resize(4)|keep("image")'
  config = ml_collections.ConfigDict(dict(seed=0, input=dict(
      data=data, pp=pp, batch_size=2, shuffle_buffer_size=8, num_examples=None)))
  batches = data_source.from_input_config(config).make_iter(0)
  with pytest.raises(ValueError, match=r"^Undecodable or truncated image in record .*img[13]\.jpg"):
    for _ in range(10):
      next(batches)
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  ctx = evaluators.EvalContext(mesh, ("data",), 2, None)
  with pytest.raises(ValueError, match=r"^Undecodable or truncated image in record .*img1\.jpg"):
    list(evaluators.global_eval_batches(data, pp, 2, ctx))
  kept = evaluators.local_eval_batches(dict(data, skip_decode_errors=True), pp, 2)
  assert sum(int(b["_mask"].sum()) for b in kept) == 3


def test_jpeg_damaged_inside_is_a_clear_error(tmp_path):
  """Valid SOI and EOI markers pass the container check; TF's decoder then fails on the
  damaged header, and the error names the source and what failed, on one line."""
  good = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), 99, np.uint8)).save(good, "JPEG")
  good = good.getvalue()
  os.makedirs(tmp_path / "val" / "a")
  for i, data in enumerate([good, good[:150] + b"\x00" * 40 + good[190:]]):
    (tmp_path / "val" / "a" / f"img{i}.jpg").write_bytes(data)
  for skip in (False, True):
    ds, _ = ip.build_eval_dataset(dict(name=f"dir:{tmp_path}", split="val"),
                                  'decode|resize(4)|keep("image")', 2, process_index=0,
                                  process_count=1, skip_decode_errors=skip)
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with pytest.raises(ValueError) as info:
      list(ip.global_batches(ds, mesh))
    msg = str(info.value)
    assert "\n" not in msg and f"dir:{tmp_path}:val" in msg
    assert "Corrupt image data" in msg and "jpeg::Uncompress failed" in msg


def test_corrupt_jpeg_skipped_and_counted(tmp_path):
  _corrupt_folder(str(tmp_path))
  before = ip.decode_error_counts().get(f"dir:{tmp_path}:val", 0)
  ds, n = ip.build_eval_dataset(dict(name=f"dir:{tmp_path}", split="val"),
                                'decode|resize(4)|keep("image", "label")', 2,
                                process_index=0, process_count=1, skip_decode_errors=True)
  masks = np.concatenate([b["_mask"] for b in ds.as_numpy_iterator()])
  assert n == 5 and masks.sum() == 3
  assert ip.decode_error_counts()[f"dir:{tmp_path}:val"] - before == 2
  cfg = dict(data=dict(name=f"dir:{tmp_path}", split="val"), pp=
             'decode|resize(4)|keep("image")', batch_size=3, skip_decode_errors=True,
             shuffle_buffer_size=8)
  train, _ = ip.build_train_dataset(cfg, process_index=0, process_count=1)
  vals = np.concatenate([b["image"] for b in train.take(4).as_numpy_iterator()])
  assert vals.shape == (12, 4, 4, 3) and (np.abs(vals.astype(int) - 99) <= 3).all()


def test_lit_pp_on_shape_captions(data_dir):
  pp = ('decode|resize(32)|value_range(-1, 1)|choice(inkey="texts", outkey="text")|'
        'tokenize(16, eos="sticky", inkey="text", outkey="labels")|keep("image", "labels")')
  ds, n = ip.build_train_dataset(dict(data=dict(name="shape_captions/tiny", data_dir=data_dir),
                                      pp=pp, batch_size=4, shuffle_buffer_size=16),
                                 process_index=0, process_count=1)
  b = next(ds.as_numpy_iterator())
  assert n == 96 and b["labels"].shape == (4, 16) and b["labels"].dtype == np.int32
  text = ip.get_tokenizer("bytes").decode(b["labels"][0])
  assert text.startswith("a ") and any(c in text for c in draw.COLOURS)


def test_unknown_dataset_suggests_close_names(data_dir):
  with pytest.raises(ValueError, match=r"Unknown dataset 'fine_shape'.*fine_shapes"):
    datasets.get_source(dict(name="fine_shape", data_dir=data_dir))


def test_missing_imagenet_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match=(
      r"'imagenet2012' is not prepared .*downloads/manual.*tfds build imagenet2012")):
    datasets.get_source(dict(name="imagenet2012", data_dir=str(tmp_path)))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    datasets.get_source(dict(name=f"dir:{tmp_path}/nope"))


def test_unknown_split_and_config_key(data_dir):
  with pytest.raises(ValueError, match=r"no split 'tran'"):
    ip.build_train_dataset(dict(_train_cfg(data_dir), data=dict(name=TINY, split="tran",
                                                                data_dir=data_dir)))
  with pytest.raises(ValueError, match=r"'shuffle_bufer_size'.*'shuffle_buffer_size'"):
    ip.build_train_dataset(dict(_train_cfg(data_dir), shuffle_bufer_size=3))
  with pytest.raises(ValueError, match=r"batch size 9 .* processes 2"):
    ip.build_train_dataset(dict(_train_cfg(data_dir), batch_size=9), process_index=0,
                           process_count=2)


def test_pp_error_while_tf_data_traces_is_one_line(data_dir):
  """An op that fails while tf.data traces the pp function (here a missing key): the
  op's own message with the dataset, not TF's multi-line "in user code" trace."""
  with pytest.raises(ValueError) as info:
    ip.build_eval_dataset(dict(name=TINY, split="test", data_dir=data_dir),
                          "decode|resize(8)|onehot(10)", 4, process_index=0, process_count=1)
  assert str(info.value) == (f"{TINY}:test: pp op 'onehot': key 'labels' not in the "
                             "example (keys: ['image', 'label'])")
