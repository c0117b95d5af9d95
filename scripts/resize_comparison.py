r"""Paper Figure 4: resize image AND patch embedding together, sequence length fixed.

A model trained at patch size p (resolution r, token grid g = r/p) is evaluated at
resolution r' = p' * g with its kernel resized from p to p' by each method of
`flexi.resize.resize_patchemb`: PI-resize, plain bilinear, "area" (bilinear scaled by
the area ratio) and "norm" (bilinear rescaled to the original kernel norm). The token
count never changes, so only the patch embedding's response to the resized pixels
matters: PI-resize keeps every token unchanged when upsampling, the others do not.

    python -m trainers.train --config configs/demo.py:fixed=8 --workdir /tmp/demo_b8
    python scripts/resize_comparison.py --config configs/demo.py:fixed=8 \
        --workdir /tmp/demo_b8 --base_patch 8 --patches 4,6,8,12,16,24 --out docs

Writes OUT/NAME.{md,json,png} (NAME defaults to resize_comparison).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import jax
import numpy as np

from flexi import ckpt_manager, resize, vit
from flexi import config as config_lib

METHODS = ("pi", "bilinear", "area", "norm")
LABELS = {"pi": "PI-resize", "bilinear": "bilinear", "area": "area", "norm": "norm"}


def eval_pp(res, num_classes):
  return (f"decode|resize({res})|value_range(-1, 1)|"
          f'onehot({num_classes}, key="label", key_result="labels")|keep("image", "labels")')


def batches(data, res, num_classes, batch_size):
  """(images, labels, mask) numpy batches of the split decoded at `res`."""
  import input_pipeline  # pylint: disable=import-outside-toplevel
  ds, _ = input_pipeline.build_eval_dataset(data, eval_pp(res, num_classes), batch_size,
                                            process_index=0, process_count=1)
  for b in ds.as_numpy_iterator():
    yield b["image"], b["labels"], b["_mask"]


def compare(params, model_kw, num_classes, data, *, base_patch, patches, grid,
            batch_size=250, methods=METHODS):
  """{patch: {method: accuracy}} with the image at patch * grid pixels."""
  kernel = params["embedding"]["kernel"]
  base = resize.pi_resize_patchemb(np.asarray(kernel, np.float32), (base_patch, base_patch))
  out = {}
  for p in patches:
    model = vit.Model(num_classes, **{**model_kw, "patch_size": (p, p)})
    apply = jax.jit(lambda prm, x, model=model: model.apply({"params": prm}, x)[0])
    variants = {}
    for m in methods:
      k = np.asarray(resize.resize_patchemb(base, (p, p), m), np.float32)
      variants[m] = dict(params, embedding=dict(params["embedding"], kernel=k))
    hits, count = {m: 0.0 for m in methods}, 0.0
    for images, labels, mask in batches(data, p * grid, num_classes, batch_size):
      for m in methods:
        pred = np.asarray(apply(variants[m], images)).argmax(-1)
        hits[m] += float(np.sum((labels[np.arange(len(pred)), pred] > 0) * mask))
      count += float(mask.sum())
    out[p] = {m: hits[m] / count for m in methods}
    print(f"patch {p:3d} res {p * grid:4d}: " +
          "  ".join(f"{LABELS[m]} {out[p][m]:.4f}" for m in methods), flush=True)
  return out


def write_outputs(results, out_dir, *, base_patch, grid, source, name="resize_comparison"):
  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, name)
  with open(base + ".json", "w") as f:
    json.dump({"base_patch": base_patch, "grid": grid, "source": source,
               "accuracy": {str(p): r for p, r in results.items()}}, f, indent=1)
  methods = list(next(iter(results.values())))
  lines = [f"Model: {source}; trained at patch {base_patch}, token grid {grid}x{grid} "
           "(fixed); top-1 on the offline test split.", "",
           "| patch (res) | " + " | ".join(LABELS[m] for m in methods) + " |",
           "|---|" + "---|" * len(methods)]
  for p, r in sorted(results.items()):
    mark = " (trained)" if p == base_patch else ""
    lines.append(f"| {p} ({p * grid}px){mark} | " +
                 " | ".join(f"{100 * r[m]:.1f}" for m in methods) + " |")
  with open(base + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(5.5, 4))
  ps = sorted(results)
  for m in methods:
    ax.plot(ps, [100 * results[p][m] for p in ps], "o-", label=LABELS[m])
  ax.axvline(base_patch, color="gray", ls=":", label="trained patch size")
  ax.set_xlabel(f"patch size (resolution = patch x {grid})")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_xticks(ps)
  ax.set_title("Resizing image and patch embedding together")
  ax.grid(alpha=.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(base + ".png", dpi=100)
  plt.close(fig)
  return base


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  path, overrides, rest = config_lib.parse_cli(argv)
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="A training run (its latest checkpoint).")
  p.add_argument("--base_patch", type=int, required=True, help="Patch size it was trained at.")
  p.add_argument("--patches", default="4,6,8,12,16,24", help="Patch sizes to evaluate.")
  p.add_argument("--res", type=int, default=None, help="Training resolution (config arg res).")
  p.add_argument("--data", default=None, help="TFDS name (default: the config's eval data).")
  p.add_argument("--split", default="test")
  p.add_argument("--out", default="docs")
  p.add_argument("--name", default="resize_comparison", help="Output file basename.")
  args = p.parse_args(rest)
  if path is None:
    p.error("--config is required")
  config = config_lib.load(path, overrides)
  res = args.res or int(config.arg.get("res", 0))
  if not res or res % args.base_patch:
    p.error(f"--res {res} must be a positive multiple of --base_patch {args.base_patch}")
  grid = res // args.base_patch
  data_name = args.data or next(iter(config.evals.values()))["data"]["name"]
  params = ckpt_manager.restore_params_from_workdir(args.workdir)
  patches = [int(v) for v in args.patches.split(",")]
  results = compare(params, dict(config.model), config.num_classes,
                    dict(name=data_name, split=args.split), base_patch=args.base_patch,
                    patches=patches, grid=grid)
  base = write_outputs(results, args.out, base_patch=args.base_patch, grid=grid,
                       source=f"{path} ({data_name})", name=args.name)
  print(open(base + ".md").read())
  return 0


if __name__ == "__main__":
  sys.exit(main())
