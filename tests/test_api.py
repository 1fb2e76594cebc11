"""The Python API (step_jax.load / segment / build) and the visualisation helpers."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import step_jax
from step_jax import api
from step_jax.analysis import visualize
from step_jax.data import datasets
from test_export import _tiny_segvit, make_workdir  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_package_root_reexports_the_api():
  assert (step_jax.load, step_jax.build, step_jax.segment) == (api.load, api.build, api.segment)
  code = "import step_jax.data.synthetic, step_jax; print(step_jax.load.__module__)"
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr  # importing a submodule first leaves no cycle
  assert out.stdout.strip() == "step_jax.api"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("run")
  params = make_workdir(path, _tiny_segvit())
  return path, params


def test_load_workdir_and_segment_any_size(workdir):
  path, params = workdir
  model, variables = step_jax.load(str(path))
  assert set(variables) == {"params"}
  for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)   # off the 16-px grid
  pred, info = step_jax.segment(model, variables, image)
  assert pred.shape == (40, 50) and pred.dtype == np.int32
  assert info["scores"].shape == (40, 50, 6) and info["grid"] == (3, 4)
  assert info["patch_size"] == 16 and info["exit_layers"] == ()
  # The same as padding by hand with the pixel mean and running the model.
  x = np.full((1, 48, 64, 3), 127.5, np.float32)
  x[0, :40, :50] = image
  want = jax.jit(api.inference_fn(model))(variables, x)
  np.testing.assert_array_equal(pred, np.asarray(want["pred"])[0, :40, :50])
  # A batch gives the per-image results stacked.
  preds, infos = step_jax.segment(model, variables, np.stack([image, image[::-1]]))
  assert preds.shape == (2, 40, 50) and infos["scores"].shape == (2, 40, 50, 6)
  np.testing.assert_array_equal(preds[0], pred)
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    step_jax.segment(model, variables, image[..., :2])


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    step_jax.load(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    step_jax.load(str(tmp_path))


def test_get_config_from_path_module_and_json(tmp_path):
  spec = "configs/step.py:method=dcts,variant=Mu/16,dataset=synthetic,smoke"
  cfg = api.get_config(os.path.join(REPO, spec))
  assert cfg.method == "dcts" and cfg.model.merge == "dcts"
  cwd = os.getcwd()
  try:  # elsewhere: the installed `configs` package
    os.chdir(tmp_path)
    assert api.get_config(spec).to_dict() == cfg.to_dict()
  finally:
    os.chdir(cwd)
  (tmp_path / "c.json").write_text(cfg.to_json())
  assert api.get_config(str(tmp_path / "c.json")).model.variant == "Mu/16"
  with pytest.raises(FileNotFoundError, match="no file"):
    api.get_config("configs/nope.py:x=1")


# ----------------------------------------------------------------------------- visualize

def test_superpatches_draws_borders_and_tints_merged_tokens():
  image = np.full((64, 64, 3), 100, np.uint8)
  level = np.ones((4, 4), np.int32)
  level[:2, :2] = 2                      # one 2x2 superpatch top-left, 12 single patches
  out = visualize.superpatches(image, level, 16, tint=0.5)
  white = (out == 255).all(-1)
  assert not white[5:30, 5:30].any()     # inside the superpatch: no border at 16 px
  assert white[5:30, 32].all()           # its right border
  assert white[40:60, 48].all() and white[48, 40:60].all()   # single patches' borders
  assert (out[5, 5] != 100).any() and (out[40, 40] == 100).all()   # tinted vs untouched
  np.testing.assert_array_equal(visualize.token_ids(level)[:2, :2], 0)


def test_halted_greys_exactly_the_halted_cells():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
  halt = np.array([[0, 1, 2], [2, 0, 2]])    # 2 = never halted (two exits)
  first = visualize.halted(image, halt, 16, 0)
  second = visualize.halted(image, halt, 16, 1)
  changed = lambda a: (a != image).any(-1)
  cells = lambda m: m.reshape(2, 16, 3, 16).any(axis=(1, 3))
  np.testing.assert_array_equal(cells(changed(first)), halt == 0)
  np.testing.assert_array_equal(cells(changed(second)), halt <= 1)


def test_merged_draws_algm_tokens_of_any_shape():
  """ALGM's tokens need not be squares: a global merge joins any cells. Borders separate
  tokens, cells of merged tokens are tinted by size, single cells stay untouched."""
  image = np.full((48, 64, 3), 100, np.uint8)
  source = np.array([[0, 0, 1, 2],       # token 0: an L of 3 cells; 1, 2, 3: single cells;
                     [0, 3, 4, 6],       # token 4: two cells apart (a global merge)
                     [5, 5, 5, 4]])      # token 5: a row of 3
  out = visualize.merged(image, source, 16, tint=0.5)
  white = (out == 255).all(-1)
  assert not white[2:14, 2:30].any() and not white[2:30, 2:14].any()  # inside the L
  assert white[2:14, 32].all() and white[16, 18:30].all()   # its borders to tokens 1 and 3
  assert not white[34:46, 2:46].any()                       # inside the row of 3
  cell = lambda r, c: out[16 * r + 8, 16 * c + 8]
  assert (cell(0, 0) != 100).any() and (cell(2, 1) != 100).any()   # merged: tinted
  assert (cell(2, 3) != 100).any() and (cell(2, 3) == cell(1, 2)).all()   # one token, apart
  for r, c in ((0, 2), (0, 3), (1, 1), (1, 3)):   # single cells: untouched
    assert (cell(r, c) == 100).all()
  info = dict(patch_size=16, algm_source_local=np.arange(12).reshape(3, 4),
              algm_source=source, scores=np.zeros((48, 64, 3)))
  _, titles = visualize.panels(image, np.zeros((48, 64), np.int32), info)
  assert titles == ["input", "ALGM local merge: 12 tokens", "ALGM merged: 7 tokens",
                    "prediction"]


def test_colorize_palette_and_figure():
  pred = np.array([[0, 1], [255, 2]])
  rgb = visualize.colorize(pred, num_classes=3)
  assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
  np.testing.assert_array_equal(rgb[1, 0], 0)                       # ignore → black
  np.testing.assert_array_equal(rgb[0], datasets.palette("", 3)[:2])  # the registry's colours
  camvid = datasets.palette("camvid", 11)
  np.testing.assert_array_equal(visualize.colorize(pred, colours=camvid)[0], camvid[:2])
  assert len({tuple(c) for c in datasets.palette("", 200)}) == 200  # distinct colours
  image = np.zeros((32, 32, 3), np.uint8)
  info = dict(patch_size=16, level=np.array([[2, 2], [2, 2]]), num_tokens=np.array(1),
              halt_stage=np.array([[0, 1], [1, 1]]), active_tokens=np.array([1, 1]),
              exit_layers=(2,), scores=np.zeros((32, 32, 3)))
  ims, titles = visualize.panels(image, np.zeros((32, 32), np.int32), info)
  assert titles == ["input", "superpatches: 1 tokens", "halted by layer 2, 1 left",
                    "prediction"]
  fig = visualize.figure(image, np.zeros((32, 32), np.int32), info, scale=2)
  assert fig.size[0] == 4 * 64 + 5 * 4
