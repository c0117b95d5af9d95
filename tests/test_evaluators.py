"""Sweep and timing evaluators, the budget picker (tiny model, 8 simulated devices)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import evaluators
from evaluators import classification, sweep, timing
from flexi import budget, sharding, train_loop, vit

SIZES = (16, 8, 4)
NUM_CLASSES = 10


@pytest.fixture(scope="module")
def setup():
  model = vit.Model(NUM_CLASSES, width=32, depth=1, mlp_dim=64, num_heads=2,
                    pool_type="gap", head_zeroinit=False)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(37, 32, 32, 3)).astype(np.float32)  # 37: not a multiple of 16.
  labels = rng.integers(0, NUM_CLASSES, size=37)
  params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
  mesh = sharding.make_mesh([("data", -1)])
  params = jax.device_put(params, sharding.replicated(mesh))

  def predict(variables, batch, **flexi):
    logits, _ = model.apply({"params": variables["params"]}, batch["image"], **flexi)
    return {"logits": logits}

  fns = train_loop.PredictFns(predict, "patch_size", SIZES)
  ctx = evaluators.EvalContext(mesh, ("data",), 16, None)
  onehot = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
  ref = {}
  for p in SIZES:  # NumPy reference on the unpadded split.
    logits = np.asarray(model.apply({"params": params}, images, patch_size=p)[0], np.float64)
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                  keepdims=True)) - logits.max(-1, keepdims=True)
    ref[p] = dict(logits=logits, acc=np.mean(logits.argmax(-1) == labels),
                  loss=np.mean(-logp[np.arange(37), labels]))
  return dict(model=model, params=params, images=images, labels=labels, onehot=onehot,
              fns=fns, ctx=ctx, ref=ref, mesh=mesh)


def _batches(s, **extra):
  arrays = {"image": s["images"], "labels": s["onehot"], **extra}
  return lambda: sweep.pad_batches(arrays, 16)


@pytest.fixture(scope="module")
def sweep_rows(setup, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sweep"))
  ctx = evaluators.EvalContext(setup["mesh"], ("data",), 16, workdir)
  ev = sweep.Evaluator(setup["fns"], ctx, patch_sizes=SIZES, batch_size=16,
                       batches=_batches(setup), verbose=False)
  metrics = dict(ev.run({"params": setup["params"]}))
  return ev, metrics, workdir


def test_sweep_matches_reference_and_padding(setup, sweep_rows):
  _, metrics, _ = sweep_rows
  for p in SIZES:
    ref = setup["ref"][p]
    assert metrics[f"patch_size={p}/prec@1"] == pytest.approx(ref["acc"], abs=1e-9)
    assert metrics[f"patch_size={p}/loss"] == pytest.approx(ref["loss"], rel=1e-5)
  # The random-init accuracies must differ between sizes, or the test proves little.
  assert len({round(metrics[f"patch_size={p}/loss"], 6) for p in SIZES}) == 3


def test_sweep_counts_every_example_once(setup, sweep_rows):
  ev, _, workdir = sweep_rows
  rows = json.load(open(os.path.join(workdir, "sweep.json")))["rows"]
  assert [r["num_examples"] for r in rows] == [37, 37, 37]  # 3 batches of 16, 11 padded.
  assert [r["tokens"] for r in rows] == [4, 16, 64]
  assert os.path.getsize(os.path.join(workdir, "sweep.png")) > 10_000
  assert ev.compiled  # Compiled once, reused for every batch.


def test_sweep_equals_separate_classification_evals(setup, sweep_rows):
  _, metrics, _ = sweep_rows
  for p in SIZES:
    ev = classification.Evaluator(setup["fns"], setup["ctx"], data={}, pp_fn="",
                                  pred=f"predict_patch_size={p}", batch_size=16)
    ev._batches = lambda: (sharding.to_global(b, setup["mesh"]) for b in _batches(setup)())
    single = dict(ev.run({"params": setup["params"]}))
    assert metrics[f"patch_size={p}/prec@1"] == single["prec@1"]
    assert metrics[f"patch_size={p}/loss"] == pytest.approx(single["loss"], rel=1e-6)


def test_gflops_follow_token_count(sweep_rows):
  _, metrics, _ = sweep_rows
  d, m, hw, c, n_cls = 32, 64, 32 * 32, 3, NUM_CLASSES
  for p in SIZES:
    n = hw // (p * p)
    # Patch embedding + qkv/out + attention + MLP + head, 2 flops per multiply-add.
    analytic = 2 * hw * c * d + 8 * n * d * d + 4 * n * n * d + 4 * n * d * m + 2 * d * n_cls
    ratio = metrics[f"patch_size={p}/gflops"] * 1e9 / analytic
    assert 1.0 < ratio < 1.15, (p, ratio)  # Extra: LayerNorms, softmax, GELU.
  g = [metrics[f"patch_size={p}/gflops"] for p in SIZES]
  assert g[0] < g[1] < g[2]


def test_sweep_real_accuracy_with_label_sets(setup):
  real = setup["onehot"].copy()
  real[::3, (setup["labels"][::3] + 1) % NUM_CLASSES] = 1.  # Second valid label.
  real[1::7] = 0.  # Examples without any valid label are excluded from real@1.
  ev = sweep.Evaluator(setup["fns"], setup["ctx"], patch_sizes=(8,), batch_size=16,
                       real_key="real", batches=_batches(setup, real=real), verbose=False)
  metrics = dict(ev.run({"params": setup["params"]}))
  top1 = setup["ref"][8]["logits"].argmax(-1)
  valid = real.sum(-1) > 0
  expect = np.mean(real[np.arange(37), top1][valid] > 0)
  assert metrics["patch_size=8/real@1"] == pytest.approx(expect, abs=1e-9)
  assert metrics["patch_size=8/prec@1"] == pytest.approx(setup["ref"][8]["acc"], abs=1e-9)


def test_examples_without_labels_are_left_out_of_accuracy_and_loss(setup):
  """big_vision's classification evaluator masks label rows that are all zero (an
  empty ReaL set); counting them as misses would bias prec@1 low and the loss."""
  labels = setup["onehot"].copy()
  labels[2::5] = 0.
  kept = labels.sum(-1) > 0
  ref = setup["ref"][8]
  batches = lambda: sweep.pad_batches({"image": setup["images"], "labels": labels}, 16)  # noqa: E731
  ev = sweep.Evaluator(setup["fns"], setup["ctx"], patch_sizes=(8,), batch_size=16,
                       batches=batches, verbose=False)
  metrics = dict(ev.run({"params": setup["params"]}))
  expect_acc = np.mean(ref["logits"].argmax(-1)[kept] == setup["labels"][kept])
  assert metrics["patch_size=8/prec@1"] == pytest.approx(expect_acc, abs=1e-9)
  assert expect_acc != pytest.approx(ref["acc"])  # Leaving them in would differ.
  single = classification.Evaluator(setup["fns"], setup["ctx"], data={}, pp_fn="",
                                    pred="predict_patch_size=8", batch_size=16)
  single._batches = lambda: (sharding.to_global(b, setup["mesh"]) for b in batches())
  out = dict(single.run({"params": setup["params"]}))
  assert out["prec@1"] == pytest.approx(expect_acc, abs=1e-9)
  assert out["loss"] == pytest.approx(metrics["patch_size=8/loss"], rel=1e-6)


def test_sweep_bad_config(setup):
  with pytest.raises(ValueError, match="one of patch_sizes, seqhws or preds"):
    sweep.Evaluator(setup["fns"], setup["ctx"], patch_sizes=(8,), preds=["x"],
                    data={}, pp_fn="")
  with pytest.raises(ValueError, match="'predict_foo'"):
    sweep.Evaluator(setup["fns"], setup["ctx"], preds=["predict_foo"], data={}, pp_fn="")
  with pytest.raises(ValueError, match="needs `data` and `pp_fn`"):
    sweep.Evaluator(setup["fns"], setup["ctx"], patch_sizes=(8,))
  with pytest.raises(ValueError, match="needs 'pp_fn'"):
    sweep.Evaluator.validate("s", dict(data={}), setup["fns"])
  with pytest.raises(ValueError, match="batch size 12"):
    sweep.Evaluator(setup["fns"], setup["ctx"], patch_sizes=(8,), batch_size=12,
                    data={}, pp_fn="")
  with pytest.raises(ValueError, match="'predict_patch_size=0' is not"):
    sweep.Evaluator(setup["fns"], setup["ctx"], patch_sizes=(0,), data={}, pp_fn="")


def test_sweep_rows_on_non_square_images(setup):
  """A token grid on a 32x16 image: patch (8, 4), grid 4x4 = 16 tokens (not 8x8 on both
  axes); img/s is timed on a resident batch, so it is finite and positive."""
  images = setup["images"][:16, :, :16]
  batches = lambda: sweep.pad_batches({"image": images, "labels": setup["onehot"][:16]}, 16)  # noqa: E731
  ev = sweep.Evaluator(setup["fns"], setup["ctx"], seqhws=(4,), batch_size=16,
                       batches=batches, verbose=False, timing_reps=2)
  row = ev.evaluate({"params": setup["params"]})["predict_seqhw=4"]
  assert (row["patch_hw"], row["seqhw"], row["tokens"]) == ([8, 4], [4, 4], 16)
  assert row["img_per_sec"] > 0 and row["ms_per_img"] == pytest.approx(1e3 / row["img_per_sec"])


def test_timing_evaluator(setup, tmp_path):
  ctx = evaluators.EvalContext(setup["mesh"], ("data",), 16, str(tmp_path))
  ev = timing.Evaluator(setup["fns"], ctx, image_size=32, patch_sizes=(16, 4),
                        batch_sizes=(1, 16), repeats=2, verbose=False)
  metrics = dict(ev.run({"params": setup["params"]}))
  for p in (16, 4):
    for b in (1, 16):
      assert metrics[f"patch_size={p}/batch={b}/ms"] > 0
  rows = json.load(open(tmp_path / "timing.json"))["rows"]
  assert len(rows) == 4 and {r["batch_size"] for r in rows} == {1, 16}
  assert rows[0]["gflops"] < rows[2]["gflops"]  # Patch 16 is cheaper than patch 4.
  with pytest.raises(ValueError, match="batch size 0"):
    timing.Evaluator(setup["fns"], ctx, image_size=32, patch_sizes=(8,), batch_sizes=(0,))
  with pytest.raises(ValueError, match="does not tile"):
    timing.Evaluator(setup["fns"], ctx, image_size=32, patch_sizes=(5,))


HAND_MADE = [dict(patch_size=48, **{"prec@1": .60}, gflops=1.0, ms_per_img=1.0),
             dict(patch_size=32, **{"prec@1": .70}, gflops=2.0, ms_per_img=1.5),
             dict(patch_size=24, **{"prec@1": .69}, gflops=3.0, ms_per_img=2.0),  # Dominated.
             dict(patch_size=16, **{"prec@1": .80}, gflops=6.0, ms_per_img=4.0),
             dict(patch_size=8, **{"prec@1": .85}, gflops=24.0, ms_per_img=20.0)]


def test_budget_picker_hand_made():
  assert budget.pick(HAND_MADE, 2.5)["patch_size"] == 32
  assert budget.pick(HAND_MADE, 5.9)["patch_size"] == 32  # 24 is worse and dearer.
  assert budget.pick(HAND_MADE, 6.0)["patch_size"] == 16  # Inclusive budget.
  assert budget.pick(HAND_MADE, 100)["patch_size"] == 8
  assert budget.pick(HAND_MADE, 0.5) is None
  assert budget.pick(HAND_MADE, 3.0, cost="ms_per_img")["patch_size"] == 32
  assert [r["patch_size"] for r in budget.pareto_front(HAND_MADE)] == [48, 32, 16, 8]
  table = budget.choices_table(HAND_MADE, budget=2.5)
  assert "| 32 | 0.7000 | 2 | * | yes <- chosen |" in table
  with pytest.raises(ValueError, match="lacks 'ms_per_img'"):
    budget.pick([dict(patch_size=8, gflops=1., **{"prec@1": .5})], 1.0, cost="ms_per_img")
  with pytest.raises(ValueError, match="unknown cost 'joules'"):
    budget.pick(HAND_MADE, 1.0, cost="joules")
  with pytest.raises(ValueError, match="positive"):
    budget.pick(HAND_MADE, -1.0)


def test_budget_cli(tmp_path, capsys):
  path = tmp_path / "sweep.json"
  path.write_text(json.dumps({"rows": HAND_MADE}))
  assert budget.main([str(path), "--gflops", "7"]) == 0
  assert "choose patch size 16" in capsys.readouterr().out
  assert budget.main([str(path), "--ms", "0.1"]) == 1
  assert "no patch size fits" in capsys.readouterr().out
  assert budget.main([str(tmp_path / "missing.json"), "--ms", "1"]) == 2
  assert "not found" in capsys.readouterr().err
  timing_rows = [dict(patch_size=r["patch_size"], batch_size=b, ms_per_img=r["ms_per_img"] / b)
                 for r in HAND_MADE for b in (1, 4)]
  (tmp_path / "timing.json").write_text(json.dumps({"rows": timing_rows}))
  assert budget.main([str(path), "--ms", "1.0", "--timing", str(tmp_path / "timing.json"),
                      "--batch", "4"]) == 0
  assert "choose patch size 16" in capsys.readouterr().out  # 4.0 / 4 = 1.0 ms.
  assert budget.main([str(path), "--ms", "1.0", "--timing", str(tmp_path / "timing.json"),
                      "--batch", "2"]) == 2
  assert "no batch size 2" in capsys.readouterr().err
  (tmp_path / "bad.json").write_text("{")
  assert budget.main([str(tmp_path / "bad.json"), "--ms", "1"]) == 2
  assert "bad.json is not a readable JSON file (JSONDecodeError" in capsys.readouterr().err
  for bad in (tmp_path, tmp_path / "img.png"):  # A folder; binary bytes.
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n")
    assert budget.main([str(bad), "--ms", "1"]) == 2
    assert f"{bad} is not a readable JSON file" in capsys.readouterr().err
  assert budget.main([str(path), "--ms", "1.0", "--timing", str(path)]) == 2
  assert "--timing needs the timing evaluator's JSON" in capsys.readouterr().err


# --- Eval-only CLI on a tiny demo workdir ---------------------------------------

PP = ('decode|resize(32)|value_range(-1, 1)|onehot(10, key="label", key_result="labels")'
      '|keep("image", "labels")')
DEMO = ["--config", "configs/demo.py:runlocal,width=32,depth=1,batch=16",  # 32px, tiny set.
        "--config.evals.test.data.split=test",  # 50 examples: the last batch is padded.
        "--config.total_steps=2", "--config.flexi.patch_size={'v': [16]}"]
SWEEP = ("--config.evals.sweep={'type': 'sweep', 'data': {'name': 'fine_shapes/tiny', "
         f"'split': 'test'}}, 'pp_fn': '{PP}', 'patch_sizes': [32, 16, 8], 'batch_size': 16}}")


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
  from trainers import train  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp("demo"))
  cache = ["--config.compilation_cache_dir=" + str(tmp_path_factory.getbasetemp() / "jc")]
  result = train.main(DEMO + cache + ["--workdir", workdir])
  return workdir, result.eval_metrics, cache


def test_eval_only_cli_on_demo_workdir(demo_workdir, tmp_path, capsys):
  from evaluators import run  # pylint: disable=import-outside-toplevel
  from flexi.tools import convert  # pylint: disable=import-outside-toplevel
  workdir, trained, cache = demo_workdir
  assert run.main(DEMO + cache + [SWEEP, "--workdir", workdir]) == 0
  out = capsys.readouterr().out
  # Each sweep evaluator ("test", "sweep") prints its own table, once; no generic copy.
  assert out.count("GFLOPs/img") == 2 and "| 32 | 1 |" in out
  assert "| sweep |" not in out and "| test |" not in out
  got = json.load(open(os.path.join(workdir, "eval_results.json")))["metrics"]
  keys = [k for k in trained if k.endswith("/prec@1")]
  assert len(keys) >= 2
  for key in keys:  # Same params, same split as the end-of-training eval.
    assert got[key] == pytest.approx(trained[key], abs=1e-9)
    sweep_key = key.replace("test/", "sweep/")
    assert got[sweep_key] == pytest.approx(trained[key], abs=1e-9)
  rows = json.load(open(os.path.join(workdir, "sweep.json")))["rows"]
  assert [r["num_examples"] for r in rows] == [50, 50, 50]
  # The same model through a big_vision .npz and --checkpoint.
  npz = str(tmp_path / "demo.npz")
  assert convert.main(["to-npz", workdir, npz]) == 0
  assert run.main(DEMO + cache + ["--checkpoint", npz, "--out", str(tmp_path / "ev"),
                                  "--evals", "test"]) == 0
  got2 = json.load(open(tmp_path / "ev" / "eval_results.json"))["metrics"]
  assert got2["test/patch_size=8/loss"] == pytest.approx(got["test/patch_size=8/loss"],
                                                         rel=1e-6)


def test_eval_only_cli_errors(demo_workdir, tmp_path, capsys):
  from evaluators import run  # pylint: disable=import-outside-toplevel
  workdir, _, cache = demo_workdir
  assert run.main(DEMO + cache + ["--workdir", workdir, "--evals", "tset"]) == 2
  assert "unknown eval(s) ['tset']" in capsys.readouterr().err
  assert run.main(DEMO + cache) == 2
  assert "pass --workdir" in capsys.readouterr().err
  assert run.main(DEMO + cache + ["--workdir", str(tmp_path)]) == 2
  assert "no checkpoint folder" in capsys.readouterr().err
  assert run.main(DEMO + cache + ["--checkpoint", str(tmp_path / "x.npz")]) == 2
  assert "checkpoint not found" in capsys.readouterr().err
  assert run.main(DEMO + cache + ["--workdir", workdir, "--trainer", "bogus"]) == 2
  assert "no trainer module 'trainers.bogus'; use train, distill, lit" in capsys.readouterr().err
  wide = [DEMO[0], DEMO[1].replace("width=32", "width=64")] + DEMO[2:]
  assert run.main(wide + cache + ["--workdir", workdir]) == 2
  err = capsys.readouterr().err
  assert "param Transformer/encoder_norm/bias has shape (32,), the model wants (64,)" in err
  assert err.count("\n") == 1


def test_sweep_ensembles_average_probabilities(setup, tmp_path):
  """An ensemble of the model at patch sizes 8 and 16: top-1 and loss of the mean
  softmax (numpy), GFLOPs the members' sum; in the JSON next to the single sizes."""
  ctx = evaluators.EvalContext(setup["mesh"], ("data",), 16, str(tmp_path))
  ev = sweep.Evaluator(setup["fns"], ctx, patch_sizes=SIZES, batch_size=16,
                       batches=_batches(setup), verbose=False,
                       ensembles=[[8, 16]], timing_reps=1)
  metrics = dict(ev.run({"params": setup["params"]}))
  probs = [np.exp(setup["ref"][p]["logits"] - setup["ref"][p]["logits"].max(-1, keepdims=True))
           for p in (8, 16)]
  mean = sum(p / p.sum(-1, keepdims=True) for p in probs) / 2
  labels = setup["labels"]
  assert metrics["ensemble=8+16/prec@1"] == pytest.approx(np.mean(mean.argmax(-1) == labels))
  assert metrics["ensemble=8+16/loss"] == pytest.approx(
      np.mean(-np.log(mean[np.arange(37), labels])), rel=1e-5)
  assert metrics["ensemble=8+16/gflops"] == pytest.approx(
      metrics["patch_size=8/gflops"] + metrics["patch_size=16/gflops"])
  saved = json.load(open(tmp_path / "sweep.json"))
  assert [r["patch_size"] for r in saved["ensembles"]] == [[8, 16]]
  assert len(saved["rows"]) == len(SIZES) and (tmp_path / "sweep.png").exists()
  # A model ensembled with itself is the model, confident sigmoid logits included.
  x = jnp.array([[16.5, 18.0, -3.0], [2.0, 1.0, -20.0]])
  np.testing.assert_allclose(sweep._ensemble_logits([x, x], sigmoid=True), x, atol=1e-5)  # pylint: disable=protected-access
  np.testing.assert_allclose(sweep._ensemble_logits([x, x], sigmoid=False),  # pylint: disable=protected-access
                             jax.nn.log_softmax(x), atol=1e-6)
  with pytest.raises(ValueError, match=r"ensembles: \[12\] not among the swept patch_sizes"):
    sweep.Evaluator(setup["fns"], ctx, patch_sizes=SIZES, data={}, pp_fn="",
                    ensembles=[[8, 12]])


def _hsic_u_statistic(k, l):
  """Song et al.'s unbiased HSIC from its definition, by brute force over index tuples."""
  import itertools  # pylint: disable=import-outside-toplevel
  n = len(k)
  t2 = sum(k[i, j] * l[i, j] for i, j in itertools.permutations(range(n), 2))
  t4 = sum(k[i, j] * l[q, r] for i, j, q, r in itertools.permutations(range(n), 4))
  t3 = sum(k[i, j] * l[i, q] for i, j, q in itertools.permutations(range(n), 3))
  falling = lambda m: np.prod(range(n - m + 1, n + 1))  # noqa: E731
  return t2 / falling(2) + t4 / falling(4) - 2 * t3 / falling(3)


def test_minibatch_cka_matches_its_definition_and_invariances():
  from evaluators import representations  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(7, 5)), rng.normal(size=(7, 3))
  k, l = x @ x.T, y @ y.T
  assert representations.hsic1(k, l) == pytest.approx(_hsic_u_statistic(k, l), rel=1e-9)
  q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
  acc = representations.MinibatchCKA()
  for _ in range(4):  # Minibatches of 16: same examples in every representation.
    a = rng.normal(size=(16, 20))
    acc.add({"a": a @ a.T, "rotated": (2.5 * a @ q) @ (2.5 * a @ q).T,
             "other": (lambda b: b @ b.T)(rng.normal(size=(16, 20)))})
  assert acc.cka("a", "a") == pytest.approx(1.0)
  assert acc.cka("a", "rotated") == pytest.approx(1.0)  # Rotation and scale invariant.
  assert abs(acc.cka("a", "other")) < 0.1 and acc.cka("other", "a") == acc.cka("a", "other")


def test_cka_evaluator_across_patch_sizes(setup, tmp_path):
  from evaluators import representations  # pylint: disable=import-outside-toplevel
  model = setup["model"]

  def predict(variables, batch, **flexi):
    logits, out = vit.apply_with_blocks(model, {"params": variables["params"]},
                                        batch["image"], **flexi)
    return {"logits": logits, "pre_logits": out["pre_logits"], "blocks": out["blocks"]}
  fns = train_loop.PredictFns(predict, "patch_size", SIZES)
  ctx = evaluators.EvalContext(setup["mesh"], ("data",), 16, str(tmp_path))
  ev = representations.Evaluator(fns, ctx, patch_sizes=SIZES, batch_size=16,
                                 batches=_batches(setup), max_examples=32)
  metrics = dict(ev.run({"params": setup["params"]}))
  saved = json.load(open(tmp_path / "cka.json"))
  assert saved["layers"] == ["block_00", "pre_logits"] and saved["num_examples"] == 32
  for m in saved["cka"].values():
    np.testing.assert_allclose(np.diag(m), 1.0, rtol=1e-6)
    np.testing.assert_allclose(m, np.transpose(m), rtol=1e-9)
    assert np.all(np.asarray(m) <= 1 + 1e-6)
  assert metrics["patch_size=4/block_00"] == pytest.approx(1.0)  # The reference: finest.
  assert metrics["patch_size=16/pre_logits"] == saved["cka"]["pre_logits"][0][2]
  assert (tmp_path / "cka.png").exists()
  no_blocks = representations.Evaluator(setup["fns"], ctx, patch_sizes=SIZES, batch_size=16,
                                        batches=_batches(setup))
  with pytest.raises(ValueError, match="returns no 'blocks'"):
    dict(no_blocks.run({"params": setup["params"]}))


@pytest.mark.parametrize("kind, kwargs, missing", [
    ("classification", dict(data={}), "pp_fn"),
    ("distance", dict(pp_fn=""), "data"),
    ("sweep", dict(data={}), "pp_fn"),
    ("retrieval", dict(pp_fn=""), "data"),
    ("zeroshot", dict(data={}, pp_fn=""), "pp_txt"),
    ("timing", dict(patch_sizes=(8,)), "image_size"),
    ("cka", dict(data={}, patch_sizes=(8,)), "pp_fn"),
])
def test_missing_required_option_names_the_eval_and_the_option(kind, kwargs, missing):
  """Config typos fail when the evaluators are built, naming config.evals.<name>."""
  with pytest.raises(ValueError, match=rf"config\.evals\.ev \({kind}\) needs '{missing}'"):
    evaluators.build_evaluators({"ev": dict(type=kind, **kwargs)}, {}, ctx=None, batch_size=8)
