"""Evaluation and bulk inference with host-chosen buckets (config.eval.dispatch 'host',
'host_split'; evaluation/evaluator.py): the same confusion matrix and label maps as the
one-program model, bad settings refused, and two processes agreeing on every capacity."""
import functools
import io
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from numerics import assert_close  # tests/numerics.py

from configs import step as step_configs
from step_jax import inference
from step_jax.analysis import benchmark
from step_jax.data.synthetic import SyntheticScenes
from step_jax.evaluation import dispatch
from step_jax.evaluation import evaluator
from step_jax.interop import export
from step_jax.models import segmenter
from step_jax.models import variables as variables_lib
from step_jax.runtime import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def _prepared(thresholds=None):
  """(config, variables, images [5, 128, 128, 3], labels) of a tiny STEP model (dCTS + one
  exit), once per module, at 128² (an 8x8 grid: token counts that span several capacities,
  multiples of 16); one bucket, so the one program compiles one encoder (the buckets change
  no value: test_supertokens, test_dispatch). thresholds: the dCTS ones when known."""
  cfg = step_configs.get_config("method=step,variant=Mu/16,dataset=synthetic,smoke,exits=2")
  cfg.data.image_size = (128, 128)
  # keep_top_k=1: a token per class stays active, so no image halts entirely (its last head
  # would then attend to no token, whose output depends on the slots of the bucket).
  cfg.model.update(posemb_grid=(8, 8), buckets=(1.0,), exit_buckets=(1.0,), keep_top_k=1)
  cfg.eval.update(batch_size=4, group_batches=2, stride=(32, 32))
  scenes = SyntheticScenes(5, (128, 128))
  images = np.stack([scenes[i]["image"] for i in range(5)])
  labels = np.stack([scenes[i]["label"] for i in range(5)])
  _, model, variables, _ = benchmark.prepare(cfg, images=images)
  # Random policy scores sit within 1e-3 of .5: thresholds at their quantiles merge about half
  # of the 2x2 windows and some 4x4 ones, so images differ in token count.
  if thresholds is None:
    scores = jax.jit(functools.partial(model.apply, method=segmenter.Segmenter.merge_scores))(
        variables, images.astype(np.float32))
    thresholds = (float(np.median(scores[2])), float(np.quantile(scores[4], 0.75)), 0.9, 0.9)
  cfg.model.thresholds = thresholds
  cfg.model.exit_threshold = 0.1   # random exit heads: a low threshold lets tokens halt
  return cfg, variables, images, labels


def _model(method, mode="whole", thresholds=None):
  """(config, model, variables, images, labels): STEP, or dCTS (the same without its exit,
  whose head is SegViT's own), whole images or 64² windows over 96x128 images."""
  cfg, variables, images, labels = _prepared(thresholds)
  cfg = cfg.copy_and_resolve_references()
  if method == "dcts":
    cfg.model.exit_layers = ()
  if mode == "slide":   # 2 x 3 windows per image, stride 32
    cfg.data.image_size = (64, 64)
    images, labels = images[:, :96], labels[:, :96]
  cfg.eval.mode = mode
  return cfg, variables_lib.create_model(cfg), variables, images, labels


def _evaluate(cfg, model, variables, source, **eval_settings):
  """(metrics, Evaluator) with the config's evaluation settings updated."""
  cfg = cfg.copy_and_resolve_references()
  cfg.eval.update(eval_settings)
  mesh = sharding.make_mesh(cfg)
  ev = evaluator.Evaluator(cfg, model, mesh, source=source)
  return ev(jax.device_put(variables, sharding.replicated(mesh))), ev


@pytest.mark.parametrize("method,mode,host", [
    ("step", "whole", "host_split"),   # the exit: each image alone after it
    ("dcts", "slide", "host"),         # window k of every image as one batch
    pytest.param("dcts", "whole", "host", marks=pytest.mark.slow),
    pytest.param("step", "slide", "host_split", marks=pytest.mark.slow),
])
def test_host_dispatch_evaluates_like_the_one_program(method, mode, host):
  cfg, model, variables, images, labels = _model(method, mode)
  source = [dict(image=im, label=lab) for im, lab in zip(images, labels)]
  want, ref = _evaluate(cfg, model, variables, source, dispatch="device")
  got, ev = _evaluate(cfg, model, variables, source, dispatch=host, bucket_ratio=1.05)
  np.testing.assert_array_equal(ev.confusion, ref.confusion)
  assert_close(got["miou"], want["miou"], 1e-9)
  assert got["dispatch"] == host and want["dispatch"] == "device"
  assert got["model_programs"] == len(ev.host.compile_s) == len(ev.host.calls)
  merges = sum(n for k, n in ev.host.calls.items() if k[0] == "merge")
  if mode == "whole":   # only the capacities of the fine ladder that batches needed compiled
    used = {k[1] for k in ev.host.calls if k[0] in ("model", "segment 1")}
    assert 1 <= len(used) < len(ev.model.capacities(model.grid(images)))
    # 5 images in one pool: merged once, in the 2 batches that sort them; the 2 batches
    # that run them reuse those level maps (a wrong image's map would change the confusion).
    assert merges == 2
  else:   # the same per window: 2 x 3 windows
    assert merges == 2 * 6


def test_segment_with_host_dispatch_writes_the_one_programs_labels(tmp_path):
  """The label maps of step-segment on the host dispatch, evaluated as ground truth by the
  one-program evaluator (the test above's, compiled already), are all right."""
  cfg, model, variables, images, labels = _model("step")
  folder = str(tmp_path / "export")   # parameters and config: the Flax model is rebuilt
  export.export_model(cfg, variables, folder, formats=("msgpack",))
  inputs, out = tmp_path / "images", tmp_path / "out"
  inputs.mkdir()
  for i, im in enumerate(images):
    Image.fromarray(im).save(inputs / f"{i}.png")
  summary = inference.segment_files(folder, str(inputs), str(out), save=("labels",),
                                    batch_size=4, dispatch="host", bucket_ratio=1.05,
                                    stream=io.StringIO())
  assert summary["dispatch"] == "host" and summary["bucket_ratio"] == 1.05
  assert summary["images"] == 5 and summary["compiled_shapes"] == 1
  assert summary["gflops_executed"] >= summary["gflops_useful"] > 0
  assert summary["mean_tokens_kept"] > summary["mean_tokens_halted"] > 0
  # Sorted by token count in their pool, yet each image's labels are its own.
  predicted = [dict(image=im, label=np.asarray(Image.open(out / "labels" / f"{i}.png")))
               for i, im in enumerate(images)]
  metrics, _ = _evaluate(cfg, model, variables, predicted)
  assert metrics["pixel_acc"] == 1.0


def test_bad_dispatch_settings_are_refused(tmp_path):
  cfg = step_configs.get_config("method=dcts,variant=Mu/16,dataset=synthetic,smoke")
  for key, value, message in (
      ("dispatch", "gpu", "config.eval.dispatch='gpu': use one of auto, device, host, "
                   "host_split"),
      ("bucket_ratio", 0.9, "config.eval.bucket_ratio=0.9: use 0"),
      ("group_batches", -1, "config.eval.group_batches=-1: use 0")):
    bad = cfg.copy_and_resolve_references()
    bad.eval[key] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
      evaluator.settings(bad)
  with pytest.raises(ValueError, match="dispatch='gpu': use one of auto, device"):
    inference.segment_files(str(tmp_path), str(tmp_path), str(tmp_path / "out"),
                            dispatch="gpu")
  with pytest.raises(ValueError, match="bucket_ratio=1.0: use 0"):
    inference.segment_files(str(tmp_path), str(tmp_path), str(tmp_path / "out"),
                            bucket_ratio=1.0)
  model = step_configs.get_config("method=algm,variant=Mu/16,dataset=synthetic,smoke")
  with pytest.raises(ValueError, match="inside the encoder"):
    dispatch.with_ladder(variables_lib.create_model(model), 1.05)
  oracle = step_configs.get_config("method=oracle,variant=Mu/16,dataset=synthetic,smoke")
  oracle.eval.dispatch = "host"
  with pytest.raises(ValueError, match="oracle merge .*dispatch='device'"):
    evaluator.Evaluator(oracle, variables_lib.create_model(oracle),
                        sharding.make_mesh(oracle), source=[])



@pytest.mark.parametrize("method, want", [
    ("segvit", ("device", 0.0)), ("algm", ("device", 0.0)), ("oracle", ("device", 0.0)),
    ("dcts", ("host", dispatch.AUTO_RATIO)), ("dtop", ("host_split", dispatch.AUTO_RATIO)),
    ("step", ("host_split", dispatch.AUTO_RATIO))])
def test_auto_dispatch_per_model(method, want):
  """'auto' (the default) runs on the host whatever has token counts to choose buckets for,
  with exits split per image; an explicit choice stays, and 'device' never takes a ladder."""
  cfg = step_configs.get_config(f"method={method},variant=Mu/16,dataset=synthetic,smoke")
  assert evaluator.settings(cfg)["dispatch"] == "auto"
  model = variables_lib.create_model(cfg)
  assert dispatch.resolve(model, "auto", 0.0) == want
  assert dispatch.resolve(model, "device", 1.05) == ("device", 0.0)
  assert dispatch.resolve(model, "host", 0.0) == ("host", 0.0)
  if want[0] != "device":
    assert dispatch.resolve(model, "auto", 1.2) == (want[0], 1.2)
  with pytest.raises(ValueError, match="'gpu': use one of auto, device"):
    dispatch.resolve(model, "gpu", 0.0)


_PROCESS = """
import json, sys
pid, port, thresholds = int(sys.argv[1]), sys.argv[2], tuple(json.loads(sys.argv[3]))
import jax
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
sys.path.insert(0, "tests")
from test_eval_dispatch import _model, _evaluate
cfg, model, variables, images, labels = _model("dcts", thresholds=thresholds)
source = [dict(image=im, label=lab) for im, lab in zip(images, labels)]
got, ev = _evaluate(cfg, model, variables, source, dispatch="host", bucket_ratio=1.05)
print("RESULT", json.dumps(dict(
    confusion=ev.confusion.tolist(), miou=got["miou"], processes=jax.process_count(),
    capacities=sorted({dict(k[1])["capacity"] for k in ev.host.calls if k[0] == "model"}),
    ladder=list(ev.model.capacities((8, 8))))), flush=True)
"""


def test_two_processes_agree_on_each_batchs_capacity():
  """2 processes x 2 CPU devices, each holding half the rows of every batch: the capacity
  follows the largest count of the whole batch (gathered from both), so both run the same
  programs, and the confusion matrix is the one program's in one process."""
  cfg, model, variables, images, labels = _model("dcts")
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "")
  procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, str(i), str(port),
                             json.dumps(list(cfg.model.thresholds))], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
           for i in range(2)]
  # Meanwhile, here: the one program in one process, and the merge's token counts.
  source = [dict(image=im, label=lab) for im, lab in zip(images, labels)]
  want, ref = _evaluate(cfg, model, variables, source, dispatch="device")
  counts = np.sort(dispatch.HostBuckets(model).token_counts(variables, images))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  results = [json.loads(o.split("RESULT ", 1)[1].splitlines()[0]) for o in outs]
  assert results[0] == results[1]   # the same programs, the same metrics
  r = results[0]
  assert r["processes"] == 2
  np.testing.assert_array_equal(r["confusion"], ref.confusion)
  assert_close(r["miou"], want["miou"], 1e-9)
  # 5 images in one pool sorted by count: batches [4 lowest] and [highest + 3 repeats]; rows
  # 0-1 of a batch are process 0's, 2-3 process 1's. Each batch runs in the capacity of its
  # largest count, which process 0 alone would not see in the first batch.
  pick = lambda n: dispatch.pick_capacity(n, r["ladder"])
  assert r["capacities"] == sorted({pick(counts[3]), pick(counts[4])})
  assert pick(counts[1]) < pick(counts[3]), counts


def test_measure_evaluation_rows():
  """experiments/eval_dispatch.py's rows: every dispatch evaluates the same weights to the
  same mIoU; the executed GFLOPs are those of the capacities each dispatch runs (the fine
  ladder on the host wastes less than the one program's single bucket), never below the
  useful ones, which do not depend on the dispatch."""
  cfg, _, variables, _, _ = _model("dcts")
  rows = benchmark.measure_evaluation(cfg, variables, dispatches=("device", "host"), batch=4,
                                      num_images=5, square=True)
  device, host = rows
  assert [r["dispatch"] for r in rows] == ["device", "host"]
  assert device["miou_delta"] == host["miou_delta"] == 0.0 and 0 < device["miou"] <= 1
  assert device["images"] == host["images"] == 5 and device["batch"] == host["batch"] == 4
  assert host["model_programs"] >= 2 and device["model_programs"] is None   # merge + model
  assert_close(host["gflops_useful"], device["gflops_useful"], 1e-6)
  assert device["gflops_executed"] > host["gflops_executed"] >= host["gflops_useful"] > 0
  assert device["executed_over_useful"] > host["executed_over_useful"] >= 1.0
  assert all(r["compile_s"] >= 0 and r["s_per_image"] > 0 for r in rows)
