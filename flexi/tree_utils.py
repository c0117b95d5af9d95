"""Pytree helpers: '/'-joined param names and regex masks over them."""
import re
from typing import Sequence

import jax


def _key_name(k):
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(path) -> str:
  return "/".join(_key_name(k) for k in path)


def tree_paths(tree):
  """A tree of the same structure holding each leaf's '/'-joined name."""
  return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), tree)


def named_leaves(tree):
  return [(path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def regex_mask(tree, patterns: Sequence[str], *, what="pattern", must_match=True):
  """Bool tree: True where the name fully matches any regex in `patterns`."""
  compiled = [re.compile(p) for p in patterns]
  names = [n for n, _ in named_leaves(tree)]
  if must_match:
    for pat, c in zip(patterns, compiled):
      if not any(c.fullmatch(n) for n in names):
        raise ValueError(f"{what} {pat!r} matches no parameter; e.g. {names[:4]}")
  return jax.tree.map(lambda n: any(c.fullmatch(n) for c in compiled), tree_paths(tree))
