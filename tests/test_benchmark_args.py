"""benchmarks.perf, .ceiling and .remat: bad arguments are one-line errors that name
them; the ceiling's FLOP split; the remat settings' memory order; the training mix."""
import types

import pytest

from benchmarks import ceiling, perf, remat
from flexi import vit

TI_DEPTH = 2  # The measuring tests' "Ti": the same per-block programs, ~6x less compile.


@pytest.fixture
def shallow_ti(monkeypatch):
  """Ti's width, heads and MLP with TI_DEPTH blocks: what is measured is per block."""
  variants = vit._VARIANTS  # pylint: disable=protected-access
  width, _, mlp_dim, heads = variants["Ti"]
  monkeypatch.setitem(variants, "Ti", (width, TI_DEPTH, mlp_dim, heads))


@pytest.mark.parametrize("script, argv, message", [
    (perf, ["--sections", "step,speed"], "unknown section(s) ['speed']"),
    (perf, ["--patches", "16,7"], "patch size(s) [7] do not tile 240px"),
    (perf, ["--mix-rounds", "-1"], "--mix-rounds must be >= 1, got -1"),
    (perf, ["--steps", "-2"], "--steps must be >= 1, got -2"),
    (perf, ["--remat-policy", "dots"], "argument --remat-policy: invalid choice: 'dots'"),
    (ceiling, ["--patches", "16,9"], "patch size(s) [9] do not tile 240px"),
    (ceiling, ["--reps", "0"], "--reps must be >= 1, got 0"),
    (ceiling, ["--batch", "-1"], "--batch must be >= 1, got -1"),
    (remat, ["--patches", "7"], "patch size(s) [7] do not tile 240px"),
    (remat, ["--reps", "0"], "--reps must be >= 1, got 0"),
])
def test_bad_arguments_name_the_culprit(script, argv, message, capsys):
  with pytest.raises(SystemExit):
    script.parse_args(argv)
  assert message in capsys.readouterr().err


def test_defaults_and_quick():
  args = perf.parse_args([])
  assert (args.batch, args.steps, args.mix_rounds) == (8, 3, 4)
  assert args.patches == perf.PATCHES and args.compile_patches == perf.PATCHES
  quick = perf.parse_args(["--quick"])
  assert (quick.batch, quick.steps, quick.mix_rounds) == (4, 2, 2)
  assert quick.compile_patches == (48, 16, 8)


@pytest.mark.usefixtures("shallow_ti")
def test_ceiling_splits_the_flops_into_attention_core_and_rest():
  """The core's FLOPs (whole minus the no-core program) are the six attention
  contractions per layer, 2 * b * heads * n^2 * head_dim each, plus the softmax's
  elementwise work; and the ceiling follows from the parts' times."""
  row = ceiling.measure("Ti", 48, batch=1, reps=1)
  n, heads, head_dim, depth = 26, 3, 64, TI_DEPTH
  contractions = 6 * 2 * heads * n * n * head_dim * depth
  assert contractions <= row["flops"]["core"] <= 1.1 * contractions
  assert row["flops"]["rest"] + row["flops"]["core"] == row["flops"]["whole"]
  t = row["seconds"]
  assert row["ceiling"] == pytest.approx(
      row["flops"]["whole"] / (t["rest"] + t["core"]) / row["peak"])


def test_cpu_record_reads_the_first_cpu_and_its_widest_isa(tmp_path):
  """The machine record tells CPU generations apart that share a model name."""
  block = ("processor\t: {i}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: {model}\n"
           "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx {flags}\n\n")
  info = tmp_path / "cpuinfo"
  info.write_text(block.format(i=0, model=1, flags="avx2 fma")
                  + block.format(i=1, model=17, flags="avx2 avx512f avx512_bf16"))
  assert perf.cpu_record(str(info)) == dict(cpu="AMD EPYC", cpu_family_model="25/1",
                                            isa="avx2")
  info.write_text(block.format(i=0, model=17, flags="avx2 avx512f"))
  assert perf.cpu_record(str(info))["isa"] == "avx512f"
  record = perf.cpu_record(str(tmp_path / "missing"))  # Not Linux: no /proc/cpuinfo.
  assert record["cpu_family_model"] == "?/?" and record["isa"] is None


@pytest.mark.usefixtures("shallow_ti")
def test_remat_settings_order_activation_memory():
  """benchmarks.remat: inside nn.scan, the dots-and-attention policy keeps less than
  no remat and more than full remat (a 2-block Ti/48 at batch 1 already shows it)."""
  settings = remat.measure("Ti", 48, batch=1, reps=1)["settings"]
  temp = {name: s["temp_bytes"] for name, s in settings.items()}
  assert temp["scan+remat"] < temp["scan+remat(dots+attn)"] < temp["scan"]
  assert all(s["min_s"] > 0 for s in settings.values())


def test_training_mix_rotates_the_sides_over_one_sequence_per_round():
  """Every side runs each round's patch sequence, the first side rotating by round, and
  img/s is images over that side's own step times."""
  calls = []
  updates_for = lambda p: {s: (lambda s=s: calls.append((s, p))) for s in "abc"}  # noqa: E731
  args = types.SimpleNamespace(patches=(48, 24, 16), mix_rounds=3, batch=2)
  mix = perf.training_mix(args, updates_for, sides=("a", "b", "c"))
  for i, row in enumerate(mix["rounds"]):
    chunk = calls[9 * i: 9 * (i + 1)]
    assert [s for s, _ in chunk[::3]] == ["abc"[(i + j) % 3] for j in range(3)]
    assert all([p for _, p in chunk[3 * j: 3 * j + 3]] == row["sequence"] for j in range(3))
    assert sorted(row["sequence"]) == [16, 24, 48]
  for side in "abc":
    seconds = sum(sum(row[f"{side}_s"]) for row in mix["rounds"])
    assert mix[f"{side}_img_s"] == pytest.approx(2 * 3 * 3 / seconds)


def test_remat_section_runs_every_setting(capsys):
  """`--sections remat` on the tiny variant: each setting's whole steps, one summary row
  each, relative to the unrolled model."""
  perf.main(["--sections", "remat", "--variants", "mu", "--patches", "48",
             "--mix-rounds", "2", "--batch", "2", "--threads", "1"])
  res = perf.RESULTS.pop("remat_mu")
  assert len(res["rounds"]) == 2 and set(res["compile_s"]) == set(perf.REMAT_SETTINGS)
  out = capsys.readouterr().out
  for name in perf.REMAT_SETTINGS:
    assert res[f"{name}_img_s"] > 0
    assert f"| mu: train img/s, random patch size per step (2 rounds), {name} / unrolled |" in out
  assert "scan+remat(dots+attn) / unrolled | " in out and "unrolled / unrolled | 1.00x" in out
