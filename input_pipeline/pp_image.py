"""Image preprocessing ops with big_vision's names, arguments and numerics.

Every op works on one image tensor (HWC) and accepts key/inkey/outkey through
`in_key_out_key`. Random ops are stateless given the per-example seed, so a
`copy` made after the crop/flip shares them (FunMatch needs identical views).
"""
import tensorflow as tf

from input_pipeline import pp_base
from input_pipeline.pp_base import in_key_out_key, maybe_repeat

# Shape of the placeholder decoded for a skipped bad record (dropped after pp).
# Large enough that later crops do not fail on it.
_PLACEHOLDER_HW = 512
_TAIL = 256  # Bytes at the end of a PNG searched for its IEND chunk.


def _contains(vec, pattern):
  """Whether the uint8 vector `vec` contains the byte sequence `pattern`."""
  n = tf.shape(vec)[0] - len(pattern) + 1
  hit = tf.ones([tf.maximum(n, 0)], tf.bool)
  for i, b in enumerate(pattern):
    hit &= tf.equal(vec[i:i + tf.maximum(n, 0)], b)
  return tf.reduce_any(hit)


def image_bytes_ok(raw):
  """Cheap container check: a known image format that is not truncated.

  TF's decoders abort the whole input pipeline on a bad file and cannot be
  caught in-graph, so bad records are recognised before decoding: JPEG must
  start with SOI and contain an EOI marker (anywhere: cameras append trailers
  after it), PNG its IEND chunk near the end, WebP as many bytes as its RIFF
  header declares; GIF and BMP are checked by their magic only.
  """
  length = tf.strings.length(raw)
  tail = tf.io.decode_raw(tf.strings.substr(raw, tf.maximum(length - _TAIL, 0), _TAIL),
                          tf.uint8)
  is_jpeg = tf.equal(tf.strings.substr(raw, 0, 3), b"\xff\xd8\xff")
  is_png = tf.equal(tf.strings.substr(raw, 0, 8), b"\x89PNG\r\n\x1a\n")
  is_gif = tf.equal(tf.strings.substr(raw, 0, 4), b"GIF8")
  is_bmp = tf.equal(tf.strings.substr(raw, 0, 2), b"BM")
  # The first 12 bytes, zero-padded (substr past the end would raise).
  head = tf.strings.join([tf.strings.substr(raw, 0, 12), b"\x00" * 12])
  is_webp = (tf.equal(tf.strings.substr(head, 0, 4), b"RIFF")
             & tf.equal(tf.strings.substr(head, 8, 4), b"WEBP"))
  jpeg_ok = tf.cond(is_jpeg,  # Only JPEGs pay for the scan of the whole file.
                    lambda: _contains(tf.io.decode_raw(raw, tf.uint8), (0xFF, 0xD9)),
                    lambda: tf.constant(False))
  png_ok = is_png & _contains(tail, tuple(b"IEND"))
  webp_ok = is_webp & (_riff_size(head) + 8 <= tf.cast(length, tf.int64))
  return jpeg_ok | png_ok | webp_ok | is_gif | is_bmp


def _riff_size(head):
  """The little-endian uint32 byte count at offset 4 of a RIFF file."""
  field = tf.cast(tf.io.decode_raw(tf.strings.substr(head, 4, 4), tf.uint8), tf.int64)
  return tf.reduce_sum(field * tf.constant([1, 1 << 8, 1 << 16, 1 << 24], tf.int64))


def _guarded(raw, data, decode_fn, channels):
  """Runs `decode_fn(raw)` only on sane bytes; a bad record errors or is flagged.

  Error mode (default): an assertion naming the record id. Skip mode (the
  pipeline put `_decode_ok` in the example): a placeholder image is returned and
  the record is flagged, dropped and counted after preprocessing.
  """
  ok = image_bytes_ok(raw)
  if pp_base.DECODE_OK_KEY in data:
    data[pp_base.DECODE_OK_KEY] &= ok
    placeholder = lambda: tf.zeros([_PLACEHOLDER_HW, _PLACEHOLDER_HW, channels], tf.uint8)
    return tf.cond(ok, lambda: decode_fn(raw), placeholder)
  record = data.get(pp_base.ID_KEY, tf.constant("<no id: not read through input_pipeline>"))
  check = tf.debugging.Assert(ok, [
      "Undecodable or truncated image in record", record,
      "(set skip_decode_errors=True to skip and count such records)"])
  with tf.control_dependencies([check]):
    return decode_fn(tf.identity(raw))


def _decode_any(raw, channels, precise=False):
  if precise:
    return tf.cond(tf.io.is_jpeg(raw),
                   lambda: tf.io.decode_jpeg(raw, channels, dct_method="INTEGER_ACCURATE"),
                   lambda: tf.io.decode_image(raw, channels, expand_animations=False))
  return tf.io.decode_image(raw, channels=channels, expand_animations=False)


@in_key_out_key(with_data=True)
def get_decode(channels=3, precise=False):
  """Encoded bytes -> uint8 HWC. `precise` uses the accurate JPEG IDCT."""
  def _decode(raw, data):
    img = _guarded(raw, data, lambda r: _decode_any(r, channels, precise), channels)
    img.set_shape([None, None, channels])
    return img
  return _decode


def _resize(image, size, method="bilinear", antialias=False):
  """tf.image.resize, cast back to the input dtype (clipped), as big_vision."""
  dtype = image.dtype
  out = tf.image.resize(image, size, method=method, antialias=antialias)
  if dtype.is_integer:
    out = tf.clip_by_value(out, dtype.min, dtype.max)
  return tf.cast(out, dtype)


@in_key_out_key()
def get_resize(size, method="bilinear", antialias=False):
  """Resizes to `size` (int -> square, or (h, w))."""
  size = maybe_repeat(size, 2)
  return lambda image: _resize(image, size, method, antialias)


@in_key_out_key()
def get_resize_small(smaller_size, method="area", antialias=False):
  """Resizes so the smaller side is `smaller_size`, keeping the aspect ratio."""
  def _resize_small(image):
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    ratio = tf.cast(smaller_size, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
    nh = tf.cast(tf.round(tf.cast(h, tf.float32) * ratio), tf.int32)
    nw = tf.cast(tf.round(tf.cast(w, tf.float32) * ratio), tf.int32)
    return _resize(image, (nh, nw), method, antialias)
  return _resize_small


def _sample_crop(shape, seed, area_min, area_max, ratio_min=3 / 4, ratio_max=4 / 3):
  """Inception-style box (begin, size) covering area_min..area_max percent."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.zeros([0, 0, 4], tf.float32), seed=seed, min_object_covered=0.0,
      aspect_ratio_range=(ratio_min, ratio_max),
      area_range=(area_min / 100, area_max / 100),
      use_image_if_no_bounding_boxes=True)
  return begin, size


@in_key_out_key(random=True)
def get_inception_crop(size=None, area_min=5, area_max=100, method="bilinear",
                       antialias=False):
  """Random crop of 5%-100% of the area (aspect 3/4..4/3), optionally resized."""
  def _inception_crop(image, seed):
    begin, crop_size = _sample_crop(tf.shape(image), seed, area_min, area_max)
    crop = tf.slice(image, begin, crop_size)
    crop.set_shape([None, None, image.shape[-1]])
    if size:
      crop = _resize(crop, maybe_repeat(size, 2), method, antialias)
    return crop
  return _inception_crop


@in_key_out_key(random=True, with_data=True)
def get_decode_jpeg_and_inception_crop(size=None, area_min=5, area_max=100,
                                       ratio_min=3 / 4, ratio_max=4 / 3,
                                       method="bilinear", antialias=False):
  """Decodes only the inception crop of a JPEG (fast); other formats decode fully."""
  def _op(raw, seed, data):
    def jpeg(r):
      shape = tf.image.extract_jpeg_shape(r)
      begin, crop = _sample_crop(shape, seed, area_min, area_max, ratio_min, ratio_max)
      window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
      return tf.image.decode_and_crop_jpeg(r, window, channels=3)

    def other(r):
      img = tf.io.decode_image(r, channels=3, expand_animations=False)
      begin, crop = _sample_crop(tf.shape(img), seed, area_min, area_max, ratio_min,
                                 ratio_max)
      return tf.slice(img, begin, crop)

    img = _guarded(raw, data, lambda r: tf.cond(tf.io.is_jpeg(r), lambda: jpeg(r),
                                                lambda: other(r)), 3)
    img.set_shape([None, None, 3])
    if size:
      img = _resize(img, maybe_repeat(size, 2), method, antialias)
    return img
  return _op


@in_key_out_key(random=True)
def get_random_crop(size):
  """Uniformly placed crop of `size`."""
  h, w = maybe_repeat(size, 2)
  def _random_crop(image, seed):
    return tf.image.stateless_random_crop(image, [h, w, tf.shape(image)[-1]], seed=seed)
  return _random_crop


@in_key_out_key()
def get_central_crop(size):
  """Centred crop of `size` (the image must be at least that large)."""
  h, w = maybe_repeat(size, 2)
  def _central_crop(image):
    dy = (tf.shape(image)[0] - h) // 2
    dx = (tf.shape(image)[1] - w) // 2
    return tf.image.crop_to_bounding_box(image, dy, dx, h, w)
  return _central_crop


@in_key_out_key(random=True)
def get_flip_lr():
  """Left-right flip with probability 1/2."""
  return lambda image, seed: tf.image.stateless_random_flip_left_right(image, seed)


@in_key_out_key()
def get_value_range(vmin=-1, vmax=1, in_min=0, in_max=255.0, clip_values=False):
  """Linearly maps [in_min, in_max] to [vmin, vmax] (float32)."""
  def _value_range(image):
    image = tf.cast(image, tf.float32)
    image = (image - in_min) / (in_max - in_min)
    image = vmin + image * (vmax - vmin)
    if clip_values:
      image = tf.clip_by_value(image, vmin, vmax)
    return image
  return _value_range


@in_key_out_key()
def get_vgg_value_range(mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
                        std=(0.229 * 255, 0.224 * 255, 0.225 * 255)):
  """(image - ImageNet mean) / std, per channel (float32)."""
  mean = tf.constant(mean, tf.float32)
  std = tf.constant(std, tf.float32)
  return lambda image: (tf.cast(image, tf.float32) - mean) / std
