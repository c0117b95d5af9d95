"""Multi-process initialisation (TPU pods, SLURM/GPU clusters, local processes)."""
import os

import jax

_ENV_HINTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
              "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


def initialize(coordinator=None, num_processes=None, process_id=None, local_device_ids=None):
  """Calls `jax.distributed.initialize` when several processes are launched.

  Explicit arguments (the trainers' `--coordinator/--num_processes/--process_id`) win;
  otherwise JAX auto-detects from the environment (SLURM, Open MPI, TPU pods). A single
  plain process does nothing. Returns True when distributed mode is on.
  """
  if coordinator is None:
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
      if not os.environ.get("JAX_PROCESS_ID"):
        raise ValueError("JAX_NUM_PROCESSES is set but JAX_PROCESS_ID is not: set both "
                         "(and JAX_COORDINATOR_ADDRESS)")
      num_processes = int(os.environ["JAX_NUM_PROCESSES"])
      process_id = int(os.environ["JAX_PROCESS_ID"])
  if coordinator is None and not any(os.environ.get(k) for k in _ENV_HINTS):
    if num_processes is not None and int(num_processes) > 1:  # Else each trains alone.
      raise ValueError(f"{num_processes} processes need a coordinator: pass --coordinator "
                       "host:port (or set JAX_COORDINATOR_ADDRESS)")
    return False
  if num_processes is not None and int(num_processes) <= 1 and coordinator is None:
    return False
  # CPU collectives across processes (only used by the CPU backend; harmless elsewhere).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids)
  return True

