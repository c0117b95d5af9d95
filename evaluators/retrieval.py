"""Image-text retrieval and zero-shot classification per patch size (flexi-LiT).

Predict functions return {"img": [n, d]} for a batch with "image" and {"txt": [n, d]}
for a batch with token ids under `text_key` (L2-normalised embeddings, see
trainers/lit.py). Both evaluators read their data once per run; every requested
predict function (patch size) sees every image; texts are embedded once (the text
tower does not depend on the patch size).

    evals.retrieval = dict(type="retrieval", data=dict(name="shape_captions/64", split="test"),
                           pp_fn='decode|resize(96)|value_range(-1, 1)|first_n(3)|'
                                 'tokenize(32, eos="sticky", pad_value=1, sample_if_multi=False)|'
                                 'keep("image", "labels", "texts_mask")',  # All captions.
                           preds=["predict_patch_size=8", ...])       # metrics: <size>/i2t@1 ...
    evals.zeroshot = dict(type="zeroshot", data=..., pp_fn='...|keep("image", "label")',
                          pp_txt='tokenize(32, eos="sticky", pad_value=1)',
                          classnames=None, templates=["a {}", "a picture of a {}"])
"""
import jax
import jax.numpy as jnp
import numpy as np

import evaluators
from evaluators import classification, register
from flexi import sharding


def _suffix(name):
  return name[len("predict_"):] if name.startswith("predict_") else name


def recall_at_k(sim, txt_to_img, ks=(1, 5, 10), chunk=1024):
  """Retrieval recall from a [n_img, n_txt] similarity matrix.

  txt_to_img[j] is the image of text j (an image may own several texts).
  image->text: an image hits at k if one of its texts is among its k most similar
  texts; text->image: a text hits at k if its image is among its k most similar
  images. Ties count against the query (every other candidate scoring as high as the
  right one ranks ahead of it) and NaN similarities are misses, so a collapsed or
  diverged model scores ~0, not 1 (big_vision's argsort breaks ties by index
  instead). Returns {"i2t@k": r, "t2i@k": r}.
  """
  sim = np.asarray(sim, np.float32)
  sim = np.where(np.isnan(sim), -np.inf, sim)
  txt_to_img = np.asarray(txt_to_img)
  n_img, n_txt = sim.shape
  if txt_to_img.shape != (n_txt,) or txt_to_img.min(initial=0) < 0 or \
      txt_to_img.max(initial=0) >= n_img:
    raise ValueError(f"txt_to_img must be {n_txt} image indices < {n_img}, got shape "
                     f"{txt_to_img.shape}")
  if np.bincount(txt_to_img, minlength=n_img).min() == 0:
    raise ValueError("every image needs at least one text for image->text recall")
  true = sim[txt_to_img, np.arange(n_txt)]                      # [n_txt]
  own_best = np.full(n_img, -np.inf, np.float32)
  np.maximum.at(own_best, txt_to_img, true)
  own_at_best = np.bincount(txt_to_img[true >= own_best[txt_to_img]], minlength=n_img)
  rank_i2t = np.empty(n_img, np.int64)
  rank_t2i = np.full(n_txt, -1, np.int64)  # The text's own image is counted below.
  for lo in range(0, n_img, chunk):
    block = sim[lo:lo + chunk]
    rank_i2t[lo:lo + chunk] = (np.sum(block >= own_best[lo:lo + chunk, None], axis=1)
                               - own_at_best[lo:lo + chunk])
    rank_t2i += np.sum(block >= true[None, :], axis=0)
  out = {}
  for k in ks:
    out[f"i2t@{k}"] = float(np.mean(rank_i2t < k))
    out[f"t2i@{k}"] = float(np.mean(rank_t2i < k))
  return out


class _Base:
  """Shared: predict-fn selection, the eval data pass, jitted embedders."""

  def __init__(self, predict_fns, ctx, *, data, pp_fn, pred, preds, batch_size, text_key):
    self.names = classification.Evaluator.pred_names(pred, preds, predict_fns)
    self.single = pred is not None
    self.data, self.pp_fn, self.ctx, self.text_key = dict(data), pp_fn, ctx, text_key
    self.batch_size = int(batch_size or ctx.default_batch_size)
    sharding.check_batch_size(self.batch_size, ctx.mesh, ctx.batch_axes)
    rep = sharding.replicated(ctx.mesh)
    self.embed_img = {n: jax.jit(lambda v, x, fn=predict_fns[n]: fn(v, {"image": x})["img"],
                                 out_shardings=rep) for n in self.names}
    first = predict_fns[self.names[0]]
    self.embed_txt = jax.jit(
        lambda v, t: first(v, {text_key: t.reshape(-1, t.shape[-1])})["txt"],
        out_shardings=rep)

  @classmethod
  def validate(cls, name, kwargs, predict_fns):
    evaluators.require_options(name, cls.TYPE, kwargs, cls.REQUIRED)
    classification.Evaluator.pred_names(kwargs.get("pred"), kwargs.get("preds"), predict_fns)

  def _batches(self):
    for b in evaluators.global_eval_batches(self.data, self.pp_fn, self.batch_size, self.ctx):
      yield evaluators.to_host(b["_mask"]).astype(bool), b

  def _metric(self, name, metric):
    return metric if self.single else f"{_suffix(name)}/{metric}"


@register("retrieval")
class RetrievalEvaluator(_Base):
  """Image->text and text->image recall@k per patch size.

  Several captions per image: token ids [batch, k, len] (`tokenize(...,
  sample_if_multi=False)`), and where images have different numbers of captions (COCO)
  `first_n(5, ...)` before it, whose `text_mask_key` says which of the k are real.
  """
  TYPE, REQUIRED = "retrieval", ("data", "pp_fn")

  def __init__(self, predict_fns, ctx, *, data, pp_fn, pred=None, preds=None,
               batch_size=None, ks=(1, 5, 10), text_key="labels", text_mask_key="texts_mask"):
    super().__init__(predict_fns, ctx, data=data, pp_fn=pp_fn, pred=pred, preds=preds,
                     batch_size=batch_size, text_key=text_key)
    self.ks = tuple(int(k) for k in ks)
    self.text_mask_key = text_mask_key

  def _real_texts(self, batch, shape):
    """bool[batch, k]: which captions are real (all, without `text_mask_key`)."""
    if self.text_mask_key not in batch:
      return np.ones(shape, bool)
    real = evaluators.to_host(batch[self.text_mask_key]).astype(bool)
    if real.shape != shape:
      raise ValueError(f"retrieval: {self.text_mask_key!r} has shape {real.shape}, the "
                       f"captions {shape} ([batch, captions per image])")
    return real

  def run(self, variables):
    zimg = {n: [] for n in self.names}
    ztxt, owner, n_seen = [], [], 0
    for mask, batch in self._batches():
      if self.text_key not in batch:
        raise ValueError(f"retrieval eval batches need {self.text_key!r}; check pp_fn")
      tokens = batch[self.text_key]
      per_image = 1 if tokens.ndim == 2 else tokens.shape[1]
      t = evaluators.to_host(self.embed_txt(variables, tokens)).reshape(len(mask), per_image, -1)
      real = self._real_texts(batch, (len(mask), per_image))[mask]
      ztxt.append(t[mask][real])
      idx = n_seen + np.arange(int(mask.sum()))
      owner.append(np.broadcast_to(idx[:, None], real.shape)[real])
      n_seen += int(mask.sum())
      for n in self.names:
        zimg[n].append(evaluators.to_host(self.embed_img[n](variables, batch["image"]))[mask])
    ztxt, owner = np.concatenate(ztxt), np.concatenate(owner)
    for n in self.names:
      sim = np.concatenate(zimg[n]) @ ztxt.T
      for metric, value in recall_at_k(sim, owner, self.ks).items():
        yield self._metric(n, metric), value


def class_prompts(classnames, templates):
  """[(class index, prompt)] for every class and template ("a photo of a {}.")."""
  if not classnames:
    raise ValueError("zero-shot classification needs class names")
  for t in templates:
    if "{}" not in t:
      raise ValueError(f"zero-shot template {t!r} has no '{{}}' for the class name")
  return [(i, t.format(c)) for i, c in enumerate(classnames) for t in templates]


def _dataset_classnames(data, label_key):
  """The dataset's class names: a folder source's class folders, a TFDS label's names."""
  from input_pipeline import datasets  # pylint: disable=import-outside-toplevel
  source = datasets.get_source(data)
  if isinstance(source, datasets.FolderSource):
    return [c.replace("_", " ") for c in source.classes]
  builder = source.builder
  feature = builder.info.features[label_key]
  if not hasattr(feature, "names"):
    raise ValueError(f"dataset {data['name']!r} feature {label_key!r} has no class names; "
                     "pass classnames=[...]")
  return [n.replace("_", " ") for n in feature.names]


@register("zeroshot")
class ZeroShotEvaluator(_Base):
  """Zero-shot top-1: an image's class is the class whose prompt embedding (averaged
  over templates) is most similar to it."""
  TYPE, REQUIRED = "zeroshot", ("data", "pp_fn", "pp_txt")

  def __init__(self, predict_fns, ctx, *, data, pp_fn, pp_txt, classnames=None,
               templates=("{}",), pred=None, preds=None, batch_size=None,
               label_key="label", text_key="labels"):
    super().__init__(predict_fns, ctx, data=data, pp_fn=pp_fn, pred=pred, preds=preds,
                     batch_size=batch_size, text_key=text_key)
    self.label_key = label_key
    names = list(classnames) if classnames else _dataset_classnames(self.data, label_key)
    self.classnames, self.templates = names, list(templates)
    self.tokens = self._tokenize(class_prompts(names, self.templates), pp_txt)

  def _tokenize(self, prompts, pp_txt):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from input_pipeline import preprocess  # pylint: disable=import-outside-toplevel
    pp = preprocess.get_preprocess_fn(pp_txt)
    out = [np.asarray(pp({"texts": tf.constant(p)})[self.text_key]) for _, p in prompts]
    return np.stack(out).astype(np.int32)

  def class_embeddings(self, variables):
    """[n_classes, d]: mean of each class's normalised prompt embeddings, renormalised."""
    z = evaluators.to_host(self.embed_txt(variables, jnp.asarray(self.tokens)))
    z = z.reshape(len(self.classnames), len(self.templates), -1).mean(axis=1)
    return z / (np.linalg.norm(z, axis=-1, keepdims=True) + 1e-8)

  def run(self, variables):
    cls = self.class_embeddings(variables)
    hits = {n: 0 for n in self.names}
    count = 0
    for mask, batch in self._batches():
      if self.label_key not in batch:
        raise ValueError(f"zero-shot eval batches need {self.label_key!r}; check pp_fn")
      labels = evaluators.to_host(batch[self.label_key])[mask]
      if labels.ndim == 2:
        labels = labels.argmax(-1)
      count += int(mask.sum())
      for n in self.names:
        pred = (evaluators.to_host(self.embed_img[n](variables, batch["image"]))[mask] @ cls.T).argmax(-1)
        hits[n] += int(np.sum(pred == labels))
    for n in self.names:
      yield self._metric(n, "acc"), hits[n] / max(count, 1)
