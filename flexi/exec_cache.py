"""On-disk cache of compiled step executables, so a restart skips tracing too.

JAX's persistent compilation cache skips XLA's compile but still traces and lowers
every step function in Python (most of a warm start for a flexible model: one
program per patch size). This cache stores the whole compiled executable
(`jax.experimental.serialize_executable`) under a key computed WITHOUT tracing:
everything that decides the program — the config, the abstract arguments (shapes,
dtypes, shardings), the patch-size value, the compiler options and XLA_FLAGS, the
versions of jax/jaxlib/flax/optax, the devices (on CPU also the host CPU's model and
feature flags: XLA:CPU compiles for them, and a cache in a shared home directory may
serve several machine types), and a hash of this codebase's
Python source and of the files defining a trainer kept elsewhere (`code_fingerprint`;
modules those import are not followed: set `executable_cache=False` while editing
them). Change any of them and the key changes; a file that cannot be read
back is recompiled, never trusted half-way. Executables are only stored by a process
that has not loaded any (see the jaxlib note below): in practice the first start of a
configuration stores, every later start loads.

Only load executables you wrote yourself: unpickling one can run arbitrary code.
"""
import concurrent.futures
import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import pickle
import sys
import tempfile
import threading
import time
from typing import Any, Optional

import jax
from jax._src import config as jax_config  # Thread-local switch for the persistent cache.
from jax.experimental import serialize_executable

from flexi import host, native_attention

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SOURCE_DIRS = ("flexi", "trainers", "evaluators", "input_pipeline")  # mixup runs in-step.
_JAX_FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
              "jax_threefry_partitionable")  # They change what tracing produces.
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_collections")


@functools.lru_cache(maxsize=None)
def source_fingerprint(root: str = _ROOT, dirs=_SOURCE_DIRS) -> str:
  """sha256 over the codebase's .py and .cc files (path and content): edits change it."""
  h = hashlib.sha256()
  for d in dirs:
    for base, subdirs, files in sorted(os.walk(os.path.join(root, d))):
      subdirs.sort()
      for name in sorted(files):
        if name.endswith((".py", ".cc")):
          path = os.path.join(base, name)
          h.update(os.path.relpath(path, root).encode())
          with open(path, "rb") as f:
            h.update(f.read())
  return h.hexdigest()


def code_fingerprint(*fns) -> str:
  """sha256 over the source files that define `fns` (a trainer's loss_fn etc.) when
  they live outside the codebase's own directories, which `source_fingerprint` covers:
  a trainer kept in a user's own module (or run as a script) changes the key when its
  file changes. Modules those files import are not followed."""
  own = tuple(os.path.join(_ROOT, d) + os.sep for d in _SOURCE_DIRS)
  files = set()
  for fn in fns:
    fn = getattr(fn, "func", fn)  # functools.partial
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    path = getattr(module, "__file__", None)
    if path and not os.path.abspath(path).startswith(own):
      files.add(os.path.abspath(path))
  h = hashlib.sha256()
  for path in sorted(files):
    h.update(path.encode())
    with open(path, "rb") as f:
      h.update(f.read())
  return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _versions():  # Cached: reading package metadata costs ~1 ms a package.
  out = {}
  for pkg in _PACKAGES:
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = None
  return out


@functools.lru_cache(maxsize=4096)
def _describe_array(shape, dtype, sharding):
  return f"{shape}:{dtype}:{sharding}"


def _describe(x):
  """Stable text for an abstract argument leaf (shape, dtype, sharding)."""
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    # Cached: a model has thousands of leaves but few distinct (shape, dtype, sharding).
    return _describe_array(tuple(x.shape), x.dtype, getattr(x, "sharding", None))
  return repr(x)


def step_key(*, config_json: str, value: Any, abstract_args, compiler_options) -> str:
  """The cache key of one step executable (see module docstring)."""
  leaves, treedef = jax.tree_util.tree_flatten(abstract_args)
  parts = dict(
      config=config_json, value=repr(value), args=[_describe(x) for x in leaves],
      tree=str(treedef), compiler_options=sorted((compiler_options or {}).items()),
      xla_flags=os.environ.get("XLA_FLAGS", ""), versions=_versions(),
      jax_flags=[str(getattr(jax.config, f, None)) for f in _JAX_FLAGS],
      devices=[(d.platform, d.device_kind, d.id, d.process_index) for d in jax.devices()],
      process=(jax.process_index(), jax.process_count()), source=source_fingerprint(),
      host_cpu=host.cpu_signature() if jax.default_backend() == "cpu" else None)
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# Known jaxlib issue (0.10.2, CPU): once a process has LOADED any executable (a hit in
# JAX's persistent cache, or `get` below), executables it compiles afterwards serialise
# without the kernels they share by name with the loaded ones, and fail when reloaded
# elsewhere ("Function copy_bitcast_fusion.N not found"). So `put` only stores from a
# process that has loaded nothing, and `fresh_compiles()` keeps JAX's persistent cache
# out of the way while the training loop builds its state and compiles its steps.
_PROCESS_LOADED_EXECUTABLES = threading.Event()


def _on_jax_event(event, **kwargs):
  del kwargs
  if event == "/jax/compilation_cache/cache_hits":
    _PROCESS_LOADED_EXECUTABLES.set()


jax.monitoring.register_event_listener(_on_jax_event)


def can_store() -> bool:
  """False once this process has loaded an executable (see the note above)."""
  return not _PROCESS_LOADED_EXECUTABLES.is_set()


def fresh_compiles(enabled: bool = True):
  """Context (thread-local): compiles skip JAX's persistent cache, so they stay storable."""
  return jax_config.enable_compilation_cache(False) if enabled else contextlib.nullcontext()


def compile_for_cache(lowered, compiler_options=None):
  """`lowered.compile(...)` by XLA itself, never a persistent-cache hit (see above)."""
  with fresh_compiles():
    return lowered.compile(compiler_options=compiler_options or None)


class ExecutableCache:
  """`get(key)` -> compiled or None; `put(key, compiled)`. Writes are atomic.

  Every code edit or config change keys a new set of executables, so the directory
  is capped: after each `put`, the least recently used files (a hit refreshes a
  file's mtime) are deleted until the total is at most `max_bytes`.
  """

  def __init__(self, directory: str, max_bytes: Optional[int] = 4 << 30):
    self.directory = os.path.expanduser(directory)
    self.max_bytes = max_bytes
    os.makedirs(self.directory, exist_ok=True)

  def _path(self, key):
    return os.path.join(self.directory, f"{key}.exe")

  def contains(self, key) -> bool:
    return os.path.exists(self._path(key))

  def get(self, key) -> Optional[jax.stages.Compiled]:
    path = self._path(key)
    if not os.path.exists(path):
      return None
    if jax.default_backend() == "cpu":
      native_attention.register_if_built()  # A program may call the kernel's FFI targets.
    try:
      with open(path, "rb") as f:
        payload, in_tree, out_tree = pickle.load(f)
      out = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
    except Exception as e:  # pylint: disable=broad-except
      # Truncated, ...: the caller compiles instead, and a later run stores it anew.
      logging.warning("executable cache: removing unreadable %s (%s)", path, e)
      with contextlib.suppress(OSError):
        os.remove(path)
      return None
    _PROCESS_LOADED_EXECUTABLES.set()
    with contextlib.suppress(OSError):
      os.utime(path)  # Recently used: evicted last.
    return out

  def get_many(self, keys) -> dict:
    """{key: (compiled or None, seconds)}, loaded on a thread pool (linking releases
    the GIL, so this scales with cores)."""
    keys = list(keys)

    def timed_get(key):
      t0 = time.perf_counter()
      out = self.get(key)
      return out, time.perf_counter() - t0
    workers = max(1, min(len(keys), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      return dict(zip(keys, pool.map(timed_get, keys)))

  def put(self, key, compiled) -> bool:
    """Stores `compiled`; False if it cannot be serialized or stored safely."""
    if not can_store():
      return False
    try:
      blob = pickle.dumps(serialize_executable.serialize(compiled))
    except Exception as e:  # pylint: disable=broad-except
      # E.g. closed-over constants, host callbacks (jax.debug.print): they still run,
      # just uncached.
      logging.warning("executable cache: cannot serialise %s (%s)", key, e)
      return False
    tmp = None
    try:  # A full or read-only disk costs the cache entry, never the run.
      fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
      with os.fdopen(fd, "wb") as f:
        f.write(blob)
      os.replace(tmp, self._path(key))
    except OSError as e:
      logging.warning("executable cache: cannot store %s in %s (%s)", key, self.directory, e)
      if tmp is not None:
        with contextlib.suppress(OSError):
          os.remove(tmp)
      return False
    self.evict(keep=self._path(key))
    return True

  def evict(self, keep: Optional[str] = None, stale_tmp_seconds: float = 3600):
    """Deletes least recently used executables until the total fits `max_bytes`, and
    temp files a crashed `put` left (older than `stale_tmp_seconds`: another process
    may be writing a younger one)."""
    files = []
    for name in os.listdir(self.directory):
      path = os.path.join(self.directory, name)
      with contextlib.suppress(OSError):  # Another process may delete it meanwhile.
        st = os.stat(path)
        if name.endswith(".tmp") and time.time() - st.st_mtime > stale_tmp_seconds:
          os.remove(path)
        elif name.endswith(".exe"):
          files.append((st.st_mtime, st.st_size, path))
    if self.max_bytes is None:
      return
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
      if total <= self.max_bytes:
        break
      if path != keep:
        with contextlib.suppress(OSError):
          os.remove(path)
          total -= size
