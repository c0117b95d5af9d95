"""Patch-size sampler: distribution, determinism, curricula."""
import numpy as np
import pytest

from flexi import patch_sampler


def _freq(sampler, steps):
  draws = [sampler.sample(s) for s in steps]
  return np.array([draws.count(v) for v in sampler.values]) / len(draws)


def test_weighted_distribution():
  s = patch_sampler.PatchSampler("patch_size", [8, 16, 32], [1, 2, 5], total_steps=4000)
  freq = _freq(s, range(4000))
  expected = np.array([1, 2, 5]) / 8
  # Binomial std at n=4000 is <= 0.008; 4 sigma.
  np.testing.assert_allclose(freq, expected, atol=0.032)
  chi2 = np.sum((freq - expected) ** 2 / expected) * 4000
  assert chi2 < 13.8  # p = 0.001 for 2 degrees of freedom.


def test_uniform_default_and_from_config():
  cfg = {"seqhw": {"v": [5, 6, 8, 10, 12, 15, 16, 20, 24, 30]}, "patch_size": None}
  s = patch_sampler.from_config(cfg, total_steps=5000, seed=1)
  assert s.kind == "seqhw"
  np.testing.assert_allclose(_freq(s, range(5000)), 0.1, atol=0.018)
  assert s.kwargs(15) == {"seqhw": 15}
  assert patch_sampler.patch_size_of("seqhw", 15, (240, 240)) == 16


def test_deterministic_by_seed_and_step():
  a = patch_sampler.PatchSampler("patch_size", [8, 16, 24, 32], seed=7, total_steps=100)
  b = patch_sampler.PatchSampler("patch_size", [8, 16, 24, 32], seed=7, total_steps=100)
  c = patch_sampler.PatchSampler("patch_size", [8, 16, 24, 32], seed=8, total_steps=100)
  seq_a = [a.sample(s) for s in range(100)]
  assert seq_a == [b.sample(s) for s in range(100)]
  # A "resumed" sampler asked from step 50 continues the same sequence.
  assert seq_a[50:] == [b.sample(s) for s in range(50, 100)]
  assert seq_a != [c.sample(s) for s in range(100)]


def test_stage_curriculum_large_patches_first():
  s = patch_sampler.PatchSampler(
      "patch_size", [8, 16, 32], curriculum={"stages": [(0.5, [0, 0, 1]), (1.0, [1, 1, 0])]},
      total_steps=1000)
  early = {s.sample(i) for i in range(500)}
  late = [s.sample(i) for i in range(500, 1000)]
  assert early == {32}
  assert set(late) == {8, 16}
  # A stage bound > 1 is a step count.
  s2 = patch_sampler.PatchSampler("patch_size", [8, 32], curriculum={
      "stages": [(10, [0, 1]), (1.0, [1, 0])]}, total_steps=1000)
  assert [s2.sample(i) for i in range(12)] == [32] * 10 + [8] * 2
  for stages in ([(1.0, [0, 1]), (0.25, [1, 0])],    # Out of order.
                 [(2000, [1, 0]), (1.0, [0, 1])]):    # First ends after training.
    with pytest.raises(ValueError, match=r"stage 1 never applies \(the stages end at steps"):
      patch_sampler.PatchSampler("patch_size", [8, 32], curriculum={"stages": stages},
                                 total_steps=1000)


def test_linear_curriculum():
  s = patch_sampler.PatchSampler("patch_size", [8, 32],
                                 curriculum={"start": [0, 1], "end": [1, 0]}, total_steps=101)
  np.testing.assert_allclose(s.probs(0), [0, 1])
  np.testing.assert_allclose(s.probs(50), [0.5, 0.5])
  np.testing.assert_allclose(s.probs(100), [1, 0])
  np.testing.assert_allclose(s.mean_probs(), [0.5, 0.5], atol=0.01)


def test_bad_configs():
  with pytest.raises(ValueError, match="exactly one"):
    patch_sampler.from_config({"seqhw": None, "patch_size": None}, total_steps=1, seed=0)
  with pytest.raises(ValueError, match="weights"):
    patch_sampler.PatchSampler("patch_size", [8, 16], [1])
  with pytest.raises(ValueError, match="curriculum"):
    patch_sampler.PatchSampler("patch_size", [8], curriculum={"stagez": []})
