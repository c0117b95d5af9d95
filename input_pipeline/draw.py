"""Deterministic numpy/PIL drawing of the offline datasets' images.

fine_shapes: the class is the pattern (stripes, diagonal, checker, dots) and the
scale (fine or coarse cells of a few pixels) of a texture partly hidden by solid
shapes; the fine patterns need pixel-level detail, so small patches help.

shape_captions: a few coloured shapes whose captions state colour, shape and
relative position ("a red circle above a blue square").
"""
import io

import numpy as np
from PIL import Image, ImageDraw

FINE_PATTERNS = ("hstripes", "vstripes", "diagonal", "checker", "dots")
FINE_CLASSES = tuple(f"{p}_{scale}" for scale in ("fine", "coarse") for p in FINE_PATTERNS)
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


def _texture(pattern, cell, shape, offset):
  """Binary texture: a pattern with square cells of `cell` pixels."""
  y, x = np.mgrid[:shape[0], :shape[1]]
  y, x = (y + offset[0]) // cell, (x + offset[1]) // cell
  if pattern == "hstripes":
    return y % 2 == 0
  if pattern == "vstripes":
    return x % 2 == 0
  if pattern == "diagonal":
    return ((y + x) // 2) % 2 == 0
  if pattern == "checker":
    return (y + x) % 2 == 0
  return (y % 2 == 0) & (x % 2 == 0)  # dots


def fine_shapes_example(seed, size, label):
  """One uint8 image of class `label` (deterministic in `seed`).

  The class is the background texture's pattern (5 kinds) and its scale: "fine"
  cells of `u` pixels or "coarse" cells of 2u (u = size // 48, at least 2). Telling
  the fine patterns apart needs pixel-level detail, so accuracy rises as the patch
  size shrinks; the coarse ones stay readable at large patches. Solid distractor
  shapes on top and noise hide parts of it.
  """
  rng = np.random.default_rng(seed)
  pattern, scale = FINE_CLASSES[label].rsplit("_", 1)
  unit = max(2, size // 48)
  cell = unit if scale == "fine" else 2 * unit
  on = _texture(pattern, cell, (size, size), rng.integers(0, 4 * cell, size=2))
  colour_a = rng.integers(0, 256, size=3)
  colour_b = (colour_a + rng.integers(96, 160, size=3)) % 256
  img = Image.fromarray(np.where(on[..., None], colour_a, colour_b).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  for _ in range(rng.integers(2, 5)):  # Solid distractor shapes on top.
    w, h = rng.integers(size // 8, size // 3, size=2)
    x, y = rng.integers(-size // 10, size, size=2)
    box = [int(x), int(y), int(x + w), int(y + h)]
    fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
  arr = np.asarray(img, np.float64) + rng.normal(0, 8, (size, size, 3))
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
