"""Host memory setting for XLA:CPU that glibc only reads when a process starts.

XLA:CPU allocates an executable's temporary buffer (hundreds of MiB for a train step)
at every call, and glibc serves an allocation that large with a fresh `mmap` that it
unmaps again on free. So every step the kernel zero-fills the buffer one 4 KiB page
fault at a time: ~105,000 faults per FlexiViT-Ti/16 step at batch 8, a quarter of its
time on the 2-core dev machine (docs/benchmarks.md). glibc's tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35) backs those mappings with transparent huge
pages (2 MiB), which removes nearly all of the faults. Tunables are read at process
start, so the command-line entry points call `reexec_with_hugepages()` first: it
restarts the same command once, same PID, with the tunable added to GLIBC_TUNABLES.
Set FLEXI_HUGEPAGES=0 to keep the process as it was started.
"""
import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "FLEXI_HUGEPAGES"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
_DONE = "_FLEXI_HUGEPAGES_REEXECED"  # Set in the restarted process: never restart twice.


def glibc_version() -> Optional[tuple]:
  """(major, minor) of the running glibc, None elsewhere (macOS, musl, Windows)."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, ValueError, OSError, TypeError):
    return None
  if name != "glibc":
    return None
  try:
    return tuple(int(x) for x in version.split(".")[:2])
  except ValueError:
    return None


def thp_mode(path: str = _THP_MODE) -> Optional[str]:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never') or None."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def cpuinfo(path: str = "/proc/cpuinfo") -> dict:
  """The first CPU's /proc/cpuinfo fields ({} where there is no such file)."""
  fields = {}
  try:
    with open(path) as f:
      for line in f:
        if not line.strip():
          break  # The first CPU's block ends here.
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:  # No such file (macOS, Windows); cpu_signature falls back to `platform`.
    return {}
  return fields


# Fields that differ between cores or change without changing what code can run here.
_VOLATILE_CPU_FIELDS = frozenset({"processor", "bogomips", "cpu mhz", "apicid", "initial apicid",
                                  "core id", "physical id", "siblings", "cpu cores",
                                  "microcode", "bugs"})
_SIGNATURE = None  # cpu_signature's value once /proc/cpuinfo has been read.


def cpu_signature() -> str:
  """What code compiled for this CPU depends on: the first CPU's /proc/cpuinfo fields
  (x86: model name, family/model, feature flags; ARM: implementer, part, Features)
  without the per-core and volatile ones; `platform` facts where there is no such file.
  XLA:CPU and the native attention kernel generate code for the host's features, so
  their on-disk caches key on this. Read once per process (a failed read is retried)."""
  global _SIGNATURE
  if _SIGNATURE is None:
    info = cpuinfo()
    if not info:
      return f"{platform.machine()} {platform.processor()}"
    _SIGNATURE = " | ".join(f"{k}: {v}" for k, v in sorted(info.items())
                            if k.lower() not in _VOLATILE_CPU_FIELDS)
  return _SIGNATURE


def needs_reexec(environ: Mapping[str, str], glibc: Optional[tuple],
                 mode: Optional[str]) -> bool:
  """True when adding the tunable would change something and nobody said no.

  Only the kernel's 'madvise' mode needs it: 'always' already backs large mappings with
  huge pages, 'never' cannot.
  """
  if environ.get(OPT_OUT, "1") == "0" or _DONE in environ:
    return False
  if glibc is None or glibc < (2, 35) or mode != "madvise":
    return False
  return "glibc.malloc.hugetlb" not in environ.get("GLIBC_TUNABLES", "")


def with_tunable(environ: Mapping[str, str]) -> dict:
  """A copy of `environ` with TUNABLE appended to GLIBC_TUNABLES (':'-separated)."""
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), TUNABLE]))
  env[_DONE] = "1"
  return env


def reexec_with_hugepages():
  """Restarts this command with TUNABLE if `needs_reexec`; returns otherwise.

  Call it first in a `__main__` block, never from library code or tests (it replaces
  the running process).
  """
  # (An embedded interpreter has no sys.executable to restart.)
  if not sys.executable or not needs_reexec(os.environ, glibc_version(), thp_mode()):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], with_tunable(os.environ))
