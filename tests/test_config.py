"""Config files, arg strings, overrides and unknown-key errors."""
import os
import textwrap

import pytest

from flexi import config as config_lib
from flexi import durations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(name):
  return os.path.join(ROOT, "configs", name)


def _write(tmp_path, body):
  path = tmp_path / "c.py"
  path.write_text(textwrap.dedent(body))
  return str(path)


@pytest.mark.parametrize("name", ["demo.py", "demo.py:runlocal", "flexivit_i21k_sup.py",
                                  "flexivit_i21k_sup.py:runlocal",
                                  "vit_fixed_i21k_sup.py", "vit_fixed_i21k_sup.py:runlocal"])
def test_repo_configs_load(name):
  c = config_lib.load(_cfg(name))
  assert c.input.batch_size > 0
  assert (c.flexi.seqhw is None) != (c.flexi.patch_size is None)


def test_i21k_matches_big_vision():
  c = config_lib.load(_cfg("flexivit_i21k_sup.py"))
  assert tuple(c.flexi.seqhw.v) == (5, 6, 8, 10, 12, 15, 16, 20, 24, 30)
  assert [240 // s for s in c.flexi.seqhw.v] == [48, 40, 30, 24, 20, 16, 15, 12, 10, 8]
  assert (c.model.variant, tuple(c.model.patch_size), tuple(c.model.posemb_size)) == (
      "B", (32, 32), (7, 7))
  assert (c.lr, c.wd, c.loss, c.init_head_bias, c.total_epochs) == (
      1e-3, 1e-4, "sigmoid_xent", -10.0, 90)
  assert c.optax.mu_dtype == "bfloat16" and c.input.batch_size == 4096
  # big_vision's i21k examples carry "labels" (as configs/flexivit_b.py's i21k data).
  assert 'onehot(21843, key="labels", key_result="labels")' in c.input.pp
  fixed = config_lib.load(_cfg("vit_fixed_i21k_sup.py:patch=30"))
  assert tuple(fixed.flexi.patch_size.v) == (30,) and tuple(fixed.model.posemb_size) == (8, 8)
  assert (fixed.lr, fixed.wd, fixed.schedule.warmup_steps) == (c.lr, c.wd, 10_000)


def test_arg_string_types():
  a = config_lib.parse_arg("runlocal,variant=S,res=224,lr=1", runlocal=False, variant="B",
                           res=240, lr=0.1)
  assert a.runlocal is True and a.variant == "S" and a.res == 224
  assert isinstance(a.lr, float) and a.lr == 1.0
  with pytest.raises(config_lib.ConfigError, match=r"'rse'.*did you mean 'res'"):
    config_lib.parse_arg("rse=3", res=240)
  with pytest.raises(config_lib.ConfigError, match="int"):
    config_lib.parse_arg("res=abc", res=240)


def test_arg_through_load():
  c = config_lib.load(_cfg("flexivit_i21k_sup.py:variant=S,res=224"))
  assert c.model.variant == "S" and c.arg.res == 224


def test_unknown_key_in_file(tmp_path):
  path = _write(tmp_path, """
      import ml_collections
      def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.input = dict(batch_sise=8)
        return c
  """)
  with pytest.raises(config_lib.ConfigError, match=r"'input.batch_sise'.*'batch_size'"):
    config_lib.load(path)


def test_unknown_top_level_key_in_file(tmp_path):
  path = _write(tmp_path, """
      def get_config(arg=None):
        return dict(lrr=0.1)
  """)
  with pytest.raises(config_lib.ConfigError, match=r"'lrr'.*did you mean 'lr'"):
    config_lib.load(path)


def test_overrides_typed_and_checked():
  c = config_lib.load(_cfg("demo.py"), ["lr=1", "input.batch_size=8", "model.width=48",
                                        "flexi.patch_size={'v': [8, 16]}"])
  assert c.lr == 1.0 and isinstance(c.lr, float)
  assert c.input.batch_size == 8 and c.model.width == 48
  assert list(c.flexi.patch_size.v) == [8, 16]
  with pytest.raises(config_lib.ConfigError, match=r"'input.batchsize'.*'batch_size'"):
    config_lib.load(_cfg("demo.py"), ["input.batchsize=8"])
  with pytest.raises(config_lib.ConfigError, match=r"'totl_steps'.*'total_steps'"):
    config_lib.load(_cfg("demo.py"), ["totl_steps=8"])
  with pytest.raises(config_lib.ConfigError, match="int"):
    config_lib.load(_cfg("demo.py"), ["input.batch_size=abc"])


def test_locked_and_cli_parsing():
  c = config_lib.load(_cfg("demo.py"))
  with pytest.raises(AttributeError):
    c.lrr = 3
  path, overrides, rest = config_lib.parse_cli(
      ["--config", "configs/demo.py:runlocal", "--config.lr=1e-3", "--config.seed", "4",
       "--workdir", "/tmp/x"])
  assert path == "configs/demo.py:runlocal"
  assert overrides == ["lr=1e-3", "seed=4"] and rest == ["--workdir", "/tmp/x"]
  assert config_lib.split_path_arg("a/b.py:x=1,y") == ("a/b.py", "x=1,y")


def test_schema_extend():
  schema = config_lib.base_schema().extend({"teacher": {"model": {}, "init": None}},
                                           open_paths=["teacher.model"])
  c = config_lib.build({"teacher": {"init": "x.npz", "model": {"variant": "B"}}},
                       ["teacher.model.width=8"], schema=schema)
  assert c.teacher.init == "x.npz" and c.teacher.model.width == 8
  with pytest.raises(config_lib.ConfigError, match="teacher.int"):
    config_lib.build({"teacher": {"int": 1}}, schema=schema)


def test_durations():
  kw = dict(batch_size=10, num_examples=1000)
  assert durations.to_steps({"total_epochs": 2}, "total", **kw) == 200
  assert durations.to_steps({"total_examples": 55}, "total", **kw) == 6
  assert durations.to_steps({"log_percent": 10}, "log", total_steps=200, **kw) == 20
  assert durations.to_steps({}, "log", default=None, **kw) is None
  with pytest.raises(ValueError, match="only one"):
    durations.to_steps({"total_steps": 1, "total_epochs": 1}, "total", **kw)
  with pytest.raises(ValueError, match="number of training examples"):
    durations.to_steps({"total_epochs": 1}, "total", batch_size=10)
