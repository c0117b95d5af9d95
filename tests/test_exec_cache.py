"""Compiled step executables on disk: a restart loads them without tracing."""
import os

import jax
import numpy as np
import pytest

from flexi import exec_cache, steps, train_loop
from trainers import train
from tests import tiny_setup


def _run(workdir, cache_dir, **overrides):
  config = tiny_setup.tiny_config(compilation_cache_dir=cache_dir, total_steps=2,
                                  ckpt_steps=None, **overrides)
  return train_loop.train_and_evaluate(config, str(workdir), train.make_trainer(config),
                                       data=tiny_setup.data())


def _exe_files(cache_dir):
  return sorted(f for f in os.listdir(os.path.join(cache_dir, "executables"))
                if f.endswith(".exe"))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  cache_dir = str(tmp_path_factory.mktemp("cache"))
  result = _run(tmp_path_factory.mktemp("w0"), cache_dir)
  return cache_dir, result, _exe_files(cache_dir)


def _no_tracing(*args, **kwargs):
  raise AssertionError("a step was traced although its executable is cached")


def test_restart_loads_executables_without_tracing(tmp_path, first_run, monkeypatch):
  cache_dir, first, files = first_run
  assert len(files) == 2  # Patch sizes 8 and 16.
  monkeypatch.setattr(steps, "jit_step", _no_tracing)
  again = _run(tmp_path, cache_dir)
  for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_changed_config_compiles_new_executables(tmp_path, first_run):
  cache_dir, _, _ = first_run
  before = set(_exe_files(cache_dir))
  _run(tmp_path, cache_dir, lr=1e-3)
  assert len(set(_exe_files(cache_dir)) - before) == 2


def test_corrupt_executable_is_recompiled(tmp_path, first_run):
  _, first, files = first_run
  src = tmp_path / "cache"
  os.makedirs(src / "executables")
  for name in files:
    (src / "executables" / name).write_bytes(b"not an executable")
  again = _run(tmp_path / "w", str(src))
  for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert all((src / "executables" / n).stat().st_size > 1000 for n in files)


def test_disabled_by_config(tmp_path):
  _run(tmp_path / "w", str(tmp_path / "c"), executable_cache=False)
  assert not os.path.exists(tmp_path / "c" / "executables")


def test_key_depends_on_every_input(tmp_path):
  args = (jax.ShapeDtypeStruct((2, 3), np.float32),)
  base = dict(config_json="{}", value=8, abstract_args=args, compiler_options={})
  key = exec_cache.step_key(**base)
  assert key == exec_cache.step_key(**base)
  for change in (dict(config_json='{"lr": 1}'), dict(value=16),
                 dict(abstract_args=(jax.ShapeDtypeStruct((2, 4), np.float32),)),
                 dict(abstract_args=(jax.ShapeDtypeStruct((2, 3), jax.numpy.bfloat16),)),
                 dict(compiler_options={"xla_backend_optimization_level": 0})):
    assert exec_cache.step_key(**{**base, **change}) != key, change
  (tmp_path / "flexi").mkdir()
  (tmp_path / "flexi" / "a.py").write_text("x = 1\n")
  one = exec_cache.source_fingerprint(str(tmp_path), ("flexi",))
  (tmp_path / "flexi" / "a.py").write_text("x = 2\n")
  exec_cache.source_fingerprint.cache_clear()
  assert exec_cache.source_fingerprint(str(tmp_path), ("flexi",)) != one
