"""Deterministic numpy/PIL drawing of the offline datasets' images.

fine_shapes: the class is the position of one small mark inside a closed
square outline (or no mark), drawn in cells of a few pixels on a small plate;
distractor plates carry an open outline (a "U"), so the class is only readable
from pixel-level detail. Big shapes and noise make the background busy.

shape_captions: a few coloured shapes whose captions state colour, shape and
relative position ("a red circle above a blue square").
"""
import io

import numpy as np
from PIL import Image, ImageDraw

FINE_CLASSES = ("empty", "top_left", "top", "top_right", "left", "center", "right",
                "bottom_left", "bottom", "bottom_right")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
           "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
CAPTION_CLASSES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)


def encode(img, fmt="jpeg"):
  buf = io.BytesIO()
  if fmt == "jpeg":
    Image.fromarray(img).save(buf, "JPEG", quality=95)
  else:
    Image.fromarray(img).save(buf, "PNG")
  return buf.getvalue()


def _background(rng, size):
  base = rng.integers(40, 216, size=3)
  ramp = np.linspace(-1, 1, size)[:, None, None] * rng.integers(-40, 41, size=3)
  img = np.broadcast_to(base + ramp, (size, size, 3)).copy()
  return img


def _plate(rng, cell, pattern):
  """A 7x7-cell plate with a 5x5 glyph: closed outline (target) or open (decoy)."""
  plate_col = rng.integers(0, 256, size=3)
  ink = np.array((0, 0, 0) if plate_col.mean() > 127 else (255, 255, 255))
  grid = np.zeros((7, 7), bool)
  grid[1, 1:6] = grid[5, 1:6] = grid[1:6, 1] = grid[1:6, 5] = True
  if pattern["open"] is not None:  # Decoy: remove one side's middle.
    side = pattern["open"]
    sl = [(1, slice(2, 5)), (5, slice(2, 5)), (slice(2, 5), 1), (slice(2, 5), 5)][side]
    grid[sl] = False
  if pattern["mark"] > 0:
    r, c = divmod(pattern["mark"] - 1, 3)
    grid[2 + r, 2 + c] = True
  tile = np.where(grid[..., None], ink, plate_col).astype(np.float64)
  return np.kron(tile, np.ones((cell, cell, 1)))


def _paste(img, tile, rng):
  s, t = img.shape[0], tile.shape[0]
  y, x = rng.integers(0, s - t + 1, size=2)
  img[y:y + t, x:x + t] = tile


def fine_shapes_example(seed, size, label):
  """One uint8 image of class `label` (deterministic in `seed`)."""
  rng = np.random.default_rng(seed)
  img = Image.fromarray(_background(rng, size).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  for _ in range(rng.integers(3, 7)):  # Big distractor shapes.
    w, h = rng.integers(size // 8, size // 3, size=2)
    x, y = rng.integers(-size // 10, size, size=2)
    box = [int(x), int(y), int(x + w), int(y + h)]
    fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
  arr = np.asarray(img, np.float64).copy()
  cell = max(2, size // 60)
  for _ in range(rng.integers(1, 4)):  # Decoys: open outlines, any mark.
    _paste(arr, _plate(rng, cell, {"open": int(rng.integers(4)),
                                   "mark": int(rng.integers(10))}), rng)
  for _ in range(2):  # Two copies of the target, so most crops keep one.
    _paste(arr, _plate(rng, cell, {"open": None, "mark": label}), rng)
  arr += rng.normal(0, 8, arr.shape)
  return np.clip(arr, 0, 255).astype(np.uint8)


def _draw_shape(draw, shape, box, colour):
  x0, y0, x1, y1 = box
  if shape == "circle":
    draw.ellipse(box, fill=colour)
  elif shape == "square":
    draw.rectangle(box, fill=colour)
  else:
    draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _relation(a, b):
  """How object a sits relative to b, from their centres."""
  dy, dx = a["cy"] - b["cy"], a["cx"] - b["cx"]
  if abs(dy) >= abs(dx):
    return "above" if dy < 0 else "below"
  return "left of" if dx < 0 else "right of"


def shape_captions_example(seed, size):
  """(uint8 image, captions, label of the largest shape)."""
  rng = np.random.default_rng(seed)
  img = Image.fromarray(np.clip(_background(rng, size) * 0.5 + 64, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  n = int(rng.integers(1, 4))
  kinds = rng.choice(len(CAPTION_CLASSES), size=n, replace=False)
  cells = rng.choice(9, size=n, replace=False)  # Distinct cells of a 3x3 grid.
  objs = []
  for kind, cell in zip(kinds, cells):
    colour, shape = CAPTION_CLASSES[kind].split()
    r = size / 6 * rng.uniform(0.55, 0.95)
    cy = (cell // 3 + 0.5) * size / 3 + rng.uniform(-0.1, 0.1) * size / 3
    cx = (cell % 3 + 0.5) * size / 3 + rng.uniform(-0.1, 0.1) * size / 3
    _draw_shape(draw, shape, (cx - r, cy - r, cx + r, cy + r), COLOURS[colour])
    objs.append(dict(name=f"{colour} {shape}", kind=int(kind), r=r, cy=cy, cx=cx))
  arr = np.asarray(img, np.float64) + rng.normal(0, 4, (size, size, 3))
  names = [f"a {o['name']}" for o in objs]
  if n == 1:
    captions = [names[0], f"{names[0]} on a plain background", f"a picture of {names[0]}"]
  else:
    rel = _relation(objs[0], objs[1])
    inverse = {"above": "below", "below": "above", "left of": "right of",
               "right of": "left of"}[rel]
    captions = [f"{names[0]} {rel} {names[1]}", f"{names[1]} {inverse} {names[0]}",
                ", ".join(names[:-1]) + f" and {names[-1]}"]
  label = max(objs, key=lambda o: o["r"])["kind"]
  return np.clip(arr, 0, 255).astype(np.uint8), captions, label
