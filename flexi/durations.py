"""Durations given in steps, epochs or examples (big_vision's `u.steps`)."""
import math
from typing import Mapping, Optional


def to_steps(cfg: Mapping, prefix: str, *, batch_size: int, num_examples: Optional[int] = None,
             default=ValueError, total_steps: Optional[int] = None) -> Optional[int]:
  """Reads `{prefix}_steps` / `{prefix}_epochs` / `{prefix}_examples` (+ `_percent`).

  At most one may be set; `default` is returned when none is (raise if it is
  ValueError). Epochs need `num_examples`; percent needs `total_steps`.
  """
  keys = [f"{prefix}_{u}" for u in ("steps", "epochs", "examples", "percent")]
  given = {k: cfg.get(k) for k in keys if cfg.get(k) is not None}
  if len(given) > 1:
    raise ValueError(f"set only one of {sorted(given)}")
  if not given:
    if default is ValueError:
      raise ValueError(f"set one of {keys[:3]}")
    return default
  (key, value), = given.items()
  if key.endswith("_steps"):
    return int(value)
  if key.endswith("_examples"):
    return max(1, int(math.ceil(value / batch_size)))
  if key.endswith("_percent"):
    if total_steps is None:
      raise ValueError(f"{key} needs the total number of steps")
    return max(1, int(round(value * total_steps / 100)))
  if not num_examples:
    raise ValueError(f"{key} needs the number of training examples (set input.num_examples)")
  return max(1, int(math.ceil(value * num_examples / batch_size)))
