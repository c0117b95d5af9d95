"""Raw data sources: TFDS datasets by name, or ImageNet-style class folders.

A source reads one split as a tf.data.Dataset of raw examples (images still
encoded) that carry a record id under `_id`, and splits it across processes into
disjoint, complete, near-equal contiguous shards (`tfds.even_splits` semantics).
`data` configs: dict(name="fine_shapes/64" | "dir:/path/to/root", split="train",
data_dir=None). `data_dir` falls back to $TFDS_DATA_DIR, then TFDS's default.
"""
import difflib
import os

import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import offline
from input_pipeline.pp_base import ID_KEY

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
_MANUAL_FILES = {"imagenet2012": "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar"}


def resolve_data_dir(data_dir=None):
  return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      "~/tensorflow_datasets")


def how_to_prepare(name, data_dir):
  """One line telling the user how to get `name` into `data_dir`."""
  base = name.split("/")[0].split(":")[0]
  manual = ""
  if base in _MANUAL_FILES or base.startswith("imagenet2012"):
    files = _MANUAL_FILES.get(base, _MANUAL_FILES["imagenet2012"])
    manual = (f"put the manual download ({files}) in "
              f"{os.path.join(data_dir, 'downloads', 'manual')} and ")
  return (f"Dataset {name!r} is not prepared in {data_dir}: {manual}run "
          f"`tfds build {base} --data_dir={data_dir}`.")


def get_builder(name, data_dir=None):
  """A prepared TFDS builder; offline builders are generated on first use."""
  data_dir = resolve_data_dir(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    base = name.split("/")[0].split(":")[0]
    close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False), n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"Unknown dataset {name!r}.{hint} (use a TFDS name, one of "
                     f"{sorted(offline.OFFLINE_BUILDERS)}, or 'dir:/path/to/root')") from None
  except ValueError as e:  # E.g. an unknown builder config.
    raise ValueError(f"Dataset {name!r}: {str(e).splitlines()[0]}") from None
  if not builder.is_prepared():
    if builder.name in offline.OFFLINE_BUILDERS:
      offline.prepare(builder)
    else:
      raise FileNotFoundError(how_to_prepare(name, data_dir))
  return builder


def host_range(n, index, count):
  """[begin, end) of shard `index` of `count` contiguous near-equal shards of n."""
  return n * index // count, n * (index + 1) // count


class TfdsSource:
  """A TFDS dataset; images are left encoded (decoding is a pp op)."""

  def __init__(self, name, data_dir=None):
    self.name = name
    self.builder = get_builder(name, data_dir)
    features = self.builder.info.features
    self._decoders = {k: tfds.decode.SkipDecoding() for k, f in features.items()
                      if isinstance(f, tfds.features.Image)}

  def _splits(self, split):
    try:
      return self.builder.info.splits[split]
    except (KeyError, ValueError) as e:
      raise ValueError(f"Dataset {self.name!r} has no split {split!r} (splits: "
                       f"{sorted(self.builder.info.splits)}): {e}") from None

  def num_examples(self, split):
    return self._splits(split).num_examples

  def shard_sizes(self, split, count):
    self._splits(split)
    return [self.builder.info.splits[s].num_examples
            for s in tfds.even_splits(split, n=count)]

  def read(self, split, *, process_index=0, process_count=1, shuffle_files=False, seed=0):
    self._splits(split)
    host_split = tfds.even_splits(split, n=process_count)[process_index]
    empty = self.builder.info.splits[host_split].num_examples == 0
    ds = self.builder.as_dataset(  # A split smaller than the process count: some read
        split=split if empty else host_split, shuffle_files=shuffle_files,  # nothing.
        decoders=self._decoders,
        read_config=tfds.ReadConfig(add_tfds_id=True, shuffle_seed=seed))
    if empty:
      ds = ds.take(0)

    def rename_id(ex):
      ex = dict(ex)
      ex[ID_KEY] = ex.pop("tfds_id")
      return ex
    return ds.map(rename_id)


class FolderSource:
  """`root/<split>/<class>/<image>`; label = index of the class in the sorted union
  of class folder names over all splits (so train and val agree)."""

  def __init__(self, root):
    self.name = f"dir:{root}"
    self.root = root
    if not tf.io.gfile.isdir(root):
      raise FileNotFoundError(f"Image folder {root!r} does not exist (expected "
                              "<root>/<split>/<class>/<images>).")
    splits = [d.rstrip("/") for d in tf.io.gfile.listdir(root)
              if tf.io.gfile.isdir(os.path.join(root, d))]
    self.classes = sorted({c.rstrip("/") for s in splits
                           for c in tf.io.gfile.listdir(os.path.join(root, s))
                           if tf.io.gfile.isdir(os.path.join(root, s, c))})
    self.splits = sorted(splits)
    self._cache = {}

  def _files(self, split):
    """(paths, labels) of `split`; `train[10:20]` / `train[:50%]` slicing works."""
    if split in self._cache:
      return self._cache[split]
    base = split.split("[")[0]
    if base not in self.splits:
      close = difflib.get_close_matches(base, self.splits, n=1)
      raise ValueError(f"No split folder {base!r} in {self.root} (splits: {self.splits}"
                       + (f"; did you mean {close[0]!r}?" if close else "") + ")")
    paths, labels = [], []
    for label, cls in enumerate(self.classes):
      d = os.path.join(self.root, base, cls)
      if not tf.io.gfile.isdir(d):
        continue
      for f in sorted(tf.io.gfile.listdir(d)):
        if f.lower().endswith(IMAGE_EXTENSIONS):
          paths.append(os.path.join(d, f))
          labels.append(label)
    if split != base:
      (inst,) = tfds.core.ReadInstruction.from_spec(split).to_absolute(
          {base: tfds.core.SplitInfo(name=base, shard_lengths=[len(paths)],
                                     num_bytes=0, filename_template=None)})
      paths, labels = paths[inst.from_:inst.to], labels[inst.from_:inst.to]
    self._cache[split] = (paths, labels)
    return paths, labels

  def num_examples(self, split):
    return len(self._files(split)[0])

  def shard_sizes(self, split, count):
    n = self.num_examples(split)
    return [e - b for b, e in (host_range(n, i, count) for i in range(count))]

  def read(self, split, *, process_index=0, process_count=1, shuffle_files=False, seed=0):
    paths, labels = self._files(split)
    b, e = host_range(len(paths), process_index, process_count)
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths[b:e], tf.string), tf.constant(labels[b:e], tf.int64)))
    if shuffle_files:  # File order only; the pipeline shuffles examples too.
      ds = ds.shuffle(max(e - b, 1), seed=seed)
    return ds.map(lambda p, l: {"image": tf.io.read_file(p), "label": l, ID_KEY: p},
                  num_parallel_calls=tf.data.AUTOTUNE)


def get_source(data_cfg):
  """`data_cfg`: dict(name=..., data_dir=None); 'dir:/root' names a folder source."""
  name = data_cfg["name"]
  if name.startswith("dir:"):
    return FolderSource(name[len("dir:"):])
  return TfdsSource(name, data_cfg.get("data_dir"))
