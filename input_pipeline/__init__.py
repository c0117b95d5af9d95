"""Input pipeline: TFDS/folder sources, big_vision's pp-op strings, offline
datasets, sharded global batches and in-step mixup.

Importing this package registers the offline TFDS builders (`fine_shapes`,
`shape_captions`) and keeps TensorFlow off the GPU (JAX owns accelerators).
"""
import tensorflow as tf

tf.config.set_visible_devices([], "GPU")

# pylint: disable=g-import-not-at-top,wrong-import-position
from input_pipeline.datasets import get_builder, get_source
from input_pipeline.mixup import mixup
from input_pipeline.offline import FineShapes, ShapeCaptions
from input_pipeline.pipeline import (build_eval_dataset, build_train_dataset,
                                     decode_error_counts, global_batches, numpy_batches)
from input_pipeline.preprocess import OPS, get_preprocess_fn
from input_pipeline.text import get_tokenizer

__all__ = [
    "OPS", "FineShapes", "ShapeCaptions", "build_eval_dataset", "build_train_dataset",
    "decode_error_counts", "get_builder", "numpy_batches", "get_preprocess_fn", "get_source",
    "get_tokenizer", "global_batches", "mixup",
]
