"""Patch-size (or token-grid) sampling per training step, with optional curricula.

Config (`config.flexi`):
    seqhw=dict(v=(5, 6, 8, ...), p=(1, 1, ...))      # token grids (resolution-free), or
    patch_size=dict(v=(48, 40, ...), p=None)           # patch sizes; p None = uniform.
    curriculum=dict(stages=[(0.25, p0), (1.0, p1)])    # weights p0 until 25% of training
                                                       # (a value > 1 is a step count) ...
    curriculum=dict(start=p0, end=p1)                  # ... or linear interpolation.

The value at step `s` is drawn from `np.random.default_rng((seed, s))`, so it only
depends on (seed, step): a resumed run samples exactly the same sequence.
"""
import dataclasses
from typing import Optional, Sequence

import numpy as np


def _normalize(p, n, what):
  p = np.ones(n) if p is None else np.asarray(p, np.float64)
  if p.shape != (n,) or np.any(p < 0) or p.sum() <= 0:
    raise ValueError(f"{what}: need {n} non-negative weights with a positive sum, got {p}")
  return p / p.sum()


@dataclasses.dataclass
class PatchSampler:
  """Samples `kind=value` for each step; `kind` is 'seqhw' or 'patch_size'."""
  kind: str
  values: Sequence[int]
  weights: Optional[Sequence[float]] = None
  curriculum: Optional[dict] = None
  total_steps: int = 1
  seed: int = 0

  def __post_init__(self):
    if self.kind not in ("seqhw", "patch_size"):
      raise ValueError(f"flexi kind must be 'seqhw' or 'patch_size', got {self.kind!r}")
    self.values = [int(v) for v in self.values]
    if not self.values:
      raise ValueError(f"flexi.{self.kind}.v is empty")
    n = len(self.values)
    self._p = _normalize(self.weights, n, f"flexi.{self.kind}.p")
    self._stages = None
    self._linear = None
    cur = dict(self.curriculum or {})
    unknown = set(cur) - {"stages", "start", "end"}
    if unknown:
      raise ValueError(f"unknown flexi.curriculum key(s) {sorted(unknown)}; "
                       "use stages=[(until, p), ...] or start=p0, end=p1")
    if "stages" in cur:
      self._stages = [(self._until(u), _normalize(p, n, "flexi.curriculum stage"))
                      for u, p in cur["stages"]]
      ends = [until for until, _ in self._stages]
      for i in range(1, len(ends)):  # Else a stage would silently never apply.
        if ends[i] <= ends[i - 1] or ends[i - 1] >= self.total_steps:
          raise ValueError(
              f"flexi.curriculum.stages: stage {i} never applies (the stages end at steps "
              f"{ends} of {self.total_steps}; ends must increase and all but the last lie "
              "within training)")
    elif "start" in cur or "end" in cur:
      self._linear = (_normalize(cur.get("start"), n, "flexi.curriculum.start"),
                      _normalize(cur.get("end"), n, "flexi.curriculum.end"))

  def _until(self, u):
    return int(round(u * self.total_steps)) if u <= 1 else int(u)

  def probs(self, step: int) -> np.ndarray:
    """The sampling distribution at `step`."""
    if self._stages:
      for until, p in self._stages:
        if step < until:
          return p
      return self._stages[-1][1]
    if self._linear is not None:
      t = min(max(step / max(self.total_steps - 1, 1), 0.0), 1.0)
      p = (1 - t) * self._linear[0] + t * self._linear[1]
      return p / p.sum()
    return self._p

  def sample(self, step: int) -> int:
    rng = np.random.default_rng((max(int(self.seed), 0), max(int(step), 0)))
    return self.values[int(rng.choice(len(self.values), p=self.probs(step)))]

  def kwargs(self, value: int) -> dict:
    """Model call kwargs for a sampled value, e.g. {'seqhw': 15}."""
    return {self.kind: int(value)}

  def mean_probs(self) -> np.ndarray:
    """Average distribution over training (for throughput estimates)."""
    steps = np.linspace(0, max(self.total_steps - 1, 0), num=min(self.total_steps, 200))
    return np.mean([self.probs(int(s)) for s in steps], axis=0)


def from_config(flexi_cfg, *, total_steps: int, seed: int) -> PatchSampler:
  """Builds the sampler from `config.flexi` (exactly one of seqhw / patch_size)."""
  seqhw, patch = flexi_cfg.get("seqhw"), flexi_cfg.get("patch_size")
  if (seqhw is None) == (patch is None):
    raise ValueError("set exactly one of config.flexi.seqhw or config.flexi.patch_size "
                     "(each dict(v=[...], p=[...]))")
  kind, spec = ("seqhw", seqhw) if seqhw is not None else ("patch_size", patch)
  unknown = set(spec) - {"v", "p"}
  if unknown:
    raise ValueError(f"unknown config.flexi.{kind} key(s) {sorted(unknown)}; use v and p")
  return PatchSampler(kind, list(spec["v"]), spec.get("p"), flexi_cfg.get("curriculum"),
                      total_steps=total_steps, seed=seed)


def patch_size_of(kind: str, value: int, image_hw) -> int:
  """The patch side length for logging (image_hw needed for seqhw)."""
  if kind == "patch_size":
    return int(value)
  return int(image_hw[0]) // int(value)
