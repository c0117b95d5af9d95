"""flexi.host (the entry points restart with glibc's huge-page tunable, and that works) and
flexi.distributed's launch checks."""
import json
import os
import platform
import subprocess
import sys

import pytest

from flexi import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("environ,glibc,mode,expected", [
    ({}, (2, 36), "madvise", True),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "madvise", True),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", False),  # User's choice.
    ({host.OPT_OUT: "0"}, (2, 36), "madvise", False),
    ({host.OPT_OUT: "1"}, (2, 40), "madvise", True),
    ({"_FLEXI_HUGEPAGES_REEXECED": "1"}, (2, 36), "madvise", False),  # Never twice.
    ({}, (2, 34), "madvise", False),  # Tunable unknown before glibc 2.35.
    ({}, None, "madvise", False),  # musl, macOS.
    ({}, (2, 36), "always", False),  # Huge pages already used.
    ({}, (2, 36), "never", False),
    ({}, (2, 36), None, False),
])
def test_needs_reexec(environ, glibc, mode, expected):
  assert host.needs_reexec(environ, glibc, mode) is expected


def test_with_tunable_appends_and_marks():
  env = host.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert env["A"] == "b" and not host.needs_reexec(env, (2, 36), "madvise")
  assert host.with_tunable({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert host.thp_mode(str(path)) == "madvise"
  path.write_text("[always] madvise never\n")
  assert host.thp_mode(str(path)) == "always"
  assert host.thp_mode(str(tmp_path / "missing")) is None


def test_cpu_signature_tells_machine_types_apart(monkeypatch):
  """Two VMs named "AMD EPYC": a Zen 4 with AVX-512 and a Zen 3 without; two ARM cores
  (no model name or flags there). Code compiled for one (XLA:CPU programs, the native
  kernel) must not be keyed like the other's; per-core fields must not matter."""
  def signature_of(**fields):
    monkeypatch.setattr(host, "_SIGNATURE", None)
    monkeypatch.setattr(host, "cpuinfo", lambda: fields)
    return host.cpu_signature()
  x86 = {"model name": "AMD EPYC", "cpu family": "25"}
  zen4 = signature_of(**x86, model="17", flags="avx2 avx512f", processor="0")
  assert zen4 == signature_of(**x86, model="17", flags="avx2 avx512f", processor="1",
                              **{"cpu MHz": "2445.4", "bogomips": "4890.80"})
  assert signature_of(**x86, model="1", flags="avx2") != zen4
  arm = {"CPU implementer": "0x41", "Features": "fp asimd sve"}
  assert signature_of(**arm, **{"CPU part": "0xd40"}) != signature_of(**arm, **{"CPU part": "0xd0c"})
  # No /proc/cpuinfo (macOS), or a failed read: platform facts, and read again next time.
  assert signature_of() == f"{platform.machine()} {platform.processor()}"
  assert host._SIGNATURE is None  # pylint: disable=protected-access


def test_jax_cache_is_kept_per_cpu_type(tmp_path, monkeypatch):
  """On CPU, JAX's persistent cache goes to a subdirectory per CPU type; executables
  for another machine type never share it (JAX's key omits host features)."""
  from flexi import train_loop  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(train_loop.jax, "default_backend", lambda: "cpu")
  here = train_loop.jax_cache_dir(str(tmp_path))
  assert os.path.dirname(here) == str(tmp_path)
  assert os.path.basename(here).startswith("cpu-")
  monkeypatch.setattr(host, "cpu_signature", lambda: "flags: avx2")
  assert train_loop.jax_cache_dir(str(tmp_path)) != here
  monkeypatch.setattr(train_loop.jax, "default_backend", lambda: "gpu")
  assert train_loop.jax_cache_dir(str(tmp_path)) == str(tmp_path)


_CHILD = """
import ctypes, json, os, resource, sys
from flexi import host
host.reexec_with_hugepages()
libc = ctypes.CDLL(None)  # glibc's malloc itself (numpy madvises large arrays on its own).
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(3):  # Like a step's temporaries: a large buffer allocated, filled, freed.
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  buffer = libc.malloc(64 << 20)
  ctypes.memset(buffer, 1, 64 << 20)
  libc.free(buffer)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(dict(pid=os.getpid(), tunables=os.environ.get("GLIBC_TUNABLES", ""),
                      argv=sys.argv, faults=min(faults))))
"""


def _run_child(**env_overrides):
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "_FLEXI_HUGEPAGES_REEXECED")}
  env.update(env_overrides, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", _CHILD, "--flag", "x"], env=env, cwd=ROOT,
                        capture_output=True, text=True, check=True, timeout=120)
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not host.needs_reexec({}, host.glibc_version(), host.thp_mode()),
                    reason="needs glibc >= 2.35 and the kernel's THP mode 'madvise'")
def test_restarted_process_keeps_argv_and_faults_far_fewer_pages():
  plain = _run_child(FLEXI_HUGEPAGES="0")
  huge = _run_child()
  assert plain["tunables"] == "" and huge["tunables"] == host.TUNABLE
  assert huge["argv"] == plain["argv"] == ["-c", "--flag", "x"]
  pages_4k = (64 << 20) // 4096
  assert plain["faults"] >= 0.9 * pages_4k  # Every 4 KiB page faulted in afresh...
  assert huge["faults"] <= 0.1 * pages_4k  # ...vs 2 MiB pages.


def test_multi_process_launch_without_a_coordinator_is_a_clear_error(monkeypatch):
  """Several processes without a coordinator would each train alone in one workdir."""
  from flexi import distributed  # pylint: disable=import-outside-toplevel
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              *distributed._ENV_HINTS):  # pylint: disable=protected-access
    monkeypatch.delenv(var, raising=False)
  assert distributed.initialize() is False  # One plain process: nothing to do.
  with pytest.raises(ValueError, match="2 processes need a coordinator: pass --coordinator"):
    distributed.initialize(None, 2, 1)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID is not"):
    distributed.initialize()
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  with pytest.raises(ValueError, match="2 processes need a coordinator"):
    distributed.initialize()
