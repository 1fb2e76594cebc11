"""Bulk inference (step_jax.inference, `python -m step_jax.cli.segment`): label maps at each
image's own size with the dataset's palette, bad files reported (or fatal), a rerun after a
kill writing only what is missing, videos, exported models and the command line."""
import io
import json
import os
import struct
import zlib

import av
import jax
import numpy as np
import pytest
from PIL import Image

from numerics import assert_close  # tests/numerics.py

from configs import step as step_cfg
from step_jax import api
from step_jax import inference
from step_jax.inference import files
from step_jax.inference import progress
from step_jax.data import datasets
from step_jax.data import decode
from step_jax.evaluation import evaluator
from step_jax.interop import export
from test_cli_errors import _drive, _error_line  # pylint: disable=g-bad-import-order
from test_export import _tiny_segvit, make_workdir  # pylint: disable=g-bad-import-order

SIZES = {"a": (40, 50), "sub/b": (20, 30), "c": (32, 32), "d": (41, 49)}   # name → (H, W)
BAD = ("bad.jpg", "deep.png", "empty.png", "rgb48.png")


def _png_rgb48(path, h=4, w=5):
  """A 16-bit-per-channel RGB PNG (PIL cannot write one; it reads it as 8-bit RGB)."""
  rows = (np.arange(h * w * 3).reshape(h, w, 3) * 3000).astype(">u2")
  raw = b"".join(b"\x00" + row.tobytes() for row in rows)
  chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data +
                              struct.pack(">I", zlib.crc32(kind + data)))
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _write_images(folder, sizes=SIZES, seed=0):
  rng = np.random.default_rng(seed)
  for name, hw in sizes.items():
    path = os.path.join(folder, name + ".png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, hw + (3,), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(workdir of a tiny SegViT, folder of mixed-size images and three bad files)."""
  root = tmp_path_factory.mktemp("segment")
  workdir, images = root / "run", root / "images"
  make_workdir(workdir, _tiny_segvit())
  _write_images(str(images))
  (images / "bad.jpg").write_bytes(b"not a jpeg at all")                       # corrupt
  Image.fromarray(np.full((8, 8), 4000, np.uint16)).save(images / "deep.png")  # 16-bit
  (images / "empty.png").write_bytes(b"")                                      # empty
  _png_rgb48(images / "rgb48.png")                                             # 48-bit
  return str(workdir), str(images)


@pytest.fixture(scope="module")
def first_run(setup, tmp_path_factory):
  workdir, images = setup
  out = str(tmp_path_factory.mktemp("out"))
  log = io.StringIO()
  summary = inference.segment_files(workdir, images, out, save=("labels", "overlay"),
                                    batch_size=2, stream=log)
  return out, summary, log.getvalue()


def _files(folder):
  """{relative path: mtime_ns} of every file under `folder`."""
  return {os.path.relpath(os.path.join(d, f), folder): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, names in os.walk(folder) for f in names}


def test_mixed_sizes_give_label_maps_of_each_images_own_size(setup, first_run):
  workdir, images = setup
  out, _, _ = first_run
  model, variables = api.load(workdir)
  colours = datasets.palette("synthetic", 6)
  for name, (h, w) in SIZES.items():
    label = Image.open(os.path.join(out, "labels", name + ".png"))
    assert label.mode == "P" and label.size == (w, h), name
    np.testing.assert_array_equal(np.asarray(label.getpalette(), np.uint8).reshape(-1, 3)[:6],
                                  colours)
    # The evaluation protocol's whole mode is what step_jax.segment does image by image.
    image = np.asarray(Image.open(os.path.join(images, name + ".png")))
    pred, _ = api.segment(model, variables, image)
    np.testing.assert_array_equal(np.asarray(label), pred)
    overlay = Image.open(os.path.join(out, "overlay", name + ".png"))
    assert overlay.mode == "RGB" and overlay.size == (w, h)
  assert not [f for f in _files(out) if f.endswith(".tmp")]


def test_bad_files_are_reported_by_name_and_summary(setup, first_run):
  _, images = setup
  out, summary, log = first_run
  with open(os.path.join(out, "summary.json")) as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  failed = {os.path.basename(f["file"]): f["error"] for f in summary["failed"]}
  assert sorted(failed) == sorted(BAD) and summary["failed_count"] == len(BAD)
  assert "cannot decode" in failed["bad.jpg"] and "16-bit" in failed["deep.png"]
  assert "empty" in failed["empty.png"] and "16-bit channels" in failed["rgb48.png"]
  for name in BAD:   # and in the log, by name
    assert f"skipped {os.path.join(images, name)}" in log
  assert "images/s" in log and "ETA" in log
  assert summary["images"] == 4 and summary["already_done"] == 0
  assert summary["mode"] == "whole" and summary["dataset"] == "synthetic"
  # Tiny SegViT keeps every token: kept = the padded grid's cells, nothing halts.
  grid = [(-(-h // 16)) * (-(-w // 16)) for h, w in SIZES.values()]
  assert_close(summary["mean_tokens_full"], float(np.mean(grid)), 1e-6)
  assert summary["mean_tokens_kept"] == summary["mean_tokens_full"]
  assert summary["mean_tokens_halted"] == 0
  assert summary["gflops_useful"] > 0
  assert_close(summary["gflops_executed"], summary["gflops_useful"], 1e-6)
  assert summary["compiled_shapes"] == 2 and summary["compile_s"] > 0   # 48x64 and 32x32
  assert summary["images_per_s"] > 0 and summary["batch_size"] % jax.local_device_count() == 0
  assert summary["devices"] == jax.local_device_count() and summary["processes"] == 1


def test_requests_that_cannot_work_are_refused_before_any_image(setup, tmp_path):
  workdir, images = setup
  with pytest.raises(ValueError, match="keeps every token"):
    inference.segment_files(workdir, images, str(tmp_path), save=("labels", "tokens"))
  with pytest.raises(ValueError, match="choose one or more of labels,overlay,tokens"):
    inference.segment_files(workdir, images, str(tmp_path), save=("label",))
  with pytest.raises(ValueError, match="'skip' or 'fatal'"):
    inference.segment_files(workdir, images, str(tmp_path), on_error="ignore")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    inference.segment_files(workdir, str(tmp_path / "missing"), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no image files"):
    inference.segment_files(workdir, str(tmp_path), str(tmp_path / "out"))
  assert not os.listdir(tmp_path)


def test_on_error_fatal_stops_at_the_bad_file(setup, tmp_path):
  workdir, images = setup
  with pytest.raises(decode.BadRecordError, match="bad.jpg"):
    inference.segment_files(workdir, os.path.join(images, "bad.jpg"), str(tmp_path),
                            on_error="fatal", stream=io.StringIO())
  # A glob takes every file it matches: a non-image is reported, not passed over.
  (tmp_path / "notes.txt").write_text("hello")
  summary = inference.segment_files(workdir, str(tmp_path / "*.txt"), str(tmp_path / "o"),
                                    stream=io.StringIO())
  assert summary["images"] == 0 and summary["failed"][0]["file"].endswith("notes.txt")


def test_rerun_after_a_kill_mid_write_writes_only_what_is_missing(setup, first_run, tmp_path,
                                                                 monkeypatch):
  workdir, images = setup
  reference, _, _ = first_run
  out = str(tmp_path / "out")
  real_save, calls = Image.Image.save, []

  def killed_on_the_fourth_write(self, fp, *args, **kwargs):
    calls.append(fp)
    if len(calls) < 4:
      return real_save(self, fp, *args, **kwargs)
    buf = io.BytesIO()
    real_save(self, buf, *args, **kwargs)
    with open(fp, "wb") as f:   # half a PNG, then the process dies
      f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
    raise KeyboardInterrupt
  monkeypatch.setattr(Image.Image, "save", killed_on_the_fourth_write)
  with pytest.raises(KeyboardInterrupt):
    inference.segment_files(workdir, images, out, save=("labels", "overlay"), batch_size=2,
                            stream=io.StringIO())
  monkeypatch.setattr(Image.Image, "save", real_save)
  before = _files(out)
  stale = [f for f in before if f.endswith(".tmp")]
  assert len(stale) == 1 and not os.path.exists(os.path.join(out, stale[0][:-4]))
  kept = {f: t for f, t in before.items() if not f.endswith(".tmp")}
  complete = {n for n in SIZES if files.finished(out, n, ("labels", "overlay"))}
  partial = {f.split(os.sep, 1)[1][:-4] for f in kept} - complete
  assert len(complete) == 1 and len(partial) == 1   # one image done, one half done

  summary = inference.segment_files(workdir, images, out, save=("labels", "overlay"),
                                    batch_size=2, stream=io.StringIO())
  after = _files(out)
  assert summary["images"] == 3 and summary["already_done"] == 1
  assert not [f for f in after if f.endswith(".tmp")]          # the stale temporary replaced
  for f, mtime in kept.items():                                # finished files untouched
    assert after[f] == mtime, f
  want = {os.path.join(k, n + ".png") for k in ("labels", "overlay") for n in SIZES}
  assert set(after) - {"summary.json"} == want
  for f in want:   # and the result is that of an uninterrupted run
    np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(out, f))),
                                  np.asarray(Image.open(os.path.join(reference, f))))
  again = inference.segment_files(workdir, images, out, save=("labels",), stream=io.StringIO())
  assert again["images"] == 0 and again["already_done"] == 4 and again["compiled_shapes"] == 0


@pytest.mark.parametrize("name", ["camvid", "cityscapes", "ade20k", "coco_stuff10k"])
def test_palette_png_round_trip(name, tmp_path):
  n = datasets.DATASETS[name].num_classes
  colours = datasets.palette(name, n)
  assert colours.shape == (n, 3) and colours.dtype == np.uint8
  first = dict(camvid=(128, 128, 128), cityscapes=(128, 64, 128), ade20k=(120, 120, 120),
               coco_stuff10k=(128, 0, 0))[name]   # sky, road, wall; VOC's colour 1
  assert tuple(colours[0]) == first
  assert len({tuple(c) for c in colours}) >= n - 1   # ADE20K's table repeats one grey
  pred = np.random.default_rng(0).integers(0, n, (37, 53)).astype(np.uint8)
  path = str(tmp_path / "label.png")
  files.write_png(files.label_image(pred, colours), path)
  back = Image.open(path)
  assert back.mode == "P" and back.size == (53, 37)
  np.testing.assert_array_equal(np.asarray(back), pred)
  np.testing.assert_array_equal(np.asarray(back.getpalette(), np.uint8).reshape(-1, 3)[:n],
                                colours)


def test_generated_palette_is_fixed_and_distinct():
  colours = datasets.generated_colours(255)
  assert colours == datasets.generated_colours(255) and len(set(colours)) == 255
  assert (0, 0, 0) not in colours   # black stays for void
  np.testing.assert_array_equal(datasets.palette("camvid", 12), datasets.palette("nope", 12))


def _video(path, frames):
  with av.open(path, "w") as container:
    stream = container.add_stream("mpeg4", rate=5)
    stream.height, stream.width = frames[0].shape[:2]
    stream.pix_fmt = "yuv420p"
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())


def test_video_frame_by_frame_and_each_process_its_share(setup, tmp_path, monkeypatch):
  workdir, _ = setup
  rng = np.random.default_rng(1)
  clip = str(tmp_path / "clip.mp4")
  _video(clip, [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)])
  decoded = [im for _, im in files.video_frames(clip, lambda i: True)]
  assert len(decoded) == 3 and decoded[0].shape == (40, 48, 3)
  out = str(tmp_path / "out")
  # Process 1 of 2 segments frames 1, 3, ...; the summary merge is left out here.
  monkeypatch.setattr(files, "process_share", lambda: (1, 2))
  monkeypatch.setattr(progress, "write_summary", lambda summary, output: summary)
  part = inference.segment_files(workdir, clip, out, batch_size=1, stream=io.StringIO())
  assert part["images"] == 1 and sorted(os.listdir(os.path.join(out, "labels", "clip"))) == [
      "000001.png"]
  monkeypatch.undo()
  summary = inference.segment_files(workdir, clip, out, batch_size=1, stream=io.StringIO())
  assert summary["images"] == 2 and summary["already_done"] == 1
  model, variables = api.load(workdir)
  for i, frame in enumerate(decoded):
    label = Image.open(os.path.join(out, "labels", "clip", f"{i:06d}.png"))
    assert label.size == (48, 40)
    np.testing.assert_array_equal(np.asarray(label), api.segment(model, variables, frame)[0])
  (tmp_path / "broken.mp4").write_bytes(b"\x00" * 500)
  summary = inference.segment_files(workdir, str(tmp_path / "broken.mp4"), out,
                                    stream=io.StringIO())
  assert summary["failed"][0]["file"].endswith("broken.mp4")
  assert "cannot be opened" in summary["failed"][0]["error"]


def test_merge_summaries_of_processes():
  part = lambda n, toks, fails: dict(
      images=n, already_done=1, failed=[dict(file=f, error="x") for f in fails],
      failed_count=len(fails), seconds=float(n), compile_s=1.0, images_per_s=2.0,
      compiled_shapes=2, mean_tokens_full=10.0, mean_tokens_kept=toks, mean_tokens_merged=0.0,
      mean_tokens_halted=0.0,
      gflops_useful=toks, gflops_executed=toks)
  merged = progress.merge_summaries([part(1, 4.0, ["a"]), part(3, 8.0, []), part(0, None, [])])
  assert merged["images"] == 4 and merged["already_done"] == 3 and merged["failed_count"] == 1
  assert_close(merged["mean_tokens_kept"], 7.0, 1e-9)   # weighted by images
  assert merged["images_per_s"] == 6.0 and merged["seconds"] == 3.0


class _Labelled:
  """A source of the images and the labels step-segment wrote for them."""

  def __init__(self, images, labels, names):
    self.images, self.labels, self.names = images, labels, names

  def __len__(self):
    return len(self.names)

  def __getitem__(self, i):
    read = lambda folder: np.asarray(Image.open(os.path.join(folder, self.names[i] + ".png")))
    return dict(image=read(self.images), label=read(self.labels))


def test_sliding_windows_and_resize_follow_the_evaluation_protocol(setup, tmp_path):
  """With the config's slide mode and test-time resize, the label maps are exactly what
  evaluation predicts: evaluating them as ground truth gives pixel accuracy 1."""
  _, images = setup
  cfg = _tiny_segvit()
  # 40x50 stays, 32x32 → 40x40: both slide 2x2 windows of 32 over 53x53, and 32x32's scores
  # are resized back.
  cfg.eval.update(mode="slide", resize_short=40)
  workdir = str(tmp_path / "run")
  make_workdir(workdir, cfg)
  out = str(tmp_path / "out")
  summary = inference.segment_files(workdir, os.path.join(images, "[ac].png"), out,
                                    stream=io.StringIO())
  assert summary["images"] == 2 and summary["compiled_shapes"] == 1
  assert summary["mode"] == "slide" and summary["mean_tokens_kept"] is None
  names = ["a", "c"]
  for name in names:
    h, w = SIZES[name]
    assert Image.open(os.path.join(out, "labels", name + ".png")).size == (w, h)
  model, variables = api.load(workdir)
  source = _Labelled(images, os.path.join(out, "labels"), names)
  metrics = evaluator.evaluate(cfg, variables, model=model, source=source)
  assert metrics["pixel_acc"] == 1.0 and metrics["mode"] == "slide"


def test_exported_model_refuses_images_larger_than_its_input(setup, tmp_path):
  workdir, images = setup
  model, variables = api.load(workdir)
  folder = str(tmp_path / "export")
  export.export_model(_tiny_segvit(), variables, folder, formats=("jax", "msgpack"),
                      platforms=("cpu",), image_size=(48, 48))
  summary = inference.segment_files(folder, images, str(tmp_path / "out"),
                                    stream=io.StringIO())
  failed = {os.path.basename(f["file"]): f["error"] for f in summary["failed"]}
  assert sorted(failed) == sorted(BAD + ("a.png", "d.png"))   # 40x50, 41x49 > 48x48
  assert "larger than the exported model's input 48x48" in failed["a.png"]
  assert summary["images"] == 2 and summary["compiled_shapes"] == 1
  for name in ("c", "sub/b"):
    image = np.asarray(Image.open(os.path.join(images, name + ".png")))
    label = np.asarray(Image.open(os.path.join(tmp_path, "out", "labels", name + ".png")))
    assert (label == api.segment(model, variables, image)[0]).mean() > 0.999


def test_token_maps_of_a_step_model(tmp_path):
  """A tiny STEP model (supertokens + one exit) from an export folder of parameters only."""
  cfg = step_cfg.get_config("method=step,variant=Mu/16,dataset=synthetic,smoke")
  # Random exit heads: a low threshold lets tokens halt. One bucket each: a short compile.
  cfg.model.update(exit_threshold=0.1, buckets=(1.0,), exit_buckets=(1.0,))
  model, variables = api.build(cfg)
  folder = str(tmp_path / "export")
  export.export_model(cfg, variables, folder, formats=("msgpack",))
  images = str(tmp_path / "images")
  _write_images(images, {"x": (64, 64), "y": (60, 64)})
  summary = inference.segment_files(folder, images, str(tmp_path / "out"),
                                    save=("labels", "tokens"), stream=io.StringIO())
  assert summary["images"] == 2 and summary["compiled_shapes"] == 1
  for name in ("x", "y"):
    tokens = Image.open(os.path.join(tmp_path, "out", "tokens", name + ".png"))
    assert tokens.mode == "RGB" and tokens.size[0] > 2 * 64   # superpatches | halted
  assert summary["mean_tokens_full"] == 16
  assert 0 < summary["mean_tokens_kept"] <= 16
  assert 0 < summary["mean_tokens_halted"] <= summary["mean_tokens_kept"]
  assert summary["gflops_executed"] >= summary["gflops_useful"] > 0


def test_token_maps_of_an_algm_model(tmp_path):
  """ALGM's merged tokens drawn per image (its local and global merges), token counts in the
  summary: flat images merge."""
  cfg = step_cfg.get_config("method=algm,variant=Mu/16,dataset=synthetic,smoke")
  cfg.model.update(buckets=(1.0,))
  model, variables = api.build(cfg)
  folder = str(tmp_path / "export")
  export.export_model(cfg, variables, folder, formats=("msgpack",))
  images = tmp_path / "images"
  images.mkdir()
  Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(images / "flat.png")
  summary = inference.segment_files(folder, str(images), str(tmp_path / "out"),
                                    save=("tokens",), stream=io.StringIO())
  tokens = np.asarray(Image.open(os.path.join(tmp_path, "out", "tokens", "flat.png")))
  assert tokens.shape[1] > 2 * 64    # local merge | merged
  assert summary["mean_tokens_full"] == 16 and summary["mean_tokens_kept"] == 16
  assert summary["mean_tokens_merged"] > 0 and summary["mean_tokens_halted"] == 0
  assert summary["gflops_executed"] >= summary["gflops_useful"] > 0


def test_command_line(setup, tmp_path):
  workdir, images = setup
  out = str(tmp_path / "out")
  cases = [("segment", [f"--workdir={workdir}", f"--input={tmp_path}/missing",
                        f"--output={out}"]),
           ("segment", [f"--workdir={workdir}", f"--input={images}", f"--output={out}",
                        "--save=labels,bogus"]),
           ("segment", [f"--workdir={workdir}", f"--input={images}", f"--output={out}",
                        "--on_error=fatal"]),
           ("segment", [f"--workdir={workdir}", f"--input={images}/c.png", f"--output={out}",
                        "--save=labels,overlay"])]
  missing, bogus, fatal, good = _drive(cases)
  for r, want in ((missing, f"input {tmp_path}/missing does not exist"),
                  (bogus, "save=labels,bogus: choose one or more of labels,overlay,tokens"),
                  (fatal, "bad.jpg")):
    assert r["code"] == 2 and "Traceback" not in r["stderr"], r["stderr"][-2000:]
    lines = [l for l in r["stderr"].splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and want in _error_line(r["stderr"]), r["stderr"][-2000:]
  assert good["code"] == 0, good["stderr"][-2000:]
  assert "images/s" in good["stderr"]
  with open(os.path.join(out, "summary.json")) as f:
    assert json.load(f)["images"] == 1
  assert Image.open(os.path.join(out, "labels", "c.png")).size == (32, 32)
