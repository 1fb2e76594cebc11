"""Export round trips: the jax.export artifact (symbolic batch, CPU+CUDA lowering), the
parameter files, the TF SavedModel, and the export CLI on a training workdir."""
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from numerics import assert_close  # tests/numerics.py

from configs import segvit
from configs import step as step_cfg
from step_jax import api
from step_jax.runtime import checkpoint as ckpt_lib
from step_jax.interop import export
from step_jax.data import synthetic
from step_jax.models import attention
from step_jax.models import variables as variables_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n, hw=(128, 128), seed=1):
  src = synthetic.SyntheticScenes(n, hw, seed=seed)
  return np.stack([src[i]["image"] for i in range(n)]).astype(np.float32)


@pytest.fixture(scope="module")
def step_model():
  """A tiny STEP model (dCTS + one exit) whose merges and halting vary across images.

  Random weights merge and halt nothing useful, so the dCTS thresholds are set to the median
  window score of the test images and the exit threshold low (fixed, not calibrated: one
  compilation less; the first test checks that tokens do halt). Two buckets each (instead
  of seven) keep the compile short; the lax.switch is still there.
  """
  cfg = step_cfg.get_config("method=step,variant=Mu/16,dataset=synthetic,smoke")
  cfg.model.update(buckets=(0.5, 1.0), exit_buckets=(0.5, 1.0))
  model, variables = api.build(cfg)
  images = _images(3)
  logits = jax.jit(lambda v, x: model.apply(v, x, method=lambda m, x: m.policy(x)))(
      variables, images)
  taus = tuple(float(np.median(jax.nn.sigmoid(logits[k]))) if logits[k].size else 1.0
               for k in (2, 4, 8, 16))
  model = model.clone(thresholds=taus, exit_threshold=0.1)
  live = jax.jit(api.inference_fn(model))(variables, images)
  return cfg, model, variables, images, jax.device_get(live)


def test_live_model_merges_and_halts_variably(step_model):
  *_, live = step_model
  # Otherwise the round trips below would not exercise the merge and the switch branches.
  assert len(np.unique(live["level"])) > 1 and (live["halt_stage"] == 0).any()
  assert (live["halt_stage"] == 1).any()
  assert int(live["capacity"]) < 64 and int(live["stage_capacity"][1]) < int(live["capacity"]), (
      live["num_tokens"], live["active_tokens"])


def test_jax_artifact_round_trip(step_model, tmp_path):
  cfg, model, variables, images, live = step_model
  meta = export.export_model(cfg, variables, str(tmp_path), model=model,
                             formats=("jax", "msgpack", "safetensors"))
  assert meta["platforms"] == ["cpu", "cuda"] and meta["batch"] == "symbolic"
  assert meta["outputs"]["pred"] == "int32[b,128,128]"
  assert set(meta["outputs"]) >= {"scores", "pred", "level", "num_tokens", "halt_stage",
                                  "active_tokens"}
  # Run it as a user without step_jax would: jax.export + flax.serialization only.
  from flax import serialization  # pylint: disable=g-import-not-at-top
  with open(tmp_path / "model.jaxexport", "rb") as f:
    exp = jax.export.deserialize(bytearray(f.read()))
  with open(tmp_path / "params.msgpack", "rb") as f:
    restored = serialization.msgpack_restore(f.read())
  assert str(exp.in_avals[-1].shape[0]) == "b"   # symbolic batch (images are the last input)
  # Two images where the live model ran three: another batch size (and possibly another
  # bucket) through the same artifact gives the same per-image results.
  got = jax.device_get(exp.call(restored, images[1:]))
  assert set(got) == set(live)
  assert_close(got["scores"], live["scores"][1:], 1e-5)
  for k in ("level", "halt_stage", "num_tokens", "active_tokens"):
    np.testing.assert_array_equal(got[k], live[k][1:], err_msg=k)
  assert (got["pred"] == live["pred"][1:]).mean() > 0.999
  assert jax.eval_shape(exp.call, restored, images[:1])["pred"].shape == (1, 128, 128)


def test_artifact_takes_the_plain_jax_attention(monkeypatch):
  """In inference from CPU_FUSED_FROM tokens 'auto' takes the fused CPU kernel where it runs,
  a custom call of this process only: the artifact must take the plain JAX path instead (and
  can then be serialized and run anywhere)."""
  monkeypatch.setattr(jax, "device_count", lambda: 1)   # one device, as outside the tests
  cfg = segvit.get_config("variant=Mu/16,dataset=synthetic,res=256")
  cfg.data.image_size = (128, 256)                            # 8 x 16 = 128 tokens
  model, variables = api.build(cfg)
  assert model.backbone.attention_impl == "auto"
  x = jax.ShapeDtypeStruct((1, 128, 256, 3), np.float32)
  live = jax.jit(api.inference_fn(model)).lower(variables, x).as_text()
  if attention.resolve_impl("auto", np.float32, 32, 128) == "cpu_fused":
    assert "step_jax_cpu_attention" in live    # so that the check below can fail
  exp = export.export_inference(model, variables, (128, 256), platforms=("cpu",), batch=1)
  assert "step_jax_cpu_attention" not in exp.mlir_module()
  exp.serialize()


def test_parameter_files_round_trip(step_model, tmp_path):
  cfg, model, variables, *_ = step_model
  export.export_model(cfg, variables, str(tmp_path), model=model,
                      formats=("msgpack", "safetensors"))
  assert not (tmp_path / "model.jaxexport").exists()
  want = jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]
  from_msgpack = api.read_params(tmp_path)
  os.remove(tmp_path / "params.msgpack")
  from_st = api.read_params(tmp_path)                    # falls back to safetensors
  for tree in (from_msgpack, from_st):
    got = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert [p for p, _ in got] == [p for p, _ in want]
    for (p, a), (_, b) in zip(got, want):
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(p))
  # The config beside them rebuilds the same model.
  loaded, _ = api.load(tmp_path)
  assert loaded.merge == "dcts" and tuple(loaded.exit_layers) == tuple(model.exit_layers)
  assert json.load(open(tmp_path / "config.json"))["model"]["variant"] == "Mu/16"


def test_tf_saved_model_round_trip(step_model, tmp_path):
  tf = pytest.importorskip("tensorflow")
  cfg = _tiny_segvit()
  model, variables = api.build(cfg)
  images = _images(2, (32, 32))
  export.export_model(cfg, variables, str(tmp_path), formats=("tf",), platforms=("cpu",))
  loaded = tf.saved_model.load(str(tmp_path / "saved_model"))
  got = loaded.serve(tf.constant(images))
  want = jax.jit(api.inference_fn(model))(variables, images)
  assert_close(got["scores"].numpy(), want["scores"], 1e-5)
  # STEP: runs, or (TF 2.21 with JAX 0.10: top_k of the exits) a clear error at export time.
  cfg, model, variables, images, live = step_model
  try:
    export.export_model(cfg, variables, str(tmp_path / "step"), formats=("tf",),
                        platforms=("cpu",), model=model)
  except RuntimeError as e:
    assert "cannot run the StableHLO" in str(e)
    return
  got = tf.saved_model.load(str(tmp_path / "step" / "saved_model")).serve(tf.constant(images))
  assert_close(got["scores"].numpy(), live["scores"], 1e-5)


def test_export_rejects_bad_input(step_model, tmp_path):
  cfg, model, variables, *_ = step_model
  with pytest.raises(ValueError, match="unknown export formats"):
    export.export_model(cfg, variables, str(tmp_path), formats=("onnx",))
  with pytest.raises(ValueError, match="multiple of the patch size"):
    export.export_model(cfg, variables, str(tmp_path), formats=("jax",), image_size=(100, 128))
  with pytest.raises(ValueError, match="oracle"):
    export.export_inference(model.clone(merge="oracle"), variables, (128, 128))
  with pytest.raises(FileNotFoundError, match="exported=True"):
    api.load(tmp_path, exported=True)


def _tiny_segvit():
  cfg = segvit.get_config("variant=Mu/16,dataset=synthetic,smoke")
  cfg.data.update(image_size=(32, 32), num_train=4, num_eval=2)
  cfg.model.update(out_layers=(2,), head_layers=1, posemb_grid=(2, 2))
  return cfg


def make_workdir(path, cfg, step=3):
  """A training workdir with one checkpoint: random params (numpy, nothing compiled),
  the rest of the train state zeros, in the layout train.abstract_train_state describes."""
  from step_jax.training import optim  # pylint: disable=g-import-not-at-top
  from step_jax.training import train  # pylint: disable=g-import-not-at-top
  model, tx = variables_lib.create_model(cfg), optim.make_optimizer(cfg.optim)
  abstract = jax.eval_shape(functools.partial(train.init_state, model=model, tx=tx, config=cfg),
                            jax.random.key(0))
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  state["params"] = jax.tree.map(np.asarray, variables_lib.random_variables(
      model, tuple(cfg.data.image_size), seed=1)["params"])
  ck = ckpt_lib.Checkpointer(str(path))
  ck.save(step, state)
  ck.close()
  ckpt_lib.write_json(os.path.join(path, "config.json"), cfg.to_dict())
  return state["params"]


def test_cli_exports_a_workdir(tmp_path):
  cfg = _tiny_segvit()
  workdir, out = tmp_path / "run", tmp_path / "out"
  params = make_workdir(workdir, cfg)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "")
  res = subprocess.run([sys.executable, "-m", "step_jax.cli.export", f"--workdir={workdir}",
                        f"--out={out}", "--formats=jax,msgpack", "--platforms=cpu"],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "exported" in res.stdout
  meta = json.load(open(out / "export.json"))
  assert meta["image_size"] == [32, 32] and meta["platforms"] == ["cpu"]
  # The exported weights are the checkpoint's, and the artifact predicts as the live model.
  ex_model, ex_vars = api.load(out, exported=True)
  for a, b in zip(jax.tree.leaves(ex_vars["params"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  images = _images(2, (32, 32))
  want = jax.device_get(jax.jit(api.inference_fn(api.create_model(cfg)))(
      {"params": params}, images))
  pred, info = api.segment(ex_model, ex_vars, images)
  assert_close(info["scores"], want["scores"], 1e-5)
  assert (pred == want["pred"]).mean() > 0.999
  # Smaller images are padded to the exported size and cropped back; larger ones refused.
  pred, info = api.segment(ex_model, ex_vars, images[0, :20, :30].astype(np.uint8))
  assert pred.shape == (20, 30) and info["scores"].shape == (20, 30, 6)
  with pytest.raises(ValueError, match="larger than the exported input"):
    api.segment(ex_model, ex_vars, np.zeros((48, 32, 3), np.uint8))
  help_text = subprocess.run([sys.executable, "-m", "step_jax.cli.export", "--help"], cwd=REPO,
                             capture_output=True, text=True, timeout=120).stdout
  assert "--formats" in help_text and "--workdir" in help_text
