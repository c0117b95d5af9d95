"""The fused CPU attention kernel (flexi/native): same math as flax, forward and backward."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexi import attention
from flexi import native_attention as native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qkv(n_q, n_k, heads, dim, batch=3):
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (batch, n, heads, dim))
             for i, n in enumerate((n_q, n_k, n_k)))
  return 6.0 * q, k, v  # Peaked softmax: the saved log-sum-exp must be stable.


def _float64_attention(q, k, v):
  """softmax(q k^T / sqrt(d)) v in float64 numpy: the reference both are held to."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", probs / probs.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("n_q,n_k,heads,dim", [(33, 33, 3, 64), (1, 26, 2, 16), (50, 7, 1, 8),
                                              (226, 226, 3, 64)])
def test_native_equals_flax_with_gradients(n_q, n_k, heads, dim):
  """Forward and the recomputing backward against flax's autodiff, for q, k and v;
  includes a single query (the MAP head's probe), more queries than keys and Ti/16's
  226 tokens."""
  q, k, v = _qkv(n_q, n_k, heads, dim)
  exact = _float64_attention(q, k, v)
  # Held to float32 attention's own accuracy on this CPU: the error against float64
  # is at most 2.5x flax's on the same inputs (flax's is 1-5e-6 here; the kernel's
  # vectorised expf and sgemm summation order differ by CPU: 0.8-2x flax's on AVX2),
  # never looser than 2e-5.
  flax_error = float(np.abs(np.asarray(nn.dot_product_attention(q, k, v)) - exact).max())
  np.testing.assert_allclose(native.native_attention(q, k, v), exact,
                             rtol=0, atol=min(max(2.5 * flax_error, 3e-6), 2e-5))
  weights = jax.random.normal(jax.random.PRNGKey(9), q.shape)
  loss = lambda f: lambda *qkv: jnp.sum(f(*qkv) * weights)  # noqa: E731
  ours = jax.jit(jax.grad(loss(native.native_attention), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", ours, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=f"d{name}")
    assert float(jnp.abs(b).max()) > 1e-2  # The gradient is not trivially zero.


@pytest.mark.parametrize("spec,n_q", [(("data",), 9), (("data", None, "model"), 9),
                                      ((None, None, "model"), 9), (("data",), 5)])
def test_native_on_a_mesh_runs_on_each_shard(spec, n_q):
  """Batch and/or heads sharded: each device runs the kernel on its shard, forward and
  backward, with no collective (no gathered batch), and the values equal flax's."""
  mesh = jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  q, k, v = _qkv(n_q, 9, 4, 8, batch=8)
  weights = jax.random.normal(jax.random.PRNGKey(9), q.shape)
  loss = lambda f: lambda *qkv: jnp.sum(f(*qkv) * weights)  # noqa: E731
  want = jax.grad(loss(nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  sharded = [jax.device_put(t, sharding) for t in (q, k, v)]
  grad = jax.jit(jax.grad(loss(native.native_attention), argnums=(0, 1, 2)))
  program = grad.lower(*sharded).compile().as_text()
  assert "flexi_attention_backward" in program
  assert not any(op in program for op in ("all-gather", "all-to-all", "all-reduce",
                                           "collective-permute", "reduce-scatter"))
  for name, got, expect in zip("qkv", grad(*sharded), want):
    assert got.sharding.is_equivalent_to(sharding, 4), name
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=2e-5, err_msg=f"d{name}")
  out = jax.jit(native.native_attention)(*sharded)
  np.testing.assert_allclose(out, nn.dot_product_attention(q, k, v), rtol=1e-5, atol=3e-6)


def _uses_kernel(fn, *args):
  traced = jax.make_jaxpr(lambda *a: fn(*a))(*args)  # A new function: no trace cache hit.
  return "flexi_attention_forward" in str(traced)


def test_auto_picks_the_kernel_on_one_cpu_device_only(monkeypatch):
  q, k, v = _qkv(9, 9, 2, 8)
  assert jax.device_count() > 1 and not _uses_kernel(attention.auto_attention, q, k, v)
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert _uses_kernel(attention.auto_attention, q, k, v)
  assert not _uses_kernel(lambda *t: attention.auto_attention(*t, dtype=jnp.bfloat16), q, k, v)
  assert not _uses_kernel(lambda *t: attention.auto_attention(*t, mask=jnp.ones((9, 9), bool)),
                          q, k, v)
  monkeypatch.setattr(native, "available", lambda: False)  # No compiler here, say.
  assert not _uses_kernel(attention.auto_attention, q, k, v)


def test_native_rejects_what_it_does_not_fuse():
  q, k, v = _qkv(4, 4, 1, 8)
  with pytest.raises(ValueError, match="does not take a mask"):
    native.native_attention(q, k, v, mask=jnp.ones((4, 4), bool))
  with pytest.raises(ValueError, match="computes in float32, got bfloat16"):
    native.native_attention(q, k, v, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match=r"expects \(batch, tokens, heads, dim\)"):
    native.native_attention(q[0], k[0], v[0])


@pytest.mark.parametrize("cxx,message", [("/nonexistent/c++", "cannot run the C\\+\\+ compiler"),
                                         ("false", "building .*attention.cc failed")])
def test_build_failure_is_one_clear_error(tmp_path, monkeypatch, cxx, message):
  monkeypatch.setenv("CXX", cxx)
  with pytest.raises(native.NativeAttentionUnavailable, match=message):
    native._compile(str(tmp_path / "attention.so"))  # pylint: disable=protected-access
  assert not os.listdir(tmp_path)  # Nothing half-written is left to be loaded later.


def test_blas_kernel_choice_is_scoped(monkeypatch):
  """The process's OPENBLAS_CORETYPE (meant for numpy) is lifted while the kernel's
  OpenBLAS loads, FLEXI_BLAS_CORETYPE replaces it, and both are restored after."""
  monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
  monkeypatch.delenv("FLEXI_BLAS_CORETYPE", raising=False)
  with native._blas_coretype():  # pylint: disable=protected-access
    assert "OPENBLAS_CORETYPE" not in os.environ
  monkeypatch.setenv("FLEXI_BLAS_CORETYPE", "SkylakeX")
  with native._blas_coretype():  # pylint: disable=protected-access
    assert os.environ["OPENBLAS_CORETYPE"] == "SkylakeX"
  assert os.environ["OPENBLAS_CORETYPE"] == "Haswell"


def _one_device_env():
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


_RUN = """
import sys
import numpy as np
import jax
from tests import test_exec_cache
result = test_exec_cache._run(sys.argv[1], sys.argv[2], **{"model.attention": "native"})
np.savez(sys.argv[3], *[np.asarray(x) for x in jax.tree.leaves(result.params)])
"""


def test_restart_loads_native_programs_from_the_executable_cache(tmp_path):
  """A fresh process loads executables that call the kernel before tracing anything,
  so the cache must register the kernel's FFI targets first; same params both runs."""
  env = _one_device_env()
  outputs = []
  for run in ("store", "load"):
    done = subprocess.run(
        [sys.executable, "-c", _RUN, str(tmp_path / run), str(tmp_path / "cache"),
         str(tmp_path / f"{run}.npz")], cwd=ROOT, env=env, check=True, capture_output=True,
        text=True)
    outputs.append(done.stdout)
  assert "(3 loaded, 0 compiled" in outputs[1], outputs[1][-2000:]
  with np.load(tmp_path / "store.npz") as a, np.load(tmp_path / "load.npz") as b:
    assert a.files == b.files
    for name in a.files:
      np.testing.assert_array_equal(a[name], b[name])


_STORE_OR_LOAD = """
import sys
import jax
import numpy as np
from flexi import exec_cache, native_attention
from tests.test_native_attention import _qkv
cache, qkv = exec_cache.ExecutableCache(sys.argv[2]), _qkv(9, 9, 2, 8)
if sys.argv[1] == "store":
  loss = lambda *t: native_attention.native_attention(*t).sum()
  compiled = exec_cache.compile_for_cache(jax.jit(jax.grad(loss, (0, 1, 2))).lower(*qkv))
  assert cache.put("grads", compiled)
else:
  compiled = cache.get("grads")  # Before anything has touched the kernel.
np.savez(sys.argv[3], *compiled(*qkv))
"""


def test_executable_cache_registers_the_kernel_before_loading(tmp_path):
  """A program that calls the kernel, loaded by a process that has not traced it."""
  for run in ("store", "load"):
    subprocess.run([sys.executable, "-c", _STORE_OR_LOAD, run, str(tmp_path / "cache"),
                    str(tmp_path / f"{run}.npz")], cwd=ROOT, env=_one_device_env(),
                   check=True, capture_output=True)
  with np.load(tmp_path / "store.npz") as a, np.load(tmp_path / "load.npz") as b:
    for name in a.files:
      np.testing.assert_array_equal(a[name], b[name])


def test_unwritable_cache_is_one_clear_error(tmp_path, monkeypatch):
  blocker = tmp_path / "not_a_directory"
  blocker.write_text("")
  monkeypatch.setenv("FLEXI_NATIVE_CACHE", str(blocker / "native"))
  with pytest.raises(native.NativeAttentionUnavailable, match="cannot build or load .*not_a_directory"):
    native._load_once.__wrapped__()  # pylint: disable=protected-access


def test_builds_from_source_into_a_fresh_cache(tmp_path, monkeypatch):
  """The build a fresh machine does (here into an empty directory, not the shared cache)."""
  monkeypatch.setenv("FLEXI_NATIVE_CACHE", str(tmp_path))
  path = native._library_path()  # pylint: disable=protected-access
  assert path.startswith(str(tmp_path)) and not os.path.exists(path)
  native._compile(path)  # pylint: disable=protected-access
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # No temporary files left.
  with open(path, "rb") as f:
    binary = f.read()
  for symbol in (b"FlexiAttentionForward", b"FlexiAttentionBackward", b"scipy_cblas_sgemm"):
    assert symbol in binary


def test_cache_key_follows_the_environment(monkeypatch):
  """Built with -march=native and linked to this venv's OpenBLAS by path: another CPU or
  another environment must not load it."""
  blas = native._blas()  # pylint: disable=protected-access
  here = native._library_path()  # pylint: disable=protected-access
  monkeypatch.setattr(native.host, "cpu_signature", lambda: "flags: sse2")
  other_cpu = native._library_path()  # pylint: disable=protected-access
  monkeypatch.undo()
  monkeypatch.setattr(blas, "get_lib_dir", lambda: "/elsewhere/lib")
  assert len({here, other_cpu, native._library_path()}) == 3  # pylint: disable=protected-access
