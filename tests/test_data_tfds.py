"""tfds datasets without TensorFlow: our builders' example generators on tiny generated
releases (folders and zips), label mappings through the tfds feature codecs, and
get_source/make_train_iter on `tfds.testing.mock_data`."""
import os
import zipfile

from etils import epath
import numpy as np
from PIL import Image
import pytest
import scipy.io
import tensorflow_datasets as tfds

from configs import segvit
from step_jax.data import get_source
from step_jax.data import pipeline
from step_jax.data import sources
from step_jax.data import tfds_ade20k
from step_jax.data import tfds_coco_stuff10k


class _FakeDownloadManager:
  """The parts of tfds' DownloadManager the builders use; download = a local folder."""

  def __init__(self, tmp, manual=None, download=None):
    self.tmp, self.manual, self.download, self.urls = tmp, manual, download, []

  @property
  def manual_dir(self):
    if self.manual is None or not os.listdir(self.manual):
      raise AssertionError("Manual directory does not exist or is empty.")   # as tfds
    return epath.Path(self.manual)

  def extract(self, path):
    out = os.path.join(self.tmp, "extracted", os.path.basename(os.fspath(path)))
    with zipfile.ZipFile(path) as z:
      z.extractall(out)
    return epath.Path(out)

  def download_and_extract(self, url):
    self.urls.append(url)
    return self.extract(self.download)


def _zip(folder, zip_path, arc_root=""):
  with zipfile.ZipFile(zip_path, "w") as z:
    for dirpath, _, files in os.walk(folder):
      for f in files:
        full = os.path.join(dirpath, f)
        z.write(full, os.path.join(arc_root, os.path.relpath(full, folder)))


def _decode(builder, examples):
  """Encode with the builder's tfds features and decode as tfds.data_source would."""
  features = builder.info.features
  return [features.decode_example_np(features.encode_example(ex)) for _, ex in examples]


################################################################################
# ADE20K (ADEChallengeData2016).                                               #
################################################################################
def _write_ade(root):
  """A 3-image ADEChallengeData2016 folder; image 2 is a grey JPEG, as a few real ones."""
  for folder, names in (("training", ["ADE_train_00000001", "ADE_train_00000002"]),
                        ("validation", ["ADE_val_00000001"])):
    os.makedirs(os.path.join(root, "images", folder))
    os.makedirs(os.path.join(root, "annotations", folder))
    for i, name in enumerate(names):
      h, w = 6 + i, 9
      rgb = np.full((h, w, 3), 40 * (i + 1), np.uint8)
      Image.fromarray(rgb if i == 0 else rgb[..., 0]).save(
          os.path.join(root, "images", folder, name + ".jpg"), quality=95)
      label = (np.arange(h * w).reshape(h, w) * 7 % 151).astype(np.uint8)   # 0..150
      Image.fromarray(label).save(os.path.join(root, "annotations", folder, name + ".png"))


def test_ade20k_builder_generates_the_benchmark_labels(tmp_path):
  _write_ade(str(tmp_path / "manual" / tfds_ade20k.ROOT))
  builder = tfds_ade20k.Ade20k(data_dir=str(tmp_path / "tfds"))
  dl = _FakeDownloadManager(str(tmp_path), manual=str(tmp_path / "manual"))
  gens = builder._split_generators(dl)
  assert set(gens) == {"train", "validation"} and not dl.urls
  train = list(gens["train"])
  assert [k for k, _ in train] == ["ADE_train_00000001", "ADE_train_00000002"]
  assert isinstance(train[0][1]["image"], str)            # RGB JPEG bytes kept as released
  assert isinstance(train[1][1]["image"], Image.Image)    # grey JPEG converted to RGB
  decoded = _decode(builder, train) + _decode(builder, gens["validation"])
  src = sources.LabelMapped(decoded, sources.ade20k_lut(), name="ade20k")
  assert len(src) == 3
  for i, ex in enumerate(src):
    raw = decoded[i]["annotation"][..., 0]
    assert ex["image"].shape == raw.shape + (3,) and ex["label"].dtype == np.uint8
    np.testing.assert_array_equal(ex["label"], np.where(raw == 0, 255, raw.astype(int) - 1))
  assert (src[1]["image"] == src[1]["image"][..., :1]).all()       # grey → 3 equal channels


def test_ade20k_builder_uses_a_manual_zip_or_downloads_the_official_zip(tmp_path):
  _write_ade(str(tmp_path / "release" / tfds_ade20k.ROOT))
  os.makedirs(tmp_path / "manual")
  zip_path = str(tmp_path / "manual" / (tfds_ade20k.ROOT + ".zip"))
  _zip(str(tmp_path / "release"), zip_path)
  dl = _FakeDownloadManager(str(tmp_path / "a"), manual=str(tmp_path / "manual"))
  assert len(list(tfds_ade20k.Ade20k(data_dir=str(tmp_path))._split_generators(dl)["train"])) == 2
  assert not dl.urls
  dl = _FakeDownloadManager(str(tmp_path / "b"), manual=None, download=zip_path)
  root = tfds_ade20k.find_root(dl)
  assert dl.urls == [tfds_ade20k.URL] and os.path.isdir(os.path.join(root, "annotations"))


def test_ade20k_builder_names_a_missing_annotation(tmp_path):
  root = str(tmp_path / tfds_ade20k.ROOT)
  _write_ade(root)
  os.remove(os.path.join(root, "annotations", "validation", "ADE_val_00000001.png"))
  gen = tfds_ade20k.Ade20k(data_dir=str(tmp_path))._generate_examples(root, "validation")
  with pytest.raises(FileNotFoundError, match="ADE_val_00000001.png"):
    list(gen)


################################################################################
# COCO-Stuff 10k.                                                              #
################################################################################
_COCO_IDS = np.array([0, 1, 11, 13, 91, 92, 182, 45, 50], np.uint16)   # incl. unlabeled/unused


def _write_coco(root):
  for d in ("images", "annotations", "imageLists"):
    os.makedirs(os.path.join(root, d))
  names = {"train": ["COCO_train2014_000000000009", "COCO_train2014_000000000025"],
           "test": ["COCO_train2014_000000000030"]}
  for split, split_names in names.items():
    with open(os.path.join(root, "imageLists", split + ".txt"), "w") as f:
      f.write("\n".join(split_names) + "\n")
    for i, name in enumerate(split_names):
      Image.fromarray(np.full((3, 6, 3), 100 + i, np.uint8)).save(
          os.path.join(root, "images", name + ".jpg"))
      s = np.resize(np.roll(_COCO_IDS, i), (3, 6)).astype(np.uint16)
      scipy.io.savemat(os.path.join(root, "annotations", name + ".mat"), {"S": s})


def test_coco_stuff10k_builder_maps_ids_like_mmseg(tmp_path):
  _write_coco(str(tmp_path / "manual"))
  builder = tfds_coco_stuff10k.CocoStuff10k(data_dir=str(tmp_path / "tfds"))
  dl = _FakeDownloadManager(str(tmp_path), manual=str(tmp_path / "manual"))
  gens = builder._split_generators(dl)
  assert set(gens) == {"train", "test"} and not dl.urls
  train = list(gens["train"])
  assert [k for k, _ in train] == ["COCO_train2014_000000000009", "COCO_train2014_000000000025"]
  decoded = _decode(builder, train)
  np.testing.assert_array_equal(decoded[0]["annotation"][..., 0],
                                np.resize(_COCO_IDS, (3, 6)))        # stored as released
  ex = sources.LabelMapped(decoded, sources.coco_stuff_lut(), name="coco")[0]
  expected = {0: 255, 1: 0, 11: 10, 13: 11, 91: 255, 92: 80, 182: 170, 45: 255, 50: 44}
  np.testing.assert_array_equal(ex["label"], np.vectorize(expected.get)(np.resize(_COCO_IDS,
                                                                                 (3, 6))))
  assert len(list(gens["test"])) == 1


def test_coco_stuff10k_builder_finds_a_nested_zip_root_and_checks_labels(tmp_path):
  _write_coco(str(tmp_path / "release"))
  zip_path = str(tmp_path / tfds_coco_stuff10k.ZIP)
  _zip(str(tmp_path / "release"), zip_path, arc_root="cocostuff-10k-v1.1")
  dl = _FakeDownloadManager(str(tmp_path), download=zip_path)
  root = tfds_coco_stuff10k.find_root(dl)
  assert dl.urls == [tfds_coco_stuff10k.URL] and root.endswith("cocostuff-10k-v1.1")
  scipy.io.savemat(str(tmp_path / "bad.mat"), {"S": np.full((2, 2), 300, np.uint16)})
  with pytest.raises(ValueError, match="0..182"):
    tfds_coco_stuff10k.read_mat_labels(str(tmp_path / "bad.mat"))
  with pytest.raises(FileNotFoundError, match="val.txt"):
    tfds_coco_stuff10k.read_list(os.path.join(root, "imageLists", "val.txt"))


################################################################################
# get_source / make_train_iter on mocked tfds data sources.                    #
################################################################################
def _mock(examples_by_split):
  requested = []

  def as_data_source(self, split, **unused_kwargs):
    requested.append((self.name, split))
    return examples_by_split[split]

  return tfds.testing.mock_data(as_data_source_fn=as_data_source), requested


def _labelled(key_image, key_label, raw, n=4, size=(12, 20)):
  return [{key_image: np.full(size + (3,), 10 * i, np.uint8),
           key_label: np.resize(raw, size)[..., None].astype(np.uint8), "image_id": f"x{i}"}
          for i in range(n)]


def test_cityscapes_source_maps_label_ids_and_trains():
  label_ids = np.array([7, 26, 33, 0, 9, 24, 11, 255], np.uint8)
  mock, requested = _mock({"train": _labelled("image_left", "segmentation_label", label_ids),
                           "validation": _labelled("image_left", "segmentation_label",
                                                   label_ids, n=2)})
  cfg = segvit.get_config("variant=Mu/16,dataset=cityscapes,res=16")
  cfg.batch_size = 2
  with mock:
    val = get_source(cfg.data, "val", cfg.num_classes, cfg.ignore_index)
    assert len(val) == 2 and requested == [("cityscapes", "validation")]
    np.testing.assert_array_equal(val[0]["label"][0, :8], [0, 13, 18, 255, 255, 11, 2, 255])
    batch = next(pipeline.make_train_iter(cfg))
  assert batch["image"].shape == (2, 16, 16, 3) and batch["label"].dtype == np.int32
  assert set(np.unique(batch["label"])) <= {0, 2, 11, 13, 18, 255}


@pytest.mark.parametrize("name,num_classes,split,tfds_split,raw,mapped", [
    ("ade20k", 150, "val", "validation", [0, 1, 150], [255, 0, 149]),
    ("coco_stuff10k", 171, "val", "test", [0, 1, 92, 12], [255, 0, 80, 255]),
    ("ade20k", 150, "train", "train", [5], [4]),
])
def test_our_tfds_builders_are_read_through_get_source(name, num_classes, split, tfds_split,
                                                       raw, mapped):
  mock, requested = _mock({tfds_split: _labelled("image", "annotation", np.array(raw))})
  cfg = segvit.get_config(f"variant=Mu/16,dataset={name},res=16")
  with mock:
    src = get_source(cfg.data, split, num_classes, 255)
  assert requested == [(name, tfds_split)]
  np.testing.assert_array_equal(src[0]["label"][0, :len(raw)], mapped)


def test_random_mock_examples_with_mismatched_shapes_fail_clearly():
  # tfds' own random mocks draw image and annotation shapes independently.
  cfg = segvit.get_config("variant=Mu/16,dataset=ade20k,res=16")
  with tfds.testing.mock_data(num_examples=3):
    src = get_source(cfg.data, "train", 150, 255)
    for i in range(3):
      try:
        ex = src[i]
      except ValueError as e:
        assert "do not match" in str(e)
      else:
        assert ex["image"].shape[:2] == ex["label"].shape


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  cfg = segvit.get_config("variant=Mu/16,dataset=ade20k,res=16")
  cfg.data.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="step_jax.data.prepare") as e:
    get_source(cfg.data, "train", 150, 255)
  assert str(tmp_path) in str(e.value) and "config.data.data_dir" in str(e.value)


def test_prepare_without_tensorflow_points_to_requirements_tf():
  try:
    import tensorflow  # noqa: F401  pylint: disable=unused-import
    pytest.skip("TensorFlow is installed")
  except ImportError:
    pass
  from step_jax.data import prepare
  with pytest.raises(ImportError, match="requirements-tf.txt"):
    prepare.prepare("ade20k")
