"""The preprocessing-op string language: `op1(args)|op2(args, key="x")|...`.

The string is parsed with `ast` (a `|`-chain of names and calls whose arguments
must be literals); nothing is ever evaluated. Ops are looked up in `OPS`, a
registry filled explicitly below, so no import order can leave an op missing.
"""
import ast
import difflib

from input_pipeline import pp_general, pp_image, text

OPS = {
    # Images.
    "decode": pp_image.get_decode,
    "decode_jpeg_and_inception_crop": pp_image.get_decode_jpeg_and_inception_crop,
    "inception_crop": pp_image.get_inception_crop,
    "random_crop": pp_image.get_random_crop,
    "central_crop": pp_image.get_central_crop,
    "resize": pp_image.get_resize,
    "resize_small": pp_image.get_resize_small,
    "flip_lr": pp_image.get_flip_lr,
    "value_range": pp_image.get_value_range,
    "vgg_value_range": pp_image.get_vgg_value_range,
    # Labels and keys.
    "onehot": pp_general.get_onehot,
    "keep": pp_general.get_keep,
    "drop": pp_general.get_drop,
    "copy": pp_general.get_copy,
    "rename": pp_general.get_rename,
    "flatten": pp_general.get_flatten,
    # Text (flexi-LiT).
    "choice": pp_general.get_choice,
    "first_n": pp_general.get_first_n,
    "tokenize": text.get_tokenize,
}


def _unknown_op(name):
  close = difflib.get_close_matches(name, OPS, n=3, cutoff=0.5)
  hint = f" Did you mean: {', '.join(close)}?" if close else ""
  return ValueError(f"Unknown pp op '{name}'.{hint} Known ops: {', '.join(sorted(OPS))}")


def _literal(node, op, pp_string):
  try:
    return ast.literal_eval(node)
  except ValueError:
    raise ValueError(f"pp op '{op}': argument `{ast.get_source_segment(pp_string, node)}` "
                     "is not a literal (only numbers, strings, tuples, lists, dicts, "
                     "True/False/None are allowed)") from None


def _flatten(node):
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
    return _flatten(node.left) + _flatten(node.right)
  return [node]


def parse(pp_string):
  """'a|b(1, k=2)' -> [("a", (), {}), ("b", (1,), {"k": 2})]."""
  if not pp_string.strip():
    return []
  try:
    tree = ast.parse(pp_string.strip(), mode="eval")
  except SyntaxError as e:
    raise ValueError(f"Cannot parse pp string {pp_string!r}: {e.msg} at column "
                     f"{e.offset}") from None
  ops = []
  for node in _flatten(tree.body):
    if isinstance(node, ast.Name):
      ops.append((node.id, (), {}))
      continue
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
      segment = ast.get_source_segment(pp_string.strip(), node)
      raise ValueError(f"Cannot parse pp op `{segment}`: expected `name` or `name(args)`")
    name = node.func.id
    if any(isinstance(a, ast.Starred) for a in node.args) or any(
        k.arg is None for k in node.keywords):
      raise ValueError(f"pp op '{name}': *args/**kwargs are not allowed")
    args = tuple(_literal(a, name, pp_string.strip()) for a in node.args)
    kwargs = {k.arg: _literal(k.value, name, pp_string.strip()) for k in node.keywords}
    ops.append((name, args, kwargs))
  return ops


def _build_op(name, args, kwargs):
  if name not in OPS:
    raise _unknown_op(name)
  try:
    return OPS[name](*args, **kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f"pp op '{name}': bad arguments {args or ''}{kwargs or ''}: {e}") from None


def get_preprocess_fn(pp_string):
  """Returns fn(example dict of tf tensors) -> processed dict (input not mutated)."""
  steps = [(name, _build_op(name, args, kwargs)) for name, args, kwargs in parse(pp_string)]

  def _pp_fn(data):
    data = dict(data)
    for name, op in steps:
      try:
        data = op(data)
      except KeyError as e:
        visible = sorted(k for k in data if not k.startswith("_"))
        raise ValueError(f"pp op '{name}': key {e.args[0]!r} not in the example "
                         f"(keys: {visible})") from None
    return data
  return _pp_fn
