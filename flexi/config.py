"""Config loading: ml_collections files, big_vision arg strings, declared keys.

Every key a trainer reads is declared ONCE below in `base_schema()` with its default
and a comment (nanoGPT style). A config file is a Python file with `get_config(arg)`;
its result is merged onto the schema, then command-line overrides are applied. An
unknown key, in the file or on the command line, is an error that names it and
suggests the closest declared key. Sections listed in `Schema.open` (model kwargs,
dataset spec, evaluators, ...) take free-form keys; their consumers validate them.

    config = load("configs/demo.py:runlocal", overrides=["lr=1e-3", "input.batch_size=8"])
"""
import ast
import copy
import dataclasses
import difflib
import importlib.util
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import ml_collections


class ConfigError(ValueError):
  """A bad config file, arg string or override."""


def base_defaults() -> dict:
  """The declared keys shared by every trainer, with defaults."""
  return dict(
      seed=0,                       # Seeds init, dropout/mixup rngs, data order, patch sampling.
      arg={},                       # (open) The parsed arg string, recorded for reference.
      # --- Durations: set exactly ONE of *_steps / *_epochs / *_examples. ---
      total_steps=None,             # Training length in optimizer steps.
      total_epochs=None,            # ... or in passes over the training split.
      total_examples=None,          # ... or in examples seen.
      log_training_steps=50,        # Console/JSON/TensorBoard cadence (also *_epochs/*_examples).
      log_training_epochs=None,
      log_training_examples=None,
      ckpt_steps=1000,              # Checkpoint cadence (also *_epochs/*_examples); None = only at end.
      ckpt_epochs=None,
      ckpt_examples=None,
      keep_ckpts=2,                 # Orbax keeps the last N checkpoints.
      # --- Model. ---
      model_name="vit",             # Informational; the trainer decides which module to build.
      model={},                     # (open) kwargs of flexi.vit.Model (variant, width, ...).
      num_classes=None,             # Classifier outputs.
      init_head_bias=None,          # If set, the head bias is initialised to this (e.g. -10).
      model_init=None,              # big_vision .npz / released name / another workdir to init from.
      model_load={},                # (open) dont_load=[regex...]: params kept from random init.
      # --- Patch-size sampling (flexi/patch_sampler.py). ---
      flexi=dict(
          seqhw=None,               # dict(v=[token grids], p=[weights]) ...
          patch_size=None,          # ... or dict(v=[patch sizes], p=[weights]); p optional.
          curriculum=None,          # dict(stages=[(until, p), ...]) or dict(start=p0, end=p1).
      ),
      # --- Loss and optimizer (flexi/optim.py). ---
      loss="softmax_xent",          # softmax_xent | sigmoid_xent.
      optax_name="scale_by_adam",   # scale_by_adam | adam | adamw | sgd | momentum | lamb | lars.
      optax={},                     # (open) kwargs for the optax transform (b1, b2, mu_dtype, momentum).
      lr=1e-3,                      # Peak learning rate.
      wd=1e-4,                      # Decoupled weight decay (scaled by the schedule, not by lr).
      wd_mults=None,                # [(regex, mult)]; default [(".*/kernel$", 1.0)].
      grad_clip_norm=None,          # Global-norm gradient clipping threshold.
      frozen=[],                    # Regexes of '/'-joined param names that are not trained.
      schedule=dict(
          decay_type="cosine",      # cosine | linear | rsqrt | constant.
          warmup_steps=0,           # Linear warmup from 0 (also warmup_epochs / warmup_examples).
          warmup_epochs=None,
          warmup_examples=None,
          linear_end=0.0,           # Final multiplier of 'linear' decay.
          timescale=10_000,         # rsqrt timescale in steps.
      ),
      mixup=dict(p=0.0, fold_in=None),  # Mixup inside the step (p=0 disables).
      # --- Data (input_pipeline). ---
      input=dict(
          data={},                  # (open) dict(name=tfds name, split=..., data_dir=...).
          pp="",                    # Preprocessing op string.
          batch_size=256,           # GLOBAL batch size; must divide by the number of devices.
          shuffle_buffer_size=10_000,
          cache_raw=False,          # Cache decoded-before-pp examples in memory.
          skip_decode_errors=False,
          prefetch=2,               # tf.data prefetch (batches).
          num_examples=None,        # Override the split size used for epoch-based durations.
      ),
      evals={},                     # (open) {name: dict(type=..., data=..., pp_fn=..., log_steps=...)}.
      # --- Devices. ---
      mesh=dict(axes=[("data", -1)]),    # Mesh axes (name, size); -1 = all remaining devices.
      sharding=dict(
          rules=[(".*", "replicate")],   # [(regex on param path, 'replicate'|'fsdp'|spec tuple)].
          batch_axes=["data"],           # Mesh axes the batch dimension is split over.
          fsdp_axis="data",              # Axis used by the 'fsdp' rule.
      ),
      compilation_cache_dir="~/.cache/flexi/jax_cache",  # None/'' disables the persistent cache.
      executable_cache=True,        # Also keep compiled steps there: a restart skips tracing.
      executable_cache_max_gb=4.0,  # Least recently used executables beyond this are deleted.
      xla_compiler_options={},      # (open) e.g. {"xla_backend_optimization_level": 0} (fast compiles).
      debug=dict(check_finite_every=0),  # >0: also check the loss for NaN every N steps.
  )


# Dotted paths whose contents are free-form.
BASE_OPEN = frozenset({"arg", "model", "model_load", "optax", "input.data", "evals",
                       "xla_compiler_options"})


@dataclasses.dataclass(frozen=True)
class Schema:
  """Declared keys (`defaults`) plus the dotted paths that accept any key (`open`)."""
  defaults: Mapping[str, Any]
  open: frozenset = BASE_OPEN

  def extend(self, defaults: Mapping[str, Any] = (), open_paths: Iterable[str] = ()):
    """A schema with extra keys (e.g. a trainer's `teacher` section)."""
    merged = _merge(copy.deepcopy(dict(self.defaults)), dict(defaults), self, "", strict=False)
    return Schema(merged, frozenset(self.open) | frozenset(open_paths))


def base_schema() -> Schema:
  return Schema(base_defaults(), BASE_OPEN)


def _suggest(key, valid):
  close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
  return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {sorted(valid)}"


def _unknown(path, key, valid):
  full = f"{path}.{key}" if path else key
  return ConfigError(f"unknown config key {full!r}{_suggest(key, valid)}")


def _merge(base: dict, new: Mapping, schema: Schema, path: str, strict=True) -> dict:
  """Recursively merges `new` onto `base`; unknown keys are errors outside open paths."""
  for key, value in new.items():
    full = f"{path}.{key}" if path else key
    if isinstance(value, ml_collections.ConfigDict):
      value = value.to_dict()
    if key not in base:
      if strict and path not in schema.open and not _in_open(path, schema):
        raise _unknown(path, key, base)
      base[key] = copy.deepcopy(value)
    elif isinstance(base[key], dict) and isinstance(value, Mapping) and full not in schema.open:
      base[key] = _merge(base[key], value, schema, full, strict)
    else:
      base[key] = copy.deepcopy(value)
  return base


def _in_open(path, schema):
  return any(path == p or path.startswith(p + ".") for p in schema.open)


def parse_arg(arg: Optional[str], **spec) -> ml_collections.ConfigDict:
  """big_vision-style arg string: "runlocal,variant=S,res=240" -> typed ConfigDict.

  Every key must be declared in `spec` (its default fixes the type); a bare key sets a
  bool to True.
  """
  out = dict(spec)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, eq, raw = item.partition("=")
    key = key.strip()
    if key not in spec:
      raise ConfigError(f"unknown config arg {key!r}{_suggest(key, spec)}")
    if not eq:
      if not isinstance(spec[key], bool):
        raise ConfigError(f"config arg {key!r} needs a value ({key}=...)")
      out[key] = True
    else:
      out[key] = _coerce(spec[key], raw.strip(), key)
  return ml_collections.ConfigDict(out)


def _coerce(default, raw: str, key: str):
  """Parses `raw` to the type of `default` (literals only, never eval)."""
  if isinstance(default, str):
    return raw
  if isinstance(default, bool):
    if raw.lower() in ("1", "true", "yes"):
      return True
    if raw.lower() in ("0", "false", "no"):
      return False
    raise ConfigError(f"config key {key!r} is a bool, got {raw!r}")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    if default is None:
      return raw  # Undeclared type: keep the string.
    raise ConfigError(f"config key {key!r}: cannot parse {raw!r} as {type(default).__name__}")
  if value is None:
    return None
  if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
    if value != int(value):
      raise ConfigError(f"config key {key!r} is an int, got {raw!r}")
    return int(value)
  if default is not None and not isinstance(value, type(default)):
    if not (isinstance(default, (list, tuple)) and isinstance(value, (list, tuple))):
      raise ConfigError(f"config key {key!r} expects {type(default).__name__}, got {raw!r}")
  return value


def apply_override(cfg: dict, item: str, schema: Schema) -> None:
  """Applies one "a.b.c=value" override in place (value parsed as a literal)."""
  dotted, eq, raw = item.partition("=")
  if not eq:
    raise ConfigError(f"override {item!r} must look like key=value")
  keys = dotted.strip().split(".")
  node, path = cfg, ""
  for key in keys[:-1]:
    if key not in node:
      if _in_open(path, schema) or path in schema.open:
        node[key] = {}
      else:
        raise _unknown(path, key, node)
    if not isinstance(node[key], dict):
      raise ConfigError(f"config key {path + '.' if path else ''}{key!r} is not a section")
    node, path = node[key], (f"{path}.{key}" if path else key)
  last = keys[-1]
  if last not in node and not (path in schema.open or _in_open(path, schema)):
    raise _unknown(path, last, node)
  node[last] = _coerce(node.get(last), raw.strip(), dotted)


def split_path_arg(path_with_arg: str):
  """"configs/x.py:a=1,b" -> ("configs/x.py", "a=1,b"); no arg -> (path, None)."""
  head, sep, arg = path_with_arg.partition(".py:")
  if sep:
    return head + ".py", arg
  return path_with_arg, None


def _import_file(path: str):
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist")
  name = "flexi_config_" + os.path.basename(path).replace(".", "_")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config(arg=None)")
  return module


def build(raw: Mapping, overrides: Sequence[str] = (), schema: Optional[Schema] = None):
  """Merges `raw` (a dict/ConfigDict) onto the schema, applies overrides, locks."""
  schema = schema or base_schema()
  if isinstance(raw, ml_collections.ConfigDict):
    raw = raw.to_dict()
  cfg = _merge(copy.deepcopy(dict(schema.defaults)), raw, schema, "")
  for item in overrides:
    apply_override(cfg, item, schema)
  out = ml_collections.ConfigDict(cfg)
  out.lock()
  return out


def load(path_with_arg: str, overrides: Sequence[str] = (), schema: Optional[Schema] = None):
  """Loads `configs/x.py[:arg]`, validates it against the schema, applies overrides."""
  path, arg = split_path_arg(path_with_arg)
  module = _import_file(path)
  raw = module.get_config(arg) if arg is not None else module.get_config()
  return build(raw, overrides, schema)


def parse_cli(argv: Sequence[str]):
  """Splits `--config path[:arg]` and `--config.key=value` / `--config.key value`.

  Returns (config_path_or_None, overrides, remaining_argv).
  """
  path, overrides, rest = None, [], []
  argv = list(argv)
  i = 0
  while i < len(argv):
    a = argv[i]
    if a == "--config" or a.startswith("--config="):
      if "=" in a:
        path = a.split("=", 1)[1]
      else:
        i += 1
        path = argv[i]
    elif a.startswith("--config."):
      body = a[len("--config."):]
      if "=" not in body:
        i += 1
        body = f"{body}={argv[i]}"
      overrides.append(body)
    else:
      rest.append(a)
    i += 1
  return path, overrides, rest
