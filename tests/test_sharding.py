"""flexi.sharding: rules, their errors, and optimizer state following its params."""
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from flexi import sharding, tree_utils

PARAMS = {"txt": {"head": {"kernel": np.zeros((4, 16), np.float32)},
                  "Embed_0": {"embedding": np.zeros((259, 8), np.float32)}},
          "img": {"head": {"kernel": np.zeros((4, 16), np.float32)}}}


def test_optimizer_state_follows_anchored_param_rules():
  """Adam's mu of txt/head/kernel lives at '.../mu/txt/head/kernel': an anchored rule
  ('^txt/') does not match that name, yet the moment must be sharded like its param."""
  mesh = sharding.make_mesh([("data", -1)])
  cfg = dict(rules=[("^txt/", "fsdp"), (".*", "replicate")])
  shard = lambda tree: sharding.tree_shardings(tree, mesh, cfg)  # noqa: E731
  p_sh = shard(PARAMS)
  assert p_sh["txt"]["head"]["kernel"].spec == P(None, "data")
  assert p_sh["img"]["head"]["kernel"].spec == P()
  opt = jax.eval_shape(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)).init,
                       PARAMS)
  assert dict(tree_utils.named_leaves(shard(opt)))["1/0/mu/txt/head/kernel"].spec == P()
  o_sh = dict(tree_utils.named_leaves(sharding.opt_state_shardings(opt, PARAMS, p_sh, shard)))
  assert o_sh["1/0/mu/txt/head/kernel"].spec == P(None, "data")
  assert o_sh["1/0/nu/txt/head/kernel"].spec == P(None, "data")
  assert o_sh["1/0/mu/img/head/kernel"].spec == P() and o_sh["1/0/count"].spec == P()


def test_explicit_specs_that_do_not_fit_name_the_param():
  mesh = sharding.make_mesh([("data", -1)])
  with pytest.raises(ValueError, match=r"txt/Embed_0/embedding \(259, 8\) has a dim of 259, "
                     r"not divisible by mesh axes \('data',\) \(8 devices\)"):
    sharding.tree_shardings(PARAMS, mesh, dict(rules=[("Embed_0", ("data", None)),
                                                      (".*", "replicate")]))
  with pytest.raises(ValueError, match="'model' is not a mesh axis"):
    sharding.tree_shardings(PARAMS, mesh, dict(rules=[("head", (None, "model")),
                                                      (".*", "replicate")]))
