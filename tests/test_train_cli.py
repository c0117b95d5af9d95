"""End to end through the command line on the offline dataset: demo.py:runlocal."""
import json

from trainers import train


def test_demo_runlocal_cli(tmp_path, capsys):
  workdir = tmp_path / "demo"
  argv = ["--config", "configs/demo.py:runlocal", "--workdir", str(workdir),
          "--config.compilation_cache_dir", str(tmp_path / "cache"),
          "--config.xla_compiler_options={'xla_backend_optimization_level': 0}"]
  result = train.main(argv)
  out = capsys.readouterr().out
  assert result.step == 4
  # The sweep's table (printed once: the generic table skips evaluators with their own).
  assert out.count("| patch | tokens | prec@1 | loss | GFLOPs/img | img/s |") == 1
  assert "| eval | patch_size |" not in out
  assert "\n| 8 | 16 |" in out and "\n| 16 | 4 |" in out  # 32px: 4x4 and 2x2 tokens.
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  evals = [r for r in rows if "test/patch_size=8/prec@1" in r]
  assert [r["step"] for r in evals] == [4]  # The demo's sweep runs at the end only.
  assert (workdir / "test_sweep.json").exists()
  assert 0.0 <= evals[-1]["test/patch_size=16/prec@1"] <= 1.0
  # Rerunning the finished workdir resumes at the end: nothing is retrained.
  again = train.main(argv)
  assert again.step == 4 and "resumed" in capsys.readouterr().out
