"""Data: label mappings, mmseg-exact transforms, the grain training pipeline, CamVid."""
import hashlib
import os

import grain
import ml_collections
import numpy as np
from PIL import Image
import pytest

from numerics import assert_close  # tests/numerics.py

from configs import segvit
from step_jax.data import get_source
from step_jax.data import pipeline
from step_jax.data import datasets
from step_jax.data import sources
from step_jax.data import transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shared data next to the repository (CI: ../shared/data), or none (those tests skip).
CAMVID = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "camvid_segnet"))
CAMVID = CAMVID if os.path.isdir(os.path.join(CAMVID, "CamVid")) else None


################################################################################
# Label mappings.                                                              #
################################################################################
def test_ade20k_lut_reduces_zero_label():
  lut = sources.ade20k_lut()
  assert lut[0] == 255 and lut[1] == 0 and lut[150] == 149 and lut[151] == 255
  np.testing.assert_array_equal(lut[1:151], np.arange(150))


def test_coco_stuff_lut_matches_mmseg_converter_plus_reduce_zero_label():
  lut = sources.coco_stuff_lut()
  # Spot checks from mmseg's tools/dataset_converters/coco_stuff10k.py clsID_to_trID
  # (0: 0, 11: 11, 13: 12, 27: 25, 31: 27, 46: 41, 67: 61, 70: 62, 72: 63, 84: 74, 92: 81,
  # 182: 171), then reduce_zero_label (0 → 255, k → k-1).
  mmseg = {11: 11, 13: 12, 25: 24, 27: 25, 28: 26, 31: 27, 44: 40, 46: 41, 65: 60, 67: 61,
           70: 62, 72: 63, 82: 73, 84: 74, 90: 80, 92: 81, 100: 89, 182: 171}
  for cls_id, tr_id in mmseg.items():
    assert lut[cls_id] == tr_id - 1, cls_id
  assert lut[0] == 255 and lut[1] == 0
  for unused in sources.COCO_STUFF_UNUSED:
    assert lut[unused] == 255
  used = lut[1:183][lut[1:183] != 255]
  np.testing.assert_array_equal(used, np.arange(171))   # 171 classes, in id order
  assert (lut[183:] == 255).all()


def test_cityscapes_lut_label_ids_to_train_ids():
  lut = sources.cityscapes_lut()
  assert [lut[i] for i in (7, 8, 11, 21, 23, 24, 26, 31, 33)] == [0, 1, 2, 8, 10, 11, 13, 16, 18]
  for void in (0, 1, 3, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34, 255):
    assert lut[void] == 255
  assert sorted(lut[lut != 255].tolist()) == list(range(19))


def test_camvid_lut_keeps_void_as_ignore():
  lut = sources.identity_lut(11, 11)
  np.testing.assert_array_equal(lut[:12], np.arange(12))
  assert (lut[12:] == 11).all()


################################################################################
# Transforms: OpenCV-exact resizing and colour conversions, mmseg semantics.   #
################################################################################
def _noise(shape, salt):
  """Deterministic uint8 noise from a hash (independent of numpy's RNG streams)."""
  n = np.arange(int(np.prod(shape)), dtype=np.uint64) + np.uint64(salt * 1000003)
  x = n * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)
  x ^= x >> np.uint64(33)
  x *= np.uint64(0xff51afd7ed558ccd)
  x ^= x >> np.uint64(33)
  return (x >> np.uint64(56)).astype(np.uint8).reshape(shape)


def _sha(a):
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


# sha256 prefixes of cv2 4.14 outputs (opencv-python-headless, x86) on the same inputs.
_CV2_RESIZE = [((45, 61), (97, 131), "e3a0435fc48a0dfd", "5821b878533ec0b5"),
               ((90, 120), (41, 57), "159df725902069b4", "c5f9b1d003701cea"),
               ((33, 47), (66, 94), "16d604d253cac4bf", "fe8883c6e12ecd1c"),
               ((50, 64), (25, 32), "21080bd7c8d50629", "2850fe4abb2f151c"),
               ((37, 41), (80, 13), "d1627ac81c9fea63", "32803631b99a249f")]


@pytest.mark.parametrize("i", range(len(_CV2_RESIZE)))
def test_resize_matches_cv2_bit_for_bit(i):
  (h, w), size, bilinear_sha, nearest_sha = _CV2_RESIZE[i]
  assert _sha(transforms.resize_bilinear(_noise((h, w, 3), i), size)) == bilinear_sha
  assert _sha(transforms.resize_nearest(_noise((h, w), i + 100), size)) == nearest_sha


def test_hsv_conversions_match_cv2_bit_for_bit():
  rgb = np.stack(np.meshgrid(np.arange(0, 256, 3), np.arange(0, 256, 5), np.arange(0, 256, 7),
                             indexing="ij"), -1).reshape(-1, 86, 3).astype(np.uint8)
  assert _sha(transforms.rgb_to_hsv(rgb)) == "5886d074be996f34"     # cv2.COLOR_RGB2HSV
  hsv = np.stack(np.meshgrid(np.arange(180), np.arange(0, 256, 3), np.arange(0, 256, 4),
                             indexing="ij"), -1).reshape(-1, 64, 3).astype(np.uint8)
  assert _sha(transforms.hsv_to_rgb(hsv)) == "14a79f405a81672a"     # cv2.COLOR_HSV2RGB


def test_resized_image_window_is_exact():
  img = _noise((40, 60, 3), 7)
  lazy = transforms.ResizedImage(img, (83, 121))
  full = transforms.resize_bilinear(img, (83, 121))
  np.testing.assert_array_equal(np.asarray(lazy), full)
  np.testing.assert_array_equal(lazy[10:50, 30:90], full[10:50, 30:90])
  np.testing.assert_array_equal(lazy[:, ::-1], full[:, ::-1])


def test_rescale_size_follows_mmcv():
  assert transforms.rescale_size((512, 683), (2048, 512)) == (512, 683)
  assert transforms.rescale_size((360, 480), (2048, 512)) == (512, 683)
  assert transforms.rescale_size((1024, 2048), (2048, 1024)) == (1024, 2048)
  assert transforms.rescale_size((400, 300), (1000, 150)) == (200, 150)


def test_random_resize_keeps_ratio_within_range():
  op = transforms.RandomResize((2048, 512), (0.5, 2.0))
  ex = dict(image=_noise((60, 80, 3), 1), label=_noise((60, 80), 2))
  shorts = []
  for seed in range(20):
    out = op.random_map(ex, np.random.default_rng(seed))
    h, w = out["label"].shape
    assert np.asarray(out["image"]).shape == (h, w, 3)
    assert_close(w / h, 80 / 60, 0.01)   # whole pixels: within 0.5 px of >= 256
    shorts.append(h)
  assert 256 <= min(shorts) < 400 and 700 < max(shorts) <= 1024


def test_random_crop_acceptance_ignores_the_ignore_label():
  op = transforms.RandomCrop((10, 10), cat_max_ratio=0.75, ignore_index=255)
  lab = np.full((10, 10), 255, np.uint8)
  lab[0, :5], lab[1, :5] = 1, 2                       # 80 % ignore, classes 50/50
  assert op._accept(lab)
  lab[1, :5] = 1
  assert not op._accept(lab)                          # one class (+ ignore only)
  lab = np.ones((10, 10), np.uint8)
  lab[:3] = 2
  assert op._accept(lab)                              # 70 / 30
  lab[2] = 1
  assert not op._accept(lab)                          # 80 / 20


def test_random_crop_cat_max_ratio_avoids_single_class_crops():
  label = np.zeros((64, 64), np.uint8)
  label[:, 40:] = 1                                   # crops left of x=24 see one class
  ex = dict(image=_noise((64, 64, 3), 3), label=label)
  plain = transforms.RandomCrop((24, 24), cat_max_ratio=1.0)
  retry = transforms.RandomCrop((24, 24), cat_max_ratio=0.75)
  ok = lambda lab: transforms.RandomCrop((24, 24))._accept(lab)
  plain_ok = [ok(plain.random_map(ex, np.random.default_rng(s))["label"]) for s in range(40)]
  retry_ok = [ok(retry.random_map(ex, np.random.default_rng(s))["label"]) for s in range(40)]
  assert sum(plain_ok) < 30 and all(retry_ok)
  out = retry.random_map(ex, np.random.default_rng(0))
  assert out["image"].shape == (24, 24, 3) and out["label"].shape == (24, 24)
  small = retry.random_map(dict(image=ex["image"][:10], label=label[:10]),
                           np.random.default_rng(0))
  assert small["label"].shape == (10, 24)              # smaller side kept; Pad fills later


def test_flip_applies_to_image_and_label_together():
  label = _noise((16, 20), 4) % 7
  ex = dict(image=np.repeat(label[..., None] * 30, 3, -1).astype(np.uint8), label=label)
  flipped = 0
  for seed in range(20):
    out = transforms.RandomFlip(0.5).random_map(ex, np.random.default_rng(seed))
    np.testing.assert_array_equal(out["image"][..., 0], out["label"] * 30)
    flipped += not np.array_equal(out["label"], label)
  assert 3 < flipped < 17


def test_pad_uses_zero_for_images_and_ignore_for_labels():
  ex = dict(image=np.full((5, 7, 3), 9, np.uint8), label=np.full((5, 7), 3, np.uint8))
  out = transforms.Pad((8, 10), ignore_index=11).map(ex)
  assert out["image"].shape == (8, 10, 3) and out["label"].shape == (8, 10)
  assert (out["image"][5:] == 0).all() and (out["image"][:, 7:] == 0).all()
  assert (out["label"][5:] == 11).all() and (out["label"][:, 7:] == 11).all()
  assert (out["label"][:5, :7] == 3).all() and (out["image"][:5, :7] == 9).all()
  with pytest.raises(ValueError, match="larger than the pad size"):
    transforms.Pad((4, 10)).map(ex)


def test_photometric_distortion_is_deterministic_uint8_and_leaves_labels():
  ex = dict(image=_noise((24, 32, 3), 5), label=_noise((24, 32), 6))
  op = transforms.PhotoMetricDistortion()
  outs = [op.random_map(ex, np.random.default_rng(s)) for s in range(16)]
  for s, out in enumerate(outs):
    assert out["image"].dtype == np.uint8 and out["image"].shape == (24, 32, 3)
    assert out["label"] is ex["label"]
    np.testing.assert_array_equal(out["image"],
                                  op.random_map(ex, np.random.default_rng(s))["image"])
  unchanged = [np.array_equal(op.random_map(ex, np.random.default_rng(s))["image"], ex["image"])
               for s in range(64)]
  assert 1 <= sum(unchanged) <= 10        # each of the 4 steps fires with p=1/2: 4/64 expected
  grey = dict(ex, image=np.full((4, 4, 3), 100, np.uint8))
  for s in range(8):   # saturation and hue leave grey pixels grey
    img = op.random_map(grey, np.random.default_rng(s))["image"]
    assert (img == img[..., :1]).all()


################################################################################
# The training pipeline.                                                       #
################################################################################
class _Indexed:
  """Examples whose pixels carry their index (image) and size varies (like ADE20K)."""

  def __init__(self, n, sizes=((32, 32),)):
    self.n, self.sizes = n, sizes

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    h, w = self.sizes[i % len(self.sizes)]
    return dict(image=np.full((h, w, 3), i, np.uint8),
                label=(np.arange(h * w).reshape(h, w) % 3).astype(np.uint8))


def _config(batch_size=4, size=32, aug=None, **data):
  cfg = segvit.get_config("variant=Mu/16,dataset=synthetic,smoke")
  cfg.batch_size = batch_size
  cfg.data.update(image_size=(size, size), num_train=24, **data)
  # Explicit, so the tests do not depend on the defaults the configs choose.
  cfg.data.aug = ml_collections.ConfigDict(aug or _FLIPS_ONLY)
  return cfg


_FLIPS_ONLY = dict(scale=(0, 0), min_ratio=1.0, max_ratio=1.0, cat_max_ratio=1.0, flip=True,
                   photometric=False)


_ADE_AUG = dict(scale=(128, 32), min_ratio=0.5, max_ratio=2.0, cat_max_ratio=0.75, flip=True,
                photometric=True)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_augmentations_follow_the_config():
  names = lambda data: [type(op).__name__ for op in pipeline.augmentations(data, 255)]
  cfg = _config(aug=_ADE_AUG)
  assert names(cfg.data) == ["RandomResize", "RandomCrop", "RandomFlip",
                             "PhotoMetricDistortion", "Pad"]
  del cfg.data["aug"]                        # no aug: random crops and flips only
  assert names(cfg.data) == ["RandomCrop", "RandomFlip", "Pad"]
  assert names(_config().data) == ["RandomCrop", "RandomFlip", "Pad"]


def test_train_iter_shapes_dtypes_and_determinism():
  cfg = _config(aug=_ADE_AUG)
  a = _take(pipeline.make_train_iter(cfg), 3)
  b = _take(pipeline.make_train_iter(cfg), 3)
  assert a[0]["image"].shape == (4, 32, 32, 3) and a[0]["image"].dtype == np.uint8
  assert a[0]["label"].shape == (4, 32, 32) and a[0]["label"].dtype == np.int32
  assert _equal(a, b)
  assert not np.array_equal(a[0]["image"], a[1]["image"])
  other = _config(aug=_ADE_AUG)
  other.seed = 1
  assert not np.array_equal(a[0]["image"], next(pipeline.make_train_iter(other))["image"])


def test_train_iter_variable_size_examples_are_cropped_and_padded():
  cfg = _config(size=24, aug=dict(scale=(40, 20), min_ratio=0.5, max_ratio=1.0,
                                  cat_max_ratio=0.75, flip=True, photometric=False))
  src = _Indexed(10, sizes=((30, 50), (60, 20), (17, 23)))
  batches = _take(pipeline.make_train_iter(cfg, source=src), 6)
  labels = np.concatenate([b["label"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])
  assert labels.shape == (24, 24, 24) and images.shape == (24, 24, 24, 3)
  pad = labels == 255
  assert pad.any()                                       # small resizes were padded …
  assert (images[pad] == 0).all()                        # … with 0 pixels and ignore labels
  assert set(np.unique(labels[~pad])) <= {0, 1, 2}


def test_train_iter_resumes_on_the_identical_batch():
  cfg = _config(aug=_ADE_AUG)
  it = pipeline.make_train_iter(cfg)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 2)
  resumed = pipeline.make_train_iter(cfg)
  resumed.set_state(state)
  assert _equal(_take(resumed, 2), expected)
  # start_step (no saved state) lands on the same batches.
  assert _equal(_take(pipeline.make_train_iter(cfg, start_step=3), 2), expected)


def test_train_iter_checkpoints_with_orbax(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  cfg = _config()
  it = pipeline.make_train_iter(cfg)
  _take(it, 2)
  ckpt = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  ckpt.save(tmp_path / "it", args=grain.checkpoint.CheckpointSave(it))
  expected = next(it)
  resumed = pipeline.make_train_iter(cfg)
  ckpt.restore(tmp_path / "it", args=grain.checkpoint.CheckpointRestore(resumed))
  assert _equal([next(resumed)], [expected])


def test_per_host_slices_are_disjoint_and_make_up_the_global_batch():
  cfg = _config(batch_size=4)
  src = _Indexed(12)
  ids = lambda b: sorted(b["image"][:, 0, 0, 0].tolist())
  glob = _take(pipeline.make_train_iter(cfg, source=src), 3)
  hosts = [_take(pipeline.make_train_iter(cfg, source=src, process_index=p, process_count=2), 3)
           for p in range(2)]
  for step in range(3):
    h0, h1 = ids(hosts[0][step]), ids(hosts[1][step])
    assert len(h0) == len(h1) == 2 and not set(h0) & set(h1)
    assert sorted(h0 + h1) == ids(glob[step])
  seen = [i for h in hosts for b in h for i in ids(b)]
  assert sorted(seen) == list(range(12))                 # one epoch, each example once
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_train_iter(cfg, source=src, process_count=3)


def test_multiprocess_workers_give_the_same_batches():
  cfg = _config(aug=_ADE_AUG)
  expected = _take(pipeline.make_train_iter(cfg), 3)
  cfg.data.num_workers = 1
  it = pipeline.make_train_iter(cfg)
  assert _equal(_take(it, 2), expected[:2])
  state = it.get_state()
  resumed = pipeline.make_train_iter(cfg)
  resumed.set_state(state)
  assert _equal([next(resumed)], expected[2:])


def test_eval_batches_pad_and_eval_examples_keep_native_size():
  batches = list(pipeline.eval_batches(_Indexed(5), 2))
  assert [b["valid"].tolist() for b in batches] == [[True, True], [True, True], [True, False]]
  assert batches[-1]["image"].shape == (2, 32, 32, 3)
  var = _Indexed(3, sizes=((8, 9), (5, 4)))
  with pytest.raises(ValueError, match="eval_examples"):
    list(pipeline.eval_batches(var, 2))
  exs = list(pipeline.eval_examples(var))
  assert [e["label"].shape for e in exs] == [(8, 9), (5, 4), (8, 9)]
  assert exs[1]["label"].dtype == np.int32 and exs[2]["index"] == 2


################################################################################
# get_source and CamVid.                                                       #
################################################################################
def _data_cfg(name, data_dir=""):
  return ml_collections.ConfigDict(dict(name=name, data_dir=data_dir, image_size=(32, 32),
                                        train_split="train", num_train=4, num_eval=2, seed=0))


def _write_camvid(root, split="train", n=3, size=(6, 8)):
  os.makedirs(os.path.join(root, "CamVid", split), exist_ok=True)
  os.makedirs(os.path.join(root, "CamVid", split + "annot"), exist_ok=True)
  lines = []
  for i in range(n):
    name = f"seq_{i:04d}.png"
    Image.fromarray(_noise(size + (3,), i)).save(os.path.join(root, "CamVid", split, name))
    label = (np.arange(size[0] * size[1]).reshape(size) % 12).astype(np.uint8)
    Image.fromarray(label).save(os.path.join(root, "CamVid", split + "annot", name))
    lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}\n")
  with open(os.path.join(root, "CamVid", split + ".txt"), "w") as f:
    f.writelines(lines)


def test_camvid_source_from_split_file(tmp_path):
  _write_camvid(str(tmp_path))
  src = get_source(_data_cfg("camvid", str(tmp_path)), "train", 11, 11)
  assert len(src) == 3
  ex = src[1]
  assert ex["image"].shape == (6, 8, 3) and ex["image"].dtype == np.uint8
  np.testing.assert_array_equal(ex["image"], _noise((6, 8, 3), 1))
  raw = np.arange(48).reshape(6, 8) % 12
  np.testing.assert_array_equal(ex["label"], raw)   # 0..10 classes, 11 = void kept
  # Without the split file, <split>/ and <split>annot/ are paired by name.
  os.remove(tmp_path / "CamVid" / "train.txt")
  assert len(get_source(_data_cfg("camvid", str(tmp_path / "CamVid")), "train", 11, 11)) == 3


def test_camvid_errors_name_the_path_and_config_key(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.data.data_dir"):
    get_source(_data_cfg("camvid", ""), "train", 11, 11)
  with pytest.raises(FileNotFoundError, match="config.data.data_dir"):
    get_source(_data_cfg("camvid", str(tmp_path / "nowhere")), "train", 11, 11)
  _write_camvid(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="test.txt"):
    get_source(_data_cfg("camvid", str(tmp_path)), "test", 11, 11)
  bad = tmp_path / "CamVid" / "train" / "seq_0001.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  src = get_source(_data_cfg("camvid", str(tmp_path)), "train", 11, 11)
  with pytest.raises(ValueError, match="seq_0001.png"):
    src[1]
  os.remove(tmp_path / "CamVid" / "trainannot" / "seq_0002.png")
  with pytest.raises(FileNotFoundError, match="seq_0002.png"):
    get_source(_data_cfg("camvid", str(tmp_path)), "train", 11, 11)


def test_get_source_rejects_mismatched_config():
  with pytest.raises(ValueError, match="unknown dataset"):
    get_source(_data_cfg("imagenet"), "train", 10, 255)
  with pytest.raises(ValueError, match="150 classes"):
    get_source(_data_cfg("ade20k"), "train", 151, 255)
  with pytest.raises(ValueError, match="ignore_index"):
    get_source(_data_cfg("camvid", "/x"), "train", 11, 5)


def test_registry_entries_are_complete_and_their_tables_fit_the_classes():
  for name, d in datasets.DATASETS.items():
    assert (name == "synthetic") + (d.local is not None) + (d.tfds is not None) == 1, name
    assert d.num_classes <= d.ignore_index <= 255 and d.crop % 16 == 0
    if d.tfds:   # every raw value a release may hold maps to a class or to ignore
      lut = d.tfds.lut(d.ignore_index)
      raw = np.flatnonzero(sources.raw_label_table(d.tfds.raw_labels))
      assert set(lut[raw]) - {d.ignore_index} == set(range(d.num_classes)), name
  with pytest.raises(ValueError, match="unknown dataset 'imagenet'; choose from"):
    datasets.get("imagenet")


class _Tiles:
  """A local reader as a new dataset would bring one: (data_dir, split, classes, ignore)."""

  def __init__(self, data_dir, split, num_classes, ignore_index):
    self.n, self.num_classes = {"train": 6, "val": 2}[split], num_classes

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    label = (np.arange(40 * 48).reshape(40, 48) // 7 + i) % self.num_classes
    return {"image": _noise((40, 48, 3), i), "label": label.astype(np.uint8)}


def test_a_new_dataset_is_one_registry_entry_plus_its_source(monkeypatch):
  entry = datasets.Dataset(num_classes=5, crop=32, steps=123, aug_scale=(2, 1),
                           eval=dict(mode="slide", resize_short=1, max_long=2), local=_Tiles)
  monkeypatch.setitem(datasets.DATASETS, "tiles", entry)
  from configs import step   # pylint: disable=g-import-not-at-top
  cfg = step.get_config("variant=Mu/16,dataset=tiles,method=segvit")
  assert (cfg.num_classes, cfg.ignore_index, tuple(cfg.data.image_size)) == (5, 255, (32, 32))
  assert cfg.optim.total_steps == 123 and tuple(cfg.data.aug.scale) == (64, 32)
  assert (cfg.eval.mode, cfg.eval.resize_short, cfg.eval.max_long) == ("slide", 32, 64)
  cfg.batch_size = 2
  assert len(get_source(cfg.data, "val", 5, 255)) == 2
  batch = next(pipeline.make_train_iter(cfg))
  assert batch["image"].shape == (2, 32, 32, 3)
  assert set(np.unique(batch["label"])) <= {0, 1, 2, 3, 4, 255}   # 255: padding


@pytest.mark.skipif(CAMVID is None, reason="real CamVid (shared/data/camvid_segnet) absent")
def test_real_camvid_splits_and_a_training_batch():
  train = get_source(_data_cfg("camvid", CAMVID), "train", 11, 11)
  val = get_source(_data_cfg("camvid", CAMVID), "val", 11, 11)
  assert (len(train), len(val)) == (367, 101)
  ex = val[0]
  assert ex["image"].shape == (360, 480, 3) and ex["label"].shape == (360, 480)
  assert ex["label"].max() <= 11 and (ex["label"] == 11).any()
  cfg = _config(batch_size=2, size=256, aug=dict(scale=(480, 360), min_ratio=0.5,
                                                  max_ratio=2.0, cat_max_ratio=0.75,
                                                  flip=True, photometric=True))
  cfg.ignore_index, cfg.num_classes = 11, 11
  batch = next(pipeline.make_train_iter(cfg, source=train))
  assert batch["image"].shape == (2, 256, 256, 3) and batch["label"].max() <= 11
  assert len(np.unique(batch["label"])) > 2
