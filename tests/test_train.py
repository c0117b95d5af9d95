"""The shared loop with the supervised trainer on the 8-device simulated CPU mesh."""
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import evaluators as evaluators_lib
from flexi import ckpt_manager, data_source, sharding, steps, train_loop, tree_utils
from trainers import train
from tests import tiny_setup


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def _run(workdir, cache_dir, data=None, **overrides):
  config = tiny_setup.tiny_config(compilation_cache_dir=cache_dir, **overrides)
  return train_loop.train_and_evaluate(config, str(workdir), train.make_trainer(config),
                                       data=data or tiny_setup.data())


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(_host(a)), jax.tree.leaves(_host(b))):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache_dir):
  """6 uninterrupted data-parallel steps (reference for resume and 2-process tests)."""
  workdir = tmp_path_factory.mktemp("full")
  return workdir, _run(workdir, cache_dir)


def test_data_parallel_three_steps(tmp_path, cache_dir):
  result = _run(tmp_path, cache_dir, total_steps=3)
  assert result.step == 3
  for leaf in jax.tree.leaves(result.params):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3]
  assert all(np.isfinite(r["train/loss"]) and r["train/patch_size"] in (8, 16) for r in train_rows)
  assert {"img_per_sec", "eta_sec", "train/lr"} <= set(train_rows[-1])
  assert any(k.startswith("compile_sec/") for r in rows for k in r)
  assert os.listdir(tmp_path / "tb")
  assert set(result.compile_seconds) == {8, 16, steps.OPTIMIZER_UPDATE}


def test_fsdp_three_steps(tmp_path, cache_dir):
  result = _run(tmp_path, cache_dir, total_steps=3, **{"sharding.rules": [(".*", "fsdp")],
                                                      "flexi.patch_size": {"v": [8]},
                                                      "optax": {"mu_dtype": "bfloat16"}})
  specs = jax.tree.map(lambda x: x.sharding.spec, result.params)
  # width 32 -> the largest divisible dim is split over the 8 'data' devices.
  assert specs["embedding"]["kernel"] == jax.sharding.PartitionSpec(None, None, None, "data")
  mlp = specs["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert mlp == jax.sharding.PartitionSpec(None, "data")  # (32, 64): 64 is largest.
  assert specs["head"]["bias"] == jax.sharding.PartitionSpec()  # 4 classes: replicated.
  mu = result.opt_state[1].mu  # chain: clip, adam, ...
  assert mu["embedding"]["kernel"].sharding.spec == specs["embedding"]["kernel"]
  assert mu["embedding"]["kernel"].dtype == jax.numpy.bfloat16
  addressable = result.params["embedding"]["kernel"].addressable_shards[0].data.shape
  assert addressable == (8, 8, 3, 4)
  assert np.isfinite(result.metrics["train/loss"])


class _Killed(Exception):
  pass


def _killed_at(k, source):
  """A data source whose iterator dies when asked for batch `k` (like a preemption)."""
  def make_iter(start):
    for i, batch in enumerate(source.make_iter(start), start):
      if i == k:
        raise _Killed(f"killed before step {k}")
      yield batch
  return data_source.DataSource(make_iter, source.num_examples)


def test_kill_and_resume_bit_identical(tmp_path, cache_dir, full_run):
  _, full = full_run
  with pytest.raises(_Killed):
    _run(tmp_path, cache_dir, data=_killed_at(5, tiny_setup.data()))
  assert ckpt_manager.CheckpointManager(tmp_path).latest_step() == 3
  assert _train_steps(tmp_path)[-1] > 3  # Steps after the checkpoint were logged ...
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "train/lo')  # ... the last one cut short by the kill.
  resumed = _run(tmp_path, cache_dir)
  assert resumed.step == 6
  _assert_trees_equal(full.params, resumed.params)
  _assert_trees_equal(full.opt_state, resumed.opt_state)
  assert _train_steps(tmp_path) == [1, 2, 3, 4, 5, 6]  # ... and are not logged twice.
  # TensorBoard: a SessionLog START at step 4 between the two runs' event files makes
  # it purge the first run's steps 4-5.
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  files = sorted(os.listdir(tmp_path / "tb"))
  marker = [i for i, f in enumerate(files) if f.endswith(".~restart")]
  assert len(files) == 3 and marker == [1]
  starts = [e.step for e in tf.compat.v1.train.summary_iterator(str(tmp_path / "tb" / files[1]))
            if e.HasField("session_log")]
  assert starts == [4]


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, cache_dir):
  clean = tiny_setup.data()

  def make_iter(start):
    for i, batch in enumerate(clean.make_iter(start), start):
      if i == 4:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      yield batch
  with pytest.raises(FloatingPointError, match="non-finite loss at step 4"):
    _run(tmp_path, cache_dir, data=data_source.DataSource(make_iter, clean.num_examples),
         ckpt_steps=2)
  mngr = ckpt_manager.CheckpointManager(tmp_path)
  assert mngr.latest_step() == 4
  params = ckpt_manager.restore_params_from_workdir(str(tmp_path))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_batch_not_divisible_is_clear_error(tmp_path, cache_dir):
  with pytest.raises(ValueError, match="batch size 12 is not divisible by the 8 devices"):
    _run(tmp_path, cache_dir, data=tiny_setup.data(batch_size=12),
         **{"input.batch_size": 12})


def test_frozen_params_do_not_move(tmp_path, cache_dir):
  config = tiny_setup.tiny_config(compilation_cache_dir=cache_dir, total_steps=2,
                                  frozen=["embedding/.*"], **{"flexi.patch_size": {"v": [16]}})
  trainer = train.make_trainer(config)
  result = train_loop.train_and_evaluate(config, str(tmp_path), trainer, data=tiny_setup.data())
  ref = train.make_model(config).init(jax.random.PRNGKey(config.seed),
                                      np.zeros((1, 32, 32, 3), np.float32))["params"]
  # Equal up to jit-vs-eager init rounding; trained params move by ~lr.
  np.testing.assert_allclose(np.asarray(result.params["embedding"]["kernel"]),
                             np.asarray(ref["embedding"]["kernel"]), atol=1e-6, rtol=0)
  assert result.opt_state.inner_states["frozen"].inner_state == ()  # No optimizer state.
  assert not np.allclose(np.asarray(result.params["Transformer"]["encoder_norm"]["scale"]),
                            np.asarray(ref["Transformer"]["encoder_norm"]["scale"]))


def _free_port():
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, cache_dir, full_run):
  """2 processes x 4 CPU devices (gloo collectives) == 1 process x 8 devices."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  worker = os.path.join(os.path.dirname(__file__), "mp_worker.py")
  port, out = _free_port(), str(tmp_path / "params.npz")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, worker, str(i), str(port), str(tmp_path / "wd"),
                             out, cache_dir], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)
  assert "step 6/6" in logs[0] and "step 6/6" not in logs[1]  # Only process 0 logs.
  got = np.load(out)
  _, full = full_run
  for path, x in jax.tree_util.tree_leaves_with_path(_host(full.params)):
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" in name:
      # Its true gradient is exactly 0 (softmax ignores a per-query constant), so the
      # float noise left differs with the reduction order and Adam scales noise to lr.
      continue
    # Same global batch, same math; only the cross-process reduction order differs.
    np.testing.assert_allclose(got[name], x, rtol=0, atol=4e-6, err_msg=name)
  # Evaluators that gather per-process rows (the cka evaluator's mask) work across
  # processes: the same CKA as one process on the same global batches.
  one = tiny_setup.cka_of(tiny_setup.tiny_config(compilation_cache_dir=cache_dir),
                          full.params)
  assert len(one) == 4 and all(f"cka/{k}" in got.files for k in one)
  for k, v in one.items():
    np.testing.assert_allclose(got[f"cka/{k}"], v, rtol=1e-4, err_msg=k)


def test_model_init_from_workdir_with_dont_load(full_run, cache_dir):
  workdir, full = full_run
  config = tiny_setup.tiny_config(model_init=str(workdir),
                                  model_load={"dont_load": ["head/.*"]})
  fresh = train.make_model(config).init(jax.random.PRNGKey(9),
                                        np.zeros((1, 32, 32, 3), np.float32))["params"]
  loaded = train_loop.default_load_pretrained(fresh, config)
  trained = _host(full.params)
  np.testing.assert_array_equal(loaded["embedding"]["kernel"], trained["embedding"]["kernel"])
  np.testing.assert_array_equal(loaded["head"]["kernel"], np.asarray(fresh["head"]["kernel"]))


def test_params_written_on_8_devices_load_on_one(full_run):
  """model_init / teachers / evaluators read another run's params on any topology."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  workdir, full = full_run
  out = str(workdir / "one_device.npz")
  code = ("import sys, numpy as np; from flexi import ckpt_manager, tree_utils; "
          "p = ckpt_manager.restore_params_from_workdir(sys.argv[1]); "
          "np.savez(sys.argv[2], **dict(tree_utils.named_leaves(p)))")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-c", code, str(workdir), out], env=env, text=True,
                        capture_output=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(out)
  for name, x in tree_utils.named_leaves(_host(full.params)):
    np.testing.assert_array_equal(got[name], x, err_msg=name)


def test_resume_errors_name_the_checkpoint_and_param(tmp_path, cache_dir, full_run):
  import shutil  # pylint: disable=import-outside-toplevel
  workdir, _ = full_run
  copy = tmp_path / "wd"
  shutil.copytree(workdir / "ckpt", copy / "ckpt")
  mngr = ckpt_manager.CheckpointManager(copy)
  latest = mngr.latest_step()
  mngr.close()
  with pytest.raises(ValueError, match=r"^checkpoint .*ckpt/6: param Transformer/"
                     r"encoderblock_0/MlpBlock_0/Dense_0/bias has shape \(64,\), the "
                     r"model wants \(96,\)") as e:
    _run(copy, cache_dir, total_steps=8, **{"model.mlp_dim": 96})
  assert latest == 6 and "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"ckpt/6: its optimizer state \(\d+ arrays\) is not "
                                       r"this config's \(\d+\): optax_name"):
    _run(copy, cache_dir, total_steps=8, optax_name="sgd", grad_clip_norm=None)
  for f in (copy / "ckpt" / "6" / "params").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:10])  # Truncated array data.
  with pytest.raises(ValueError, match=r"ckpt/6 is unreadable \(.*\); move it away") as e:
    _run(copy, cache_dir, total_steps=8)
  assert "\n" not in str(e.value)
  shutil.rmtree(copy / "ckpt" / "6" / "params")
  with pytest.raises(ValueError, match=r"ckpt/6 has no params; move it away"):
    _run(copy, cache_dir, total_steps=8)


def test_two_program_step_equals_one_fused_step():
  """flexi.steps: gradient program + shared optimizer update == one plain SGD step, and
  the update program reports the gradient norm of the gradients it applies."""
  w0 = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  x = jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)

  def loss_fn(params, batch, *, rng, flexi, consts):
    del rng, consts
    y = batch["x"] @ params["w"] * flexi["scale"] + params["b"]
    return jnp.mean(y ** 2), {"scale": jnp.float32(flexi["scale"])}
  tx = optax.sgd(0.1)
  build = steps.make_train_step(types.SimpleNamespace(loss_fn=loss_fn), tx, lambda s: 0.1,
                                seed=0)
  mesh = sharding.make_mesh([("data", -1)])
  rep = sharding.replicated(mesh)
  p_sh = jax.tree.map(lambda _: rep, w0)
  spec = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)}
  sampler = types.SimpleNamespace(values=[2.0], kwargs=lambda v: {"scale": v})
  step = steps.compile_all(build, sampler, w0, tx.init(w0), None, spec, mesh, p_sh,
                           jax.tree.map(lambda _: rep, tx.init(w0)))[0][2.0]
  want_grads = jax.grad(lambda p: loss_fn(p, {"x": x}, rng=None, flexi={"scale": 2.0},
                                          consts=None)[0])(w0)
  want = jax.tree.map(lambda p, g: p - 0.1 * g, w0, want_grads)
  params, _, metrics = step(jax.tree.map(jnp.array, w0), tx.init(w0), None, {"x": x},
                            np.int32(0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, want)
  np.testing.assert_allclose(metrics["train/grad_norm"], optax.tree.norm(want_grads),
                             rtol=1e-6)
  assert float(metrics["train/scale"]) == 2.0
  np.testing.assert_allclose(metrics["train/lr"], 0.1)


def test_frozen_params_get_no_gradient_buffer():
  """A frozen param (LiT's locked tower) is left out of the differentiation: the gradient
  program returns None for it, not a buffer of zeros; the step leaves it unchanged, trains
  the rest like plain SGD with it held fixed, and the norm counts only trained params."""
  w0 = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.full((3,), 0.5)}
  x = jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)

  def loss_fn(params, batch, *, rng, flexi, consts):
    del rng, flexi, consts
    return jnp.mean((batch["x"] @ params["w"] + params["b"]) ** 2), {}
  tx = optax.multi_transform({"train": optax.sgd(0.1), "frozen": optax.set_to_zero()},
                             {"w": "train", "b": "frozen"})
  build = steps.make_train_step(types.SimpleNamespace(loss_fn=loss_fn), tx, lambda s: 0.1,
                                seed=0, frozen={"w": False, "b": True})
  mesh = sharding.make_mesh([("data", -1)])
  rep = sharding.replicated(mesh)
  p_sh = jax.tree.map(lambda _: rep, w0)
  spec = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)}
  sampler = types.SimpleNamespace(values=[1], kwargs=lambda v: {})
  opt_state = tx.init(w0)
  step = steps.compile_all(build, sampler, w0, opt_state, None, spec, mesh, p_sh,
                           jax.tree.map(lambda _: rep, opt_state))[0][1]
  grads, _ = step.grads(w0, None, {"x": x}, np.int32(0))
  assert grads["b"] is None and grads["w"].shape == (2, 3)
  grad_w = jax.grad(lambda w: loss_fn({"w": w, "b": w0["b"]}, {"x": x}, rng=None,
                                      flexi=None, consts=None)[0])(w0["w"])
  params, _, metrics = step(jax.tree.map(jnp.array, w0), opt_state, None, {"x": x},
                            np.int32(0))
  np.testing.assert_allclose(params["w"], w0["w"] - 0.1 * grad_w, rtol=1e-6)
  np.testing.assert_array_equal(params["b"], w0["b"])
  np.testing.assert_allclose(metrics["train/grad_norm"], jnp.linalg.norm(grad_w), rtol=1e-6)


def _sigterm_at(k, source):
  """A data source that sends this process SIGTERM when asked for batch `k`."""
  import signal  # pylint: disable=import-outside-toplevel

  def make_iter(start):
    for i, batch in enumerate(source.make_iter(start), start):
      if i == k:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch
  return data_source.DataSource(make_iter, source.num_examples)


def _train_steps(workdir):
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  return [r["step"] for r in rows if "train/loss" in r]


def test_sigterm_saves_a_checkpoint_and_resumes_bit_identical(tmp_path, cache_dir, full_run):
  """Preemption: SIGTERM ends the run after the step in flight with a checkpoint at that
  step (not the last periodic one, 3); the resumed run logs each step once."""
  _, full = full_run
  with pytest.raises(SystemExit) as e:
    _run(tmp_path, cache_dir, data=_sigterm_at(4, tiny_setup.data()))
  assert e.value.code == 143
  saved = ckpt_manager.CheckpointManager(tmp_path).latest_step()
  assert saved in (4, 5)  # The step in flight when the signal came (batches run ahead).
  resumed = _run(tmp_path, cache_dir)
  _assert_trees_equal(full.params, resumed.params)
  assert _train_steps(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_evals_cut_off_by_a_crash_run_on_resume(tmp_path, cache_dir, monkeypatch):
  """The checkpoint at a step is written before that step's evals: if the run dies in
  between, the resumed run runs them at that step (once), before training on."""
  calls = []

  class Counter:  # A minimal evaluator: counts its runs.
    def __init__(self, predict_fns, ctx, *, scale=1.0):
      del predict_fns, ctx
      self.scale = scale

    def run(self, variables):
      calls.append(1)
      yield "n", self.scale * len(calls)
  monkeypatch.setitem(evaluators_lib.REGISTRY, "test_counter", Counter)
  evals = {"count": {"type": "test_counter", "log_steps": 3}}
  real = train_loop._run_evals  # pylint: disable=protected-access

  def dies_at_3(evs, step, *args):
    if evs and step == 3:
      raise RuntimeError("killed in the step-3 eval")
    return real(evs, step, *args)
  monkeypatch.setattr(train_loop, "_run_evals", dies_at_3)
  with pytest.raises(RuntimeError, match="step-3 eval"):
    _run(tmp_path, cache_dir, evals=evals)
  monkeypatch.setattr(train_loop, "_run_evals", real)
  _run(tmp_path, cache_dir, evals=evals)
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if "count/n" in r] == [3, 6]
  assert _train_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
  with pytest.raises(ValueError, match=r"config.evals.count \(test_counter\): unknown option"
                                       r"\(s\) \['scal'\] \(did you mean 'scale'\?\)"):
    _run(tmp_path / "typo", cache_dir, evals={"count": {"type": "test_counter", "scal": 2}})
  with pytest.raises(ValueError, match=r"ckpt/6 was trained with seed 3, config.seed is 4"):
    _run(tmp_path, cache_dir, seed=4, total_steps=9)


def test_frozen_params_key_their_own_executables(monkeypatch):
  """Frozen params change the gradient program's outputs (None gradients), and a trainer
  may set them in code: the executable-cache keys of its programs must differ."""
  w0 = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  loss_fn = lambda params, batch, **kw: (jnp.sum(batch["x"] @ params["w"] + params["b"]), {})  # noqa: E731
  mesh = sharding.make_mesh([("data", -1)])
  rep = sharding.replicated(mesh)
  spec = {"x": jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=rep)}
  sampler = types.SimpleNamespace(values=[1], kwargs=lambda v: {})
  tx = optax.sgd(0.1)
  keys = []
  monkeypatch.setattr("flexi.exec_cache.step_key", lambda **kw: keys.append(kw["value"]) or
                      str(len(keys)))
  no_cache = types.SimpleNamespace(contains=lambda k: False, put=lambda k, c: False)
  for frozen in (None, {"w": False, "b": True}):
    build = steps.make_train_step(types.SimpleNamespace(loss_fn=loss_fn), tx, lambda s: 0.1,
                                  seed=0, frozen=frozen)
    steps.compile_all(build, sampler, w0, tx.init(w0), None, spec, mesh,
                      jax.tree.map(lambda _: rep, w0),
                      jax.tree.map(lambda _: rep, tx.init(w0)), cache=no_cache)
  plain, frozen = keys[:2], keys[2:]
  assert [v for v, _ in plain] == [v for v, _ in frozen] == [steps.OPTIMIZER_UPDATE, 1]
  assert not set(plain) & set(frozen)  # Neither the gradient nor the update key is shared.
