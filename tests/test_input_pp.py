"""The pp-op language: parsing, each op against hand/TF-computed values, errors."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from input_pipeline import get_preprocess_fn, get_tokenizer
from input_pipeline.preprocess import parse

FLEXI_TRAIN_PP = ('decode|inception_crop|flip_lr|copy("image", "prof")|resize(240)|'
                  'value_range(-1, 1)|resize(224, key="prof")|value_range(-1, 1, key="prof")|'
                  'onehot(10, key="label", key_result="labels")|keep("image", "prof", "labels")')


def png(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "PNG")
  return buf.getvalue()


def jpeg(arr, quality=95):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def rand_img(h=20, w=30, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def run(pp, **data):
  out = get_preprocess_fn(pp)({k: tf.constant(v) for k, v in data.items()})
  return {k: v.numpy() for k, v in out.items()}


def seeded(seed, **data):
  return dict(data, _rng=np.array([seed, 7], np.int64))


# --- Parsing ---------------------------------------------------------------------------


def test_parse_literals_and_keywords():
  assert parse('decode|value_range(-1, 1)|resize(224, key="prof")|flip_lr') == [
      ("decode", (), {}), ("value_range", (-1, 1), {}),
      ("resize", (224,), {"key": "prof"}), ("flip_lr", (), {})]
  assert parse('keep("a", "b")|rename(x="y")|resize((3, 4))') == [
      ("keep", ("a", "b"), {}), ("rename", (), {"x": "y"}), ("resize", ((3, 4),), {})]
  assert parse("") == []


def test_parse_refuses_code():
  with pytest.raises(ValueError, match="resize.*not a literal"):
    parse('resize(__import__("os").getpid())')
  with pytest.raises(ValueError, match="Cannot parse"):
    parse("decode|resize(")


def test_unknown_op_lists_close_matches():
  with pytest.raises(ValueError, match=r"Unknown pp op 'inception_crp'.*inception_crop"):
    get_preprocess_fn("decode|inception_crp")


def test_bad_argument_names_the_op():
  with pytest.raises(ValueError, match=r"pp op 'resize'.*sizee"):
    get_preprocess_fn("resize(sizee=3)")
  with pytest.raises(ValueError, match=r"pp op 'tokenize'.*eos"):
    get_preprocess_fn('tokenize(8, eos="maybe")')


def test_missing_key_names_op_and_key():
  with pytest.raises(ValueError, match=r"pp op 'keep'.*'labels'"):
    run('keep("labels")', image=rand_img())
  with pytest.raises(ValueError, match=r"pp op 'resize'.*'prof'"):
    run('resize(4, key="prof")', image=rand_img())


def test_key_inkey_outkey():
  img = rand_img(8, 8)
  out = run('resize(4, inkey="a", outkey="b")', a=img)
  assert out["a"].shape == (8, 8, 3) and out["b"].shape == (4, 4, 3)
  out = run('resize(2, key="a")', a=img, image=img)
  assert out["a"].shape == (2, 2, 3) and out["image"].shape == (8, 8, 3)
  out = run("resize(5)", image=img)
  assert out["image"].shape == (5, 5, 3)


# --- Image ops -------------------------------------------------------------------------


def test_decode_png_is_exact_and_channels():
  img = rand_img()
  np.testing.assert_array_equal(run("decode", image=png(img))["image"], img)
  gray = run("decode(channels=1)", image=png(img))["image"]
  assert gray.shape == (20, 30, 1)


def test_decode_jpeg_precise_close_to_source():
  img = np.full((16, 16, 3), 120, np.uint8)
  out = run("decode(precise=True)", image=jpeg(img))["image"]
  assert np.abs(out.astype(int) - 120).max() <= 2


def test_resize_bilinear_half_pixel_by_hand():
  # 1x2 -> 1x4 with half-pixel centres: [0, 25, 75, 100]; uint8 kept.
  img = np.array([[[0], [100]]], np.uint8)
  out = run("resize((1, 4))", image=img)["image"]
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, :, 0], [0, 25, 75, 100])
  f = run("resize((1, 4))", image=img.astype(np.float32))["image"]
  np.testing.assert_allclose(f[0, :, 0], [0, 25, 75, 100])


def test_resize_matches_tf_with_antialias_and_method():
  img = rand_img(40, 40).astype(np.float32)
  out = run('resize(10, method="bicubic", antialias=True)', image=img)["image"]
  ref = tf.image.resize(img, (10, 10), method="bicubic", antialias=True).numpy()
  np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_resize_small_keeps_aspect():
  out = run("resize_small(10)", image=rand_img(40, 20))["image"]
  assert out.shape == (20, 10, 3)
  ref = tf.cast(tf.image.resize(rand_img(40, 20), (20, 10), method="area"), tf.uint8)
  np.testing.assert_array_equal(out, ref.numpy())


def test_central_crop_by_hand():
  img = np.arange(6 * 8, dtype=np.uint8).reshape(6, 8, 1)
  out = run("central_crop((2, 4))", image=img)["image"]
  np.testing.assert_array_equal(out, img[2:4, 2:6])


def _is_window(big, small):
  h, w = small.shape[:2]
  return any(np.array_equal(big[y:y + h, x:x + w], small)
             for y in range(big.shape[0] - h + 1) for x in range(big.shape[1] - w + 1))


def test_random_crop_is_a_window():
  img = rand_img(12, 12)
  out = run("random_crop(5)", **seeded(3, image=img))["image"]
  assert out.shape == (5, 5, 3) and _is_window(img, out)


def test_inception_crop_is_a_window_with_valid_area():
  img = rand_img(32, 32)
  for s in range(5):
    out = run("inception_crop", **seeded(s, image=img))["image"]
    assert _is_window(img, out)
    assert 0.05 * 32 * 32 * 0.9 <= out.shape[0] * out.shape[1] <= 32 * 32
  out = run("inception_crop(8, area_min=50)", **seeded(0, image=img))["image"]
  assert out.shape == (8, 8, 3)


def test_decode_jpeg_and_inception_crop_equals_decode_then_crop():
  img = rand_img(48, 64)
  raw = jpeg(img)
  for s in range(3):
    a = run("decode_jpeg_and_inception_crop", **seeded(s, image=raw))["image"]
    b = run("decode|inception_crop", **seeded(s, image=raw))["image"]
    assert a.shape == b.shape  # Same window; pixels equal up to chroma edge effects.
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff[:-1, :-1].max() <= 3 and diff.mean() < 1
  # Non-JPEG input is decoded fully and cropped the same way.
  c = run("decode_jpeg_and_inception_crop(16)", **seeded(0, image=png(img)))["image"]
  assert c.shape == (16, 16, 3)


def test_flip_lr_is_identity_or_mirror_and_both_happen():
  img = rand_img(4, 6)
  flips = set()
  for s in range(16):
    out = run("flip_lr", **seeded(s, image=img))["image"]
    assert np.array_equal(out, img) or np.array_equal(out, img[:, ::-1])
    flips.add(np.array_equal(out, img[:, ::-1]))
  assert flips == {True, False}


def test_value_range_by_hand():
  img = np.array([[[0, 127.5, 255]]], np.float32)
  np.testing.assert_allclose(run("value_range(-1, 1)", image=img)["image"], [[[-1, 0, 1]]])
  np.testing.assert_allclose(run("value_range(0, 1, 0, 127.5, True)", image=img)["image"],
                             [[[0, 1, 1]]])


def test_vgg_value_range_by_hand():
  img = np.full((1, 1, 3), 255, np.uint8)
  out = run("vgg_value_range", image=img)["image"][0, 0]
  expect = (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(out, expect, rtol=1e-5)


def test_random_ops_deterministic_given_rng():
  img = rand_img(32, 32)
  pp = "inception_crop(16)|flip_lr"
  a, b = run(pp, **seeded(1, image=img)), run(pp, **seeded(1, image=img))
  c = run(pp, **seeded(2, image=img))
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], c["image"])


def test_funmatch_copies_share_crop_and_flip():
  """The crop and flip happen before `copy`; each copy is then resized on its own."""
  yy, xx = np.mgrid[0:64, 0:48]
  smooth = np.stack([yy * 3, xx * 4, 128 + 60 * np.sin((yy + xx) / 9)], -1)
  raw = png(smooth.astype(np.uint8))
  for s in range(4):
    view = run("decode|inception_crop|flip_lr", **seeded(s, image=raw))["image"]
    out = run('decode|inception_crop|flip_lr|copy("image", "prof")|resize(24)|'
              'resize(16, key="prof")', **seeded(s, image=raw))
    np.testing.assert_array_equal(out["image"], run("resize(24)", image=view)["image"])
    np.testing.assert_array_equal(out["prof"], run("resize(16)", image=view)["image"])
    # The resized copy equals the other copy resized (up to the uint8 rounding).
    again = run("resize(16)", image=out["image"].astype(np.float32))["image"]
    assert np.abs(again - out["prof"].astype(np.float32)).mean() < 2


def test_flexivit_distill_train_pp_runs():
  out = run(FLEXI_TRAIN_PP, **seeded(0, image=jpeg(rand_img(50, 40)), label=np.int64(3)))
  assert set(out) == {"image", "prof", "labels", "_rng"}
  assert out["image"].shape == (240, 240, 3) and out["prof"].shape == (224, 224, 3)
  assert out["image"].min() >= -1 and out["image"].max() <= 1
  np.testing.assert_array_equal(out["labels"], np.eye(10)[3])


# --- Label and key ops -----------------------------------------------------------------


def test_onehot():
  out = run('onehot(4, key="label", key_result="labels", on=0.9, off=0.1)', label=np.int64(2))
  np.testing.assert_allclose(out["labels"], [0.1, 0.1, 0.9, 0.1])
  assert out["label"] == 2
  # big_vision's default key is "labels", one-hot in place; a vector is multi-hot.
  multi = run("onehot(5)", labels=np.array([0, 3, 3], np.int64))["labels"]
  np.testing.assert_allclose(multi, [1, 0, 0, 1, 0])


def test_keep_drop_copy_rename():
  d = dict(a=np.int32(1), b=np.int32(2), c=np.int32(3))
  assert set(run('keep("a", "b")', **d)) == {"a", "b"}
  assert set(run('drop("a")', **d)) == {"b", "c"}
  out = run('copy("a", "z")|rename(y="b")', **d)
  assert out["z"] == 1 and out["y"] == 2 and "b" not in out


def test_corrupt_image_error_names_the_record():
  raw = jpeg(rand_img(32, 32))
  for bad in (raw[:len(raw) // 2], b"not an image at all"):
    with pytest.raises(tf.errors.InvalidArgumentError, match="rec-7"):
      run("decode|resize(8)", image=bad, _id=b"rec-7")


# --- Text ------------------------------------------------------------------------------


def test_byte_tokenize_pad_truncate_eos():
  tok = get_tokenizer("bytes")
  ab = [ord("a") + 3, ord("b") + 3]
  t = lambda pp, s: list(run(pp, texts=s)["labels"])
  assert t("tokenize(4)", "AB") == ab + [0, 0]  # Lower-cased by default.
  assert t('tokenize(4, eos="yes")', "ab") == ab + [tok.eos_id, 0]
  assert t('tokenize(2, eos="yes")', "abc") == ab
  assert t('tokenize(2, eos="sticky")', "abc") == [ab[0], tok.eos_id]
  assert t("tokenize(3)", "") == [0, 0, 0]
  assert tok.decode(tok.encode("héllo wörld")) == "héllo wörld"
  ids = run('tokenize(16, eos="yes", lower=False)', texts="Héllo")["labels"]
  assert tok.decode(ids) == "Héllo"


def test_choice_and_multi_caption_tokenize():
  caps = np.array([b"one", b"two", b"three"])
  assert run('choice(mode="first", outkey="text")', texts=caps)["text"] == b"one"
  picked = {run('choice(outkey="text")', **seeded(s, texts=caps))["text"] for s in range(12)}
  assert picked == set(caps.tolist())
  out = run('tokenize(6, sample_if_multi=False)', texts=caps)["labels"]
  assert out.shape == (3, 6)
  assert get_tokenizer("bytes").decode(out[2]) == "three"


def test_sentencepiece_round_trip(tmp_path):
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  sentences = ["a red circle above a blue square", "a green triangle left of a circle",
               "a yellow square below a red triangle", "a blue circle and a green square"]
  (tmp_path / "corpus.txt").write_text("\n".join(sentences * 20))
  spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"),
                                 model_prefix=str(tmp_path / "sp"), vocab_size=28,
                                 pad_id=0, unk_id=1, bos_id=-1, eos_id=2,
                                 minloglevel=2)
  model = str(tmp_path / "sp.model")
  tok = get_tokenizer(model)
  assert tok.decode(tok.encode("a red circle above a blue square")) == (
      "a red circle above a blue square")
  ids = run(f'tokenize(24, eos="yes", model="{model}")', texts="A Green Triangle")["labels"]
  assert ids.shape == (24,) and ids[-1] == 0 and tok.eos_id in ids
  assert tok.decode(ids) == "a green triangle"


def test_flatten_nested_features():
  fn = get_preprocess_fn('flatten|choice("first", inkey="captions/text", outkey="texts")')
  out = fn({"image": tf.zeros((2, 2, 3), tf.uint8),
            "captions": {"text": tf.constant(["a cat", "a dog"]), "id": tf.constant([1, 2])}})
  assert set(out) >= {"image", "captions/text", "captions/id", "texts"}
  assert out["texts"].numpy() == b"a cat"


def test_container_check_accepts_what_tf_decodes_and_rejects_truncation():
  """JPEGs with data after the end marker (camera trailers) and WebP decode in TF, so
  the pre-decode check must pass them; truncated files must fail it."""
  import io  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from input_pipeline import pp_image  # pylint: disable=import-outside-toplevel

  def encoded(fmt):
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 99, np.uint8)).save(buf, fmt)
    return buf.getvalue()
  jpeg, webp = encoded("JPEG"), encoded("WEBP")
  for good in (jpeg, jpeg + b"\x11" * 300, webp, encoded("PNG")):
    assert bool(pp_image.image_bytes_ok(tf.constant(good)))
    assert tf.io.decode_image(good, channels=3, expand_animations=False).shape == (16, 16, 3)
  for bad in (jpeg[:len(jpeg) // 2], webp[:len(webp) - 10], webp[:6], b"\x00garbage"):
    assert not bool(pp_image.image_bytes_ok(tf.constant(bad)))


def test_first_n_pads_or_truncates_with_a_mask():
  out = run('first_n(3, inkey="captions/text")', **{"captions/text": ["a", "b"]})
  assert out["texts"].tolist() == [b"a", b"b", b""]
  assert out["texts_mask"].tolist() == [True, True, False]
  out = run("first_n(2, mask_key='m')", texts=["a", "b", "c"])
  assert out["texts"].tolist() == [b"a", b"b"] and out["m"].all()
  with pytest.raises(ValueError, match="'first_n': n must be >= 1, got 0"):
    run("first_n(0)", texts=["a"])
  with pytest.raises(ValueError, match=r"'first_n': 'texts' must be 1-D .* shape \(\)"):
    run("first_n(2)", texts="a")
  with pytest.raises(ValueError, match=r"pp op 'first_n'.*'texts'"):
    run("first_n(2)", image=rand_img())
