"""One process of the 2-process test: `python tests/mp_worker.py PID PORT WORKDIR OUT CACHE`."""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from flexi import distributed, train_loop  # noqa: E402


def main():
  pid, port, workdir, out, cache = sys.argv[1:6]
  distributed.initialize(f"localhost:{port}", 2, int(pid))
  assert jax.process_count() == 2 and len(jax.devices()) == 8
  from flexi import sharding  # pylint: disable=import-outside-toplevel
  # A mesh whose batch axis repeats across the processes cannot take per-process rows.
  try:
    sharding.check_batch_size(8, sharding.make_mesh([("model", 2), ("data", -1)]))
    raise AssertionError("a model-first mesh across processes was accepted")
  except ValueError as e:
    assert "devices hold 8 batch rows, not its own 4" in str(e), e
  sharding.check_batch_size(8, sharding.make_mesh([("data", -1), ("model", 2)]))
  from tests import tiny_setup  # pylint: disable=import-outside-toplevel
  from trainers import train  # pylint: disable=import-outside-toplevel
  config = tiny_setup.tiny_config(compilation_cache_dir=cache)
  result = train_loop.train_and_evaluate(config, workdir, train.make_trainer(config),
                                         data=tiny_setup.data())
  flat = {jax.tree_util.keystr(p): np.asarray(x.addressable_data(0))
          for p, x in jax.tree_util.tree_leaves_with_path(result.params)}
  flat.update({f"cka/{k}": np.float64(v)
               for k, v in tiny_setup.cka_of(config, result.params).items()})
  if jax.process_index() == 0:
    np.savez(out, **flat)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
