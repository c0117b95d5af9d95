"""Fused CPU attention: `flexi/native/attention.cc` called through the XLA FFI.

XLA:CPU runs attention as separate batched dots of width d (64 in every ViT) with the
scores going through memory in between; at 226 tokens that core ran at ~29% of the
matmul peak and held FlexiViT-Ti's train step below 60% (`benchmarks/ceiling.py`).
The kernel does one (example, head) slice per task on XLA's own thread pool: scores
stay in a per-thread buffer, the five products are OpenBLAS sgemm calls that read
the (batch, tokens, heads, dim) layout in place, and the backward recomputes the
probabilities from the saved log-sum-exp. Same math as flax's attention.

The library is compiled on first use with the system C++ compiler (`$CXX`, default
g++) against jaxlib's FFI headers and the `scipy-openblas32` wheel, and cached under
`$FLEXI_NATIVE_CACHE` (default `~/.cache/flexi/native`), keyed by the source, the
compiler, the versions and paths of jaxlib and OpenBLAS, and the CPU's feature flags
(it is built with -march=native).
CPU only; `attention="auto"` uses it on a single-device CPU backend when it builds.
`attention="native"` also runs on a mesh: each device on its shard of the batch and
heads (`custom_partitioning`; such programs are not serialisable with jaxlib 0.10.2,
so restarts compile them afresh).
"""
import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from flexi import host

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "attention.cc")
_FORWARD, _BACKWARD = "flexi_attention_forward", "flexi_attention_backward"
_COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC", "-std=c++17", "-w")
# Name of what the attention forward keeps for its backward (the output and the rows'
# log-sum-exp), so that a remat policy can save them instead of re-running the forward
# (vit.REMAT_POLICIES["dots_and_attention_saveable"]). Used by attention.py too.
RESIDUALS_NAME = "attention_residuals"


class NativeAttentionUnavailable(RuntimeError):
  """The kernel cannot be built or loaded here (the message says why)."""


@contextlib.contextmanager
def _blas_coretype():
  """OpenBLAS picks its kernels when it loads, from $OPENBLAS_CORETYPE if set; the
  kernel's copy detects the CPU itself (FLEXI_BLAS_CORETYPE forces one) so that a
  process-wide setting meant for numpy (e.g. Haswell kernels on an AVX-512 machine,
  2x slower here) does not apply to it. numpy's own OpenBLAS is a separate library."""
  old = os.environ.pop("OPENBLAS_CORETYPE", None)
  if os.environ.get("FLEXI_BLAS_CORETYPE"):
    os.environ["OPENBLAS_CORETYPE"] = os.environ["FLEXI_BLAS_CORETYPE"]
  try:
    yield
  finally:
    os.environ.pop("OPENBLAS_CORETYPE", None)
    if old is not None:
      os.environ["OPENBLAS_CORETYPE"] = old


def _blas():
  try:
    with _blas_coretype():  # Importing the wheel loads its library.
      import scipy_openblas32  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise NativeAttentionUnavailable(
        "native attention needs the scipy-openblas32 wheel (pip install -r requirements.txt)"
    ) from e
  return scipy_openblas32


def _cxx() -> str:
  return os.environ.get("CXX", "g++")


def _library_path() -> str:
  blas, cxx = _blas(), _cxx()
  with open(_SOURCE, "rb") as f:
    source = f.read()
  # The library's paths are in the key: it links to this environment's OpenBLAS by path.
  key = hashlib.sha256(repr((source, cxx, _COMPILE_FLAGS, jax.__version__, jax.ffi.include_dir(),
                             blas.__version__, blas.get_lib_dir(), host.cpu_signature())).encode())
  key = key.hexdigest()[:20]
  directory = os.environ.get("FLEXI_NATIVE_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "flexi", "native")
  return os.path.join(directory, f"attention-{key}.so")


def _compile(path: str):
  """Compile, then link without -ffast-math (so the process's float mode is untouched)."""
  blas, cxx = _blas(), _cxx()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
    obj, lib = os.path.join(tmp, "attention.o"), os.path.join(tmp, "attention.so")
    commands = [
        [cxx, *_COMPILE_FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{blas.get_include_dir()}",
         "-c", _SOURCE, "-o", obj],
        [cxx, "-shared", obj, "-o", lib, f"-L{blas.get_lib_dir()}",
         f"-l{blas.get_library()}", f"-Wl,-rpath,{blas.get_lib_dir()}", "-lm"],
    ]
    for command in commands:
      try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
      except OSError as e:
        raise NativeAttentionUnavailable(f"cannot run the C++ compiler {cxx!r}: {e}") from e
      if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise NativeAttentionUnavailable(
            f"building {_SOURCE} failed ({shlex.join(command[:2])} ...): {last}")
    os.replace(lib, path)  # Atomic: concurrent builders (several hosts) never see half a file.


_LOAD_LOCK = threading.Lock()  # Executable-cache loads run on threads.


def load() -> ctypes.CDLL:
  """Builds (once per machine) and loads the kernel, and registers its FFI targets.

  Raises NativeAttentionUnavailable with the reason when that is not possible."""
  with _LOAD_LOCK:
    return _load_once()


@functools.lru_cache(maxsize=None)
def _load_once() -> ctypes.CDLL:
  if platform.system() != "Linux":
    raise NativeAttentionUnavailable(f"native attention is built for Linux, not {platform.system()}")
  path = _library_path()
  try:
    if not os.path.exists(path):
      _compile(path)
    with _blas_coretype():
      lib = ctypes.CDLL(path)  # Loads OpenBLAS too if the import above did not.
  except OSError as e:  # An unwritable cache directory, a library that does not load.
    raise NativeAttentionUnavailable(f"cannot build or load {path}: {e}") from e
  lib.flexi_attention_blas_threads(1)  # One BLAS thread per task; tasks use XLA's pool.
  lib.flexi_attention_blas_core.restype = ctypes.c_char_p
  for name, symbol in ((_FORWARD, lib.FlexiAttentionForward),
                       (_BACKWARD, lib.FlexiAttentionBackward)):
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
  return lib


def available() -> bool:
  """Whether `load()` works here; logs the reason once when it does not."""
  with _LOAD_LOCK:
    return _available_once()


@functools.lru_cache(maxsize=None)
def _available_once() -> bool:
  try:
    _load_once()
    return True
  except NativeAttentionUnavailable as e:
    logging.warning("native attention unavailable, using XLA's: %s", e)
    return False


@functools.lru_cache(maxsize=None)
def register_if_built() -> None:
  """Registers the kernel's FFI targets when this machine has already built it; never
  compiles or warns. Cached executables may call the targets, so they must exist
  before loading; a program whose kernel is not built here fails to load and is
  recompiled (which builds it). Once per process: ~10 ms of hashing otherwise."""
  with _LOAD_LOCK:
    with contextlib.suppress(NativeAttentionUnavailable):
      if os.path.exists(_library_path()):
        _load_once()


def blas_core() -> str:
  """OpenBLAS's kernel family in use (e.g. 'SkylakeX'), for benchmark records."""
  return load().flexi_attention_blas_core().decode()


def _shapes(*arrays):
  return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays)


def _forward_call(q, k, v):
  b, n, h, _ = q.shape
  return jax.ffi.ffi_call(
      _FORWARD, (*_shapes(q), jax.ShapeDtypeStruct((b, h, n), q.dtype)),
      vmap_method="sequential")(q, k, v)


def _backward_call(q, k, v, out, lse, d_out):
  return tuple(jax.ffi.ffi_call(_BACKWARD, _shapes(q, k, v), vmap_method="sequential")(
      q, k, v, out, lse, d_out))


# On a mesh: every (example, head) slice is independent, so each device runs the kernel
# on its own shard of the batch and head axes; tokens and the head dimension are
# gathered if they were sharded (`need_replication`). Without this rule XLA would
# gather the whole batch onto every device.
def _batch_and_heads(sharding):
  spec = (*getattr(sharding, "spec", ()), None, None, None, None)  # Not named: replicate.
  return spec[0], spec[2]


def _mesh_shardings(mesh, arg_shapes):
  """(q-like, lse-like) shardings on `mesh` from q's batch and head axes."""
  b, h = _batch_and_heads(arg_shapes[0].sharding)
  return (NamedSharding(mesh, PartitionSpec(b, None, h, None)),
          NamedSharding(mesh, PartitionSpec(b, h, None)))


def _infer_forward(mesh, arg_shapes, result_shape):
  del result_shape
  return _mesh_shardings(mesh, arg_shapes)


def _partition_forward(mesh, arg_shapes, result_shape):
  x, lse = _infer_forward(mesh, arg_shapes, result_shape)
  return mesh, _forward_call, (x, lse), (x, x, x)


def _infer_backward(mesh, arg_shapes, result_shape):
  del result_shape
  x, _ = _mesh_shardings(mesh, arg_shapes)
  return x, x, x


def _partition_backward(mesh, arg_shapes, result_shape):
  del result_shape
  x, lse = _mesh_shardings(mesh, arg_shapes)
  return mesh, _backward_call, (x, x, x), (x, x, x, x, lse, x)


@functools.lru_cache(maxsize=None)
def _mesh_calls():
  """(forward, backward) for multi-device hosts, built on first use. Factors are
  numbered by first appearance (b n h d m); the replication list is sorted by them."""
  forward = custom_partitioning(_forward_call)
  forward.def_partition(
      partition=_partition_forward, infer_sharding_from_operands=_infer_forward,
      sharding_rule="b n h d, b m h d, b m h d -> b n h d, b h n",
      need_replication_factors=("n", "d", "m"))
  backward = custom_partitioning(_backward_call)
  backward.def_partition(
      partition=_partition_backward, infer_sharding_from_operands=_infer_backward,
      sharding_rule=("b n h d, b m h d, b m h d, b n h d, b h n, b n h d -> "
                     "b n h d, b m h d, b m h d"),
      need_replication_factors=("n", "d", "m"))
  return forward, backward


def _on_mesh() -> bool:
  # One device: the plain call. custom_partitioning puts a per-process pointer into the
  # program (JAX's persistent cache misses it across restarts), JAX's lowering keeps
  # local closures in it (the executable cache cannot pickle it), and it has no vmap
  # rule (on a multi-device host vmap a model with attention="auto" or "flax").
  return jax.device_count() > 1


@jax.custom_vjp
def _attend(q, k, v):
  return _forward(q, k, v)[0]


def _forward(q, k, v):
  out, lse = (_mesh_calls()[0] if _on_mesh() else _forward_call)(q, k, v)
  out, lse = checkpoint_name((out, lse), RESIDUALS_NAME)
  return out, (q, k, v, out, lse)


def _backward(residuals, d_out):
  return (_mesh_calls()[1] if _on_mesh() else _backward_call)(*residuals, d_out)


_attend.defvjp(_forward, _backward)


def native_attention(query, key, value, mask=None, dtype=None):
  """softmax(q k^T / sqrt(d)) v on (batch, tokens, heads, dim) float32, fused on CPU.

  Same signature and math as flax's `dot_product_attention`. Masks and other dtypes
  are not fused: they raise, so that a config never silently runs something else
  ("auto" checks first and falls back)."""
  if mask is not None:
    raise ValueError("attention='native' does not take a mask; use 'flax' or 'auto'")
  if dtype is not None:
    query, key, value = (t.astype(dtype) for t in (query, key, value))
  if query.dtype != jnp.float32 or key.dtype != jnp.float32 or value.dtype != jnp.float32:
    raise ValueError(f"attention='native' computes in float32, got {query.dtype}; "
                     "use 'auto' for other dtypes")
  if query.ndim != 4:
    raise ValueError(f"attention='native' expects (batch, tokens, heads, dim), got {query.shape}")
  load()
  return _attend(query, key, value)
