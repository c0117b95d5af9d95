"""Pick the deployment patch size: the most accurate one under a compute budget.

One FlexiViT serves every patch size, so deployment is a choice on the sweep's
accuracy/compute curve. Input: the JSON the sweep evaluator writes
(WORKDIR/sweep.json, {"rows": [{"patch_size", "prec@1", "gflops", "ms_per_img"...}]}).

    python -m flexi.budget /tmp/demo/sweep.json --gflops 0.05
    python -m flexi.budget /tmp/demo/sweep.json --ms 2.5 --metric real@1
    python -m flexi.budget /tmp/demo/sweep.json --ms 2.5 --timing /tmp/demo/timing.json \
        --batch 1   # latency from the timing evaluator instead of the sweep's own
"""
import argparse
import json
import math
import os
import sys

COSTS = {"gflops": "GFLOPs/img", "ms_per_img": "ms/img"}


def load_rows(path):
  """Rows of a sweep JSON (a dict with "rows", or a bare list)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"sweep JSON not found: {path}")
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is not a readable JSON file ({type(e).__name__}: {e})") from None
  rows = data.get("rows") if isinstance(data, dict) else data
  if not isinstance(rows, list) or not rows:
    raise ValueError(f"{path} has no sweep rows (expected {{'rows': [...]}})")
  return rows


def with_timing(rows, timing_rows, batch_size=None):
  """Sweep rows with ms_per_img taken from the timing evaluator's rows at one batch size.

  The sweep's own images/s is measured inside an eval pass; the timing evaluator's
  median latency is the better number for a latency budget.
  """
  for t in timing_rows:
    if not isinstance(t, dict) or not {"batch_size", "patch_size", "ms_per_img"} <= set(t):
      raise ValueError("--timing needs the timing evaluator's JSON (rows with batch_size, "
                       "patch_size, ms_per_img), not a sweep JSON")
  sizes = sorted({int(t["batch_size"]) for t in timing_rows})
  batch_size = int(batch_size) if batch_size else sizes[-1]
  if batch_size not in sizes:
    raise ValueError(f"timing JSON has no batch size {batch_size}; it has {sizes}")
  ms = {int(t["patch_size"]): t["ms_per_img"] for t in timing_rows
        if int(t["batch_size"]) == batch_size}
  missing = [r["patch_size"] for r in rows if int(r["patch_size"]) not in ms]
  if missing:
    raise ValueError(f"timing JSON lacks patch size(s) {missing} at batch {batch_size}")
  return [dict(r, ms_per_img=ms[int(r["patch_size"])]) for r in rows]


def _check(rows, metric, cost):
  if cost not in COSTS:
    raise ValueError(f"unknown cost {cost!r}; choose one of {sorted(COSTS)}")
  for r in rows:
    for key in (metric, cost, "patch_size"):
      if key not in r or r[key] is None or (isinstance(r[key], float) and math.isnan(r[key])):
        raise ValueError(f"sweep row {r.get('patch_size', r)} lacks {key!r}")


def pareto_front(rows, cost="gflops", metric="prec@1"):
  """Rows no other row beats (cheaper-or-equal AND more accurate), by cost ascending."""
  front, best = [], -math.inf
  for r in sorted(rows, key=lambda r: (r[cost], -r[metric])):
    if r[metric] > best:
      front.append(r)
      best = r[metric]
  return front


def pick(rows, budget, cost="gflops", metric="prec@1"):
  """The most accurate row with rows[cost] <= budget (cheaper wins ties); None if none fits."""
  _check(rows, metric, cost)
  if not budget > 0:
    raise ValueError(f"budget must be a positive number, got {budget}")
  fits = [r for r in rows if r[cost] <= budget]
  if not fits:
    return None
  return max(fits, key=lambda r: (r[metric], -r[cost]))


def choices_table(rows, cost="gflops", metric="prec@1", budget=None):
  """Markdown table of every patch size: accuracy, cost, on the Pareto front, fits."""
  _check(rows, metric, cost)
  front = {id(r) for r in pareto_front(rows, cost, metric)}
  chosen = pick(rows, budget, cost, metric) if budget is not None else None
  lines = [f"| patch | {metric} | {COSTS[cost]} | Pareto | fits |", "|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: r[cost]):
    fits = "" if budget is None else ("yes" if r[cost] <= budget else "no")
    mark = " <- chosen" if r is chosen else ""
    lines.append(f"| {r['patch_size']} | {r[metric]:.4f} | {r[cost]:.4g} | "
                 f"{'*' if id(r) in front else ''} | {fits}{mark} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description="Most accurate patch size under a budget.")
  p.add_argument("sweep_json", help="JSON written by the sweep evaluator.")
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--gflops", type=float, help="Budget in GFLOPs per image.")
  g.add_argument("--ms", type=float, help="Budget in milliseconds per image.")
  p.add_argument("--metric", default="prec@1", help="Accuracy key (prec@1, real@1).")
  p.add_argument("--timing", default=None, help="Timing-evaluator JSON for --ms latencies.")
  p.add_argument("--batch", type=int, default=None, help="Its batch size (default largest).")
  args = p.parse_args(argv)
  cost, value = ("gflops", args.gflops) if args.gflops is not None else ("ms_per_img", args.ms)
  try:
    rows = load_rows(args.sweep_json)
    if args.timing:
      rows = with_timing(rows, load_rows(args.timing), args.batch)
    best = pick(rows, value, cost, args.metric)
    print(choices_table(rows, cost, args.metric, value))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if best is None:
    cheapest = min(rows, key=lambda r: r[cost])
    print(f"no patch size fits {value:g} {COSTS[cost]}; the cheapest is patch "
          f"{cheapest['patch_size']} at {cheapest[cost]:.4g}")
    return 1
  print(f"choose patch size {best['patch_size']}: {args.metric} {best[args.metric]:.4f} at "
        f"{best[cost]:.4g} {COSTS[cost]} (budget {value:g})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
