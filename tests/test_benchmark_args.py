"""benchmarks.perf rejects bad arguments with one line that names them."""
import pytest

from benchmarks import perf


@pytest.mark.parametrize("argv, message", [
    (["--sections", "step,speed"], "unknown section(s) ['speed']"),
    (["--patches", "16,7"], "patch size(s) [7] do not tile 240px"),
    (["--mix-rounds", "-1"], "--mix-rounds must be >= 1, got -1"),
    (["--steps", "-2"], "--steps must be >= 1, got -2"),
])
def test_bad_arguments_name_the_culprit(argv, message, capsys):
  with pytest.raises(SystemExit):
    perf.parse_args(argv)
  assert message in capsys.readouterr().err


def test_defaults_and_quick():
  args = perf.parse_args([])
  assert (args.batch, args.steps, args.mix_rounds) == (8, 3, 4)
  assert args.patches == perf.PATCHES and args.compile_patches == perf.PATCHES
  quick = perf.parse_args(["--quick"])
  assert (quick.batch, quick.steps, quick.mix_rounds) == (4, 2, 2)
  assert quick.compile_patches == (48, 16, 8)
