"""Text tokenizers for flexi-LiT and the `tokenize` pp op.

`get_tokenizer("bytes")` is a dependency-free UTF-8 byte tokenizer (pure TF in
the pipeline); any other string is a path to a SentencePiece `.model` file
(a protobuf, safe to load). Both offer `encode`/`decode` in Python for
zero-shot class names and round trips, and `tf_encode` for the pipeline.
"""
import functools

import numpy as np
import tensorflow as tf

from input_pipeline.pp_base import in_key_out_key

EOS_MODES = ("none", "yes", "sticky")


class ByteTokenizer:
  """ids = UTF-8 bytes + 3; 0 = pad, 1 = eos, 2 = unused (unk)."""
  pad_id, eos_id, offset = 0, 1, 3
  vocab_size = 256 + offset

  def encode(self, text):
    return [b + self.offset for b in text.encode("utf-8")]

  def decode(self, ids):
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return bytes(i - self.offset for i in ids if i >= self.offset).decode(
        "utf-8", errors="replace")

  def tf_encode(self, text):
    raw = tf.io.decode_raw(text, tf.uint8)  # An empty string gives [].
    return tf.cast(raw, tf.int32) + self.offset


class SentencePieceTokenizer:
  """A SentencePiece model file; pad = its pad id (0 if it has none)."""

  def __init__(self, path):
    import sentencepiece  # pylint: disable=import-outside-toplevel
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f"SentencePiece model {path!r} does not exist")
    with tf.io.gfile.GFile(path, "rb") as f:
      self._sp = sentencepiece.SentencePieceProcessor(model_proto=f.read())
    self.path = path
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id = max(self._sp.pad_id(), 0)
    self.eos_id = self._sp.eos_id()

  def encode(self, text):
    return self._sp.encode(text)

  def decode(self, ids):
    ids = [int(i) for i in ids]
    if self.eos_id >= 0 and self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self._sp.decode([i for i in ids if i != self.pad_id])

  def tf_encode(self, text):
    def fn(t):
      return np.asarray(self._sp.encode(np.asarray(t).item().decode("utf-8")), np.int32)
    ids = tf.numpy_function(fn, [text], tf.int32, stateful=False)
    ids.set_shape([None])
    return ids


@functools.lru_cache(maxsize=None)
def get_tokenizer(model="bytes"):
  """"bytes" or a path to a SentencePiece model."""
  if model == "bytes":
    return ByteTokenizer()
  return SentencePieceTokenizer(model)


def pad_ids(ids, max_len, eos, eos_id, pad_value):
  """Truncates/pads a 1-D id tensor to `max_len` with big_vision's eos modes.

  none: truncate. yes: append eos, then truncate (a cut sentence has no eos).
  sticky: append eos; when cut, the last kept token is eos.
  """
  if eos not in EOS_MODES:
    raise ValueError(f"eos must be one of {EOS_MODES}, got {eos!r}")
  if eos != "none":
    if eos_id is None or eos_id < 0:
      raise ValueError("the tokenizer has no eos id; use eos='none'")
    ids = tf.concat([ids, [eos_id]], 0)
  if eos == "sticky":
    ids = tf.cond(tf.shape(ids)[0] > max_len,
                  lambda: tf.concat([ids[:max_len - 1], [eos_id]], 0), lambda: ids)
  ids = ids[:max_len]
  ids = tf.pad(ids, [[0, max_len - tf.shape(ids)[0]]], constant_values=pad_value)
  ids.set_shape([max_len])
  return ids


@in_key_out_key(indefault="texts", outdefault="labels", random=True)
def get_tokenize(max_len, eos="none", model="bytes", lower=True, sample_if_multi=True,
                 pad_value=None):
  """Text -> int32[max_len] ids. A vector of texts gives one random text
  (`sample_if_multi`) or ids for each text ([n, max_len])."""
  tok = get_tokenizer(model)
  pad = tok.pad_id if pad_value is None else pad_value
  if eos not in EOS_MODES:
    raise ValueError(f"eos must be one of {EOS_MODES}, got {eos!r}")

  def one(text):
    if lower:
      text = tf.strings.lower(text, encoding="utf-8")
    return pad_ids(tok.tf_encode(text), max_len, eos, tok.eos_id, pad)

  def _tokenize(texts, seed):
    if texts.shape.rank == 0:
      return one(texts)
    if sample_if_multi:
      i = tf.random.stateless_uniform([], seed, maxval=tf.shape(texts)[0], dtype=tf.int32)
      return one(texts[i])
    return tf.map_fn(one, texts, fn_output_signature=tf.TensorSpec([max_len], tf.int32))
  return _tokenize
