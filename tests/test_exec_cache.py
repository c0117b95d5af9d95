"""Compiled step executables on disk: a restart loads them without tracing."""
import os
import shutil
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
import pytest

from flexi import exec_cache, steps, train_loop
from trainers import train
from tests import tiny_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JITS = {name: getattr(steps, name) for name in ("jit_grad_step", "jit_apply_step")}


def _run(workdir, cache_dir, **overrides):
  config = tiny_setup.tiny_config(compilation_cache_dir=cache_dir, total_steps=2,
                                  ckpt_steps=None, **overrides)
  return train_loop.train_and_evaluate(config, str(workdir), train.make_trainer(config),
                                       data=tiny_setup.data())


def _exe_files(cache_dir):
  return sorted(f for f in os.listdir(os.path.join(cache_dir, "executables"))
                if f.endswith(".exe"))


_WORKER = """
import sys
import numpy as np
import jax
from tests import test_exec_cache
result = test_exec_cache._run(sys.argv[1], sys.argv[2])
np.savez(sys.argv[3], *[np.asarray(x) for x in jax.tree.leaves(result.params)])
"""


def _run_in_fresh_process(workdir, cache_dir, out):
  """Executables are stored only by a process that has loaded none (jaxlib issue, see
  flexi/exec_cache.py); this pytest process has, so the storing run is a subprocess."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  subprocess.run([sys.executable, "-c", _WORKER, str(workdir), cache_dir, str(out)],
                 cwd=ROOT, env=env, check=True, capture_output=True)
  with np.load(out) as f:
    return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  cache_dir = str(tmp_path_factory.mktemp("cache"))
  base = tmp_path_factory.mktemp("w0")
  params = _run_in_fresh_process(base / "w", cache_dir, base / "params.npz")
  return cache_dir, params, _exe_files(cache_dir)


def _assert_params_equal(expected, result):
  got = jax.tree.leaves(result.params)
  assert len(got) == len(expected)
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a, np.asarray(b))


def _no_tracing(*args, **kwargs):
  raise AssertionError("a step was traced although its executable is cached")


def test_restart_loads_executables_without_tracing(tmp_path, first_run, monkeypatch, capsys):
  cache_dir, first, files = first_run
  assert len(files) == 3  # Gradients at patch sizes 8 and 16, the optimizer update.
  for name in JITS:
    monkeypatch.setattr(steps, name, _no_tracing)
  _assert_params_equal(first, _run(tmp_path, cache_dir))
  out = capsys.readouterr().out
  assert out.count("loaded from the executable cache") == 3 and "(3 loaded, 0 compiled" in out


def test_changed_config_compiles_new_executables(tmp_path, first_run, monkeypatch):
  cache_dir, _, _ = first_run
  before = set(_exe_files(cache_dir))
  traced = []
  for name, jit in JITS.items():
    monkeypatch.setattr(steps, name, lambda *a, jit=jit, **k: traced.append(1) or jit(*a, **k))
  _run(tmp_path, cache_dir, lr=1e-3)
  assert len(traced) == 3  # All traced: the old executables do not match.
  assert set(_exe_files(cache_dir)) == before  # This process has loaded: stores nothing.


def test_corrupt_executable_is_recompiled(tmp_path, first_run):
  _, first, files = first_run
  src = tmp_path / "cache"
  os.makedirs(src / "executables")
  for name in files:
    (src / "executables" / name).write_bytes(b"not an executable")
  _assert_params_equal(first, _run(tmp_path / "w", str(src)))
  assert not _exe_files(str(src))  # Removed, so that a later run stores them anew.


def test_a_partial_cache_is_refilled(tmp_path, first_run):
  """One executable missing (a crash while storing): the next run compiles all and
  stores all (loading the others would forbid storing), and a crashed write's old temp
  file is removed."""
  cache_dir, first, files = first_run
  partial = tmp_path / "cache"
  shutil.copytree(cache_dir, partial)
  os.remove(partial / "executables" / files[0])
  orphan = partial / "executables" / "tmpcrashed.tmp"
  orphan.write_bytes(b"half")
  os.utime(orphan, (1e9, 1e9))
  _run_in_fresh_process(tmp_path / "w", str(partial), tmp_path / "p.npz")
  assert _exe_files(str(partial)) == files and not orphan.exists()


def test_stored_after_a_warm_persistent_cache_run_correctly(tmp_path, first_run):
  """JAX's persistent cache is warm, the executable cache empty: the storing process
  must not take its steps (or init) from the persistent cache, or what it stores is
  incomplete and fails when reloaded."""
  cache_dir, first, _ = first_run
  warm = tmp_path / "cache"
  shutil.copytree(cache_dir, warm)
  shutil.rmtree(warm / "executables")
  _run_in_fresh_process(tmp_path / "w1", str(warm), tmp_path / "p1.npz")
  assert len(_exe_files(str(warm))) == 3
  _assert_params_equal(first, _run(tmp_path / "w2", str(warm)))  # Runs what was stored.


def test_no_store_after_loading(first_run):
  cache_dir, _, files = first_run
  cache = exec_cache.ExecutableCache(os.path.join(cache_dir, "executables"))
  assert cache.get(files[0][:-len(".exe")]) is not None
  assert not exec_cache.can_store() and not cache.put("k", None)


def test_get_refreshes_and_put_evicts_least_recently_used(tmp_path, first_run):
  cache_dir, _, files = first_run
  directory = tmp_path / "exe"
  shutil.copytree(os.path.join(cache_dir, "executables"), directory)
  cache = exec_cache.ExecutableCache(str(directory))
  paths = [directory / name for name in files]
  for age, path in enumerate(paths):  # paths[0] newest ... paths[-1] oldest.
    os.utime(path, (1e9 - age * 100, 1e9 - age * 100))
  assert cache.get(files[-1][:-len(".exe")]) is not None  # The oldest, now just used.
  (directory / "new.exe").write_bytes(b"x" * 10)
  size = lambda p: os.path.getsize(p)  # noqa: E731
  cache.max_bytes = size(paths[-1]) + 10 + 1
  cache.evict(keep=str(directory / "new.exe"))
  assert sorted(os.listdir(directory)) == sorted([files[-1], "new.exe"])
  cache.max_bytes = 5  # Even when the newest alone is over the cap, it is kept.
  cache.evict(keep=str(directory / "new.exe"))
  assert os.listdir(directory) == ["new.exe"]


def test_bad_executable_cache_cap_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="executable_cache_max_gb must be > 0"):
    _run(tmp_path / "w", str(tmp_path / "c"), executable_cache_max_gb=0.0)


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
  # XLA:CPU compiles for the host's features (AVX-512 here, AVX2 there): a cache in a
  # shared home directory must not hand one machine type's programs to another.
  with mock.patch.object(exec_cache.host, "cpu_signature", lambda: "flags: avx2"):
    assert exec_cache.step_key(**base) != key
  (tmp_path / "flexi").mkdir()
  (tmp_path / "flexi" / "a.py").write_text("x = 1\n")
  one = exec_cache.source_fingerprint(str(tmp_path), ("flexi",))
  (tmp_path / "flexi" / "a.py").write_text("x = 2\n")
  exec_cache.source_fingerprint.cache_clear()
  assert exec_cache.source_fingerprint(str(tmp_path), ("flexi",)) != one


def test_trainer_code_outside_the_codebase_is_part_of_the_key(tmp_path, monkeypatch):
  """A trainer in a user's own module: editing its file must change the program key."""
  import importlib  # pylint: disable=import-outside-toplevel
  monkeypatch.syspath_prepend(str(tmp_path))
  module = tmp_path / "my_trainer_mod.py"
  module.write_text("def loss_fn(params, batch):\n  return 1.0\n")
  mod = importlib.import_module("my_trainer_mod")
  config = tiny_setup.tiny_config()
  base = train.make_trainer(config)

  def context():
    trainer = train_loop.Trainer(init_params=base.init_params, loss_fn=mod.loss_fn)
    return train_loop._program_context(config, trainer, {"total": 1})  # pylint: disable=protected-access
  first = context()
  assert context() == first
  module.write_text("def loss_fn(params, batch):\n  return 2.0\n")
  assert context() != first
  # The codebase's own trainers are covered by source_fingerprint instead.
  assert exec_cache.code_fingerprint(base.loss_fn) == exec_cache.code_fingerprint()


def test_a_full_disk_costs_the_entry_not_the_run(tmp_path, monkeypatch, caplog):
  cache = exec_cache.ExecutableCache(str(tmp_path))
  compiled = jax.jit(lambda x: x * 2).lower(np.ones(3, np.float32)).compile()
  monkeypatch.setattr(exec_cache, "can_store", lambda: True)

  def full_disk(src, dst):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(exec_cache.os, "replace", full_disk)
  assert cache.put("k", compiled) is False
  assert "cannot store k" in caplog.text and os.listdir(tmp_path) == []  # No .tmp left.
