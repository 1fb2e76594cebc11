"""Bad input at every boundary fails clearly (which input, what was expected, what was
found), and nothing good is lost: files and records, the training pipeline's bad-record
policy, the model API, configs, the CLI, checkpoints; plus bf16 vs fp32 agreement."""
import functools
import glob
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image
import pytest

from numerics import assert_close  # tests/numerics.py

from configs import segvit
from configs import step as step_config
from step_jax.runtime import checkpoint as ckpt_lib
from step_jax.training import optim
from step_jax.runtime import sharding
from step_jax.training import train
from step_jax.runtime import writers
from step_jax.data import get_source
from step_jax.data import pipeline
from step_jax.data import datasets
from step_jax.data import sources
from step_jax.data.decode import BadRecordError
from step_jax.models import segmenter
from step_jax.models import inputs
from step_jax.models import pretrained
from step_jax.models import variables as variables_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(**data):
  """The smallest segvit smoke config (32x32, one ATM stage): fast to build and compile."""
  cfg = segvit.get_config("variant=Mu/16,dataset=synthetic,smoke")
  cfg.data.update(image_size=(32, 32), num_train=16, num_eval=4, **data)
  cfg.model.update(out_layers=(2,), head_layers=1, posemb_grid=(2, 2))
  cfg.optim.update(total_steps=4, warmup_steps=1)
  cfg.update(batch_size=4, log_every=2, eval_every=0, checkpoint_every=2, eval_batch_size=4)
  return cfg


def _rgb(size=(6, 8), salt=0):
  return np.random.default_rng(salt).integers(0, 256, size + (3,), dtype=np.uint8)


################################################################################
# Image and label files (CamVid layout: files read directly).                  #
################################################################################
def _camvid(root, n=3, size=(6, 8)):
  """A SegNet-layout CamVid split of n good pairs; returns the paths of image/label i."""
  for d in ("train", "trainannot"):
    os.makedirs(os.path.join(root, "CamVid", d), exist_ok=True)
  for i in range(n):
    Image.fromarray(_rgb(size, i)).save(os.path.join(root, "CamVid", "train", f"f{i}.png"))
    label = (np.arange(size[0] * size[1]).reshape(size) % 12).astype(np.uint8)
    Image.fromarray(label).save(os.path.join(root, "CamVid", "trainannot", f"f{i}.png"))
  return (lambda i: os.path.join(root, "CamVid", "train", f"f{i}.png"),
          lambda i: os.path.join(root, "CamVid", "trainannot", f"f{i}.png"))


def _camvid_cfg(root):
  return ml_collections.ConfigDict(dict(name="camvid", data_dir=str(root), train_split="train"))


def _source(root):
  return get_source(_camvid_cfg(root), "train", 11, 11)


def _truncate(path):
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])


@pytest.mark.parametrize("damage,match", [
    (_truncate, r"cannot decode image file .*f1\.png: image file is truncated"),
    (lambda p: open(p, "wb").close(), r"cannot decode image file .*f1\.png"),       # 0 bytes
    (lambda p: open(p, "wb").write(b"GIF89a garbage"), r"cannot decode image file .*f1\.png"),
    (lambda p: Image.fromarray(np.zeros((6, 8), np.uint16)).save(p),               # 16-bit
     r"f1\.png has PIL mode 'I;16' \(16-bit or float pixels\); expected 8-bit"),
    (lambda p: Image.fromarray(np.zeros((6, 8, 4), np.uint8)).save(p),             # RGBA
     r"f1\.png \(RGBA\) has transparent pixels"),
])
def test_bad_image_files_name_the_file(tmp_path, damage, match):
  image, _ = _camvid(str(tmp_path))
  damage(image(1))
  src = _source(tmp_path)
  with pytest.raises(BadRecordError, match=match):
    src[1]
  assert src[0]["image"].shape == (6, 8, 3) and src[2]["image"].shape == (6, 8, 3)


def test_grey_palette_and_opaque_rgba_images_become_rgb(tmp_path):
  image, _ = _camvid(str(tmp_path))
  Image.fromarray(np.full((6, 8), 7, np.uint8)).save(image(0))                     # grey
  Image.fromarray(np.full((6, 8, 4), 255, np.uint8)).save(image(1))                # opaque
  Image.fromarray(np.full((6, 8), 3, np.uint8)).convert("P").save(image(2))        # palette
  src = _source(tmp_path)
  assert (src[0]["image"] == 7).all() and (src[1]["image"] == 255).all()
  assert all(src[i]["image"].shape == (6, 8, 3) for i in range(3))


@pytest.mark.parametrize("label,match", [
    (np.full((6, 8, 3), 2, np.uint8), r"label file .*f1\.png has mode 'RGB'; expected 8-bit"),
    (np.full((6, 8), 2, np.uint16), r"label file .*f1\.png has mode 'I;16'"),
    (np.full((6, 8), 12, np.uint8),
     r"f1\.png has label values \[12\] \(48 pixels\) outside the classes 0\.\.10 and void 11"),
    (np.full((5, 8), 2, np.uint8), r"f1\.png is \(6, 8\) but its label .*f1\.png is \(5, 8\)"),
])
def test_bad_label_files_name_the_file(tmp_path, label, match):
  _, lab = _camvid(str(tmp_path))
  Image.fromarray(label).save(lab(1))
  with pytest.raises(BadRecordError, match=match):
    _source(tmp_path)[1]


def test_bad_split_files_and_folders(tmp_path):
  _camvid(str(tmp_path))
  with open(tmp_path / "CamVid" / "train.txt", "w") as f:
    f.write("train/f0.png trainannot/f0.png\ntrain/f1.png\n")
  with pytest.raises(ValueError, match=r"train\.txt:2: expected '<image> <label>'"):
    _source(tmp_path)
  with open(tmp_path / "CamVid" / "train.txt", "w") as f:
    f.write("\n")
  with pytest.raises(FileNotFoundError, match="split 'train' under .* lists no images"):
    _source(tmp_path)
  with pytest.raises(FileNotFoundError, match="neither .*val.txt nor"):
    get_source(_camvid_cfg(tmp_path), "val", 11, 11)


def test_tfds_records_with_bad_labels_or_dtypes():
  lut = sources.ade20k_lut()
  valid = sources.raw_label_table(datasets.DATASETS["ade20k"].tfds.raw_labels)
  good = dict(image=np.zeros((4, 5, 3), np.uint8), annotation=np.full((4, 5, 1), 3, np.uint8))
  records = [good, dict(good, annotation=np.full((4, 5, 1), 200, np.uint8)),
             dict(good, image=np.zeros((4, 5, 3), np.uint16))]
  src = sources.LabelMapped(records, lut, name="ade20k/train", valid=valid)
  assert (src[0]["label"] == 2).all()
  with pytest.raises(BadRecordError, match=r"ade20k/train example 1 has label values \[200\]"):
    src[1]
  with pytest.raises(BadRecordError, match=r"example 2: image uint16 .*expected uint8"):
    src[2]


################################################################################
# The training pipeline: validation and the bad-record policy.                 #
################################################################################
class _Examples:
  """Good 32x32 examples, except those listed in `bad` (index → example or exception)."""

  def __init__(self, n=8, bad=None):
    self.n, self.bad = n, bad or {}

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if i in self.bad:
      if isinstance(self.bad[i], Exception):
        raise self.bad[i]
      return self.bad[i]
    return dict(image=np.full((32, 32, 3), i, np.uint8), label=np.full((32, 32), i % 6, np.uint8))


_GOOD = dict(image=np.zeros((32, 32, 3), np.uint8), label=np.zeros((32, 32), np.uint8))


@pytest.mark.parametrize("bad,match", [
    (dict(_GOOD, image=np.full((32, 32, 3), np.nan, np.float32)),
     r"training example 3: image has dtype float32 with 3072 NaN/Inf values; expected uint8"),
    (dict(_GOOD, image=np.zeros((32, 32), np.uint8)),
     r"training example 3: image has shape \(32, 32\); expected \[H, W, 3\] RGB"),
    (dict(_GOOD, image=np.zeros((32, 32, 3), np.uint16)),
     r"image has dtype uint16; expected uint8"),
    (dict(_GOOD, label=np.full((32, 32), 7, np.uint8)),
     r"label values \[7\] are outside the classes 0\.\.5 and the ignore value 255"),
    (dict(_GOOD, label=np.zeros((16, 32), np.uint8)),
     r"label shape \(16, 32\) does not match the image's \(32, 32\)"),
    (OSError("disk went away"), "disk went away"),
])
def test_fail_policy_raises_the_first_bad_record(bad, match):
  cfg = _tiny()
  it = pipeline.make_train_iter(cfg, source=_Examples(8, {3: bad}))
  with pytest.raises((BadRecordError, OSError), match=match) as e:
    for _ in range(2):   # one epoch: example 3 is in it
      next(it)
  assert any("bad_records='fail'" in n for n in getattr(e.value, "__notes__", []))


def test_skip_policy_replaces_counts_logs_and_resumes(caplog):
  cfg = _tiny(bad_records="skip")
  src = _Examples(8, {2: OSError("truncated"), 3: BadRecordError("bad label"),
                      5: dict(_GOOD, image=np.full((32, 32, 3), np.inf, np.float32))})
  with caplog.at_level(logging.WARNING):
    it = pipeline.make_train_iter(cfg, source=src)
    epoch = [next(it) for _ in range(2)]
  ids = np.concatenate([b["image"][:, 0, 0, 0] for b in epoch])
  assert set(ids) <= {0, 1, 4, 6, 7} and len(ids) == 8      # full batches, good records only
  assert it.bad_records == 4      # 2 → 3 → 4 skips two, 3 → 4 one, 5 → 6 one
  assert "skipping bad training record 3" in caplog.text
  assert set(epoch[0]) == {"image", "label"}
  # The count is part of the iterator state: a resumed iterator continues it.
  state = it.get_state()
  want = next(it)
  resumed = pipeline.make_train_iter(cfg, source=src)
  resumed.set_state(state)
  got = next(resumed)
  np.testing.assert_array_equal(got["image"], want["image"])
  assert resumed.bad_records == it.bad_records


def test_skip_policy_with_nothing_good_and_unknown_policies():
  cfg = _tiny(bad_records="skip")
  src = _Examples(4, {i: OSError("gone") for i in range(4)})
  with pytest.raises(BadRecordError, match="all 4 records of the training split are bad"):
    next(pipeline.make_train_iter(cfg, source=src))
  cfg.data.bad_records = "ignore"
  with pytest.raises(ValueError, match=r"config.data.bad_records='ignore': use one of"):
    pipeline.make_train_iter(cfg, source=_Examples())


def test_bad_record_stops_training_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
  cfg = _tiny()   # (the program of test_skipped_records_reach_training_metrics: compiled once)
  train.train_and_evaluate(cfg, str(tmp_path))          # good data: checkpoints at steps 2, 4
  real = pipeline.get_source

  def all_bad(*args):
    n = len(real(*args))
    return _Examples(n, {i: BadRecordError(f"training example {i}: corrupt") for i in range(n)})
  monkeypatch.setattr(pipeline, "get_source", all_bad)  # the files rot after step 4
  cfg.optim.total_steps = 6
  with pytest.raises(BadRecordError, match=r"training example \d+: corrupt"):
    train.train_and_evaluate(cfg, str(tmp_path))
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  assert ck.all_steps() == [2, 4]                       # nothing written after, nothing lost
  model = variables_lib.create_model(cfg)
  abstract, sh = train.abstract_train_state(cfg, model, sharding.make_mesh(cfg))
  state, _, step = ck.restore(sharding.with_shardings(abstract, sh))
  assert step == 4 and int(state["step"]) == 4


def test_skipped_records_reach_training_metrics(tmp_path, monkeypatch):
  cfg = _tiny(bad_records="skip")
  cfg.checkpoint_every = 0
  monkeypatch.setattr(pipeline, "get_source", lambda *a: _Examples(
      16, {3: BadRecordError("x"), 5: OSError("y")}))
  _, ev = train.train_and_evaluate(cfg, str(tmp_path))
  assert ev["bad_records"] == 2
  lines = [l for l in writers.read_jsonl(tmp_path / "metrics.jsonl") if "loss" in l]
  assert [l["bad_records"] for l in lines] == [0, 2]   # batches 1-2 then 3-4 of 4 examples


################################################################################
# The model API.                                                               #
################################################################################
@pytest.fixture(scope="module")
def tiny_model():
  return variables_lib.create_model(_tiny())


@pytest.mark.parametrize("shape,dtype,match", [
    ((2, 32, 32, 1), jnp.float32, r"got shape \(2, 32, 32, 1\); grayscale\? repeat it"),
    ((2, 32, 32, 4), jnp.uint8, r"got shape \(2, 32, 32, 4\); RGBA\? drop the alpha"),
    ((32, 32, 3), jnp.uint8, r"a single image\? add the batch axis"),
    ((2, 32, 32, 3), jnp.uint16, r"dtype uint16; expected uint8 or float .* 16-bit\?"),
    ((2, 32, 32, 3), jnp.int32, r"dtype int32; expected uint8 or float"),
    ((2, 40, 32, 3), jnp.uint8, r"image size 40x32 is not a multiple of the patch size 16"),
])
def test_model_rejects_bad_images_at_trace_time(tiny_model, shape, dtype, match):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(tiny_model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, dtype))


def test_model_rejects_non_finite_pixels_outside_jit(tiny_model):
  images = np.full((1, 32, 32, 3), 100.0, np.float32)
  images[0, 3, 4, 1] = np.nan
  images[0, 5, 6, 2] = np.inf
  with pytest.raises(ValueError, match=r"images contain 2 NaN/Inf values \(of 3072\)"):
    tiny_model.init(jax.random.key(0), images)
  with pytest.raises(ValueError, match="NaN/Inf"):
    inputs.check_images(images)       # the host-side check for jitted callers
  inputs.check_images(np.zeros((1, 32, 32, 3), np.uint8))


################################################################################
# Configs and the CLI.                                                         #
################################################################################
def _model_cfg(**overrides):
  cfg = step_config.get_config("method=step,variant=Mu/16,dataset=synthetic,smoke")
  for k, v in overrides.items():  # any type: a per-exit tuple where a float was, say
    del cfg.model[k]
    cfg.model[k] = v
  return cfg


@pytest.mark.parametrize("change,match", [
    (dict(exit_layers=(2, 4)), r"model.exit_layers=\(2, 4\) must be increasing 1-based layers "
                               r"below the depth 4 of Mu/16"),
    (dict(exit_layers=(3, 2)), r"must be increasing"),
    (dict(thresholds=(0.6, 1.2, 0.9, 0.9)), r"model.thresholds=.* must lie in \[0, 1\]"),
    (dict(exit_threshold=1.5), r"model.exit_threshold=1.5 must lie in \[0, 1\]"),
    (dict(exit_threshold=(0.9, 0.9)), r"needs one value per exit layer \(2,\)"),
    (dict(variant="Q/16"), r"unknown ViT variant 'Q/16'"),
    (dict(dtype="bf16"), r"model.dtype='bf16': use 'float32', 'bfloat16' or 'float16'"),
    (dict(merge="topk"), r"model.merge='topk'"),
    (dict(exit_mode="drop"), r"model.exit_mode='drop': use 'mask' or 'compact'"),
    (dict(buckets=(0.5, 1.5)), r"model.buckets=\(0.5, 1.5\) must be fractions in \(0, 1\]"),
])
def test_contradictory_model_configs(change, match):
  cfg = _model_cfg(**change)
  with pytest.raises(ValueError, match=match):
    variables_lib.create_model(cfg)


def test_contradictory_data_and_class_configs():
  cfg = _tiny()
  cfg.data.image_size = (40, 40)
  with pytest.raises(ValueError, match=r"data.image_size=\(40, 40\) is not a multiple of the "
                                       r"patch size 16 of Mu/16; use e.g. \(48, 48\)"):
    variables_lib.create_model(cfg)
  cfg = _tiny()
  cfg.ignore_index = 3
  with pytest.raises(ValueError, match=r"ignore_index=3 must lie outside the classes 0\.\.5"):
    variables_lib.create_model(cfg)
  with pytest.raises(ValueError, match=r"res=100 must be a positive multiple of the patch "
                                       r"size 16 of B/16"):
    segvit.get_config("variant=B/16,dataset=ade20k,res=100")
  with pytest.raises(ValueError, match=r"config argument res='big' must be int"):
    segvit.get_config("res=big")
  with pytest.raises(ValueError, match=r"tau='6x99'"):
    step_config.get_config("tau=6x99")


def test_cli_reports_a_bad_config_and_writes_no_checkpoint(tmp_path):
  wd = tmp_path / "wd"
  proc = subprocess.run(
      [sys.executable, "-m", "step_jax.cli.train", f"--workdir={wd}",
       "--config=configs/segvit.py:variant=Mu/16,dataset=synthetic,smoke",
       "--config.data.image_size=(40, 40)"],
      cwd=REPO, capture_output=True, text=True, timeout=240)
  assert proc.returncode != 0
  assert "data.image_size=(40, 40) is not a multiple of the patch size 16" in proc.stderr
  assert not os.path.exists(wd / "checkpoints")


################################################################################
# Checkpoints.                                                                 #
################################################################################
def _abstract(cfg, mesh):
  model, tx = variables_lib.create_model(cfg), optim.make_optimizer(cfg.optim)
  abstract, sh = train.abstract_train_state(cfg, model, mesh, tx)
  init = functools.partial(train.init_state, model=model, tx=tx, config=cfg)
  return sharding.with_shardings(abstract, sh), jax.jit(init, out_shardings=sh)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A workdir with checkpoints at steps 2 and 4 (different states) and its config."""
  cfg = _tiny()
  cfg.sharding.num_devices = 1
  abstract, init = _abstract(cfg, sharding.make_mesh(cfg))
  wd = str(tmp_path_factory.mktemp("ck"))
  ck = ckpt_lib.Checkpointer(wd)
  states = {2: init(jax.random.key(2)), 4: init(jax.random.key(4))}
  for s, st in states.items():
    ck.save(s, st, None, cfg.to_dict())
  ck.close()
  return wd, cfg, abstract, jax.device_get(states)


def _copy(saved, tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(saved[0], wd)
  return wd


def _params_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(jax.device_get(a)),
                                                   jax.tree.leaves(b)))


def _array_files(wd, step):
  return sorted(glob.glob(os.path.join(wd, "checkpoints", str(step), "state", "ocdbt.*", "d",
                                       "*")))


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(saved, tmp_path, caplog, damage):
  wd = _copy(saved, tmp_path)
  for f in _array_files(wd, 4):
    _truncate(f) if damage == "truncate" else os.remove(f)
  ck = ckpt_lib.Checkpointer(wd)
  with caplog.at_level(logging.WARNING):
    state, _, step = ck.restore(saved[2])
  assert step == 2 and _params_equal(state["params"], saved[3][2]["params"])
  assert "checkpoints/4 cannot be restored" in caplog.text and "trying the previous" in caplog.text
  # The unreadable checkpoint is kept aside, not deleted, and the step can be saved again.
  assert ck.all_steps() == [2]
  assert os.listdir(os.path.join(wd, "corrupt_checkpoints"))[0].startswith("4.")
  assert ck.save(4, state)
  ck.wait()
  assert ck.all_steps() == [2, 4]
  ck.close()


def test_no_readable_checkpoint_is_an_error_that_moves_nothing(saved, tmp_path):
  wd = _copy(saved, tmp_path)
  for s in (2, 4):
    for f in _array_files(wd, s):
      os.remove(f)
  ck = ckpt_lib.Checkpointer(wd)
  with pytest.raises(RuntimeError, match=r"none of the checkpoints \[4, 2\] .* could be restored"):
    ck.restore(saved[2])
  assert ck.all_steps() == [2, 4] and not os.path.exists(os.path.join(wd, "corrupt_checkpoints"))


def test_partially_written_checkpoint_is_never_picked_up(saved, tmp_path):
  wd = _copy(saved, tmp_path)
  # What a kill during an orbax save leaves: the step directory under its temporary name,
  # with only part of its files.
  partial = os.path.join(wd, "checkpoints", "6.orbax-checkpoint-tmp-1234567")
  shutil.copytree(os.path.join(wd, "checkpoints", "4"), partial)
  for f in glob.glob(os.path.join(partial, "state", "ocdbt.*", "d", "*"))[::2]:
    os.remove(f)
  os.remove(os.path.join(partial, "_CHECKPOINT_METADATA"))
  ck = ckpt_lib.Checkpointer(wd)
  assert ck.latest_step() == 4 and ck.all_steps() == [2, 4]
  state, _, step = ck.restore(saved[2])
  assert step == 4 and _params_equal(state["params"], saved[3][4]["params"])
  assert pretrained.load_pretrained(wd, None)["backbone"]["embedding"]["kernel"].shape
  ck.close()


def test_checkpoint_of_another_variant_names_the_arrays(saved, tmp_path):
  wd = _copy(saved, tmp_path)
  cfg = _tiny()
  cfg.sharding.num_devices = 1
  cfg.model.variant = "Ti/16"
  abstract, _ = _abstract(cfg, sharding.make_mesh(cfg))
  ck = ckpt_lib.Checkpointer(wd)
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"checkpoints/4 does not match the model built from the config: "
                           r"\d+ arrays differ in shape, e.g. params/backbone/") as e:
    ck.restore(abstract)
  assert "checkpoint (64,) vs model (192,)" in str(e.value)
  assert "It was written with model.variant='Mu/16'" in str(e.value)
  assert "model arrays missing from it, e.g. ['params/backbone/blocks_10" in str(e.value)
  with pytest.raises(ckpt_lib.CheckpointMismatchError):
    ck.restore(abstract, step=2)
  assert ck.all_steps() == [2, 4]                       # a mismatch is not corruption


################################################################################
# Numerics: bf16 agrees with fp32.                                             #
################################################################################
def test_bf16_forward_and_training_agree_with_fp32():
  """Stated tolerances (tiny model, 32x32, same fp32 parameters; bf16 = activations and
  matmuls in bfloat16): mask and class logits, and the class scores made of them, within 2 %
  of their largest fp32 magnitude, >= 90 % of pixels with the same argmax; the losses of
  three SGD steps within 0.5 %, gradient norms within 2 %."""
  cfg32 = _tiny()
  cfg16 = _tiny()
  cfg16.model.dtype = "bfloat16"
  m32, m16 = variables_lib.create_model(cfg32), variables_lib.create_model(cfg16)
  src = get_source(cfg32.data, "train", cfg32.num_classes, cfg32.ignore_index)
  batch = dict(image=np.stack([src[i]["image"] for i in range(4)]),
               label=np.stack([src[i]["label"] for i in range(4)]).astype(np.int32))
  params = variables_lib.random_variables(m32, cfg32.data.image_size)["params"]

  def forward(m):
    out, _ = m.apply({"params": params}, batch["image"])
    return out, segmenter.predict_scores(out, batch["image"].shape[1:3])
  (o32, s32), (o16, s16) = jax.jit(forward, static_argnums=0)(m32), jax.jit(
      forward, static_argnums=0)(m16)
  for k in ("pred_logits", "pred_masks"):
    assert_close(o16[k], o32[k], 0.02, what=k)
  s32, s16 = np.asarray(s32), np.asarray(s16, np.float32)
  # (was 0.01 absolute: 1.4 % of these scores, 0.86 % measured)
  assert_close(s16, s32, 0.02, what="class scores")
  assert (np.argmax(s32, -1) == np.argmax(s16, -1)).mean() >= 0.9

  def sgd(cfg, model, lr=0.05):
    rng = jax.random.key(1)

    @jax.jit   # one program (eagerly, each tree op would compile per array shape)
    def step(p):
      loss, g = jax.value_and_grad(lambda p: train.loss_fn(p, model, batch, rng, cfg)[0])(p)
      return (loss, optax.tree.norm(g)), jax.tree.map(lambda w, d: w - lr * d, p, g)
    p, out = params, []
    for _ in range(3):
      (loss, norm), p = step(p)
      out.append((float(loss), float(norm)))
    return np.array(out)
  r32, r16 = sgd(cfg32, m32), sgd(cfg16, m16)
  assert r32[-1, 0] < r32[0, 0]                                       # it does train
  assert_close(r16[:, 0], r32[:, 0], 0.005, what="losses")
  assert_close(r16[:, 1], r32[:, 1], 0.02, what="gradient norms")
